"""Two units, never confused: heatmaps are shares of the words' attention (renormalised per pixel
over the prompt's words), curves and grids shares of all text positions. Every figure names its
unit in its title (the PNG's Title chunk) and its colour bars, and never the other one."""

from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import analyse_stepavg  # noqa: E402
from synthetic_dump import make_layout, random_arrays, write_dump, write_runs  # noqa: E402

from attention_map_diffusers.analysis import plots  # noqa: E402
from attention_map_diffusers.analysis.views import TEXT_SHARE, WORD_SHARE  # noqa: E402

PROMPT = "a red circle next to a blue square"


def _title(path):
    with Image.open(path) as im:
        return im.text["Title"].replace("\n", " ")


def test_every_figure_names_its_unit(tmp_path):
    lay = make_layout([PROMPT], clip_len=24, t5_len=16)
    records = []
    for k in range(2):
        arrays = random_arrays(lay, num_blocks=2, num_steps=3, grid=(6, 6), seed=k)
        arrays["per_step_token_map"] = np.random.default_rng(k).uniform(size=(1, 3, 6, 6, lay.T)).astype(np.float32)
        write_dump(tmp_path / f"r{k}", lay, arrays, seed=k, store_dtype="float32")
        records.append({"run": k, "folder": f"r{k}", "prompt": [PROMPT], "seed": k, "status": "done"})
    write_runs(tmp_path, records)
    assert analyse_stepavg.main(["--root", str(tmp_path), "--dpi", "20", "--topk", "2", "--phrases", "red circle"]) == 0
    out = tmp_path / "analysis"
    run = out / "r0"
    (agg,) = list((out / "aggregate").iterdir())
    word = [*(run / "clip" / "heatmaps" / "words").glob("*.png"), *(run / "t5" / "heatmaps" / "phrases").glob("*.png"),
            run / "clip" / "summary.png", run / "t5" / "strips" / "steps.png", run / "clip" / "segmentation.png",
            run / "clip_vs_t5.png", agg / "clip" / "heatmaps_mean_01.png"]
    text = [*(run / "t5" / "curves").glob("*.png"), run / "clip" / "overview.png", run / "t5" / "word_grids.png",
            run / "clip" / "token_groups.png", agg / "t5" / "curves_mean.png", agg / "clip" / "curves_blocks.png"]
    assert len(word) == 8 and len(text) == 9 and all(p.is_file() for p in word + text)
    for path in word:
        t = _title(path)
        assert WORD_SHARE in t and TEXT_SHARE not in t, (path, t)
    for path in text:
        t = _title(path)
        assert TEXT_SHARE in t and WORD_SHARE not in t, (path, t)


def _bar_labels(fig):
    return [ax.yaxis.get_label().get_text().replace("\n", " ") for ax in fig.axes if ax.yaxis.get_label().get_text()]


def test_colour_bars_name_their_unit():
    rng = np.random.default_rng(0)
    heat = rng.uniform(size=(6, 6))
    word_figs = [plots.heatmap_figure(heat, "t", vmax=1.0), plots.clip_vs_t5_figure([(heat, heat)], ["a"], np.ones(1), np.ones(1), ["a"], "t"),
                 plots.spread_figure(heat[None], heat[None], ["a"], "t")]
    text_figs = [plots.overview_figure(rng.uniform(size=(2, 3)), rng.uniform(size=(4, 3)), ["a", "b", "c"], [0, 1], None, "t"),
                 plots.word_grid_figure(rng.uniform(size=(2, 2, 4)), ["a", "b"], [0, 1], None, "t")]
    for fig in word_figs:
        bars = [t for t in _bar_labels(fig) if "share" in t]
        assert bars and all(WORD_SHARE in t and TEXT_SHARE not in t for t in bars), _bar_labels(fig)
    for fig in text_figs:
        assert any(TEXT_SHARE in t for t in _bar_labels(fig)) and not any(WORD_SHARE in t for t in _bar_labels(fig))
