"""Every figure of the analysis, laid out with fixed margins (no layout engine), keeps its texts on
the canvas and off each other: drawn with long words, long titles and the random-weights footer, no
tick label, axis label, title, legend entry or footer reaches past the figure's edge, overlaps a
text of another panel, or lies on a panel it does not belong to."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from attention_map_diffusers.analysis import figure, group_plots, plots  # noqa: E402
from attention_map_diffusers.analysis.layout import text_width  # noqa: E402
from attention_map_diffusers.analysis.views import FigureFacts  # noqa: E402

LONG = "photographically #12"  # a long word label
TITLE = "T5: where the pixels' text attention goes (T5 positions; the rest: the other encoder)"
FACTS = FigureFacts(model="stabilityai/stable-diffusion-3.5-large-turbo", seed=123456,
                    prompt="A rusty bicycle in front of a barn, leaning against a weathered wooden fence at golden hour",
                    random_weights=True)
DPI = 72  # one pixel per point


def _labels(n):
    return [LONG if i % 3 == 0 else f"w{i}" for i in range(n)]


def _figures():
    rng = np.random.default_rng(0)
    Bk, S, n, g = 6, 12, 14, 8
    ts = np.linspace(1000, 20, S)
    image = (rng.uniform(size=(64, 64, 3)) * 255).astype(np.uint8)
    heat = rng.uniform(size=(g, g)) * 0.004
    shares = rng.uniform(size=(3, 5, S))
    mean = rng.uniform(size=(3, g, g)) * 0.05
    cross = [("a", [("A rusty bicycle in front of a barn, leaning against a weath...", "A #0", 0.03, 0.001),
                    ("A red fox asleep in the snow under a pine tree, soft mornin...", "a #8", 0.06, 0.002)]),
             ("photographically", [("A rusty bicycle in front of a barn, leaning against a weath...", LONG, 0.03, 0.001)])]
    return {
        "overview": lambda: plots.overview_figure(rng.uniform(size=(Bk, n)) * 1e-3, rng.uniform(size=(S, n)) * 1e-3, _labels(n),
                                                  list(range(Bk)), ts, TITLE, facts=FACTS),
        "overview, one word, no timesteps": lambda: plots.overview_figure(rng.uniform(size=(Bk, 1)), rng.uniform(size=(S, 1)),
                                                                          [LONG], list(range(Bk)), None, "CLIP", facts=FACTS),
        "segmentation": lambda: plots.segmentation_figure(image, rng.integers(0, n, (g, g)), rng.uniform(size=(g, g)), 0.1,
                                                          _labels(n), [plots.LINE_COLOURS[i % 8] for i in range(n)], TITLE, facts=FACTS),
        "segmentation, no image": lambda: plots.segmentation_figure(None, rng.integers(0, 2, (g, g)), rng.uniform(size=(g, g)),
                                                                    0.1, ["a", "cat"], ["#d62728", "#1f4fd6"], "CLIP", facts=FACTS),
        "token groups": lambda: plots.token_groups_figure(shares, ["words", "other prompt tokens", "special tokens", "padding",
                                                                   "other encoder"], ["early 0-1", "middle 2-3", "late 4-5"],
                                                          ts, TITLE, facts=FACTS),
        "token groups, one group": lambda: plots.token_groups_figure(shares[:1], ["words", "b", "c", "d", "e"], ["blocks 0-5"],
                                                                     None, "CLIP", facts=FACTS),
        "clip vs t5": lambda: plots.clip_vs_t5_figure([(heat, heat * 2)] * 3, [LONG, "cat", "a #3"], rng.uniform(size=n) * 0.04,
                                                      rng.uniform(size=n) * 0.04, _labels(n), TITLE, facts=FACTS),
        "clip vs t5, one word": lambda: plots.clip_vs_t5_figure([(heat, heat)], ["cat"], np.array([0.5]), np.array([0.4]), ["cat"],
                                                                "CLIP vs T5", facts=FACTS),
        "curves, two axes": lambda: plots.curves_figure(rng.uniform(size=(S, 11)) * 1e-3, _labels(11), ts, TITLE, ymax=1.1e-3,
                                                        scale_text="same y scale for every block", facts=FACTS),
        "curves with bands": lambda: plots.curves_figure(rng.uniform(size=(S, 2)), ["a", "cat"], None, "T5",
                                                         spread=rng.uniform(size=(S, 2)) * 0.1, facts=FACTS),
        "spread": lambda: plots.spread_figure(mean, mean * 0.1, [LONG, "cat", "a"], TITLE, facts=FACTS),
        "cross prompt": lambda: group_plots.cross_prompt_figure(cross, "T5: words in several prompts", facts=FACTS),
        "heatmap": lambda: plots.heatmap_figure(heat, TITLE, image, vmax=0.003, scale="colour scale: 0 to the 99th percentile",
                                                facts=FACTS),
        "summary": lambda: plots.summary_figure(image, [heat] * 5, _labels(5), title=TITLE, vmaxes=[0.003] * 5, facts=FACTS),
        "summary, wide image beside the maps": lambda: plots.summary_figure(
            np.zeros((32, 96, 3), np.uint8), [heat[:3, :]] * 6, _labels(6), overlay=False, title=TITLE, facts=FACTS),
        "summary, one tall map, no title": lambda: plots.summary_figure(None, [rng.uniform(size=(12, 4))], [LONG], facts=FACTS),
        "word grids": lambda: plots.word_grid_figure(rng.uniform(size=(5, Bk, S)), _labels(5), list(range(Bk)), ts, TITLE,
                                                     facts=FACTS),
        "strip": lambda: plots.strip_figure(rng.uniform(size=(3, 6, g, g)), _labels(3), [f"step {i}" for i in range(6)], TITLE,
                                            facts=FACTS),
        "strip, 3 steps, ticks like 0.175": lambda: plots.strip_figure(
            rng.uniform(size=(2, 3, g, g)) * 0.175, [LONG, "a"], ["step 0 (t=1000)", "step 14 (t=500)", "step 27 (t=20)"],
            "CLIP: top words per step, share of the words' attention\n(each row on its own colour scale: 0 to the 99th percentile "
            "of its maps)", vmaxes=[0.175, 0.175], facts=FACTS),
        "strip, one frame, even split marked": lambda: plots.strip_figure(
            rng.uniform(size=(2, 1, g, g)) * 0.175, ["a", LONG], ["block 23"], TITLE, vmaxes=[0.175, 0.3], facts=FACTS, even=0.125),
        "heatmap, even split marked": lambda: plots.heatmap_figure(heat * 100, TITLE, image, vmax=0.3, scale="own colour scale",
                                                                 facts=FACTS, even=1 / 7),
        "summary, even split marked": lambda: plots.summary_figure(image, [heat * 100] * 3, _labels(3), title=TITLE,
                                                                 vmaxes=[0.3] * 3, facts=FACTS, even=0.125),
        "blocks bands": lambda: group_plots.blocks_bands_figure(rng.uniform(size=(Bk, S, 3)), rng.uniform(size=(Bk, S, 3)) * 0.1,
                                                                _labels(3), list(range(Bk)), ts, TITLE, facts=FACTS),
    }


FIGURES = _figures()


def _drawn_texts(fig):
    """(text, owner) of every non-empty text the figure draws; owner: the axes it belongs to, or None."""
    from matplotlib.text import Text

    fig.draw_without_rendering()
    out = [(t, None) for t in fig.texts]
    for legend in fig.legends:
        out += [(t, None) for t in legend.get_texts()] + [(legend.get_title(), None)]
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        for axis in (ax.xaxis, ax.yaxis) if ax.axison else ():  # an axes with its axis off draws no ticks or labels
            for tick in axis._update_ticks():  # the ticks in view: the ones drawn
                out += [(tick.label1, ax), (tick.label2, ax)]
            out += [(axis.label, ax), (axis.offsetText, ax)]
        out += [(ax.title, ax), (ax._left_title, ax), (ax._right_title, ax)]
        out += [(t, ax) for t in ax.texts if not t.get_clip_on()]
        legend = ax.get_legend()
        if legend is not None:
            out += [(t, ax) for t in legend.get_texts()] + [(legend.get_title(), ax)]
    return [(t, owner) for t, owner in out if isinstance(t, Text) and t.get_visible() and t.get_text().strip()]


def _overlap(a, b, tol=0.5):
    return a.x0 + tol < b.x1 and b.x0 + tol < a.x1 and a.y0 + tol < b.y1 and b.y0 + tol < a.y1


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_texts_stay_on_the_canvas_and_off_each_other(name):
    fig = FIGURES[name]()
    fig.set_dpi(DPI)
    renderer = fig.canvas.get_renderer()
    texts = [(t, owner, t.get_window_extent(renderer)) for t, owner in _drawn_texts(fig)]
    canvas = fig.bbox
    for t, _, box in texts:
        assert canvas.x0 - 1 <= box.x0 and box.x1 <= canvas.x1 + 1 and canvas.y0 - 1 <= box.y0 and box.y1 <= canvas.y1 + 1, (
            f"{name}: {t.get_text()!r} reaches past the figure's edge: {box.extents} vs {canvas.extents}")
    for i, (t, owner, box) in enumerate(texts):
        for u, other, box2 in texts[i + 1 :]:
            if owner is not other or owner is None:
                assert not _overlap(box, box2), f"{name}: {t.get_text()!r} overlaps {u.get_text()!r}"
        for ax in fig.axes:
            if ax is not owner and ax.get_visible() and ax.axison:
                assert not _overlap(box, ax.get_window_extent(renderer)), f"{name}: {t.get_text()!r} lies on another panel"


def test_footer_fits_narrow_figures_by_cutting_the_prompt():
    fig = figure.new_figure(4.0, 2.0, layout=None, facts=FACTS)
    footer = [t for t in fig.texts if t.get_gid() == "footer"]
    assert len(footer) == 1
    text = footer[0].get_text()
    # too narrow for the prompt at all: the warning, model and seed stay, on two lines
    assert text.startswith("RANDOM WEIGHTS") and "seed 123456" in text and "rusty" not in text and text.count("\n") == 1
    renderer = fig.canvas.get_renderer()
    assert footer[0].get_window_extent(renderer).x1 <= fig.bbox.x1
    # the measure the layout relies on agrees with what matplotlib draws, within a few per cent
    drawn = footer[0].get_window_extent(renderer).width / fig.dpi
    assert abs(text_width(text.split("\n"), footer[0].get_fontsize(), "bold") - drawn) < 0.06 * drawn + 0.03
    # a prompt of several lines (a shell's quoted newline) is one line in the footer
    multi = FigureFacts(model="m", seed=1, prompt="a red circle\nnext to\t a blue square", random_weights=False)
    assert multi.footer() == "model m | seed 1 | \u201ca red circle next to a blue square\u201d"
    # a figure of ordinary width keeps as much of the prompt as fits, on one line
    wide = figure.new_figure(8.0, 2.0, layout=None, facts=FACTS)
    text = [t for t in wide.texts if t.get_gid() == "footer"][0].get_text()
    assert "\n" not in text and "\u201cA rusty bicycle" in text and text.endswith("...\u201d")


def test_dollar_signs_in_a_prompt_are_drawn_as_text(tmp_path):
    """A prompt with two "$" (and a brace between them) is drawn literally: matplotlib would read
    the text between as mathtext, and the unbalanced brace would stop the whole analysis."""
    from PIL import Image
    from synthetic_dump import make_layout, random_arrays, write_dump

    import analyse_stepavg

    prompt = "a $5 bill {next to a $10 note"
    layout = make_layout([prompt], clip_len=16, t5_len=16)
    write_dump(tmp_path / "run", layout, random_arrays(layout, num_blocks=2, num_steps=3, grid=(4, 4), seed=1),
               image_size=(32, 32))
    assert analyse_stepavg.main(["--root", str(tmp_path / "run"), "--dpi", "30", "--topk", "2"]) == 0
    with Image.open(tmp_path / "run" / "analysis" / "t5" / "overview.png") as im:
        assert im.text["Prompt"] == prompt
    with pytest.raises(ValueError):  # what the analysis would meet without its own text settings
        fig = plots.overview_figure(np.ones((2, 1)), np.ones((3, 1)), ["$x_{"], [0, 1], None, "a $x_{ b$")
        figure.render_rgba(fig, 30)
