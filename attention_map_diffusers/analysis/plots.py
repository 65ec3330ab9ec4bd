"""Figures of the analysis, with matplotlib's object API on the Agg canvas.

Functions draw on an ``ax`` they are given or return a new :class:`~matplotlib.figure.Figure`
(made by :func:`.figure.new_figure`, never through ``pyplot``, so no global figure registry holds
them; :func:`.figure.save_figure` writes them atomically). Maps are drawn by :mod:`.raster`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

from .pngfile import write_png
from .figure import PHOTO, Blitter, footer_band, footer_width, new_figure, set_width, write_figure
from .layout import (
    EDGE, EVEN_COLOUR, EVEN_LABEL, LABEL_PAD, colorbar_band, fixed_layout, fontsize_of, legend_width, mark_even, new_colorbar,
    place_colorbar, place_labels,
    suptitle_band, suptitle_height, suptitle_width, text_height, text_width, tick_labels, tick_size, title_band, x_axis_band, y_axis_band,
)
from .raster import MapRaster, greyscale
from .views import MAX_LINES, TEXT_SHARE, WORD_SHARE, FigureFacts, even_note  # noqa: F401 - FigureFacts is part of this API

HEAT_CMAP = "inferno"
OVERLAY_ALPHA = 0.6
SHARE_LABEL = WORD_SHARE
CURVE_LABEL = f"mean attention ({TEXT_SHARE})"
STEP_LABEL = "denoising step (left = first, noisiest)"
LEVEL_LABEL = "noise level \u03c3 (independent levels of the given image, noisiest first)"
DISPLAY_SIDE = 512  # images are drawn (under the maps) at most this many pixels on a side
# Eight colours that stay distinct (tab10 without its grey and olive)
LINE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
CBAR_GAP, CBAR_WIDTH = 0.12, 0.16  # inches between panels and their colour bar, and its width
# inches of a map panel's longer side, per figure (the figures' dpi is chosen from them: views.sensible_dpi)
HEATMAP_SIDE, SUMMARY_SIDE, SEGMENTATION_SIDE, PAIR_SIDE, STRIP_SIDE, SPREAD_SIDE = 3.2, 2.45, 4.0, 1.9, 1.5, 2.3


def display_image(image: Image.Image, max_side: int = DISPLAY_SIDE) -> np.ndarray:
    """(h, w, 3) uint8 RGB copy of ``image`` at most ``max_side`` pixels on its longer side."""
    img = image.convert("RGB")
    scale = max_side / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    return np.asarray(img)


def draw_heatmap(ax, heat: np.ndarray, *, title: Optional[str] = None, vmax: Optional[float] = None, cmap: str = HEAT_CMAP):
    """The (Hc, Wc) map on its own grid (one square per cell); returns its mappable (for a colour bar,
    and whose ``set_clim`` rescales the picture too)."""
    mappable = ScalarMappable(Normalize(0.0, _vmax(heat, vmax)), cmap)
    MapRaster(ax, heat, mappable)
    _bare(ax, title)
    return mappable


def draw_overlay(ax, image: np.ndarray, heat: np.ndarray, *, title: Optional[str] = None, vmax: Optional[float] = None,
                 mappable: Optional[ScalarMappable] = None):
    """The map upsampled smoothly to the image's box and blended over it; returns its mappable (for a
    colour bar; ``mappable``: one to share, e.g. with the map drawn alone beside it).

    The axes' data box is the image's, in its pixels; map and image are resampled to the panel's
    pixel size when drawn (:class:`~.raster.MapRaster`).
    """
    if mappable is None:
        mappable = ScalarMappable(Normalize(0.0, _vmax(heat, vmax)), HEAT_CMAP)
    MapRaster(ax, heat, mappable, image=image, alpha=OVERLAY_ALPHA)
    _bare(ax, title)
    return mappable


def rasters(ax) -> list[MapRaster]:
    """The maps drawn in ``ax`` by :func:`draw_heatmap` / :func:`draw_overlay`."""
    return [a for a in ax.artists if isinstance(a, MapRaster)]


def heatmap_figure(
    heat: np.ndarray, title: str, image: Optional[np.ndarray] = None, *, vmax: Optional[float] = None,
    scale: str = "", facts: Optional[FigureFacts] = None, room_for: Sequence[float] = (), even: Optional[float] = None,
    titles: Sequence[str] = (),
) -> Figure:
    """One map: the grid alone, and beside it the map over the image when one is given, with a colour bar.

    ``vmax`` is the colour scale's top (values above it saturate), ``scale`` says how it was chosen.
    ``room_for``: further scale tops the figure will be redrawn with (the colour bar's labels get room for each).
    ``even``: the even split 1/n, marked on the colour bar (:func:`~.layout.mark_even`). ``titles``:
    further titles the figure will be redrawn with (the figure is made wide enough for each).
    """
    panels = 1 if image is None else 2
    side, gap = HEATMAP_SIDE, 0.1  # inches
    top = suptitle_height(title) + title_band(9)
    bottom = EDGE + footer_band(facts)
    fig = new_figure(10.0, top + side + bottom, layout=None)  # its width and footer once the colour bar is measured
    suptitle_band(fig, title)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    im = draw_heatmap(axes[0], heat, title="attention map", vmax=vmax)
    if image is not None:
        draw_overlay(axes[1], image, heat, title="over the image", mappable=im)
    notes = [n for n in (scale, even_note(even)) if n]
    cbar = new_colorbar(fig, im, bottom=bottom, top=top, label=SHARE_LABEL + "".join(f"\n({n})" for n in notes),
                        extend="max" if vmax is not None else "neither")
    if even is not None:
        mark_even(cbar, even)
    band = colorbar_band(cbar)
    clim = im.get_clim()
    for v in room_for:
        im.set_clim(0.0, v)
        band = max(band, colorbar_band(cbar))
    im.set_clim(*clim)
    right = CBAR_GAP + CBAR_WIDTH + band + EDGE
    set_width(fig, max(EDGE + panels * side + (panels - 1) * gap + right, suptitle_width([title, *titles])), facts)
    fixed_layout(fig, top=top, bottom=bottom, left=EDGE, right=right, wspace=gap / side)
    place_colorbar(fig, cbar.ax, list(axes), gap=CBAR_GAP, width=CBAR_WIDTH)
    return fig


def save_heatmap_figures(
    heats: Sequence[np.ndarray], titles: Sequence[str], paths: Sequence[str], image: Optional[np.ndarray] = None, *,
    vmaxes: Sequence[Optional[float]], scale: str = "", fmt: str = "png", dpi: int = 100,
    on_saved: Optional[Callable[[], None]] = None, facts: Optional[FigureFacts] = None, even: Optional[float] = None,
) -> None:
    """:func:`heatmap_figure` of each map, saved to ``paths``: one figure, built once and updated per
    map (its maps, colour scale and title), as building one costs about as much as drawing it; PNGs
    are blitted (the footer is drawn once). The colour bar's "values above" arrow follows the first
    map's ``vmax`` (given or None): give every map a ``vmax``, or none.

    Args:
        heats: (Hc, Wc) maps; ``titles``, ``paths``, ``vmaxes``: one per map, as in :func:`heatmap_figure`.
    """
    if not heats:
        return
    fig = heatmap_figure(heats[0], titles[0], image, vmax=vmaxes[0], scale=scale, facts=facts,
                         room_for=[_vmax(h, v) for h, v in zip(heats, vmaxes)], even=even, titles=titles)
    maps = [r for ax in fig.axes for r in rasters(ax)]  # the map alone and over the image: one mappable
    blit = Blitter(fig, [*fig.axes, fig._suptitle], dpi) if fmt == "png" else None  # every axes changes; the footer not
    for heat, title, vmax, path in zip(heats, titles, vmaxes, paths):
        for r in maps:
            r.set_heat(heat)
        maps[0].mappable.norm.vmax = _vmax(heat, vmax)  # pictures and colour bar follow (one update, not set_clim's two)
        suptitle_band(fig, title)
        if blit is not None:
            blit.write(path, facts)
        else:
            write_figure(fig, path, fmt, dpi, facts)
        if on_saved is not None:
            on_saved()


def summary_figure(
    image: Optional[np.ndarray], heats: Sequence[np.ndarray], titles: Sequence[str], *, overlay: bool = True, title: str = "",
    vmaxes: Optional[Sequence[float]] = None, facts: Optional[FigureFacts] = None, even: Optional[float] = None,
) -> Figure:
    """One panel per map (over ``image`` when ``overlay``), each with its colour bar, in a grid of up to 4 columns.

    Without ``overlay`` the image gets a panel of its own first. ``vmaxes``: each map's colour scale
    top; ``even``: the even split 1/n, marked on every colour bar.
    Panels and colour bars are placed in inches (no layout engine, no space stolen from the panels).
    """
    show_image = image is not None and not overlay
    cells = len(heats) + show_image
    cols = max(1, min(4, cells))
    rows = max(1, math.ceil(cells / cols))
    side, vgap, ticks = SUMMARY_SIDE, 0.2, 7  # inches: a panel's longer side, between rows; points: colour bar tick labels
    gap, bar_w = CBAR_GAP / 2, CBAR_WIDTH * 0.7  # inches: panel to its colour bar, the bar (narrower than elsewhere)
    h, w = (image.shape[:2] if image is not None else heats[0].shape) if cells else (1, 1)
    pw, ph = (side, side * h / w) if w >= h else (side * w / h, side)
    head = suptitle_height(title) if title else EDGE
    above = title_band(9)  # each panel's title
    bottom = EDGE + footer_band(facts)
    # the width once the bars are measured
    fig = new_figure(10.0, head + rows * (above + ph) + (rows - 1) * vgap + bottom, layout=None)
    if title:
        suptitle_band(fig, title)
    H = fig.get_figheight()

    panels = []  # (axes, its colour bar or None), placed once the widths are known
    if show_image:
        ax = fig.add_axes((0, 0, 0.1, 0.1))
        ax.imshow(image, interpolation="antialiased", gid=PHOTO)
        _bare(ax, "generated image")
        panels.append((ax, None))
    for m, (heat, name) in enumerate(zip(heats, titles)):
        vmax = vmaxes[m] if vmaxes is not None else None
        ax = fig.add_axes((0, 0, 0.1, 0.1))
        if image is not None and overlay:
            im = draw_overlay(ax, image, heat, title=name, vmax=vmax)
        else:
            im = draw_heatmap(ax, heat, title=name, vmax=vmax)
        cbar = new_colorbar(fig, im, bottom=0.0, top=H - ph, ticks_size=ticks, extend="max" if vmax is not None else "neither")
        if even is not None:
            mark_even(cbar, even)
        panels.append((ax, cbar))
    band = max([colorbar_band(cb, ticks) for _, cb in panels if cb is not None] + [0.0])
    lead = max(0.0, (text_width([ax.get_title() for ax, _ in panels] or [""], 9) - pw) / 2)  # titles wider than a panel
    col_w = lead + pw + max(gap + bar_w + band, lead) + 0.25
    W = max(EDGE + cols * col_w - 0.25 + EDGE, footer_width(facts), suptitle_width([title]))  # one narrow panel: room for the footer and title
    set_width(fig, W, facts)
    for k, (ax, cbar) in enumerate(panels):
        r, c = divmod(k, cols)
        x = EDGE + c * col_w + lead
        y = head + above + r * (above + ph + vgap)
        ax.set_position((x / W, 1.0 - (y + ph) / H, pw / W, ph / H))
        if cbar is not None:
            cbar.ax.set_position(((x + pw + gap) / W, 1.0 - (y + ph) / H, bar_w / W, ph / H))
    return fig


def step_ticks(S: int, max_ticks: int = 8) -> list[int]:
    """At most about ``max_ticks`` step positions of ``S``, evenly strided from 0."""
    return list(range(0, S, max(1, math.ceil(S / max_ticks))))


def step_axis(ax, timesteps: Optional[np.ndarray], max_ticks: int = 8, label: str = STEP_LABEL, S: Optional[int] = None,
              levels: Optional[np.ndarray] = None) -> None:
    """x axis in denoising order: ticks at steps, labelled ``step`` over ``t=timestep`` when timesteps are known.

    ``levels``: (S,) noise levels σ of a given-image run (:mod:`.given`): ticks labelled σ instead."""
    S = len(timesteps) if timesteps is not None else len(levels) if levels is not None else int(S or 0)
    ticks = step_ticks(S, max_ticks)
    ax.set_xticks(ticks)
    if levels is not None:
        ax.set_xticklabels([f"\u03c3={levels[i]:.2f}" for i in ticks], fontsize=7)
        label = LEVEL_LABEL
    elif timesteps is not None and len(timesteps):
        ax.set_xticklabels([f"{i}\nt={timesteps[i]:.0f}" for i in ticks], fontsize=7)
        label = label + " / timestep t"
    else:
        ax.set_xticklabels([str(i) for i in ticks], fontsize=7)
    ax.set_xlim(-0.5, S - 0.5)
    ax.set_xlabel(label, fontsize=8)


def _step_tick_lines(timesteps: Optional[np.ndarray]) -> int:
    """Lines of :func:`step_axis`'s tick labels."""
    return 2 if timesteps is not None and len(timesteps) else 1


def line_chunks(m: int, per_axis: int = MAX_LINES) -> list[range]:
    """Lines 0..m-1 in chunks of at most ``per_axis`` (one axis each)."""
    return [range(a, min(m, a + per_axis)) for a in range(0, max(m, 1), per_axis)]


BAND_ALPHA = 0.15  # a band's fill; its edges are outlined in the line's colour so that overlapping bands stay apart


def draw_bands(ax, x: np.ndarray, lower: np.ndarray, upper: np.ndarray, colours: Optional[Sequence[str]] = None) -> None:
    """(S, m) bands between ``lower`` and ``upper``, band j in ``colours[j]`` (default: :func:`line_colours`)
    at :data:`BAND_ALPHA` opacity with its upper and lower edges drawn as thin dashed lines of that
    colour, under the lines: what ``fill_between`` draws (within 2 levels), as plain polygon
    collections, which cost a fraction of its shape checks. One collection per band: in a single
    collection Agg draws overlapping polygons differently."""
    from matplotlib.collections import PolyCollection

    colours = line_colours(lower.shape[1], colours)

    def outline(j, colour):
        for edge in (upper[:, j], lower[:, j]):
            ax.plot(x, edge, "--", color=colour, lw=0.7, alpha=0.8, zorder=1.5)

    if not (np.isfinite(lower).all() and np.isfinite(upper).all()):  # gaps: fill_between leaves them out
        for j in range(lower.shape[1]):
            ax.fill_between(x, lower[:, j], upper[:, j], color=colours[j], alpha=BAND_ALPHA, lw=0)
            outline(j, colours[j])
        return
    xs = np.concatenate([x, x[::-1]])
    for j in range(lower.shape[1] if len(x) else 0):
        colour = colours[j]
        verts = np.column_stack([xs, np.concatenate([upper[:, j], lower[::-1, j]])])
        ax.add_collection(PolyCollection([verts], facecolors=colour, edgecolors=colour, linewidths=0, alpha=BAND_ALPHA, zorder=1),
                          autolim=False)
        outline(j, colour)


def line_colours(m: int, colours: Optional[Sequence[str]] = None) -> list[str]:
    """``colours`` (one per line, e.g. :meth:`.colours.WordColours.colours`), or :data:`LINE_COLOURS` in turn."""
    if colours is not None:
        if len(colours) < m:
            raise ValueError(f"{m} lines need {m} colours, got {len(colours)}")
        return list(colours)
    return [LINE_COLOURS[j % len(LINE_COLOURS)] for j in range(m)]


def line_styles(colours: Sequence[str]) -> list[str]:
    """Solid for a colour's first line, then dashed, dotted, dash-dotted: two words of one colour
    (the same text twice, "a #0" and "a #6") stay apart."""
    seen: dict[str, int] = {}
    out = []
    for c in colours:
        out.append(("-", "--", ":", "-.")[min(seen.get(c, 0), 3)])
        seen[c] = seen.get(c, 0) + 1
    return out


def draw_curves(ax, curves: np.ndarray, labels: Sequence[str], timesteps: Optional[np.ndarray], *, spread: Optional[np.ndarray] = None,
                S: Optional[int] = None, colours: Optional[Sequence[str]] = None, levels: Optional[np.ndarray] = None) -> list:
    """(S, m) curves, one line per label in ``colours`` (one per label: the words' own colours;
    default :data:`LINE_COLOURS` in turn), against the denoising step.

    ``spread``: (S, m) drawn as a band of +-spread around each line (e.g. the std over seeds).
    ``levels``: (S,) noise levels σ of a given-image run: independent measurements, so one marker
    per level and no joining line, on a σ axis.
    """
    x = np.arange(curves.shape[0])
    colours = line_colours(len(labels), colours)
    lines = []
    for j, (label, style) in enumerate(zip(labels, line_styles(colours))):
        if levels is not None:
            (line,) = ax.plot(x, curves[:, j], linestyle="None", color=colours[j], marker="o", ms=5, label=label)
        else:
            (line,) = ax.plot(x, curves[:, j], style, color=colours[j], lw=1.6, marker="o" if len(x) < 3 else None, ms=3, label=label)
        lines.append(line)
    ax.set_ylabel(CURVE_LABEL, fontsize=8)
    if spread is not None:
        if levels is not None:  # independent levels: error bars at the markers, no band joining two levels
            for j in range(curves.shape[1]):
                ax.errorbar(x, curves[:, j], yerr=spread[:, j], fmt="none", ecolor=colours[j], elinewidth=1.0, capsize=3)
        else:
            draw_bands(ax, x, curves - spread, curves + spread, colours)
        top = float(np.nanmax(curves + spread, initial=0.0))  # the band's top, not the mean's: no band is clipped
        ax.set_ylim(0.0, top * 1.05 if top > 0 else 1.0)
    else:
        ax.set_ylim(bottom=0)
    step_axis(ax, timesteps, S=S if timesteps is None else None, levels=levels)
    ax.grid(alpha=0.3)
    return lines


def curves_figure(
    curves: np.ndarray, labels: Sequence[str], timesteps: Optional[np.ndarray], title: str, *, ymax: Optional[float] = None,
    spread: Optional[np.ndarray] = None, scale_text: str = "", facts: Optional[FigureFacts] = None,
    colours: Optional[Sequence[str]] = None,
    levels: Optional[np.ndarray] = None,
) -> Figure:
    """(S, m) curves, at most :data:`MAX_LINES` per axis (further lines on further axes below), legends outside.

    ``ymax``: a y scale shared with other figures (stated by ``scale_text``). ``colours``: one per line.
    ``levels``: see :func:`draw_curves`.
    """
    colours = line_colours(len(labels), colours)
    chunks = line_chunks(len(labels))
    if ymax is None and spread is not None:  # one scale for every chunk's axis, from the bands' tops
        top_band = float(np.nanmax(curves + spread, initial=0.0))
        ymax = top_band * 1.05 if top_band > 0 else 1.0
    panel_w, panel_h, vgap = 5.6, 2.7, 0.3  # inches
    head = title + (f"\n{scale_text}" if scale_text else "")
    top = suptitle_height(head, 10)
    bottom = EDGE + footer_band(facts) + x_axis_band(7, _step_tick_lines(timesteps), 8)
    right = legend_width(labels, 8) + EDGE
    h = len(chunks) * panel_h + (len(chunks) - 1) * vgap
    fig = new_figure(8.5, top + h + bottom - footer_band(facts), layout=None, facts=facts)
    suptitle_band(fig, head, 10)
    axes = fig.subplots(len(chunks), 1, squeeze=False, sharex=True, sharey=True)[:, 0]
    for ax, chunk in zip(axes, chunks):
        sub = list(chunk)
        draw_curves(ax, curves[:, sub], [labels[j] for j in sub], timesteps,
                    spread=None if spread is None else spread[:, sub], S=curves.shape[0], colours=[colours[j] for j in sub],
                    levels=levels)
        if sub and labels:
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
        if ymax is not None:
            ax.set_ylim(0.0, ymax)
    for ax in axes[:-1]:
        ax.set_xlabel("")
    left = 1.0  # provisional, to measure the y tick labels at the panels' final height
    fixed_layout(fig, top=top, bottom=bottom, left=left, right=right, hspace=vgap / panel_h)
    left = EDGE + y_axis_band(tick_labels(axes[0].yaxis), tick_size(axes[0].yaxis), 8)
    set_width(fig, left + max(panel_w, 8.5 - left - right) + right, facts)
    fixed_layout(fig, top=top, bottom=bottom, left=left, right=right, hspace=vgap / panel_h)
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
    facts: Optional[FigureFacts] = None,
    colours: Optional[Sequence[str]] = None,
    levels: Optional[np.ndarray] = None,
) -> None:
    """One curves figure per block, drawn once and updated per block (much faster than a figure each).

    Every block's figure has the same y scale (0 to the largest value of any block), so that flipping
    through blocks compares like with like.

    Args:
        curves: (Bk, S, m); block b's figure shows ``curves[b]``, titled ``titles[b]``, saved to ``paths[b]``.
    """
    top = float(np.max(curves, initial=0.0))
    ymax = top * 1.05 if top > 0 else 1.0
    fig = curves_figure(curves[0], labels, timesteps, titles[0], ymax=ymax,
                        scale_text="same y scale for every block", facts=facts, colours=colours, levels=levels)
    chunks = line_chunks(len(labels))
    axes = [ax for ax in fig.axes if ax.get_lines()]
    lines = [(ax, j, line) for ax, chunk in zip(axes, chunks) for j, line in zip(chunk, ax.get_lines())]
    if fmt == "png":
        _blit_blocks(fig, curves, lines, titles, paths, dpi, on_saved, facts)
        return
    for b, path in enumerate(paths):
        for _, j, line in lines:
            line.set_ydata(curves[b][:, j])
        suptitle_band(fig, titles[b] + "\nsame y scale for every block", 10)
        write_figure(fig, path, fmt, dpi, facts)
        if on_saved is not None:
            on_saved()


def _blit_blocks(fig: Figure, curves: np.ndarray, lines: list, titles: Sequence[str], paths: Sequence[str], dpi: int,
                 on_saved: Optional[Callable[[], None]], facts: Optional[FigureFacts]) -> None:
    """PNGs of one figure whose lines and title change: the rest (axes, ticks, legend, footer) is
    rendered once and each block only draws its lines and title (:class:`Blitter`)."""
    suptitle_band(fig, titles[0] + "\nsame y scale for every block", 10)
    title = fig._suptitle
    blit = Blitter(fig, [line for _, _, line in lines] + [title], dpi)
    for b, path in enumerate(paths):
        for _, j, line in lines:
            line.set_ydata(curves[b][:, j])
        title.set_text(titles[b] + "\nsame y scale for every block")
        blit.write(path, facts)
        if on_saved is not None:
            on_saved()


def overview_figure(
    stepavg: np.ndarray, blockavg: np.ndarray, labels: Sequence[str], block_ids: Sequence[int], timesteps: Optional[np.ndarray],
    title: str, facts: Optional[FigureFacts] = None, levels: Optional[np.ndarray] = None,
) -> Figure:
    """Word x block (step-averaged) and word x step (block-averaged) attention side by side.

    Args:
        stepavg: (Bk, n) each word's curve averaged over steps, per block.
        blockavg: (S, n) each word's curve averaged over the blocks.
    """
    n = len(labels)
    S = blockavg.shape[0]
    fig = new_figure(12.0, min(60.0, 3.6 + 0.2 * max(n, 1)), layout=None, facts=facts)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(len(block_ids), 1), max(S, 1) * 0.6]})
    vmax = float(max(stepavg.max(initial=0.0), blockavg.max(initial=0.0))) or 1.0
    im = ScalarMappable(Normalize(0.0, vmax), "viridis")
    MapRaster(ax1, stepavg.T, im, aspect="auto")
    ax1.set_yticks(range(n))
    ax1.set_yticklabels(labels, fontsize=8)
    stride = max(1, math.ceil(len(block_ids) / 24))
    ax1.set_xticks(range(0, len(block_ids), stride))
    ax1.set_xticklabels([str(b) for b in block_ids][::stride], fontsize=7)
    ax1.set_xlabel("block (transformer_blocks.i)", fontsize=8)
    ax1.set_title("averaged over steps", fontsize=9)
    MapRaster(ax2, blockavg.T, im, aspect="auto")
    ax2.set_yticks(range(n))
    ax2.set_yticklabels([])
    step_axis(ax2, timesteps, max_ticks=6, S=S, levels=levels)
    ax2.set_title("averaged over blocks", fontsize=9)
    top = suptitle_band(fig, title) + title_band(9)
    bottom = EDGE + footer_band(facts) + x_axis_band(7, _step_tick_lines(timesteps), 8)
    cbar = new_colorbar(fig, im, bottom=bottom, top=top, label=f"mean attention\n({TEXT_SHARE})")
    fixed_layout(fig, top=top, bottom=bottom, left=EDGE + y_axis_band(labels, 8),
                 right=EDGE + CBAR_GAP + CBAR_WIDTH + colorbar_band(cbar), wspace=0.04)
    place_colorbar(fig, cbar.ax, [ax1, ax2], gap=CBAR_GAP, width=CBAR_WIDTH)
    return fig


def word_grid_figure(
    grids: np.ndarray, labels: Sequence[str], block_ids: Sequence[int], timesteps: Optional[np.ndarray], title: str,
    facts: Optional[FigureFacts] = None, levels: Optional[np.ndarray] = None,
) -> Figure:
    """One small panel per word: blocks on y (top = first block), steps on x (denoising order), one colour scale.

    Args:
        grids: (m, Bk, S) each word's curves.
    """
    m, Bk, S = grids.shape
    cols = max(1, min(4, m))
    rows = max(1, math.ceil(m / cols))
    fig = new_figure(3.2 * cols + 0.8, 2.6 * rows + 0.6, layout=None, facts=facts)
    # no sharex / sharey (their bookkeeping costs more than drawing): every panel gets the same
    # limits and ticks, labelled on the outer panels only
    axes = fig.subplots(rows, cols, squeeze=False)
    fixed_layout(fig, top=0.6, bottom=0.5 + footer_band(facts), left=0.55, right=1.0, wspace=0.12, hspace=0.3)  # the colour bar's ticks and label
    im = ScalarMappable(Normalize(0.0, float(grids.max(initial=0.0)) or 1.0), "viridis")
    for k, ax in enumerate(axes.ravel()):
        if k >= m:
            ax.set_axis_off()
            continue
        MapRaster(ax, grids[k], im, aspect="auto")
        ax.set_title(labels[k], fontsize=9)
        stride = max(1, math.ceil(Bk / 6))
        ax.set_yticks(range(0, Bk, stride))
        ax.set_yticklabels([str(b) for b in block_ids][::stride], fontsize=7)
        sstride = max(1, math.ceil(S / 5))
        ax.set_xticks(range(0, S, sstride))
        lowest = k + cols >= m  # the lowest panel of its column
        names = [f"{levels[i]:.2f}" if levels is not None else str(i) for i in range(0, S, sstride)]
        ax.set_xticklabels(names if lowest else [], fontsize=7)
        if k % cols == 0:
            ax.set_ylabel("block", fontsize=8)
        else:
            ax.set_yticklabels([])
        if lowest:
            ax.set_xlabel("noise level \u03c3" if levels is not None else "step (0 = noisiest)", fontsize=8)
    if m:
        cbar = fig.colorbar(im, ax=list(axes.ravel()), fraction=0.03, pad=0.01)
        cbar.set_label(CURVE_LABEL + "\n(one scale for every panel)", fontsize=8)
    fig.suptitle(title)
    return fig


UNDECIDED = "#ebebeb"  # segmentation cells whose top share is below the threshold (lighter than any word's colour)


def segmentation_figure(
    image: Optional[np.ndarray], labels: np.ndarray, top: np.ndarray, threshold: float, names: Sequence[str],
    colours: Sequence[str], title: str, facts: Optional[FigureFacts] = None,
) -> Figure:
    """Each pixel coloured by its dominant word, in that word's colour; pixels whose top share is
    below ``threshold`` in :data:`UNDECIDED`. The legend lists the words that own a cell.

    Args:
        labels: (H, W) position of each pixel's dominant word; top: (H, W) its share.
        names: the labels of all words; colours: one per word (:class:`.colours.WordColours`).
    """
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    if len(colours) < len(names):
        raise ValueError(f"{len(names)} words need {len(names)} colours, got {len(colours)}")
    grey = to_rgb(UNDECIDED)
    lut = np.array([to_rgb(c) for c in colours] or [grey])
    rgb = lut[np.clip(labels, 0, len(lut) - 1)]
    rgb[top < threshold] = grey
    owners = sorted(int(v) for v in np.unique(labels[top >= threshold]) if 0 <= v < len(names))
    by_colour: dict[str, list[int]] = {}
    for p in owners:  # words of one colour (the same text twice) share a legend entry
        by_colour.setdefault(colours[p], []).append(p)
    handles = [Patch(color=c, label=", ".join(names[p] for p in ps)) for c, ps in by_colour.items()]
    handles.append(Patch(facecolor=grey, edgecolor="#999999", label=f"undecided: top share < {threshold:.2f}"))
    panels = 2 if image is not None else 1
    side = SEGMENTATION_SIDE  # inches per panel
    legend = legend_width([h.get_label() for h in handles], 8)
    head = suptitle_height(title) + title_band(9)
    fig = new_figure(max(EDGE + (side + 0.15) * panels + legend + EDGE, suptitle_width([title])), head + side + EDGE, layout=None,
                     facts=facts)
    suptitle_band(fig, title)
    bottom = EDGE + footer_band(facts)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    fixed_layout(fig, top=head, bottom=bottom, left=EDGE, right=legend + EDGE, wspace=0.15 / side)
    axes[0].imshow(rgb, interpolation="nearest")
    _bare(axes[0], "dominant word per cell")
    if image is not None:
        h, w = image.shape[:2]
        extent = (-0.5, w - 0.5, h - 0.5, -0.5)
        axes[1].imshow(greyscale(image), interpolation="antialiased", extent=extent)  # the colours are the words'
        big = np.asarray(Image.fromarray((rgb * 255).astype(np.uint8)).resize((w, h), Image.NEAREST))
        axes[1].imshow(big, alpha=0.55, interpolation="nearest", extent=extent)
        _bare(axes[1], "over the image")
    W, H = fig.get_size_inches()
    fig.legend(handles=handles, loc="center right", bbox_to_anchor=(1.0 - EDGE / W, 1.0 - (head + side / 2) / H), fontsize=8, frameon=False)
    return fig


def clip_vs_t5_figure(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], labels: Sequence[str], mass_clip: np.ndarray, mass_t5: np.ndarray,
    scatter_labels: Sequence[str], title: str, facts: Optional[FigureFacts] = None, colours: Optional[Sequence[str]] = None,
    even: Optional[float] = None,
) -> Figure:
    """Per word, its CLIP and T5 heatmaps side by side on one shared scale, and CLIP mass against T5 mass
    (``colours``: one per scattered word; default: the first of :data:`LINE_COLOURS`)."""
    m = len(pairs)
    rows = max(1, m)
    side, vgap, hgap, scat = PAIR_SIDE, 0.3, 0.08, 4.2  # inches: a map, between rows, between the two maps, the scatter
    top = suptitle_height(title) + title_band(9)
    bottom = EDGE + footer_band(facts)
    left = EDGE + LABEL_PAD + text_height(9)
    maps_h = rows * side + (rows - 1) * vgap
    scat = min(scat, max(maps_h, 2.5))
    body = max(maps_h, scat + x_axis_band(8, 1, 8))
    top_mass = float(max(np.max(mass_clip, initial=0), np.max(mass_t5, initial=0))) * 1.1 or 1.0
    # the width is known at the end: the footer is added then, to fit it
    fig = new_figure(10.0, top + body + bottom, layout=None)
    suptitle_band(fig, title)
    W, H = fig.get_size_inches()

    def rect(x, y_top, w, h):  # inches from the left and from the top -> figure fractions
        return (x / W, 1.0 - (y_top + h) / H, w / W, h / H)

    vmax = max([float(max(a.max(initial=0), b.max(initial=0))) for a, b in pairs] + [0.0]) or 1.0
    im = None
    map_axes = []
    for r, ((a, b), name) in enumerate(zip(pairs, labels)):
        y = top + r * (side + vgap)
        ax_a = fig.add_axes(rect(left, y, side, side))
        ax_b = fig.add_axes(rect(left + side + hgap, y, side, side))
        map_axes += [ax_a, ax_b]
        im = draw_heatmap(ax_a, a, vmax=vmax)
        draw_heatmap(ax_b, b, vmax=vmax)
        row_label(ax_a, name)
        if r == 0:
            ax_a.set_title("CLIP", fontsize=9)
            ax_b.set_title("T5", fontsize=9)
    x = left + 2 * side + hgap
    if im is not None:
        cbar = new_colorbar(fig, im, bottom=H - top - maps_h, top=top,
                            label=SHARE_LABEL + " (one scale)" + (f"\n({even_note(even)})" if even is not None else ""))
        if even is not None:
            mark_even(cbar, even)
        place_colorbar(fig, cbar.ax, map_axes, gap=CBAR_GAP, width=CBAR_WIDTH)
        x += CBAR_GAP + CBAR_WIDTH + colorbar_band(cbar)
    ax = fig.add_axes(rect(x, top, scat, scat))
    ax.scatter(mass_clip, mass_t5, s=18, color=list(colours) if colours is not None else LINE_COLOURS[0])
    ax.tick_params(labelsize=8)
    label_words(ax, np.asarray(mass_clip, dtype=float), np.asarray(mass_t5, dtype=float), scatter_labels, (top_mass, top_mass),
                (scat, scat))
    ax.plot([0, top_mass], [0, top_mass], color="#999999", lw=0.8, ls=":")
    ax.set_xlim(0, top_mass)
    ax.set_ylim(0, top_mass)
    ax.set_xlabel("CLIP mass (share of the heatmap mass)", fontsize=8)
    ax.set_ylabel("T5 mass", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("every word: CLIP vs T5 mass (dotted: equal)", fontsize=9)
    x += 0.3 + y_axis_band(tick_labels(ax.yaxis), tick_size(ax.yaxis), 8)
    ax.set_position(rect(x, top, scat, scat))
    set_width(fig, x + scat + 0.35 + EDGE, facts)  # the last x tick label reaches past the axes
    return fig


LABEL_SIZE = 7  # points of the scatter's word labels


def label_words(ax, x: np.ndarray, y: np.ndarray, labels: Sequence[str], top: tuple[float, float], size: tuple[float, float]) -> None:
    """Label each point (x, y) of a scatter from 0 to ``top`` on axes ``size`` inches big, the
    labels pushed apart (:func:`~.layout.place_labels`, in points) and joined to their point by a
    thin leader line when moved from the usual place; the points with the largest x + y are labelled first."""
    to_pt = np.array([size[0] / top[0], size[1] / top[1]]) * 72.0
    pts = np.column_stack([x, y]) * to_pt
    h = text_height(LABEL_SIZE) * 72.0
    sizes = [(text_width([t], LABEL_SIZE) * 72.0, h) for t in labels]
    order = sorted(range(len(labels)), key=lambda i: -(x[i] + y[i]))
    corners, moved = place_labels([tuple(pts[i]) for i in order], [sizes[i] for i in order], (0.0, 0.0, size[0] * 72.0, size[1] * 72.0))
    for i, (cx, cy), m in zip(order, corners, moved):
        ax.annotate(labels[i], (x[i], y[i]), xytext=(cx - pts[i, 0], cy - pts[i, 1]), textcoords="offset points", fontsize=LABEL_SIZE,
                    ha="left", va="bottom", clip_on=True,
                    arrowprops=dict(arrowstyle="-", color="#888888", lw=0.5, shrinkA=0, shrinkB=2) if m else None)


GROUP_COLOURS = {"words": "#1f77b4", "other prompt tokens": "#17becf", "special tokens": "#ff7f0e", "padding": "#bbbbbb", "other encoder": "#9467bd"}


def token_groups_figure(
    shares: np.ndarray, names: Sequence[str], group_labels: Sequence[str], timesteps: Optional[np.ndarray], title: str,
    facts: Optional[FigureFacts] = None, levels: Optional[np.ndarray] = None,
) -> Figure:
    """Stacked areas over the steps, one axis per block group; with ``levels`` (a given image's
    independent noise levels σ) stacked bars, one per level, so that nothing joins two levels.

    Args:
        shares: (Gb, G, S) per block group, each token group's share of the text attention per step.
    """
    Gb, G, S = shares.shape
    legend = legend_width(list(names), 8)
    panel_w, panel_h, gap = 3.9, 2.6, 0.3  # inches
    ylabel = TEXT_SHARE.replace("share of all", "share of all\n")
    top = suptitle_height(title) + title_band(9)
    bottom = EDGE + footer_band(facts) + x_axis_band(7, _step_tick_lines(timesteps), 8)
    ymax = max(1.0, float(shares.sum(axis=1).max(initial=0)))
    left = EDGE + y_axis_band(["0.0", f"{ymax:.1f}"], fontsize_of("medium"), 8, 2)
    fig = new_figure(left + Gb * panel_w + (Gb - 1) * gap + 0.15 + legend + EDGE, top + panel_h + bottom - footer_band(facts),
                     layout=None, facts=facts)
    suptitle_band(fig, title)
    axes = fig.subplots(1, Gb, squeeze=False, sharey=True)[0]
    fixed_layout(fig, top=top, bottom=bottom, left=left, right=0.15 + legend + EDGE, wspace=gap / panel_w)
    x = np.arange(S)
    for ax, s, label in zip(axes, shares, group_labels):
        colours = [GROUP_COLOURS.get(n, "#333333") for n in names]
        if levels is not None:  # independent measurements: a bar per level, nothing drawn between them
            bottom = np.zeros(S)
            for g, (name, colour) in enumerate(zip(names, colours)):
                ax.bar(x, s[g], width=0.6, bottom=bottom, color=colour, label=name)
                bottom = bottom + s[g]
            ax.set_xlim(-0.6, S - 0.4)
        else:
            if S == 1:
                x2, s2 = np.array([-0.5, 0.5]), np.repeat(s, 2, axis=1)
            else:
                x2, s2 = x, s
            ax.stackplot(x2, s2, colors=colours, labels=list(names))
        step_axis(ax, timesteps, max_ticks=5, label="step (0 = noisiest)", S=S, levels=levels)
        ax.set_title(label, fontsize=9)
        ax.set_ylim(0, max(1.0, float(s.sum(axis=0).max(initial=0))))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel, fontsize=8)
    handles, lbls = axes[0].get_legend_handles_labels()
    W, H = fig.get_size_inches()
    fig.legend(handles[::-1], lbls[::-1], loc="center right", bbox_to_anchor=(1.0 - EDGE / W, 1.0 - (top + panel_h / 2) / H),
               fontsize=8, frameon=False)
    return fig


def strip_figure(
    maps: np.ndarray, labels: Sequence[str], frame_labels: Sequence[str], title: str, *, vmaxes: Optional[Sequence[float]] = None,
    facts: Optional[FigureFacts] = None, even: Optional[float] = None,
) -> Figure:
    """Rows: words; columns: frames (steps or blocks); each row on one colour scale, its colour bar
    at the row's right (``even``: the even split 1/n, marked on every bar). Placed in inches from
    the measured texts: frame titles, row labels, the bars' tick labels, the title (its lines: a
    ``\n`` in ``title`` breaks it) and the footer.

    Args:
        maps: (m, K, H, W).
    """
    m, K = maps.shape[:2]
    side, hgap, vgap, ticks = STRIP_SIDE, 0.06, 0.15, 7  # inches: a panel, between panels, between rows; points: bar ticks
    bar_w = CBAR_WIDTH * 0.7
    h, w = maps.shape[2:4] if maps.ndim == 4 and maps.shape[2] and maps.shape[3] else (1, 1)
    pw, ph = (side, side * h / w) if w >= h else (side * w / h, side)
    col = max(pw, text_width(frame_labels or [""], 9))  # a frame's title no wider than its column
    head = suptitle_height(title, 10) + title_band(9)
    bottom = EDGE + footer_band(facts)
    left = EDGE + LABEL_PAD + text_height(9)
    H = head + m * ph + (m - 1) * vgap + bottom
    fig = new_figure(10.0, H, layout=None)  # the width once the bars are measured; the footer then
    suptitle_band(fig, title, 10)
    grid = []
    bars = []
    for r in range(m):
        vmax = vmaxes[r] if vmaxes is not None else None
        row, im = [], None
        for c in range(K):
            ax = fig.add_axes((0, 0, 0.1, 0.1))
            im = draw_heatmap(ax, maps[r, c], vmax=vmax, title=frame_labels[c] if r == 0 else None)
            row.append(ax)
        row_label(row[0], labels[r])
        grid.append(row)
        if im is not None:
            cbar = new_colorbar(fig, im, bottom=0.0, top=H - ph, ticks_size=ticks, extend="max" if vmax is not None else "neither")
            if even is not None:
                mark_even(cbar, even)
            bars.append(cbar)
    band = max([colorbar_band(cb, ticks) for cb in bars] + [0.0])
    W = max(left + K * col + (K - 1) * hgap + CBAR_GAP / 2 + bar_w + band + EDGE,
            text_width([title], 10) + 2 * EDGE, footer_width(facts))
    set_width(fig, W, facts)
    for r, row in enumerate(grid):
        y = head + r * (ph + vgap)
        for c, ax in enumerate(row):
            x = left + c * (col + hgap) + (col - pw) / 2
            ax.set_position((x / W, 1.0 - (y + ph) / H, pw / W, ph / H))
        if r < len(bars):
            x = left + K * col + (K - 1) * hgap + CBAR_GAP / 2
            bars[r].ax.set_position((x / W, 1.0 - (y + ph) / H, bar_w / W, ph / H))
    return fig


def spread_figure(
    mean: np.ndarray, std: np.ndarray, labels: Sequence[str], title: str, facts: Optional[FigureFacts] = None,
    vmaxes: Optional[tuple[float, float]] = None,
    even: Optional[float] = None,
) -> Figure:
    """Per word (rows), the mean map over runs and its per-pixel std, each column on one scale
    (``even``: the even split 1/n, marked on the mean's colour bar).

    Args:
        mean, std: (m, H, W).
        vmaxes: the tops of the mean's and the std's scales (default: their maxima here); pieces
            of one set of words drawn as several figures pass the same ones.
    """
    m = mean.shape[0]
    rows = max(m, 1)
    side, vgap = SPREAD_SIDE, 0.3  # inches: a map, between rows
    top = suptitle_height(title) + title_band(9)
    bottom = EDGE + footer_band(facts)
    left = EDGE + LABEL_PAD + text_height(9)
    maps_h = rows * side + (rows - 1) * vgap
    fig = new_figure(7.0, top + maps_h + bottom, layout=None)  # the footer once the width is known
    suptitle_band(fig, title)
    W, H = fig.get_size_inches()
    vm, vs = vmaxes if vmaxes is not None else (float(mean.max(initial=0)) or 1.0, float(std.max(initial=0)) or 1.0)
    columns = [[], []]
    images = [None, None]
    x = left
    for c, (data, vmax, name, cmap) in enumerate(((mean, vm, "mean over runs", HEAT_CMAP), (std, vs, "std over runs (per pixel)", "magma"))):
        for r in range(m):
            ax = fig.add_axes((x / W, 1.0 - (top + r * (side + vgap) + side) / H, side / W, side / H))
            images[c] = draw_heatmap(ax, data[r], vmax=vmax, title=name if r == 0 else None, cmap=cmap)
            if c == 0:
                row_label(ax, labels[r])
            columns[c].append(ax)
        x += side
        if images[c] is not None:
            label = SHARE_LABEL + (f"\n({even_note(even)})" if even is not None else "") if c == 0 else f"std over runs of the\n{WORD_SHARE}"
            cbar = new_colorbar(fig, images[c], bottom=H - top - maps_h, top=top, label=label)
            if c == 0 and even is not None:
                mark_even(cbar, even)
            place_colorbar(fig, cbar.ax, columns[c], gap=CBAR_GAP, width=CBAR_WIDTH)
            x += CBAR_GAP + CBAR_WIDTH + colorbar_band(cbar) + (0.25 if c == 0 else 0.0)
    set_width(fig, max(x + EDGE, suptitle_width([title])), facts)
    return fig


def _vmax(heat: np.ndarray, vmax: Optional[float]) -> float:
    v = float(np.max(heat)) if vmax is None and heat.size else (vmax or 0.0)
    return v if v > 0 else 1.0


def _bare(ax, title: Optional[str]) -> None:
    """No ticks: both axes hidden (drawing an axis costs even without ticks), the frame and title stay."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.xaxis.set_visible(False)
    ax.yaxis.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)


def row_label(ax, text: str, fontsize: float = 9) -> None:
    """``text`` as the y label of a panel made bare by :func:`_bare` (a row's name)."""
    ax.yaxis.set_visible(True)
    ax.set_ylabel(text, fontsize=fontsize)


BAR_WIDTH = 12  # px of the colour bar beside a slider frame
BAR_GAP = 6
BAR_TEXT = 44  # px kept right of the bar for its two labels


def heat_frame(heat: np.ndarray, vmax: float, side: int = 256, even: Optional[float] = None) -> Image.Image:
    """A bare (Hc, Wc) map with a colour bar: the map (colour map applied, nearest-neighbour, ``side``
    pixels on its longer side) on white, then a vertical bar from 0 (bottom) to ``vmax`` (top),
    labelled with both values, and the even split ``even`` (1/n) as a line across the bar, labelled
    "even" where the other labels leave room. Used for the report's slider frames: hundreds take milliseconds."""
    from matplotlib import colormaps
    from PIL import ImageDraw, ImageFont

    cmap = colormaps[HEAT_CMAP]
    norm = np.clip(np.asarray(heat, dtype=np.float64) / (vmax if vmax > 0 else 1.0), 0.0, 1.0)
    rgb = (cmap(norm)[..., :3] * 255).astype(np.uint8)
    h, w = rgb.shape[:2]
    s = side / max(h, w)
    W, H = max(1, round(w * s)), max(1, round(h * s))
    img = Image.new("RGB", (W + BAR_GAP + BAR_WIDTH + BAR_TEXT, H), (255, 255, 255))
    img.paste(Image.fromarray(rgb).resize((W, H), Image.NEAREST), (0, 0))
    ramp = np.linspace(1.0, 0.0, H)[:, None].repeat(BAR_WIDTH, axis=1)  # top = vmax
    img.paste(Image.fromarray((cmap(ramp)[..., :3] * 255).astype(np.uint8)), (W + BAR_GAP, 0))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x = W + BAR_GAP + BAR_WIDTH + 3
    draw.text((x, 0), f"{vmax:.3g}", fill=(0, 0, 0), font=font)
    draw.text((x, H - 12), "0", fill=(0, 0, 0), font=font)
    if even is not None and 0 <= even <= vmax:
        y = min(H - 1, round((1.0 - even / vmax) * (H - 1)))
        draw.line([(W + BAR_GAP, y), (W + BAR_GAP + BAR_WIDTH - 1, y)], fill=EVEN_COLOUR, width=1)
        if 12 <= y - 5 and y + 6 <= H - 12:  # clear of the labels at the top and the bottom
            draw.text((x, y - 5), EVEN_LABEL, fill=(0, 0, 0), font=font)
    return img


def write_heat_png(path: str, heat: np.ndarray, vmax: float, side: int = 256, even: Optional[float] = None) -> None:
    """:func:`heat_frame` written as a PNG."""
    write_png(path, np.asarray(heat_frame(heat, vmax, side, even)), palette=True)


def grid_frame(heat: np.ndarray, vmax: float) -> np.ndarray:
    """(Hc, Wc) map -> (Hc, Wc, 3) uint8: the colour map applied, one pixel per cell (0 to ``vmax``).
    The report's slider frames: the browser enlarges them without smoothing
    (``image-rendering: pixelated``), so a 16 x 16 map is 256 pixels, not 65,536."""
    from matplotlib import colormaps

    norm = np.clip(np.asarray(heat, dtype=np.float64) / (vmax if vmax > 0 else 1.0), 0.0, 1.0)
    return (colormaps[HEAT_CMAP](norm)[..., :3] * 255).astype(np.uint8)


def write_grid_png(path: str, heat: np.ndarray, vmax: float) -> None:
    """:func:`grid_frame` written as a palette PNG."""
    write_png(path, grid_frame(heat, vmax), palette=True)


def write_bar_png(path: str, vmax: float, height: int = 256, even: Optional[float] = None) -> None:
    """The colour bar of a slider row (0 at the bottom, ``vmax`` at the top, the even split marked):
    :func:`heat_frame`'s bar and labels alone, drawn once per word instead of into every frame."""
    img = np.asarray(heat_frame(np.zeros((1, 1)), vmax, height, even))  # a 1 x 1 map: the bar starts at x = height
    write_png(path, np.ascontiguousarray(img[:, height + BAR_GAP - 2:]), palette=True)
