"""The new views' numbers against independent recomputations, and their files end to end."""

from __future__ import annotations

import csv
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import analyse_stepavg  # noqa: E402
from synthetic_dump import make_layout, random_arrays, write_dump, write_runs  # noqa: E402

from attention_map_diffusers.analysis import framemaps  # noqa: E402
from attention_map_diffusers.analysis.aggregate_runs import RunSummary, aggregate, group_runs  # noqa: E402
from attention_map_diffusers.analysis.dumpfile import load_dump  # noqa: E402
from attention_map_diffusers.analysis.views import (  # noqa: E402
    block_groups, dominant_words, frame_word_maps, pick_frames, robust_vmax, token_group_masks, token_groups, word_labels,
)
from attention_map_diffusers.analysis.words import Word, map_words  # noqa: E402

BICYCLE = "A rusty bicycle in front of a barn"
FAST = ["--dpi", "30", "--topk", "2"]


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


# --- numpy of the views ------------------------------------------------------------------------


def test_word_labels_number_repeated_words_only():
    words = [Word(i, t, 0, 0) for i, t in enumerate(["A", "cat", "and", "a", "Cat", "dog"])]
    assert word_labels(words) == ["A #0", "cat #1", "and", "a #3", "Cat #4", "dog"]


def test_dominant_word_matches_a_loop():
    rng = np.random.default_rng(0)
    shares = rng.uniform(size=(7, 5, 4))
    shares[2, 3] = [0.25, 0.25, 0.25, 0.25]  # a tie: the first word wins
    labels, top = dominant_words(shares)
    for y in range(7):
        for x in range(5):
            best, arg = -1.0, -1
            for k in range(4):
                if shares[y, x, k] > best:
                    best, arg = shares[y, x, k], k
            assert labels[y, x] == arg and top[y, x] == best
    assert labels[2, 3] == 0


def test_token_groups_match_explicit_sums():
    layout = make_layout([BICYCLE + ", at dusk."], clip_len=20, t5_len=16)
    arrays = random_arrays(layout, num_blocks=3, num_steps=4, grid=(2, 2), seed=3)
    mean = arrays["per_block_step_token_mean"][0].astype(np.float64)  # (Bk, S, T)
    T = layout.T
    for enc in ("clip", "t5"):
        tl = getattr(layout, enc)[0]
        a, b = layout.span(enc)
        wm = map_words(tl.tokens, [bool(v) for v in tl.special], layout.prompts[0], b - a,
                       offsets=[None if o is None else tuple(o) for o in tl.offsets])
        masks = token_group_masks(T, (a, b), len(tl.tokens), tl.special, wm.weights)
        got = token_groups(mean, masks)
        ref = {k: np.zeros(mean.shape[:2]) for k in got.names}
        for bk in range(mean.shape[0]):
            for s in range(mean.shape[1]):
                for p in range(T):
                    v = mean[bk, s, p]
                    if not a <= p < b:
                        ref["other encoder"][bk, s] += v
                    elif p - a >= len(tl.tokens):
                        ref["padding"][bk, s] += v
                    elif tl.special[p - a]:
                        ref["special tokens"][bk, s] += v
                    elif wm.weights[p - a].sum() > 0:
                        ref["words"][bk, s] += v
                    else:
                        ref["other prompt tokens"][bk, s] += v  # the comma and the full stop
        for g, name in enumerate(got.names):
            np.testing.assert_allclose(got.shares[g], ref[name], rtol=1e-12, atol=1e-15)
        assert ref["other prompt tokens"].sum() > 0
        np.testing.assert_allclose(got.shares.sum(axis=0), mean.sum(axis=-1), rtol=1e-12)


def test_frames_blocks_and_scales():
    assert pick_frames(50) == [0, 10, 20, 29, 39, 49] and pick_frames(4) == [0, 1, 2, 3]
    assert [g for g, _ in block_groups(list(range(24)))] == ["early blocks 0-7", "middle blocks 8-15", "late blocks 16-23"]
    assert block_groups([5]) == [("all blocks 5", [0])]
    v = np.zeros(1000)
    v[0] = 100.0
    v[1:] = np.linspace(0, 1, 999)
    assert robust_vmax(v, 99) == pytest.approx(np.percentile(v, 99)) and robust_vmax(v, 100) == 100.0
    rng = np.random.default_rng(1)
    maps = rng.uniform(size=(3, 4, 4, 6))
    weights = np.zeros((6, 2))
    weights[1, 0] = weights[2, 0] = weights[4, 1] = 1.0
    got = frame_word_maps(maps, weights)
    w0, w1 = maps[..., 1] + maps[..., 2], maps[..., 4]
    np.testing.assert_allclose(got[..., 0], w0 / (w0 + w1 + 1e-8))


def test_frames_read_lazily_and_in_denoising_order(tmp_path):
    layout = make_layout([BICYCLE], clip_len=12, t5_len=10)
    arrays = random_arrays(layout, num_blocks=2, num_steps=5, grid=(3, 3), seed=4)
    steps = np.random.default_rng(0).uniform(size=(1, 5, 3, 3, layout.T)).astype(np.float32)
    arrays["per_step_token_map"] = steps
    write_dump(tmp_path / "new", layout, arrays, store_dtype="float32")
    write_dump(tmp_path / "old", layout, arrays, store_dtype="float32", original=True)
    assert framemaps.available(str(tmp_path / "new")) == {"per_step_token_map"}
    got = framemaps.read_frames(str(tmp_path / "new"), framemaps.STEP_KEY, 0, [0, 4])
    np.testing.assert_array_equal(got, steps[0, [0, 4]])
    old = framemaps.read_frames(str(tmp_path / "old"), framemaps.STEP_KEY, 0, [0, 4], flip=True)
    np.testing.assert_array_equal(old, steps[0, [0, 4]])
    assert framemaps.read_frames(str(tmp_path / "new"), framemaps.BLOCK_KEY, 0, [0]) is None


def test_aggregate_matches_numpy_over_runs():
    rng = np.random.default_rng(2)
    words = (Word(0, "a", 0, 1), Word(1, "cat", 2, 5))
    runs = [RunSummary(f"r{k}", 0, k, "clip", "a cat", words, (0, 1), rng.uniform(size=2), rng.uniform(size=(2, 3, 2)),
                       rng.uniform(size=(4, 4, 2)).astype(np.float32), None) for k in range(3)]
    other = RunSummary("x", 0, 9, "clip", "a dog", words, (0, 1), rng.uniform(size=2), rng.uniform(size=(2, 3, 2)),
                       rng.uniform(size=(4, 4, 2)).astype(np.float32), None)
    groups = group_runs(runs + [other])
    assert len(groups) == 1 and len(groups[0]) == 3
    g = aggregate(groups[0])
    np.testing.assert_allclose(g.mass_mean, np.mean([r.mass for r in runs], axis=0))
    np.testing.assert_allclose(g.mass_std, np.std([r.mass for r in runs], axis=0, ddof=1))
    np.testing.assert_allclose(g.curves_std, np.std([r.curves for r in runs], axis=0, ddof=1))
    # the band of the block-averaged curves: the spread of each run's block average, not an average of spreads
    np.testing.assert_allclose(g.blockavg_std, np.std([r.curves.mean(axis=0) for r in runs], axis=0, ddof=1))
    np.testing.assert_allclose(g.map_mean, np.mean([r.shares for r in runs], axis=0), rtol=1e-6)
    aucs = [((r.curves[:, 1:] + r.curves[:, :-1]) / 2).sum(axis=1) for r in runs]
    np.testing.assert_allclose(g.auc_mean, np.mean(aucs, axis=0))
    np.testing.assert_allclose(g.auc_std, np.std(aucs, axis=0, ddof=1))


# --- end to end --------------------------------------------------------------------------------


@pytest.mark.slow
def test_views_written_for_each_encoder(tmp_path):
    layout = make_layout([BICYCLE], clip_len=77, t5_len=24)
    arrays = random_arrays(layout, num_blocks=3, num_steps=7, grid=(6, 6), seed=5)
    rng = np.random.default_rng(5)
    arrays["per_step_token_map"] = rng.uniform(size=(1, 7, 6, 6, layout.T)).astype(np.float32)
    barn = layout.positions("clip", 0, "barn") + layout.positions("t5", 0, "barn")
    arrays["sum_token_map"][0, :3, :3, barn] *= 50  # barn dominates the top-left corner
    write_dump(tmp_path / "run", layout, arrays, store_dtype="float32", image_size=(48, 32))
    assert analyse_stepavg.main(["--root", str(tmp_path / "run"), *FAST]) == 0
    out = tmp_path / "run" / "analysis"
    dump = load_dump(str(tmp_path / "run"))
    for enc in ("clip", "t5"):
        d = out / enc
        for name in ("word_grids.png", "segmentation.png", "token_groups.png", "strips/steps.png", "summary.png", "overview.png"):
            assert (d / name).is_file(), name
        assert not (d / "strips" / "blocks.png").exists()  # the dump kept no per-block maps
        assert len(list((d / "frames").glob("step*.png"))) == 7 * 2  # every step (the slider offers all) x top 2 words
        words, maps = dump.word_maps(0, enc)
        with np.load(d / "word_maps.npz") as z:
            assert z["maps"].dtype == np.float32 and z["maps"].shape == (8, 6, 6)
            np.testing.assert_allclose(z["maps"], maps, rtol=1e-6)
            assert list(z["words"]) == [w.text for w in words] and list(z["word_index"]) == list(range(8))
            assert list(z["image_size"]) == [32, 48]
            assert (z["maps"].argmax(axis=0)[:3, :3] == 7).all()
        header, rows = read_csv(d / "tables" / "words_summary.csv")
        assert header[-1] == "word_index" and [r[-1] for r in rows] == [str(i) for i in range(8)]
        header, _ = read_csv(d / "tables" / "words_auc.csv")
        assert header[1] == "A #0" and header[7] == "a #6"
    assert (out / "clip_vs_t5.png").is_file()
    from PIL import Image

    with Image.open(out / "clip" / "summary.png") as im:
        text = im.text
    assert text["Prompt"] == BICYCLE and text["Seed"] == "42" and text["Model"] == "synthetic" and "Warning" not in text


def test_across_seeds_aggregation(tmp_path):
    root = tmp_path / "out"
    records = []
    for k, (prompt, seed) in enumerate([(BICYCLE, 1), (BICYCLE, 2), (BICYCLE, 3), ("A furry cat", 1), ("A furry cat", 2), ("A dog", 1)]):
        layout = make_layout([prompt], clip_len=77, t5_len=16)
        folder = f"{k:04d}-s{seed}"
        write_dump(root / folder, layout, random_arrays(layout, 2, 3, (4, 4), seed=seed + 10 * k), seed=seed,
                   store_dtype="float32", meta={"random_weights": True})
        records.append({"run": k, "folder": folder, "prompt": [prompt], "seed": seed, "status": "done"})
    write_runs(root, records)
    assert analyse_stepavg.main(["--root", str(root), "--tables-only"]) == 0  # figures: test_report_browser.py
    out = root / "analysis"
    groups = sorted(p.name for p in (out / "aggregate").iterdir())
    assert groups == ["000-A-rusty-bicycle-in-front-of-a-barn", "001-A-furry-cat"]  # "A dog" has one run
    g = out / "aggregate" / groups[0]
    for enc in ("clip", "t5"):
        masses = []
        for folder in ("0000-s1", "0001-s2", "0002-s3"):
            _, rows = read_csv(out / folder / enc / "tables" / "words_summary.csv")
            masses.append([float(r[1]) for r in rows])
        header, rows = read_csv(g / enc / "tables" / "words_summary.csv")
        assert header == ["word", "mass_mean", "mass_std", "n_runs", "word_index"]
        np.testing.assert_allclose([float(r[1]) for r in rows], np.mean(masses, axis=0), rtol=1e-6)
        np.testing.assert_allclose([float(r[2]) for r in rows], np.std(masses, axis=0, ddof=1), rtol=1e-5, atol=1e-7)
        assert {r[3] for r in rows} == {"3"} and [r[4] for r in rows] == [str(i) for i in range(8)]
        header, _ = read_csv(g / enc / "tables" / "words_auc.csv")
        assert header[1:3] == ["A #0", "A #0 std"]
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "Groups of runs with the same prompt" in html and "Random weights" in html
    cross = html[html.index("Words in several prompts</h2>"):]
    assert "A furry cat (#0)" in cross and "A rusty bicycle in front of a barn (#6)" in cross  # "a" is in both prompts
    assert "../index.html" in (out / "0000-s1" / "index.html").read_text(encoding="utf-8")
    assert (g / "index.html").is_file()


def test_slider_frame_has_its_colour_bar():
    """A slider frame: the map in the colour map (nearest neighbour, 0 to vmax, clipped), then a
    bar running from vmax (top) to 0 (bottom) in the same colours, labelled."""
    from matplotlib import colormaps

    from attention_map_diffusers.analysis.plots import BAR_GAP, BAR_WIDTH, HEAT_CMAP, heat_frame

    heat = np.array([[0.0, 0.1], [0.2, 0.4]])
    img = np.asarray(heat_frame(heat, vmax=0.2, side=64))
    cmap = colormaps[HEAT_CMAP]

    def colour(v):
        return (np.asarray(cmap(v)[:3]) * 255).astype(np.uint8)

    assert img.shape[0] == 64
    for (i, j), v in np.ndenumerate(heat):  # the centre of each cell: its value / vmax, clipped to 1
        np.testing.assert_array_equal(img[16 + 32 * i, 16 + 32 * j], colour(min(v / 0.2, 1.0)))
    bar = img[:, 64 + BAR_GAP: 64 + BAR_GAP + BAR_WIDTH]
    np.testing.assert_array_equal(bar[0, 0], colour(1.0))
    np.testing.assert_array_equal(bar[-1, 0], colour(0.0))
    labels = img[:, 64 + BAR_GAP + BAR_WIDTH:]
    assert (labels[:12].min(axis=-1) < 100).any() and (labels[-12:].min(axis=-1) < 100).any()  # "0.2" and "0" drawn


def test_slider_frames_are_maps_at_grid_size_with_one_bar_per_word(tmp_path):
    """The report's slider frames are the maps at one pixel per cell, coloured exactly as the colour
    map gives each value / vmax (clipped), enlarged by the browser without smoothing; each word's
    row has one colour bar (vmax at the top, 0 at the bottom) beside its frame (issue 22, item 14:
    a 16 x 16 frame was a 256 x 256 picture with its bar drawn in, 3 kB; now under 1 kB)."""
    from html.parser import HTMLParser

    from matplotlib import colormaps
    from PIL import Image

    from attention_map_diffusers.analysis.plots import HEAT_CMAP

    lay = make_layout(["A red circle next to a blue square"], clip_len=24, t5_len=16)
    arrays = random_arrays(lay, num_blocks=2, num_steps=3, grid=(4, 6), seed=3)
    arrays["per_step_token_map"] = np.random.default_rng(3).uniform(size=(1, 3, 4, 6, lay.T)).astype(np.float32)
    write_dump(tmp_path / "run", lay, arrays, store_dtype="float32")
    assert analyse_stepavg.main(["--root", str(tmp_path / "run"), "--dpi", "40", "--topk", "2", "--encoders", "t5"]) == 0
    out = tmp_path / "run" / "analysis"
    frames = sorted((out / "t5" / "frames").glob("step*.png"))
    bars = sorted((out / "t5" / "frames").glob("bar-step-*.png"))
    assert len(frames) == 3 * 2 and len(bars) == 2
    cmap = colormaps[HEAT_CMAP]
    for path in frames:
        img = np.asarray(Image.open(path).convert("RGB"))
        assert img.shape == (4, 6, 3)  # one pixel per cell
        # every pixel is a colour of the colour map (a palette PNG of at most 24 distinct cells is exact)
        table = (np.asarray(cmap(np.linspace(0, 1, cmap.N)))[:, :3] * 255).astype(np.uint8)
        dist = np.abs(img[:, :, None, :].astype(int) - table[None, None].astype(int)).sum(-1).min(-1)
        assert dist.max() <= 3
    bar = np.asarray(Image.open(bars[0]).convert("RGB"))
    assert bar.shape[0] == round(256 * 4 / 6)  # as tall as the 4 x 6 frame is shown at 256 px wide
    top, bottom = bar[0], bar[-1]  # the bar's ramp (256 colours) plus its labels: reduced to a palette, within a few levels
    assert any((abs(top[x].astype(int) - (np.asarray(cmap(1.0)[:3]) * 255).astype(int)).sum() <= 12 for x in range(bar.shape[1])))
    assert any((abs(bottom[x].astype(int) - (np.asarray(cmap(0.0)[:3]) * 255).astype(int)).sum() <= 12 for x in range(bar.shape[1])))

    class Slider(HTMLParser):
        def __init__(self):
            super().__init__()
            self.imgs = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.imgs.append(dict(attrs))

    page = Slider()
    page.feed((out / "index.html").read_text(encoding="utf-8"))
    html = (out / "index.html").read_text(encoding="utf-8")
    grid = [a for a in page.imgs if "grid" in a.get("class", "").split()]
    shown_bars = [a for a in page.imgs if a.get("class") == "bar"]
    assert len(grid) == 2 and len(shown_bars) == 2  # the opening frame of each of the 2 words, each with its bar
    assert {a["src"].rsplit("/", 1)[-1] for a in shown_bars} == {p.name for p in bars}
    assert "image-rendering:pixelated" in html.replace(" ", "")
