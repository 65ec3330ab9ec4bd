"""Honest scales: the image under an overlay in grey, the even split (1/n) marked on word-share
colour bars, ``--scale shared`` (one colour scale for all the words of an encoder) said on the
figures, and flat maps (max/min near 1) flagged in their titles. Pixels and scale tops are checked
against values computed here."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import analyse_stepavg  # noqa: E402
from synthetic_dump import make_layout, random_arrays, write_dump  # noqa: E402

from attention_map_diffusers.analysis import figure, layout, plots  # noqa: E402
from attention_map_diffusers.analysis.views import flat_note, flat_ratio  # noqa: E402

PROMPT = "a red circle next to a blue square"


def test_overlay_shows_the_image_in_grey():
    """A pure red image under a map of zeros: every pixel of the panel is grey (R = G), plus the
    blend's share of the colour map's 0 (inferno's is (0, 0, 4)): the red does not show as heat."""
    image = np.zeros((48, 48, 3), np.uint8)
    image[..., 0] = 255
    fig = Figure(figsize=(4, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.1, 0.1, 0.8, 0.8))
    plots.draw_overlay(ax, image, np.zeros((8, 8)), vmax=1.0)
    rgb = figure.render_rgba(fig, 100)[..., :3].astype(int)
    box = ax.get_window_extent()
    top, left = round(rgb.shape[0] - box.y1), round(box.x0)
    inner = rgb[top + 3 : top + round(box.height) - 3, left + 3 : left + round(box.width) - 3]
    a = plots.OVERLAY_ALPHA
    luma = 0.299 * 255  # ITU-R BT.601 luma of pure red
    assert (inner[..., 0] == inner[..., 1]).all()
    np.testing.assert_allclose(inner[..., 0], (1 - a) * luma, atol=1.0)
    np.testing.assert_allclose(inner[..., 2], (1 - a) * luma + a * 4, atol=1.0)


def _bar(fig):
    return [ax for ax in fig.axes if any(t.get_text() == layout.EVEN_LABEL for t in ax.get_yticklabels())]


def test_even_split_tick_and_line_sit_at_one_over_n():
    """On a heatmap's colour bar (0 to 0.5) of 8 words: a tick labelled "even" at 1/8, and the line
    across the bar at 1/8 of 0.5 = a quarter of the bar's height from the bottom."""
    rng = np.random.default_rng(0)
    heat = rng.uniform(size=(8, 8)) * 0.5
    fig = plots.heatmap_figure(heat, "t", vmax=0.5, even=1 / 8)
    rgba = figure.render_rgba(fig, 100)
    (cax,) = _bar(fig)
    locs = [t.get_position()[1] for t in cax.get_yticklabels() if t.get_text() == layout.EVEN_LABEL]
    assert locs == [0.125]
    assert layout.EVEN_LABEL in layout.tick_labels(cax.yaxis)  # measured by the layout like any tick
    box = cax.get_window_extent()
    y = rgba.shape[0] - (box.y0 + box.height * 0.125 / 0.5)  # rows from the top
    x = round((box.x0 + box.x1) / 2)
    want = np.array([int(layout.EVEN_COLOUR[i : i + 2], 16) for i in (1, 3, 5)])
    rows = rgba[int(np.floor(y)) - 1 : int(np.ceil(y)) + 2, x, :3].astype(int)
    assert (np.abs(rows - want).max(axis=1) <= 40).any(), rows
    # a bar whose scale stops below 1/n has no "even" tick (and keeps its limits)
    fig = plots.heatmap_figure(heat * 0.1, "t", vmax=0.05, even=1 / 8)
    fig.draw_without_rendering()
    assert not _bar(fig) and all(ax.get_ylim()[1] <= 0.05 + 1e-12 for ax in fig.axes[-1:])
    # every word-share figure marks it
    for fig in (plots.summary_figure(None, [heat, heat], ["a", "b"], vmaxes=[0.5, 0.5], even=1 / 8),
                plots.strip_figure(np.stack([np.stack([heat] * 3)] * 2), ["a", "b"], ["s0", "s1", "s2"], "t", vmaxes=[0.5, 0.5],
                                   even=1 / 8),
                plots.spread_figure(np.stack([heat]), np.stack([heat]) * 0.1, ["a"], "t", even=1 / 8)):
        fig.draw_without_rendering()
        assert _bar(fig)


def test_slider_frame_marks_the_even_split():
    from attention_map_diffusers.analysis.plots import BAR_GAP

    img = np.asarray(plots.heat_frame(np.zeros((4, 4)), vmax=0.5, side=64, even=0.25))
    want = np.array([int(layout.EVEN_COLOUR[i : i + 2], 16) for i in (1, 3, 5)])
    column = img[:, 64 + BAR_GAP + 2].astype(int)
    hits = np.nonzero((np.abs(column - want).max(axis=1) <= 2))[0]
    assert len(hits) == 1 and abs(hits[0] - 63 * 0.5) <= 1  # 0.25 of 0.5: half way


def _dump(root, uniform=False, seed=0):
    layout_ = make_layout([PROMPT], clip_len=24, t5_len=16)
    arrays = random_arrays(layout_, num_blocks=2, num_steps=3, grid=(8, 8), seed=seed)
    if uniform:  # every token's map constant over the pixels: every word's share map is flat
        arrays["sum_token_map"][:] = arrays["sum_token_map"][:, :1, :1, :]
    write_dump(root, layout_, arrays, store_dtype="float32")
    return root


@pytest.mark.parametrize("scale", ["own", "shared"])
def test_scale_own_or_shared(tmp_path, monkeypatch, scale):
    """--scale shared: every word heatmap's colour scale tops at the 99th percentile of all the
    words' maps together (computed here from word_maps.npz); own: each at its own map's. The
    figures say which."""
    seen = []
    original = plots.save_heatmap_figures

    def spy(heats, titles, paths, image=None, **kw):
        seen.extend(zip(paths, kw["vmaxes"]))
        return original(heats, titles, paths, image, **kw)

    monkeypatch.setattr(plots, "save_heatmap_figures", spy)
    run = _dump(tmp_path / "run")
    assert analyse_stepavg.main(["--root", str(run), "--dpi", "30", "--topk", "20", "--encoders", "clip", "--scale", scale]) == 0
    out = run / "analysis" / "clip"
    with np.load(out / "word_maps.npz") as z:
        maps, index = z["maps"].astype(np.float64), list(z["word_index"])
    assert len(seen) == len(index) == 8
    for path, vmax in seen:
        k = index.index(int(os.path.basename(path)[:3]))
        want = np.percentile(maps, 99) if scale == "shared" else np.percentile(maps[k], 99)
        assert vmax == pytest.approx(want, rel=1e-5)
    with Image.open(out / "summary.png") as im:
        assert f"{scale} colour scale" in im.text["Title"]


def test_flat_maps_are_flagged():
    assert flat_ratio(np.array([[1.0, 1.2], [1.1, 1.0]])) == pytest.approx(1.2) and flat_note(np.full((2, 2), 0.1)) != ""
    assert flat_note(np.array([[1.0, 2.0]])) == "" and flat_note(np.array([[0.0, 1.0]])) == ""


def test_flat_word_maps_say_so_in_their_titles(tmp_path):
    run = _dump(tmp_path / "run", uniform=True)
    assert analyse_stepavg.main(["--root", str(run), "--dpi", "30", "--topk", "2", "--encoders", "clip"]) == 0
    pngs = sorted((run / "analysis" / "clip" / "heatmaps" / "words").glob("*.png"))
    assert len(pngs) == 2
    for p in pngs:
        with Image.open(p) as im:
            assert "(flat: max/min 1.00)" in im.text["Title"], im.text["Title"]
