"""Each word has one colour for the whole analysis, chosen from its text: a colour word in its
colour, no other word near the colour words' hues, the same colour in every run whatever the ranks.
Checked on the colour map itself (hues computed here with colorsys) and on the written PNGs' pixels."""

from __future__ import annotations

import colorsys
import os
import sys

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import analyse_stepavg  # noqa: E402
from synthetic_dump import make_layout, random_arrays, write_dump, write_runs  # noqa: E402

from attention_map_diffusers.analysis.colours import WordColours  # noqa: E402

PROMPT = "a red circle next to a blue square"
WORDS = PROMPT.split()


def _hsv(colour):
    r, g, b = (int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return colorsys.rgb_to_hsv(r, g, b)


def _hue_gap(a, b):
    d = abs(a - b) % 360
    return min(d, 360 - d)


def test_colour_words_get_their_hue_and_no_other_word_comes_near_it():
    colours = WordColours.build([WORDS, ["a", "cat", "on", "a", "green", "mat"]])
    named = {"red": 0.0, "blue": 240.0, "green": 120.0}
    for word, want in named.items():
        h, s, v = _hsv(colours.colour(word))
        assert _hue_gap(h * 360, want) < 20 and s > 0.5 and v > 0.4, (word, colours.colour(word))
    for word in ["a", "circle", "next", "to", "square", "cat", "on", "mat"]:
        h, s, v = _hsv(colours.colour(word))
        if s >= 0.25:  # a colour with a hue: away from every colour word's
            for name in named:
                nh = _hsv(colours.colour(name))[0]
                assert _hue_gap(h * 360, nh * 360) >= 30, (word, name, colours.colour(word))
    ordinary = [colours.colour(w) for w in dict.fromkeys(WORDS) if w not in named]
    assert len(set(ordinary)) == len(ordinary)  # the words of one prompt are told apart
    # labels and spellings share the word's colour; the prompts' order does not matter
    assert colours.colour("Red") == colours.colour("red,") == colours.colour("red #1") == colours.colour("red")
    again = WordColours.build([["a", "cat", "on", "a", "green", "mat"], list(reversed(WORDS))])
    assert again.assigned == colours.assigned


def _two_runs(root):
    """Two seeds of PROMPT: red owns the left half of the map, blue the right; red has the larger
    mass in the first run, blue in the second (the ranks swap)."""
    layout = make_layout([PROMPT], clip_len=24, t5_len=16)
    records = []
    for k, (red_gain, blue_gain) in enumerate([(60.0, 20.0), (20.0, 60.0)]):
        arrays = random_arrays(layout, num_blocks=2, num_steps=3, grid=(8, 8), seed=k)
        red = layout.positions("clip", 0, "red") + layout.positions("t5", 0, "red")
        blue = layout.positions("clip", 0, "blue") + layout.positions("t5", 0, "blue")
        arrays["sum_token_map"][0, :, :4][..., red] *= red_gain
        arrays["sum_token_map"][0, :, 4:][..., blue] *= blue_gain
        folder = f"{k:04d}-s{k}"
        write_dump(root / folder, layout, arrays, seed=k, store_dtype="float32")
        records.append({"run": k, "folder": folder, "prompt": [PROMPT], "seed": k, "status": "done"})
    write_runs(root, records)


def _mask(rgb, colour):
    want = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return np.abs(rgb.astype(int) - want).max(axis=-1) <= 30


def test_segmentation_and_curves_paint_each_word_in_its_colour_in_every_run(tmp_path):
    _two_runs(tmp_path)
    assert analyse_stepavg.main(["--root", str(tmp_path), "--dpi", "150", "--topk", "3", "--no-overlay", "--encoders", "clip"]) == 0
    out = tmp_path / "analysis"
    for folder in ("0000-s0", "0001-s1"):
        rgb = np.asarray(Image.open(out / folder / "clip" / "segmentation.png").convert("RGB")).astype(int)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        reddish = (r > 150) & (r > 2 * g) & (r > 2 * b)
        bluish = (b > 150) & (b > 1.5 * r) & (b > 1.5 * g)
        assert reddish.sum() > 500 and bluish.sum() > 500, folder
        # red's cells (the left half) are red, blue's (the right half) blue
        assert np.nonzero(reddish)[1].mean() < np.nonzero(bluish)[1].mean() - 20, folder
        # the curve of "red" is drawn in red's colour (and blue's in blue's), whatever its rank
        colours = WordColours.build([WORDS])
        curves = np.asarray(Image.open(out / folder / "clip" / "curves" / "words_mean_block0.png").convert("RGB"))
        assert _mask(curves, colours.colour("red")).sum() > 30 and _mask(curves, colours.colour("blue")).sum() > 30, folder
    # the ranks did swap: the runs' summaries list red and blue in opposite orders
    import csv

    order = []
    for folder in ("0000-s0", "0001-s1"):
        with open(out / folder / "clip" / "tables" / "words_summary.csv", newline="") as fh:
            rows = list(csv.reader(fh))[1:]
        mass = {r[0]: float(r[1]) for r in rows}
        order.append(mass["red"] > mass["blue"])
    assert order == [True, False]
