"""The analysis pages and what their figures say, checked on the parsed HTML and on the matplotlib
objects: given-image runs labelled as such, aggregate pages, narrow-screen markup."""

from __future__ import annotations

import os
import sys
from html.parser import HTMLParser

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import analyse_stepavg  # noqa: E402
from synthetic_dump import make_layout, random_arrays, write_dump, write_runs  # noqa: E402

from attention_map_diffusers.analysis import plots, write  # noqa: E402

PROMPT = "A rusty bicycle in front of a barn"
LEVELS = [0.9, 0.6, 0.3]
SOURCE = {"name": "barn photo.jpg", "path": "/nowhere/barn photo.jpg", "sha256": "0" * 64, "size": [96, 80],
          "crop_box": [8.0, 0.0, 88.0, 80.0], "resample": "bicubic"}


class Page(HTMLParser):
    """The visible text of a page and its elements as (tag, attrs, parent tags)."""

    def __init__(self, text: str):
        super().__init__()
        self.parts: list[str] = []
        self.elements: list[tuple[str, dict, list]] = []
        self.stack: list[tuple[str, dict]] = []
        self._skip = 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs, list(self.stack)))
        if tag in ("style", "script"):
            self._skip += 1
        if tag not in ("img", "meta", "br", "input", "link"):
            self.stack.append((tag, attrs))

    def handle_endtag(self, tag):
        if tag in ("style", "script"):
            self._skip -= 1
        for k in range(len(self.stack) - 1, -1, -1):
            if self.stack[k][0] == tag:
                del self.stack[k:]
                break

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.parts).split())


def _image_dump(folder, seed, levels=LEVELS):
    layout = make_layout([PROMPT], clip_len=77, t5_len=24)
    arrays = random_arrays(layout, num_blocks=2, num_steps=len(levels), grid=(4, 4), seed=seed)
    arrays["timesteps"] = np.array([1000.0 * s for s in levels], np.float32)
    meta = {"mode": "image", "source_image": SOURCE, "noise_levels": levels, "strength": None}
    write_dump(folder, layout, arrays, seed=seed, meta=meta)


@pytest.fixture
def one_cpu(monkeypatch):
    """Everything written in this process (no forked encoder, no worker pool), so figures can be watched."""
    monkeypatch.setattr(write, "_cpus", lambda: 1)


def test_given_image_run_is_labelled_as_given(tmp_path, monkeypatch, one_cpu):
    root = tmp_path / "runs"
    _image_dump(root / "0000-barn-s1", 1)
    write_runs(root, [{"run": 0, "folder": "0000-barn-s1", "prompt": [PROMPT], "seed": 1, "status": "done"}])
    figures = []
    original = plots.curves_figure

    def watched(*args, **kwargs):
        fig = original(*args, **kwargs)
        figures.append(fig)
        return fig

    monkeypatch.setattr(plots, "curves_figure", watched)
    assert analyse_stepavg.main(["--root", str(root), "--topk", "2", "--dpi", "30"]) == 0
    out = root / "analysis"
    run_page = Page((out / "0000-barn-s1" / "index.html").read_text(encoding="utf-8"))
    text = run_page.text
    assert "given image barn photo.jpg" in text and "generated image" not in text
    assert "crop (8, 0)\u2013(88, 80) of 96\u00d780" in text
    assert "mode image" in text and "0.9, 0.6, 0.3" in text
    assert "denoising step" not in text
    captions = [a.get("alt") for tag, a, _ in run_page.elements if tag == "img" and "image.png" in a.get("src", "")]
    assert captions and captions[0].startswith("given image barn photo.jpg")
    index = Page((out / "index.html").read_text(encoding="utf-8")).text
    assert "mode: image" in index and "barn photo.jpg" in index and "\u03c3 0.9, 0.6, 0.3" in index
    # the curves: one marker per level, no joining line, σ on the x axis
    assert figures
    for fig in figures:
        lines = [ln for ax in fig.axes for ln in ax.get_lines()]
        assert lines and all(ln.get_linestyle() == "None" and ln.get_marker() == "o" for ln in lines)
        ax = next(ax for ax in fig.axes if ax.get_lines())
        xlabel = [a.get_xlabel() for a in fig.axes if a.get_xlabel()][0]
        assert "\u03c3" in xlabel and "step" not in xlabel
        assert [t.get_text() for t in ax.get_xticklabels()] == [f"\u03c3={s:.2f}" for s in LEVELS]


def test_given_image_token_groups_are_bars_per_level():
    """With noise levels (independent measurements) the token groups are stacked bars, one per
    level, heights the groups' shares, and nothing (no area) joins two levels; σ on the x axis."""
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Rectangle

    shares = np.array([[[0.5, 0.2, 0.1], [0.3, 0.6, 0.7]]])  # (Gb=1, G=2, S=3)
    fig = plots.token_groups_figure(shares, ["words", "other encoder"], ["all blocks"], None, "t", levels=np.array(LEVELS))
    ax = fig.axes[0]
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]  # no stacked areas
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(bars) == 2 * 3
    got = sorted((round(b.get_x() + b.get_width() / 2, 6), round(b.get_y(), 6), round(b.get_height(), 6)) for b in bars)
    want = sorted((float(k), float(shares[0, :g, k].sum()), float(shares[0, g, k])) for g in range(2) for k in range(3))
    assert np.allclose(got, want)
    assert "\u03c3" in ax.get_xlabel()
    areas = plots.token_groups_figure(shares, ["words", "other encoder"], ["all blocks"], None, "t")  # a generation: areas
    assert [c for c in areas.axes[0].collections if isinstance(c, PolyCollection)]


def test_given_image_groups_aggregate_per_level_with_error_bars(tmp_path, one_cpu):
    """Two seeds of one given image: the group's curves are markers per noise level with error bars
    (no line, no band joining two levels) on a σ axis; a generation's runs never join that group."""
    from matplotlib.collections import LineCollection, PolyCollection

    from attention_map_diffusers.analysis import group_plots

    root = tmp_path / "runs"
    _image_dump(root / "0000-barn-s1", 1)
    _image_dump(root / "0001-barn-s2", 2)
    write_runs(root, [{"run": k, "folder": f, "prompt": [PROMPT], "seed": k + 1, "status": "done"}
                      for k, f in enumerate(("0000-barn-s1", "0001-barn-s2"))])
    made = []
    original = group_plots.blocks_bands_figure

    def watched(*args, **kwargs):
        made.append((original(*args, **kwargs), kwargs.get("levels")))
        return made[-1][0]

    mp = pytest.MonkeyPatch()
    mp.setattr(group_plots, "blocks_bands_figure", watched)
    try:
        assert analyse_stepavg.main(["--root", str(root), "--topk", "2", "--dpi", "30"]) == 0
    finally:
        mp.undo()
    assert made, "the group's per-block figure was drawn"
    for fig, levels in made:
        assert levels is not None and list(levels) == LEVELS
        for ax in fig.axes:
            assert not [c for c in ax.collections if isinstance(c, PolyCollection)]  # no band
            assert all(ln.get_linestyle() == "None" for ln in ax.get_lines())  # markers, no line
        assert any(isinstance(c, LineCollection) for ax in fig.axes for c in ax.collections)  # error bars
        assert "\u03c3" in fig._supxlabel.get_text()


def test_aggregate_curves_show_whole_bands_in_line_colours_with_labelled_steps():
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import to_rgb

    from attention_map_diffusers.analysis import group_plots

    rng = np.random.default_rng(3)
    S, m = 7, 3
    mean = rng.uniform(0.02, 0.05, (S, m))
    std = rng.uniform(0.01, 0.04, (S, m))
    std[4, 1] = 0.2  # one wide band, far above every mean
    fig = plots.curves_figure(mean, ["a", "red", "circle"], None, "mean over runs", spread=std)
    ax = next(a for a in fig.axes if a.get_lines())
    assert ax.get_ylim()[1] >= (mean + std).max()
    solid = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(solid) == len(bands) == m
    for line, band in zip(solid, bands):
        colour = to_rgb(line.get_color())
        assert np.allclose(band.get_facecolor()[0][:3], colour)  # the word's line colour ...
        assert band.get_facecolor()[0][3] < 0.5  # ... seen through
        edges = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--" and np.allclose(to_rgb(ln.get_color()), colour)]
        assert len(edges) == 2  # outlined: upper and lower edge
        ys = sorted((tuple(e.get_ydata()) for e in edges), key=sum)
        j = solid.index(line)
        assert np.allclose(ys[0], mean[:, j] - std[:, j]) and np.allclose(ys[1], mean[:, j] + std[:, j])

    Bk = 4
    fig = group_plots.blocks_bands_figure(np.repeat(mean[None], Bk, 0), np.repeat(std[None], Bk, 0), ["a", "red", "circle"],
                                          list(range(Bk)), np.linspace(1000, 100, S), "per block")
    panels = [a for a in fig.axes if a.get_lines()]
    assert all(a.get_ylim()[1] >= (mean + std).max() for a in panels)
    labelled = [([t.get_text() for t in a.get_xticklabels()], a.get_xticks()) for a in panels]
    labelled = [(names, ticks) for names, ticks in labelled if any(names)]
    assert labelled and all(names == [f"{v:.0f}" for v in ticks] for names, ticks in labelled)  # step numbers, not first / last
    assert all(names[0] == "0" and len(names) >= 3 for names, _ in labelled)
    assert "step" in fig._supxlabel.get_text()


def _runs_of_one_prompt(root, seeds=(1, 2), prompt="a red circle next to a blue square on grass"):
    runs = []
    for k, seed in enumerate(seeds):
        folder = f"{k:04d}-run-s{seed}"
        layout = make_layout([prompt], clip_len=77, t5_len=24)
        write_dump(root / folder, layout, random_arrays(layout, num_blocks=2, num_steps=3, grid=(4, 4), seed=seed), seed=seed)
        runs.append({"run": k, "folder": folder, "prompt": [prompt], "seed": seed, "status": "done"})
    write_runs(root, runs)
    return runs


def test_aggregate_page_explains_the_mean_shows_the_runs_and_splits_tall_figures(tmp_path, one_cpu):
    from PIL import Image

    root = tmp_path / "runs"
    runs = _runs_of_one_prompt(root)
    assert analyse_stepavg.main(["--root", str(root), "--topk", "8", "--dpi", "200", "--encoders", "t5"]) == 0
    group = next((root / "analysis" / "aggregate").glob("*/index.html"))
    page = Page(group.read_text(encoding="utf-8"))
    assert "an object sits in different places" in page.text
    assert "layout" in page.text and "No object-aligned view" in page.text
    assert "not each word on its own scale as in a single run" in page.text  # the changed scale rule, flagged
    # the runs' images beside the maps: one linked thumbnail per run, its own image
    thumbs = [(a["src"], stack) for tag, a, stack in page.elements
              if tag == "img" and any(t == "div" and p.get("class") == "thumbs" for t, p in stack)]
    assert [src.split("/")[-2] for src, _ in thumbs] == [r["folder"] for r in runs]
    assert all((group.parent / src).resolve().is_file() for src, _ in thumbs)
    assert all(stack[-1][0] == "a" and stack[-1][1]["href"] == src for src, stack in thumbs)
    # the mean / spread maps in pieces, each at most 1600 px tall, every top word in one of them
    pieces = sorted((group.parent / "t5").glob("heatmaps_mean_*.png"))
    assert len(pieces) >= 2
    heights = [Image.open(p).size[1] for p in pieces]
    assert max(heights) <= 1600, heights
    shown = [a["src"] for tag, a, _ in page.elements if tag == "img" and "heatmaps_mean_" in a.get("src", "")]
    assert shown == [f"t5/{p.name}" for p in pieces]


def test_segmentation_legend_lists_only_words_that_own_cells():
    names = ["a", "red", "circle", "blue"]
    labels = np.array([[0, 0, 1], [1, 3, 3], [2, 2, 0]])
    top = np.array([[0.9, 0.9, 0.9], [0.9, 0.9, 0.9], [0.1, 0.1, 0.9]])  # "circle" wins only undecided cells
    fig = plots.segmentation_figure(None, labels, top, 0.5, names, ["#444444", "#d62728", "#2ca02c", "#1f77b4"], "segmentation")
    listed = [t.get_text() for t in fig.legends[0].get_texts()]
    owners = [names[k] for k in range(4) if any(labels[y, x] == k and top[y, x] >= 0.5 for y in range(3) for x in range(3))]
    assert owners == ["a", "red", "blue"]
    assert listed[:-1] == owners and listed[-1].startswith("undecided")


STEPS, BEST = 8, 5  # more steps than a strip shows; the step whose maps have structure


def _planted_run(folder, prompt, seed, sink=None):
    """A run whose per-step maps are flat except at step BEST, and where ``sink`` (a word) takes most of the attention."""
    layout = make_layout([prompt], clip_len=77, t5_len=24)
    arrays = random_arrays(layout, num_blocks=2, num_steps=STEPS, grid=(4, 4), seed=seed)
    if sink:
        pos = layout.positions("clip", 0, sink) + layout.positions("t5", 0, sink)
        probs = arrays["sum_token_map"].astype(np.float64)
        total = probs.sum(axis=-1, keepdims=True)
        probs[..., pos] *= 40.0
        arrays["sum_token_map"] = (probs / probs.sum(axis=-1, keepdims=True) * total).astype(np.float32)
    frames = np.full((1, STEPS, 4, 4, layout.T), 1.0 / layout.T, np.float32)
    word = layout.positions("clip", 0, "circle") + layout.positions("t5", 0, "circle")
    frames[0, BEST, :, :2, word] *= 9.0  # "circle" takes the left half at step BEST
    arrays["per_step_token_map"] = frames
    write_dump(folder, layout, arrays, seed=seed)


def test_smaller_page_fixes(tmp_path, capsys, monkeypatch, one_cpu):
    """Sink flagged, slider over every step opening on the informative one, a punctuation row only
    for a prompt with punctuation, one warning for a missing phrase, steps listed once, the index's
    top-word map beside the image."""
    root = tmp_path / "runs"
    prompts = ["a red circle next to a blue square", "a circle, a cat."]
    for k, prompt in enumerate(prompts):
        _planted_run(root / f"000{k}-r", prompt, k + 1, sink="circle" if k == 0 else None)
    write_runs(root, [{"run": k, "folder": f"000{k}-r", "prompt": [p], "seed": k + 1, "status": "done"} for k, p in enumerate(prompts)])
    groups = []
    original = plots.token_groups_figure

    def watched(shares, names, *args, **kwargs):
        groups.append(list(names))
        return original(shares, names, *args, **kwargs)

    monkeypatch.setattr(plots, "token_groups_figure", watched)
    assert analyse_stepavg.main(["--root", str(root), "--topk", "2", "--dpi", "30", "--phrases", "zebra"]) == 0
    err = capsys.readouterr().err
    assert len([ln for ln in err.splitlines() if "zebra" in ln]) == 1  # 2 runs x 2 encoders, said once
    # the token groups: the punctuation row only for the prompt with punctuation (one figure per encoder per run)
    assert len(groups) == 4
    assert ["other prompt tokens" in g for g in groups] == [False, False, True, True]

    out = root / "analysis"
    page = Page((out / "0000-r" / "index.html").read_text(encoding="utf-8"))
    # sink: "circle" takes > 40 % of the words' attention in run 0, flagged in the words table and the summary's caption
    assert "Sink: \u201ccircle\u201d takes" in page.text
    captions = [a.get("alt", "") for tag, a, _ in page.elements if tag == "img" and a.get("src", "").endswith("summary.png")]
    assert captions and all("Sink: \u201ccircle\u201d" in c for c in captions)
    sink_cells = [stack for tag, a, stack in page.elements if tag == "b" and a.get("class") == "sink"]
    assert len(sink_cells) == 2  # CLIP and T5: only "circle"
    other = Page((out / "0001-r" / "index.html").read_text(encoding="utf-8"))
    assert "Sink:" not in other.text
    # the step slider: every step, opening on the step whose maps vary across the image
    sliders = [a for tag, a, _ in page.elements if tag == "div" and "slider" in a.get("class", "").split()
               and "step" in a.get("id", "")]
    assert len(sliders) == 2
    import json

    for sl in sliders:
        assert len(json.loads(sl["data-labels"])) == STEPS
    inputs = [a for tag, a, stack in page.elements if tag == "input" and "step" in stack[-1][1].get("aria-label", "") + a.get("aria-label", "")]
    assert [int(a["value"]) for a in inputs] == [BEST, BEST]
    # settings: the number of steps once
    cells = [d.strip() for d in page.parts]
    assert cells.count("num_steps") == 0 and cells.count("steps") == 1
    # the index: each run's image and its top word's map, linked to the map
    index = Page((out / "index.html").read_text(encoding="utf-8"))
    maps = [(a, stack) for tag, a, stack in index.elements if tag == "img" and a.get("src", "").endswith("top_word.png")]
    assert len(maps) == 2
    for a, stack in maps:
        assert "top word" in a["alt"] and (out / a["src"]).is_file() and stack[-1][1]["href"] == a["src"]
    assert "CLIP top word: circle" in maps[0][0]["alt"]
