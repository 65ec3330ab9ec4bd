"""The numbers of the tables: per-image rows and the summary over a set (numpy and the standard library).

Units: the CSV files hold fractions (0 to 1); the terminal table, the figures and ``index.html``
show percentages and say so. Uncertainty: the standard error of a mean over the (image, word)
pairs, ``std (ddof 1) / sqrt(n)``; figures and pages draw mean +- 1.96 standard errors (a 95 %
interval under the normal approximation; pairs of one image are not independent, so it is a
lower bound of the real spread).
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .maps import BASELINES, MULTICLASS

PER_IMAGE_COLUMNS = ("encoder", "method", "word", "iou", "ap", "word_pixel_acc", "pred_px", "gt_px")
SUMMARY_COLUMNS = ("method", "encoder", "selection", "images", "n", "mIoU", "mIoU_se", "class_mIoU", "mAP", "mAP_se",
                   "word_pixel_acc", "image_pixel_acc")
IMAGES_COLUMNS = ("key", "encoder", "words", "image_pixel_acc")
SKIPPED_COLUMNS = ("key", "name", "reason")

#: The encoder shown for a baseline drawn once (its scores do not depend on the text encoder).
NO_ENCODER = "none"
#: Half-width of the intervals drawn, in standard errors (95 % under the normal approximation).
Z95 = 1.96


@dataclass(frozen=True)
class SummaryRow:
    """One method and encoder over the whole set (fractions)."""

    method: str
    encoder: str  # "clip", "t5", "both"; NO_ENCODER for a baseline over every pair
    selection: str  # "all", "blocks 0-5", "steps 0-2"
    images: int  # images with at least one scored word
    n: int  # scored (image, word) pairs
    miou: float  # mean IoU over the pairs
    miou_se: float  # its standard error (NaN below 2 pairs)
    class_miou: float  # mean over words (classes) of their mean IoU
    map: float  # mean AP over the pairs
    map_se: float
    word_pixel_acc: float  # mean over pairs of the share of pixels where the word's mask is right
    image_pixel_acc: float  # argmax only (else NaN): mean over images of the multi-class accuracy

    @property
    def baseline(self) -> bool:
        return self.method in BASELINES


def _clean(values) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def _mean(values) -> float:
    vals = _clean(values)
    return float(np.mean(vals)) if vals else float("nan")


def std_err(values) -> float:
    """Standard error of the mean of the finite ``values`` (NaN below two)."""
    vals = _clean(values)
    return float(np.std(vals, ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else float("nan")


def _row(method: str, encoder: str, selection: str, rows: Sequence, image_accs: Sequence[float]) -> SummaryRow:
    by_word = defaultdict(list)
    for r in rows:
        by_word[r.word.lower()].append(r.iou)
    ious, aps = [r.iou for r in rows], [r.ap for r in rows]
    return SummaryRow(
        method, encoder, selection, len({r.key for r in rows}), len(rows), _mean(ious), std_err(ious),
        _mean(_mean(v) for v in by_word.values()), _mean(aps), std_err(aps), _mean(r.pixel_acc for r in rows),
        _mean(image_accs) if method in MULTICLASS else float("nan"),
    )


def summarise(scores: Sequence, methods: Sequence[str], encoders: Sequence[str], selection: str,
              images: Sequence = ()) -> list[SummaryRow]:
    """Per method (in ``methods`` order) and encoder, the set's scores; pairs without rows are left out.
    ``images``: the :class:`~.evaluate.ImageEval` of the set, for argmax's per-image accuracy."""
    groups = defaultdict(list)
    for s in scores:
        groups[(s.method, s.encoder)].append(s)
    out = []
    for m in methods:
        for e in encoders:
            rows = groups.get((m, e))
            if rows:
                accs = [im.argmax_acc[e] for im in images if e in im.argmax_acc] if m in MULTICLASS else []
                out.append(_row(m, e, selection, rows, accs))
    return out


def shown_rows(scores: Sequence, rows: Sequence[SummaryRow]) -> list[SummaryRow]:
    """The rows to show: each method per encoder, then each baseline once, over every scored pair
    (a baseline's score of a pair does not depend on the encoder: the same map under each)."""
    methods = [r for r in rows if not r.baseline]
    selection = rows[0].selection if rows else "all"
    once = []
    for m in dict.fromkeys(r.method for r in rows if r.baseline):
        pairs = {}
        for s in scores:
            if s.method == m:
                pairs.setdefault((s.key, s.word), s)
        once.append(_row(m, NO_ENCODER, selection, list(pairs.values()), []))
    return methods + once


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6f}"
    return str(v)


def csv_text(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_fmt(v) for v in r])
    return buf.getvalue()


def per_image_csv(scores: Sequence) -> str:
    return csv_text(PER_IMAGE_COLUMNS, [(s.encoder, s.method, s.word, s.iou, s.ap, s.pixel_acc, s.pred_px, s.gt_px) for s in scores])


def images_csv(images: Sequence) -> str:
    """One row per image and encoder: argmax's multi-class pixel accuracy (background included)."""
    rows = []
    for im in images:
        for enc, acc in im.argmax_acc.items():
            words = sum(1 for s in im.scores if s.encoder == enc and s.method in MULTICLASS)
            rows.append((im.key, enc, words, acc))
    return csv_text(IMAGES_COLUMNS, rows)


def summary_csv(rows: Sequence[SummaryRow]) -> str:
    return csv_text(SUMMARY_COLUMNS, [
        (r.method, r.encoder, r.selection, r.images, r.n, r.miou, r.miou_se, r.class_miou, r.map, r.map_se,
         r.word_pixel_acc, r.image_pixel_acc if r.method in MULTICLASS else "")  # one meaning per column
        for r in rows
    ])


def skipped_csv(skips: Sequence) -> str:
    return csv_text(SKIPPED_COLUMNS, [(s.key, s.name, s.reason) for s in skips])


def pct(v: float, width: int = 0) -> str:
    """A fraction as a percentage with one decimal ("-" for NaN)."""
    return f"{'-' if math.isnan(v) else f'{100 * v:.1f}':>{width}}"


def text_table(rows: Sequence[SummaryRow]) -> str:
    """A short fixed-width table for the terminal, in percent (the CSV files hold fractions)."""
    w = max([8] + [len(r.method) for r in rows])  # concept-argmax is wider than 8
    head = (f"{'method':<{w}} {'encoder':<8} {'n':>6} {'mIoU':>6} {'+-':>5} {'cls-mIoU':>8} {'mAP':>6} {'+-':>5} "
            f"{'word-acc':>8} {'img-acc':>7}")
    lines = ["in % (the CSV files hold fractions); +- = 1.96 standard errors over the pairs (95 %); word-acc: "
             "pixel accuracy of each word's mask, img-acc: argmax's (and concept-argmax's) multi-class accuracy per image", head, "-" * len(head)]
    for r in rows:
        tag = " (baseline)" if r.baseline else ""
        lines.append(
            f"{r.method:<{w}} {r.encoder:<8} {r.n:>6} {pct(r.miou, 6)} {pct(Z95 * r.miou_se, 5)} {pct(r.class_miou, 8)} "
            f"{pct(r.map, 6)} {pct(Z95 * r.map_se, 5)} {pct(r.word_pixel_acc, 8)} {pct(r.image_pixel_acc, 7)}{tag}"
        )
    return "\n".join(lines)


def best_method(rows: Sequence[SummaryRow]):
    """The non-baseline (method, encoder) with the highest mIoU (the first on ties), else the best row."""
    pool = [r for r in rows if not r.baseline] or list(rows)
    pool = [r for r in pool if not math.isnan(r.miou)]
    return max(pool, key=lambda r: r.miou) if pool else None
