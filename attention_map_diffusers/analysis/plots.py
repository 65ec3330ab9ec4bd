"""Figures of the analysis, with matplotlib's object API on the Agg canvas.

Functions draw on an ``ax`` they are given or return a new :class:`~matplotlib.figure.Figure`.
Figures are made with ``Figure()`` + ``FigureCanvasAgg``, never through ``pyplot``, so no global
figure registry holds them; :func:`save_figure` writes atomically and clears the figure.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from ..atomic import atomic_path

HEAT_CMAP = "inferno"
OVERLAY_ALPHA = 0.6
SHARE_LABEL = "share of the words' attention"
CURVE_LABEL = "mean attention (share of all text positions)"
DISPLAY_SIDE = 512  # images are shown at most this many pixels on a side
OVERLAY_MIN_SIDE = 384  # overlays are upsampled to at least this many pixels on a side


def new_figure(width: float, height: float, layout: Optional[str] = None) -> Figure:
    """A figure of ``width`` x ``height`` inches on its own Agg canvas (no pyplot)."""
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def write_figure(fig: Figure, path: str, fmt: str = "png", dpi: int = 100) -> None:
    """Write ``fig`` to ``path`` (temp name, then rename); the figure stays usable."""
    # PNG: a fast zlib level (3): about as small as the default (6), written faster.
    kwargs = {"pil_kwargs": {"compress_level": 3}} if fmt == "png" else {}
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, **kwargs)


def save_figure(fig: Figure, path: str, fmt: str = "png", dpi: int = 100) -> None:
    """Write ``fig`` to ``path`` (temp name, then rename) and release its artists."""
    try:
        write_figure(fig, path, fmt, dpi)
    finally:
        fig.clear()


def display_image(image: Image.Image, max_side: int = DISPLAY_SIDE) -> np.ndarray:
    """(h, w, 3) uint8 RGB copy of ``image`` at most ``max_side`` pixels on its longer side."""
    img = image.convert("RGB")
    scale = max_side / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    return np.asarray(img)


def upsample(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    """(Hc, Wc) -> (height, width) by bilinear interpolation (pixel centres aligned, as align_corners=False)."""
    img = Image.fromarray(np.ascontiguousarray(heat, dtype=np.float32), mode="F")
    return np.asarray(img.resize((width, height), Image.BILINEAR), dtype=np.float32)


def draw_heatmap(ax, heat: np.ndarray, *, title: Optional[str] = None, vmax: Optional[float] = None):
    """The (Hc, Wc) map on its own grid (one square per cell); returns the image artist."""
    im = ax.imshow(heat, cmap=HEAT_CMAP, vmin=0.0, vmax=_vmax(heat, vmax), interpolation="nearest")
    _bare(ax, title)
    return im


def draw_overlay(ax, image: np.ndarray, heat: np.ndarray, *, title: Optional[str] = None, vmax: Optional[float] = None):
    """The map upsampled smoothly to the image and drawn over it; returns the map's artist."""
    h, w = image.shape[:2]
    scale = max(1.0, OVERLAY_MIN_SIDE / max(h, w))  # small images: upsample the map finer than their pixels
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)
    ax.imshow(image, interpolation="antialiased", extent=extent)
    im = ax.imshow(
        upsample(heat, round(h * scale), round(w * scale)),
        cmap=HEAT_CMAP,
        vmin=0.0,
        vmax=_vmax(heat, vmax),
        alpha=OVERLAY_ALPHA,
        interpolation="antialiased",
        extent=extent,
    )
    _bare(ax, title)
    return im


def heatmap_figure(heat: np.ndarray, title: str, image: Optional[np.ndarray] = None) -> Figure:
    """One map: the grid alone, and beside it the map over the image when one is given, with a colour bar."""
    panels = 1 if image is None else 2
    fig = new_figure(3.3 * panels + 0.7, 3.6)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    im = draw_heatmap(axes[0], heat, title="attention map")
    if image is not None:
        draw_overlay(axes[1], image, heat, title="over the image")
    cbar = fig.colorbar(im, ax=list(axes), fraction=0.046 / panels, pad=0.03)
    cbar.set_label(SHARE_LABEL)
    fig.suptitle(title)
    return fig


def summary_figure(
    image: Optional[np.ndarray], heats: Sequence[np.ndarray], titles: Sequence[str], *, overlay: bool = True, title: str = ""
) -> Figure:
    """The image, then one panel per map (over the image when ``overlay``), in one grid."""
    cells = len(heats) + (image is not None)
    cols = max(1, min(5, cells))
    rows = max(1, math.ceil(cells / cols))
    fig = new_figure(2.6 * cols, 2.8 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    k = 0
    if image is not None:
        axes[0].imshow(image, interpolation="antialiased")
        _bare(axes[0], "generated image")
        k = 1
    for heat, name in zip(heats, titles):
        if image is not None and overlay:
            draw_overlay(axes[k], image, heat, title=name)
        else:
            draw_heatmap(axes[k], heat, title=name)
        k += 1
    for ax in axes[k:]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def step_axis(ax, S: int, timesteps: Optional[np.ndarray], max_ticks: int = 8) -> None:
    """x axis of ``S`` steps in denoising order: ticks at steps, labelled ``step`` over ``t=timestep``
    (the step alone when the dump has no timesteps)."""
    stride = max(1, math.ceil(S / max_ticks))
    ticks = list(range(0, S, stride))
    ax.set_xticks(ticks)
    if timesteps is None:
        ax.set_xticklabels([str(i) for i in ticks], fontsize=8)
        ax.set_xlabel("denoising step (left = first, noisiest)")
    else:
        ax.set_xticklabels([f"{i}\nt={timesteps[i]:.0f}" for i in ticks], fontsize=8)
        ax.set_xlabel("denoising step (left = first, noisiest) / scheduler timestep")
    ax.set_xlim(-0.5, S - 0.5)


def draw_curves(ax, curves: np.ndarray, labels: Sequence[str], timesteps: Optional[np.ndarray]) -> None:
    """(S, m) curves, one line per label, against the denoising step."""
    x = np.arange(curves.shape[0])
    cmap = _palette(len(labels))
    for j, label in enumerate(labels):
        style = "-" if j < 10 else "--"
        ax.plot(x, curves[:, j], style, color=cmap[j], lw=1.6, marker="o" if len(x) == 1 else None, label=label)
    step_axis(ax, curves.shape[0], timesteps)
    ax.set_ylabel(CURVE_LABEL)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def curves_figure(curves: np.ndarray, labels: Sequence[str], timesteps: Optional[np.ndarray], title: str) -> Figure:
    """(S, m) curves with a legend outside the axes."""
    fig = new_figure(8.0, 4.2)
    ax = fig.subplots()
    draw_curves(ax, curves, labels, timesteps)
    ax.set_title(title)
    if labels:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def save_curves_per_block(
    curves: np.ndarray,
    labels: Sequence[str],
    timesteps: Optional[np.ndarray],
    titles: Sequence[str],
    paths: Sequence[str],
    fmt: str = "png",
    dpi: int = 100,
    on_saved: Optional[Callable[[], None]] = None,
) -> None:
    """One curves figure per block, drawn once and updated per block (much faster than a figure each).

    Args:
        curves: (Bk, S, m); block b's figure shows ``curves[b]``, titled ``titles[b]``, saved to ``paths[b]``.
    """
    fig = curves_figure(curves[0], labels, timesteps, titles[0])
    ax = fig.axes[0]
    lines = ax.get_lines()
    try:
        for b, path in enumerate(paths):
            for j, line in enumerate(lines):
                line.set_ydata(curves[b][:, j])
            top = float(curves[b].max(initial=0.0))
            ax.set_ylim(0.0, top * 1.05 if top > 0 else 1.0)
            ax.set_title(titles[b])
            write_figure(fig, path, fmt, dpi)
            if on_saved is not None:
                on_saved()
    finally:
        fig.clear()


def overview_figure(
    stepavg: np.ndarray,
    blockavg: np.ndarray,
    labels: Sequence[str],
    block_ids: Sequence[int],
    timesteps: Optional[np.ndarray],
    title: str,
) -> Figure:
    """Word x block (step-averaged) and word x step (block-averaged) attention side by side.

    Args:
        stepavg: (Bk, n) each word's curve averaged over steps, per block.
        blockavg: (S, n) each word's curve averaged over the blocks.
    """
    n = len(labels)
    fig = new_figure(12.0, min(60.0, 2.2 + 0.22 * max(n, 1)), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(len(block_ids), 1), max(blockavg.shape[0], 1) * 0.6]})
    vmax = float(max(stepavg.max(initial=0.0), blockavg.max(initial=0.0))) or 1.0
    im = ax1.imshow(stepavg.T, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
    ax1.set_yticks(range(n))
    ax1.set_yticklabels(labels, fontsize=8)
    stride = max(1, math.ceil(len(block_ids) / 24))
    ax1.set_xticks(range(0, len(block_ids), stride))
    ax1.set_xticklabels([str(b) for b in block_ids][::stride], fontsize=8)
    ax1.set_xlabel("block (transformer_blocks.i)")
    ax1.set_title("averaged over steps")
    ax2.imshow(blockavg.T, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
    ax2.set_yticks(range(n))
    ax2.set_yticklabels([])
    step_axis(ax2, blockavg.shape[0], timesteps, max_ticks=6)
    ax2.set_xlabel("denoising step" + (" / timestep" if timesteps is not None else ""))
    ax2.set_title("averaged over blocks")
    cbar = fig.colorbar(im, ax=[ax1, ax2], fraction=0.03, pad=0.01)
    cbar.set_label(CURVE_LABEL)
    fig.suptitle(title)
    return fig


def _vmax(heat: np.ndarray, vmax: Optional[float]) -> float:
    v = float(np.max(heat)) if vmax is None and heat.size else (vmax or 0.0)
    return v if v > 0 else 1.0


def _bare(ax, title: Optional[str]) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)


def _palette(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if n <= 10 else colormaps["tab20"]
    return [cmap(i % cmap.N) for i in range(n)]

