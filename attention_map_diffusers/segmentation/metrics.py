"""Segmentation scores: numpy in, numpy out.

Every function takes an optional ``valid`` mask: pixels outside it (VOC's void label 255) take no
part in any score. Shapes: (H, W) per image; ``maps`` (n, H, W) for n concept words.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def _flat(a: np.ndarray, valid: Optional[np.ndarray]) -> np.ndarray:
    a = np.asarray(a)
    return a.reshape(-1) if valid is None else a[np.asarray(valid, dtype=bool)]


def minmax(m: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W) float64 in [0, 1]: ``(m - min) / (max - min)``; a constant map gives zeros."""
    m = np.asarray(m, dtype=np.float64)
    lo, hi = float(m.min()), float(m.max())
    if hi <= lo:
        return np.zeros_like(m)
    return (m - lo) / (hi - lo)


def iou(pred: np.ndarray, gt: np.ndarray, valid: Optional[np.ndarray] = None) -> float:
    """Intersection over union of two boolean (H, W) masks; 1.0 when both are empty, NaN never."""
    p, g = _flat(pred, valid).astype(bool), _flat(gt, valid).astype(bool)
    union = np.count_nonzero(p | g)
    return 1.0 if union == 0 else np.count_nonzero(p & g) / union


def pixel_accuracy(pred: np.ndarray, gt: np.ndarray, valid: Optional[np.ndarray] = None) -> float:
    """Share of (valid) pixels where the boolean masks agree; NaN when there is no valid pixel."""
    p, g = _flat(pred, valid).astype(bool), _flat(gt, valid).astype(bool)
    return float(np.mean(p == g)) if p.size else float("nan")


def average_precision(score: np.ndarray, gt: np.ndarray, valid: Optional[np.ndarray] = None) -> float:
    """Average precision of the pixels ranked by ``score`` against the boolean mask ``gt``.

    The step-wise definition: the mean over positive pixels of the precision at that pixel's score,
    where precision at score s is (positives with score >= s) / (pixels with score >= s). Tied scores
    form one threshold (all of them enter the ranking together), so the result does not depend on
    how ties are ordered; a constant map gives the positive rate. NaN when ``gt`` has no positive.
    """
    s, g = _flat(score, valid).astype(np.float64), _flat(gt, valid).astype(bool)
    n_pos = int(np.count_nonzero(g))
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, g = s[order], g[order]
    tp = np.cumsum(g)
    # the last position of each run of equal scores: where that threshold's ranking ends
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    tp_at, n_at = tp[ends], ends + 1
    new_pos = np.diff(np.r_[0, tp_at])  # positives entering at each threshold
    return float(np.sum(new_pos * (tp_at / n_at)) / n_pos)


def argmax_labels(maps: np.ndarray, bg_threshold: float) -> np.ndarray:
    """(n, H, W) normalised maps -> (H, W) int64: the position of each pixel's largest map (the first on
    ties), or -1 (background) where that largest value is below ``bg_threshold`` (and when n = 0)."""
    maps = np.asarray(maps)
    if maps.shape[0] == 0:
        return np.full(maps.shape[1:], -1, dtype=np.int64)
    labels = maps.argmax(axis=0).astype(np.int64)
    labels[maps.max(axis=0) < bg_threshold] = -1
    return labels


def multiclass_accuracy(labels: np.ndarray, gts: np.ndarray, valid: Optional[np.ndarray] = None) -> float:
    """Share of (valid) pixels whose label is right.

    Args:
        labels: (H, W) predicted concept position, -1 for background.
        gts: (n, H, W) boolean masks of the n concepts (they may overlap).
    A pixel labelled k is right when ``gts[k]`` covers it; a background pixel is right when no mask
    covers it. NaN when there is no valid pixel.
    """
    labels = np.asarray(labels)
    gts = np.asarray(gts, dtype=bool)
    covered = gts.any(axis=0) if gts.shape[0] else np.zeros(labels.shape, dtype=bool)
    right = ~covered & (labels < 0)
    for k in range(gts.shape[0]):
        right |= (labels == k) & gts[k]
    r = _flat(right, valid)
    return float(np.mean(r)) if r.size else float("nan")
