"""The figures of the evaluation (matplotlib object API on Agg, through the analysis' figure helpers)."""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from ..analysis.figure import new_figure
from ..analysis.plots import HEAT_CMAP, LINE_COLOURS
from .tables import Z95, SummaryRow

BASELINE_COLOUR = "#9e9e9e"  # neutral: a baseline uses no text encoder, so it gets none of their colours
GT_COLOUR = "#00e5ff"  # mask outline: cyan stays visible over photos and over the inferno colour map
PRED_COLOUR = (1.0, 0.15, 0.6)
THRESHOLD_COLOUR = "#ffffff"  # the threshold's contour on the map (dashed), and its mark on the colour bar
ERROR_COLOUR = "#222222"
#: What the error bars are, for every figure and page that draws them.
ERROR_BARS = f"error bars: \u00b1{Z95:g} standard errors over the (image, word) pairs (95 %, normal approximation)"


def _n_label(rows: Sequence[SummaryRow]) -> str:
    ns = [r.n for r in rows]
    return f"n = {ns[0]}" if len(set(ns)) == 1 else "n = " + "/".join(str(n) for n in ns)


def summary_figure(rows: Sequence[SummaryRow], title: str) -> Figure:
    """Bars of mIoU and mAP in percent with their 95 % error bars: one group per method with a bar per
    encoder (encoder colours), then each baseline once (grey: no encoder). ``rows``: as
    :func:`~.tables.shown_rows` gives them (baselines with encoder :data:`~.tables.NO_ENCODER`)."""
    methods = list(dict.fromkeys(r.method for r in rows if not r.baseline))
    baselines = list(dict.fromkeys(r.method for r in rows if r.baseline))
    encoders = list(dict.fromkeys(r.encoder for r in rows if not r.baseline))
    colour = {e: LINE_COLOURS[j % len(LINE_COLOURS)] for j, e in enumerate(encoders)}
    groups = methods + baselines
    width_in = max(6.5, 1.25 * len(groups) * 2 + 1.8)
    fig = new_figure(width_in, 4.3)
    axes = fig.subplots(1, 2, sharey=True)
    width = 0.8 / max(1, len(encoders))
    for ax, attr, name in ((axes[0], "miou", "mIoU"), (axes[1], "map", "mAP")):
        labels = []
        for i, g in enumerate(groups):
            mine = [r for r in rows if r.method == g]
            labels.append(g + ("\n(baseline)" if g in baselines else "") + "\n" + _n_label(mine))
            for r in mine:
                if r.baseline:
                    x, w, c = i, min(0.8, 2 * width), BASELINE_COLOUR
                else:
                    j = encoders.index(r.encoder)
                    x, w, c = i - 0.4 + width * (j + 0.5), width * 0.92, colour[r.encoder]
                v, se = getattr(r, attr), getattr(r, attr + "_se")
                if math.isnan(v):
                    continue
                ax.bar(x, 100 * v, w, color=c, edgecolor="none")
                top = 100 * v
                if not math.isnan(se) and se > 0:  # the interval, cut to the 0-100 % a score can take
                    lo, hi = max(0.0, v - Z95 * se), min(1.0, v + Z95 * se)
                    ax.errorbar(x, 100 * v, yerr=[[100 * (v - lo)], [100 * (hi - v)]], color=ERROR_COLOUR, capsize=3,
                                linewidth=1.0)
                    top = 100 * hi
                ax.text(x, top + 1, f"{100 * v:.0f}", ha="center", va="bottom", fontsize=7)
        if baselines and methods:
            ax.axvline(len(methods) - 0.5, color="#cccccc", linewidth=0.8)
        ax.set_xticks(range(len(groups)), labels, fontsize=7)
        ax.set_title(f"{name} (%)")
        ax.set_ylim(0, 112)  # room for the value over a bar at 100 %
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)  # grid lines behind the bars
    axes[0].set_ylabel("% (mean over the (image, word) pairs)")
    from matplotlib.patches import Patch

    handles = [Patch(color=colour[e], label=e) for e in encoders]
    if baselines:
        handles.append(Patch(color=BASELINE_COLOUR, label="baseline\n(no encoder)"))
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False, title="encoder")
    fig.suptitle(title, fontsize=10)
    # wrapped to the figure's width (about 15 characters of 7 pt per inch)
    fig.supxlabel(textwrap.fill(ERROR_BARS + ", cut at 0 and 100 %; n: pairs scored", int(width_in * 15)), fontsize=7)
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
    threshold: Optional[float] = None  # the level of ``heat`` that the method thresholds (drawn dashed)


def _base(case: Case) -> np.ndarray:
    if case.image is not None:
        return case.image.astype(np.float64) / 255.0
    return np.full(case.gt.shape + (3,), 0.5)


def _outline(ax, mask: np.ndarray, colour=GT_COLOUR) -> None:
    if mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.6)


def cases_figure(cases: Sequence[Case], title: str, threshold_name: str = "tau") -> Figure:
    """Per case a row: the image with the mask outlined, the predicted mask over it, and the normalised
    map alone (the colours of the colour bar) with the mask outlined and the method's threshold as a
    dashed contour (``threshold_name``: what the threshold is called, e.g. "tau")."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    rows = max(1, len(cases))
    fig = new_figure(10.5, 2.9 * rows + 0.6)
    axes = fig.subplots(rows, 3, squeeze=False)
    cmap = colormaps[HEAT_CMAP]
    for r, case in enumerate(cases):
        base = _base(case)
        pred_rgb = base.copy()
        pred_rgb[case.pred] = 0.45 * pred_rgb[case.pred] + 0.55 * np.array(PRED_COLOUR)
        heat_rgb = cmap(np.clip(case.heat, 0, 1))[..., :3]
        level = "" if case.threshold is None else f"dashed: {threshold_name} {case.threshold:g}, "
        panels = (
            (base, f"{case.label}: {case.key}\n\u201c{case.word}\u201d (cyan = ground truth)"
                   + ("\nvoid pixels washed out" if case.valid is not None and not case.valid.all() else "")),
            (pred_rgb, f"predicted mask (pink, outlined)\nIoU {100 * case.iou:.1f} %"),
            (heat_rgb, f"normalised map\n{level}AP {100 * case.ap:.1f} %"),
        )
        for c, (img, text) in enumerate(panels):
            ax = axes[r, c]
            if case.valid is not None and not case.valid.all():
                img = img.copy()
                img[~case.valid] = 0.5 * img[~case.valid] + 0.5  # void pixels washed out
            ax.imshow(img, interpolation="nearest")
            if c == 1:
                _outline(ax, case.pred, colour=PRED_COLOUR)
            if c == 2 and case.threshold is not None and case.heat.min() < case.threshold <= case.heat.max():
                ax.contour(case.heat, levels=[case.threshold], colors=[THRESHOLD_COLOUR], linewidths=1.4,
                           linestyles="dashed")
            _outline(ax, case.gt)
            ax.set_title(text, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    if cases:
        bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap), ax=list(axes[:, 2]), fraction=0.05, pad=0.03,
                           aspect=12 * rows)
        bar.set_label("normalised map (0 = its minimum, 1 = its maximum)", fontsize=7)
        bar.ax.tick_params(labelsize=7)
        levels = sorted({c.threshold for c in cases if c.threshold is not None})
        for t in levels:
            bar.ax.axhline(t, color=THRESHOLD_COLOUR, linewidth=1.4, linestyle="dashed")
        if levels:
            bar.set_ticks(sorted({0.0, 1.0, *levels}))
    else:
        axes[0, 0].text(0.5, 0.5, "no scored pairs", ha="center", va="center")
    fig.suptitle(title, fontsize=10)
    return fig
