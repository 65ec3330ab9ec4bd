"""Figures of the concept maps (``analysis/concepts/``): matplotlib's object API on the Agg canvas.

Each function returns a new :class:`~matplotlib.figure.Figure` (:func:`.figure.new_figure`, no
pyplot); the numbers come from :mod:`.concepts`. Shapes: C concepts, (Hc, Wc) the canonical grid,
(H, W) the image, S steps.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .figure import new_figure, write_figure
from .plots import draw_heatmap, draw_overlay, rasters, step_axis
from .raster import greyscale
from .views import FigureFacts

SHARE_LABEL = "share of the concepts (softmax over concepts)"
EVEN_COLOUR = "#00e5ff"  # the 1/C mark on the colour bars: cyan stays visible on inferno


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(v):02x}" for v in rgb)


def concept_heatmap_figure(
    heat: np.ndarray, title: str, image: Optional[np.ndarray], *, vmax: float, C: int, facts: Optional[FigureFacts] = None,
    extend: bool = False,
) -> Figure:
    """One concept's (Hc, Wc) map on its grid, and over the image when one is given, with a colour bar
    from 0 to ``vmax`` (the same for every concept of the item) on which the even share 1/C is marked
    (``extend``: an arrow saying that some values lie above ``vmax``)."""
    panels = 1 if image is None else 2
    fig = new_figure(3.4 * panels + 1.3, 3.9, facts=facts)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    im = draw_heatmap(axes[0], heat, title="on the grid", vmax=vmax)
    if image is not None:
        draw_overlay(axes[1], image, heat, title="over the image", mappable=im)
    cbar = fig.colorbar(im, ax=list(axes), fraction=0.05, pad=0.03, extend="max" if extend else "neither")
    even = 1.0 / C
    cbar.set_label(f"{SHARE_LABEL}\ncyan line: the even share 1/C = {even:.3g}", fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    cbar.ax.axhline(even, color=EVEN_COLOUR, linewidth=2.0)
    fig.suptitle(title, fontsize=10)
    return fig


def save_concept_heatmaps(
    maps: np.ndarray, titles: Sequence[str], paths: Sequence[str], image: Optional[np.ndarray], *, vmax: float,
    fmt: str = "png", dpi: int = 100, facts: Optional[FigureFacts] = None, on_saved: Optional[Callable[[], None]] = None,
) -> None:
    """:func:`concept_heatmap_figure` of each of the (C, Hc, Wc) ``maps``, saved to ``paths``: one figure,
    laid out once and given each concept's map and title in turn (the colour scale is shared)."""
    C = maps.shape[0]
    fig = concept_heatmap_figure(maps[0], titles[0], image, vmax=vmax, C=C, facts=facts, extend=float(maps.max()) > vmax)
    for k in range(C):
        if k:
            for ax in fig.axes:
                for r in rasters(ax):
                    r.set_heat(maps[k])
            fig.suptitle(titles[k], fontsize=10)
        write_figure(fig, paths[k], fmt, dpi, facts)
        if k == 0:
            fig.set_layout_engine("none")  # the layout of the first is kept for the others
        if on_saved is not None:
            on_saved()


def concept_segmentation_figure(
    picture: np.ndarray, image: Optional[np.ndarray], names: Sequence[str], colours: np.ndarray, owners: Sequence[int],
    title: str, facts: Optional[FigureFacts] = None,
) -> Figure:
    """The winning concept of each pixel: ``picture`` (H, W, 3) uint8 in the concepts' colours, alone
    and blended over the image; the legend lists the concepts that own pixels."""
    from matplotlib.patches import Patch

    panels = 1 if image is None else 2
    fig = new_figure(4.0 * panels + 2.2, 4.4, facts=facts)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    axes[0].imshow(picture, interpolation="nearest")
    axes[0].set_title("winning concept per pixel", fontsize=9)
    if image is not None:
        h, w = picture.shape[:2]
        extent = (-0.5, w - 0.5, h - 0.5, -0.5)
        # the image in grey: the colours on it are the concepts' (a red object must not read as "red")
        axes[1].imshow(greyscale(np.asarray(image)), interpolation="antialiased", extent=extent)
        axes[1].imshow(picture, alpha=0.55, interpolation="nearest", extent=extent)
        axes[1].set_title("over the image", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(color=_hex(colours[k]), label=names[k]) for k in owners]
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False, title="concept")
    fig.suptitle(title, fontsize=10)
    return fig


def concept_steps_figure(
    pictures: np.ndarray, labels: Sequence[str], names: Sequence[str], colours: np.ndarray, owners: Sequence[int],
    title: str, image: Optional[np.ndarray] = None, facts: Optional[FigureFacts] = None,
) -> Figure:
    """The winning concept per pixel at K steps: ``pictures`` (K, H, W, 3) uint8 in the concepts'
    colours, one panel each (``labels``: its step or noise level), after the image when one is given,
    three to a row; the legend lists the concepts that own pixels in any of them."""
    from matplotlib.patches import Patch

    panels = ([("the image", np.asarray(image), "antialiased")] if image is not None else []) + [
        (label, picture, "nearest") for label, picture in zip(labels, pictures)]
    K = len(panels)
    cols = min(3, K)
    rows = -(-K // cols)
    fig = new_figure(2.6 * cols + 2.0, 2.6 * rows + 0.7, facts=facts)
    axes = fig.subplots(rows, cols, squeeze=False)
    for j in range(rows * cols):
        ax = axes[j // cols, j % cols]
        ax.set_xticks([])
        ax.set_yticks([])
        if j >= K:
            ax.set_visible(False)
            continue
        label, picture, interpolation = panels[j]
        h, w = pictures[0].shape[:2]
        ax.imshow(picture, interpolation=interpolation, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        ax.set_title(label, fontsize=9)
    handles = [Patch(color=_hex(colours[k]), label=names[k]) for k in owners]
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False, title="concept")
    fig.suptitle(title, fontsize=10)
    return fig


def concept_curves_figure(
    block_ids: Sequence[int], curves: np.ndarray, names: Sequence[str], colours: np.ndarray,
    timesteps: Optional[np.ndarray], title: str, facts: Optional[FigureFacts] = None,
) -> Figure:
    """Left: each concept's mean share per block (averaged over steps); right: per denoising step
    (averaged over the blocks). ``curves``: (k, S, C) of the k blocks with a concept stream."""
    fig = new_figure(11.0, 4.0, facts=facts)
    ax_b, ax_s = fig.subplots(1, 2)
    x = np.arange(len(block_ids))
    per_block, per_step = curves.mean(axis=1), curves.mean(axis=0)  # (k, C), (S, C)
    for c, name in enumerate(names):
        colour = _hex(colours[c])
        ax_b.plot(x, per_block[:, c], marker="o", markersize=3, color=colour, label=name)
        ax_s.plot(np.arange(per_step.shape[0]), per_step[:, c], marker="o", markersize=3, color=colour, label=name)
    ax_b.set_xticks(x, [str(b) for b in block_ids], fontsize=7)
    ax_b.set_xlabel("block (with a concept stream)", fontsize=8)
    ax_b.set_title("per block, averaged over the steps", fontsize=9)
    step_axis(ax_s, timesteps, S=per_step.shape[0])
    ax_s.set_title("per step, averaged over these blocks", fontsize=9)
    top = max(float(np.nanmax(curves)) * 1.05, 1.05 / max(len(names), 1))
    for ax in (ax_b, ax_s):
        ax.set_ylim(0.0, top)
        ax.axhline(1.0 / len(names), color="#999999", linestyle=":", linewidth=1)
        ax.set_ylabel("mean share over the pixels", fontsize=8)
        ax.grid(alpha=0.3)
    fig.legend(handles=ax_b.get_lines()[: len(names)], loc="outside right center", fontsize=8, frameon=False, title="concept")
    fig.suptitle(title, fontsize=10)
    return fig


def concept_block_curves_figure(
    block_ids: Sequence[int], curves: np.ndarray, names: Sequence[str], colours: np.ndarray, title: str,
    facts: Optional[FigureFacts] = None,
) -> Figure:
    """One small panel per block with a concept stream: each concept's mean share per denoising step
    (x, left = first), one y scale for all panels. ``curves``: (k, S, C)."""
    k, S, _ = curves.shape
    cols = min(6, k)
    rows = -(-k // cols)
    fig = new_figure(2.1 * cols + 1.8, 1.7 * rows + 0.8, facts=facts)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    top = float(np.nanmax(curves)) * 1.05
    for j in range(rows * cols):
        ax = axes[j // cols, j % cols]
        if j >= k:
            ax.set_visible(False)
            continue
        for c in range(len(names)):
            ax.plot(np.arange(S), curves[j, :, c], color=_hex(colours[c]), linewidth=1.2, label=names[c])
        ax.set_title(f"block {block_ids[j]}", fontsize=8)
        ax.set_ylim(0.0, top)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
        if j + cols >= k:  # the lowest panel of its column
            ax.set_xlabel("step (0 = first)", fontsize=7)
            ax.xaxis.set_tick_params(labelbottom=True)
        if j % cols == 0:
            ax.set_ylabel("mean share", fontsize=7)
    fig.legend(handles=axes[0, 0].get_lines(), loc="outside right center", fontsize=8, frameon=False, title="concept")
    fig.suptitle(title, fontsize=10)
    return fig
