"""The analysis's fast drawing paths: maps drawn as exact-size rasters (analysis/raster.py), figures
redrawn by blitting, and bands drawn as polygon collections.

The rasters are checked pixel by pixel against independent computations: matplotlib's own colour
map call for each cell, and an explicit float64 bilinear interpolation and blend for overlays, and
against what ``imshow`` draws. The blitted PNGs must equal a full render of a fresh figure.
"""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from matplotlib import colormaps  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from attention_map_diffusers.analysis import figure, plots  # noqa: E402
from attention_map_diffusers.analysis.views import FigureFacts  # noqa: E402

FACTS = FigureFacts(model="m", seed=3, prompt="a red circle next to a blue square", random_weights=True)


def _panel(draw, dpi=100, size=(4.0, 4.0), rect=(0.1, 0.1, 0.8, 0.8)):
    """Render a figure with one axes at ``rect`` on which ``draw(ax)`` draws; returns (RGB pixels, axes box in pixels)."""
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    ax = fig.add_axes(rect)
    draw(ax)
    rgba = figure.render_rgba(fig, dpi)
    box = ax.get_window_extent()  # display pixels, y from the bottom
    H = rgba.shape[0]
    top, left = H - box.y1, box.x0
    return rgba[..., :3].astype(int), (round(top), round(left), round(box.height), round(box.width))


def test_grid_cells_have_the_colour_maps_colours():
    """A 16x20 map on a 200x160-pixel panel (10 px cells): every cell's centre pixel is
    ``cmap(value / vmax, bytes=True)``, values above vmax saturate, and the top row is at the top."""
    rng = np.random.default_rng(0)
    heat = rng.uniform(0, 1.2, (16, 20)).astype(np.float32)  # some values above vmax
    vmax = 1.0
    # 4x4 in at 100 dpi; axes 2.0 x 1.6 in -> 200 x 160 px: 10 px per cell
    pix, (top, left, h, w) = _panel(lambda ax: plots.draw_heatmap(ax, heat, vmax=vmax), rect=(0.25, 0.3, 0.5, 0.4))
    assert (h, w) == (160, 200)
    want = np.asarray(colormaps[plots.HEAT_CMAP](np.clip(heat / vmax, 0, 1), bytes=True))[..., :3]
    centres = pix[top + 5 : top + h : 10, left + 5 : left + w : 10]
    assert centres.shape[:2] == heat.shape
    np.testing.assert_array_equal(centres, want)
    assert np.array_equal(centres[0, 0], want[0, 0]) and not np.array_equal(want[0, 0], want[-1, 0])


def test_grid_matches_imshow():
    """Against ``imshow(..., interpolation="nearest")`` on the same integer-aligned panel: the same pixels
    inside the frame (spines excluded)."""
    heat = np.random.default_rng(1).uniform(size=(8, 8)).astype(np.float32)
    rect = (0.1, 0.1, 0.8, 0.8)  # 320 px: 40 px per cell

    def imshow(ax):
        ax.imshow(heat, cmap=plots.HEAT_CMAP, vmin=0.0, vmax=0.9, interpolation="nearest")
        ax.set_axis_off()

    def raster(ax):
        plots.draw_heatmap(ax, heat, vmax=0.9)
        ax.set_axis_off()

    a, (top, left, h, w) = _panel(imshow, rect=rect)
    b, _ = _panel(raster, rect=rect)
    inner = (slice(top + 2, top + h - 2), slice(left + 2, left + w - 2))
    np.testing.assert_array_equal(a[inner], b[inner])


def test_overlay_is_the_bilinear_map_blended_over_the_image():
    """A uniform grey image and an 8x8 map: each pixel is (1 - a) * grey + a * colour(bilinear(map) / vmax),
    the bilinear interpolation computed here in float64 with pixel centres aligned."""
    rng = np.random.default_rng(2)
    heat = rng.uniform(size=(8, 8))
    image = np.full((48, 48, 3), 90, np.uint8)
    vmax = 0.8
    pix, (top, left, h, w) = _panel(lambda ax: plots.draw_overlay(ax, image, heat, vmax=vmax), rect=(0.1, 0.1, 0.8, 0.8))
    assert (h, w) == (320, 320)

    def coords(n_out, n_in):  # source coordinate of each output pixel centre, clamped at the edges
        x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        x = np.clip(x, 0, n_in - 1)
        i0 = np.minimum(np.floor(x).astype(int), n_in - 2)
        return i0, x - i0

    r0, fr = coords(h, 8)
    c0, fc = coords(w, 8)
    top_row = heat[r0][:, c0] * (1 - fc) + heat[r0][:, c0 + 1] * fc
    bottom_row = heat[r0 + 1][:, c0] * (1 - fc) + heat[r0 + 1][:, c0 + 1] * fc
    values = top_row * (1 - fr[:, None]) + bottom_row * fr[:, None]
    colour = np.asarray(colormaps[plots.HEAT_CMAP](np.clip(values / vmax, 0, 1), bytes=True))[..., :3].astype(float)
    want = (1 - plots.OVERLAY_ALPHA) * 90 + plots.OVERLAY_ALPHA * colour
    got = pix[top + 2 : top + h - 2, left + 2 : left + w - 2]
    diff = np.abs(got - want[2:-2, 2:-2])
    assert np.mean(diff <= 1.0) > 0.995, np.mean(diff <= 1.0)  # rounding; the rest: a colour bin flipped at a boundary
    assert diff.max() <= 8


def test_overlay_keeps_the_images_aspect_and_orientation():
    """A 40x80 image with a bright top-left quarter in the map: the panel is twice as wide as high, the
    hot corner drawn top left."""
    heat = np.zeros((4, 8))
    heat[:2, :4] = 1.0
    image = np.zeros((40, 80, 3), np.uint8)
    pix, (top, left, h, w) = _panel(lambda ax: plots.draw_overlay(ax, image, heat, vmax=1.0), size=(6, 4), rect=(0.05, 0.05, 0.9, 0.9))
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.05, 0.05, 0.9, 0.9))
    plots.draw_overlay(ax, image, heat, vmax=1.0)
    ax.apply_aspect()
    x0, y0 = ax.transData.transform((-0.5, 39.5))
    x1, y1 = ax.transData.transform((79.5, -0.5))
    assert abs((x1 - x0) / (y1 - y0) - 2.0) < 0.02
    H = pix.shape[0]
    cx0, cx1, cy_top, cy_bottom = int(x0), int(x1), int(H - y1), int(H - y0)
    quarter = lambda r, c: pix[cy_top + r * (cy_bottom - cy_top) // 4 + 5, cx0 + c * (cx1 - cx0) // 8 + 5].sum()  # noqa: E731
    assert quarter(0, 0) > 300 and quarter(3, 7) < 60


def test_non_finite_values_draw_as_the_scales_ends():
    heat = np.array([[np.nan, 0.5], [np.inf, -np.inf]], np.float32)
    pix, (top, left, h, w) = _panel(lambda ax: plots.draw_heatmap(ax, heat, vmax=1.0), rect=(0.25, 0.25, 0.5, 0.5))
    lut = np.asarray(colormaps[plots.HEAT_CMAP](np.array([0.0, 1.0]), bytes=True))[:, :3]
    q = h // 4
    assert np.array_equal(pix[top + q, left + q], lut[0])  # NaN
    assert np.array_equal(pix[top + 3 * q, left + q], lut[1])  # +inf saturates
    assert np.array_equal(pix[top + 3 * q, left + 3 * q], lut[0])  # -inf


def test_rasters_draw_in_vector_formats():
    heat = np.random.default_rng(3).uniform(size=(8, 8))
    image = np.full((32, 32, 3), 200, np.uint8)
    fig = plots.heatmap_figure(heat, "word", image, vmax=0.5, facts=FACTS)
    for fmt, marker in (("svg", b"<image"), ("pdf", b"/Subtype /Image")):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt)
        assert buf.getvalue().count(marker) >= 2, fmt


@pytest.mark.parametrize("with_image,vmaxes", [(True, [0.9, 1.5, 0.7]), (False, [0.9, 1.5, 0.7]), (True, [None] * 3)])
def test_blitted_heatmaps_equal_full_renders(tmp_path, with_image, vmaxes):
    """save_heatmap_figures draws only what changes; each PNG equals a fresh heatmap_figure rendered whole
    and written (its colour bar ticks, the maps, the title; the same palette)."""
    rng = np.random.default_rng(4)
    heats = [rng.uniform(size=(16, 16)) * (k + 1) for k in range(3)]
    image = (rng.uniform(size=(64, 64, 3)) * 255).astype(np.uint8) if with_image else None
    titles = [f"T5: \u201cword {k}\u201d" for k in range(3)]
    paths = [str(tmp_path / f"{k}.png") for k in range(3)]
    plots.save_heatmap_figures(heats, titles, paths, image, vmaxes=vmaxes, scale="colour scale: x", dpi=60, facts=FACTS)
    room = [plots._vmax(h, v) for h, v in zip(heats, vmaxes)]
    for heat, title, vmax, path in zip(heats, titles, vmaxes, paths):
        fig = plots.heatmap_figure(heat, title, image, vmax=vmax, scale="colour scale: x", facts=FACTS, room_for=room, titles=titles)
        want = _written(fig, 60, tmp_path)
        with Image.open(path) as img:
            got = np.asarray(img.convert("RGB"))
            assert img.text["Title"] == title
        assert got.shape == figure.render_rgba(fig, 60)[..., :3].shape
        np.testing.assert_array_equal(got, want)


def _written(fig, dpi, folder):
    """The RGB pixels of ``fig`` written whole by write_figure."""
    path = str(folder / "whole.png")
    figure.write_figure(fig, path, "png", dpi)
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_blitted_block_curves_equal_full_renders(tmp_path):
    rng = np.random.default_rng(5)
    curves = rng.uniform(size=(3, 10, 9))  # 3 blocks, 10 steps, 9 words (two axes)
    labels = [f"w{j}" for j in range(9)]
    titles = [f"T5: top words, transformer_blocks.{b}" for b in range(3)]
    paths = [str(tmp_path / f"b{b}.png") for b in range(3)]
    ts = np.linspace(1000, 100, 10)
    plots.save_curves_per_block(curves, labels, ts, titles, paths, dpi=50, facts=FACTS)
    ymax = float(curves.max()) * 1.05
    for b in range(3):
        fig = plots.curves_figure(curves[b], labels, ts, titles[b], ymax=ymax, scale_text="same y scale for every block", facts=FACTS)
        with Image.open(paths[b]) as img:
            np.testing.assert_array_equal(np.asarray(img.convert("RGB")), _written(fig, 50, tmp_path))


def test_bands_draw_what_fill_between_draws():
    """draw_bands (polygon collections) against one fill_between per band, overlapping bands included."""
    rng = np.random.default_rng(6)
    x = np.arange(40)
    mean = np.cumsum(rng.uniform(size=(40, 3)), axis=0)
    std = rng.uniform(0, 2, size=(40, 3))

    def render(draw):
        fig = Figure(figsize=(4, 3))
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0.1, 0.1, 0.8, 0.8))
        draw(ax)
        ax.set_xlim(-0.5, 39.5)
        ax.set_ylim(0, 30)
        return figure.render_rgba(fig, 100).astype(int)

    def reference(ax):
        for j in range(3):
            ax.fill_between(x, mean[:, j] - std[:, j], mean[:, j] + std[:, j], color=plots.LINE_COLOURS[j], alpha=plots.BAND_ALPHA, lw=0)
            for edge in (mean[:, j] + std[:, j], mean[:, j] - std[:, j]):  # the outlines
                ax.plot(x, edge, "--", color=plots.LINE_COLOURS[j], lw=0.7, alpha=0.8, zorder=1.5)

    want = render(reference)
    got = render(lambda ax: plots.draw_bands(ax, x, mean - std, mean + std))
    assert (want != 255).any(axis=-1).mean() > 0.05  # the bands are there
    assert np.abs(got - want).max() <= 3
