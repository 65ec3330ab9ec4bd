"""The figures of the evaluation (matplotlib object API on Agg, through the analysis' figure helpers)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from ..analysis.figure import new_figure
from ..analysis.plots import HEAT_CMAP, LINE_COLOURS
from .tables import SummaryRow

BASELINE_COLOUR = "#9e9e9e"
GT_COLOUR = "#00e5ff"  # mask outline: cyan stays visible over photos and over the inferno colour map
PRED_COLOUR = (1.0, 0.15, 0.6)


def summary_figure(rows: Sequence[SummaryRow], title: str) -> Figure:
    """Grouped bars of mIoU and mAP: one group per method, one bar per encoder; baselines grey and hatched."""
    methods = list(dict.fromkeys(r.method for r in rows))
    encoders = list(dict.fromkeys(r.encoder for r in rows))
    fig = new_figure(max(6.0, 1.3 * len(methods) * 2 + 1.5), 3.8)
    axes = fig.subplots(1, 2, sharey=True)
    width = 0.8 / max(1, len(encoders))
    by = {(r.method, r.encoder): r for r in rows}
    for ax, attr, name in ((axes[0], "miou", "mIoU"), (axes[1], "map", "mAP")):
        for j, e in enumerate(encoders):
            for i, m in enumerate(methods):
                r = by.get((m, e))
                if r is None:
                    continue
                v = getattr(r, attr)
                x = i - 0.4 + width * (j + 0.5)
                colour = LINE_COLOURS[j % len(LINE_COLOURS)]
                ax.bar(x, 0 if math.isnan(v) else 100 * v, width * 0.92, color=BASELINE_COLOUR if r.baseline else colour,
                       edgecolor=colour, hatch="//" if r.baseline else None, linewidth=1.2)
                if not math.isnan(v):
                    ax.text(x, 100 * v + 1, f"{100 * v:.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(methods)), [m + ("\n(baseline)" if m in ("whole", "centre", "random") else "") for m in methods], fontsize=8)
        ax.set_title(name)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("%")
    from matplotlib.patches import Patch

    handles = [Patch(color=LINE_COLOURS[j % len(LINE_COLOURS)], label=e) for j, e in enumerate(encoders)]
    handles.append(Patch(facecolor=BASELINE_COLOUR, hatch="//", edgecolor="#555555", label="baseline"))
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False, title="encoder")
    fig.suptitle(title, fontsize=10)
    return fig


@dataclass
class Case:
    """One (image, word) pair to draw."""

    label: str  # "best 1", "worst 2"
    key: str
    word: str
    iou: float
    ap: float
    image: Optional[np.ndarray]  # (H, W, 3) uint8 at the masks' size, or None
    gt: np.ndarray  # (H, W) bool
    pred: np.ndarray  # (H, W) bool
    heat: np.ndarray  # (H, W) in [0, 1]
    valid: Optional[np.ndarray] = None  # (H, W) bool


def _base(case: Case) -> np.ndarray:
    if case.image is not None:
        return case.image.astype(np.float64) / 255.0
    return np.full(case.gt.shape + (3,), 0.5)


def _outline(ax, mask: np.ndarray, colour=GT_COLOUR) -> None:
    if mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.6)


def cases_figure(cases: Sequence[Case], title: str) -> Figure:
    """Per case a row: the image with the mask outlined, the predicted mask over it, the heat map over it."""
    from matplotlib import colormaps

    rows = max(1, len(cases))
    fig = new_figure(10.5, 2.9 * rows + 0.4)
    axes = fig.subplots(rows, 3, squeeze=False)
    cmap = colormaps[HEAT_CMAP]
    for r, case in enumerate(cases):
        base = _base(case)
        pred_rgb = base.copy()
        pred_rgb[case.pred] = 0.45 * pred_rgb[case.pred] + 0.55 * np.array(PRED_COLOUR)
        heat_rgb = 0.4 * base + 0.6 * cmap(np.clip(case.heat, 0, 1))[..., :3]
        panels = (
            (base, f"{case.label}: {case.key}\n\u201c{case.word}\u201d (cyan = ground truth)"
                   + ("\nvoid pixels washed out" if case.valid is not None and not case.valid.all() else "")),
            (pred_rgb, f"predicted mask (pink, outlined)\nIoU {100 * case.iou:.1f}"),
            (heat_rgb, f"normalised map\nAP {100 * case.ap:.1f}"),
        )
        for c, (img, text) in enumerate(panels):
            ax = axes[r, c]
            if case.valid is not None and not case.valid.all():
                img = img.copy()
                img[~case.valid] = 0.5 * img[~case.valid] + 0.5  # void pixels washed out
            ax.imshow(img, interpolation="nearest")
            if c == 1:
                _outline(ax, case.pred, colour=PRED_COLOUR)
            _outline(ax, case.gt)
            ax.set_title(text, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    if not cases:
        axes[0, 0].text(0.5, 0.5, "no scored pairs", ha="center", va="center")
    fig.suptitle(title, fontsize=10)
    return fig
