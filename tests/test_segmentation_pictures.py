"""The evaluation's figures, checked on their pixels: summary.png's bars, baselines and error bars,
cases.png's colour bar and threshold contour."""

from __future__ import annotations

from collections import deque
from html.parser import HTMLParser

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.colors import to_rgb

from attention_map_diffusers.analysis.figure import render_rgba
from attention_map_diffusers.analysis.plots import HEAT_CMAP, LINE_COLOURS
from attention_map_diffusers.segmentation.plots import (
    BASELINE_COLOUR,
    ERROR_COLOUR,
    THRESHOLD_COLOUR,
    Case,
    cases_figure,
    summary_figure,
)
from attention_map_diffusers.segmentation.tables import NO_ENCODER, SummaryRow

DPI = 100


def _rgb(colour) -> np.ndarray:
    return np.round(np.array(to_rgb(colour)) * 255).astype(int)


def _render(fig):
    rgba = render_rgba(fig, DPI).astype(int)
    return rgba[..., :3]


def _box(fig, ax):
    """(top, bottom, left, right) pixel rows / columns of ``ax`` in the rendered picture."""
    bb = ax.get_window_extent()
    H = int(round(fig.get_figheight() * DPI))
    return int(round(H - bb.y1)), int(round(H - bb.y0)), int(round(bb.x0)), int(round(bb.x1))


def _components(mask: np.ndarray, min_size: int = 30) -> list[tuple[int, int, int, int, int]]:
    """Connected regions (4-neighbour) of ``mask``: (size, top, bottom, left, right), the small ones dropped."""
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pix = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pix.append((y, x))
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                v, u = y + dy, x + dx
                if 0 <= v < mask.shape[0] and 0 <= u < mask.shape[1] and mask[v, u] and not seen[v, u]:
                    seen[v, u] = True
                    queue.append((v, u))
        if len(pix) >= min_size:
            ys, xs = zip(*pix)
            out.append((len(pix), min(ys), max(ys), min(xs), max(xs)))
    return out


def _row(method, encoder, miou, se):
    return SummaryRow(method, encoder, "all", 4, 10, miou, se, miou, miou, se, 0.9, 0.8 if method == "argmax" else float("nan"))


def test_summary_draws_each_baseline_once_in_grey_with_95_percent_error_bars():
    encoders = ("clip", "t5", "both")
    rows = [_row(m, e, 0.30 + 0.1 * i + 0.05 * j, 0.05) for i, m in enumerate(("daam", "argmax")) for j, e in enumerate(encoders)]
    rows += [_row(b, NO_ENCODER, v, 0.02) for b, v in (("whole", 0.15), ("centre", 0.25), ("random", 0.12))]
    fig = summary_figure(rows, "t")
    img = _render(fig)
    panels = [ax for ax in fig.axes if ax.get_title() in ("mIoU (%)", "mAP (%)")]
    assert len(panels) == 2
    for ax in panels:
        top, bottom, left, right = _box(fig, ax)
        part = img[top:bottom, left:right]
        grey = _components((part == _rgb(BASELINE_COLOUR)).all(-1))
        assert len(grey) == 3, grey  # each baseline once, not once per encoder
        for j, e in enumerate(encoders):
            mine = _components((part == _rgb(LINE_COLOURS[j])).all(-1))
            assert len(mine) == 2, (e, mine)  # daam and argmax
            # no encoder colour inside a baseline's bar
            for _, t, b, lft, rgt in grey:
                assert not (part[t:b + 1, lft:rgt + 1] == _rgb(LINE_COLOURS[j])).all(-1).any()
        # the error bar of daam / clip (mean 30 %, se 5 %): from 30 - 9.8 to 30 + 9.8 on a 0-112 axis
        _, t, b, lft, rgt = sorted(_components((part == _rgb(LINE_COLOURS[0])).all(-1)), key=lambda c: c[3])[0]
        col = part[:, (lft + rgt) // 2]
        h = bottom - top
        dark = np.flatnonzero((np.abs(col - _rgb(ERROR_COLOUR)) <= 40).all(-1))
        dark = dark[(dark > 1) & (dark < h - 2)]  # not the axes' frame
        y = lambda pct: h - 1 - pct / 112 * (h - 1)  # noqa: E731 - pixel row of a percentage
        assert abs(dark.min() - y(30 + 1.96 * 5)) <= 2.5 and abs(dark.max() - y(30 - 1.96 * 5)) <= 2.5, (dark.min(), dark.max())
        # the bar's top is at its mean
        assert abs(t - y(30)) <= 2.5
    labels = [t.get_text() for t in panels[0].get_xticklabels()]
    assert labels[0] == "daam\nn = 10" and labels[2] == "whole\n(baseline)\nn = 10"
    assert "1.96 standard errors" in fig._supxlabel.get_text()


def test_cases_have_a_colour_bar_and_the_threshold_contour():
    H = W = 64
    heat = np.tile(np.arange(W) / (W - 1), (H, 1))  # 0 at the left edge, 1 at the right
    gt = np.zeros((H, W), bool)
    gt[10:50, 30:60] = True
    case = Case("best 1", "k", "cat", 0.5, 0.6, None, gt, heat >= 0.4, heat, None, 0.4)
    fig = cases_figure([case], "t")
    img = _render(fig)
    grid = [ax for ax in fig.axes if ax.get_title()]
    heat_ax = grid[2]
    assert "dashed: tau 0.4" in heat_ax.get_title()
    top, bottom, left, right = _box(fig, heat_ax)
    part = img[top + 2:bottom - 2, left + 2:right - 2]
    white = (part >= 235).all(-1)
    ys, xs = np.nonzero(white)
    assert len(ys) > 0
    # heat = x / 63 reaches 0.4 at x = 25.2, i.e. at (25.2 + 0.5) / 64 of the panel's width
    assert np.median(xs) / part.shape[1] == pytest.approx(25.7 / 64, abs=0.02)
    assert xs.max() - xs.min() <= 4 and len(set(ys)) > 0.4 * part.shape[0]  # one vertical dashed line
    # the colour bar: inferno from 0 (bottom) to 1 (top), the threshold marked at 0.4 of its height
    bar_ax = [ax for ax in fig.axes if ax not in grid and ax.get_ylim() == (0.0, 1.0)]
    assert len(bar_ax) == 1
    top, bottom, left, right = _box(fig, bar_ax[0])
    col = img[top + 2:bottom - 2, left + 3]
    cmap = colormaps[HEAT_CMAP]
    assert np.abs(col[0] - np.round(np.array(cmap(1.0)[:3]) * 255)).max() <= 12
    assert np.abs(col[-1] - np.round(np.array(cmap(0.0)[:3]) * 255)).max() <= 12
    inside = img[top:bottom, left + 1:right - 1]
    marks = np.flatnonzero((np.abs(inside - _rgb(THRESHOLD_COLOUR)) <= 20).all(-1).sum(axis=1) >= 2)
    assert len(marks) and abs(1 - np.median(marks) / (bottom - top) - 0.4) <= 0.03


# ---------------------------------------------------------------------------------------------
# index.html


class _Dom(HTMLParser):
    """A small DOM: every element with its tag, attributes, parent and text (html.parser of the standard library)."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.root = {"tag": "#root", "attrs": {}, "children": [], "parent": None, "text": ""}
        self.here = self.root
        self.all = []

    def handle_starttag(self, tag, attrs):
        node = {"tag": tag, "attrs": dict(attrs), "children": [], "parent": self.here, "text": ""}
        self.here["children"].append(node)
        self.all.append(node)
        if tag not in self.VOID:
            self.here = node

    def handle_endtag(self, tag):
        node = self.here
        while node is not self.root and node["tag"] != tag:
            node = node["parent"]
        if node is not self.root:
            self.here = node["parent"]

    def handle_data(self, data):
        node = self.here
        while node is not None:
            node["text"] += data
            node = node["parent"]

    def find(self, tag, **attrs):
        return [n for n in self.all if n["tag"] == tag and all(n["attrs"].get(k) == v for k, v in attrs.items())]


def _parse(path) -> _Dom:
    dom = _Dom()
    dom.feed(path.read_text(encoding="utf-8"))
    return dom


def _cells(row):
    return [c["text"].strip() for c in row["children"] if c["tag"] in ("td", "th")]


def _evaluation(tmp_path, capsys, *, damaged=False):
    from test_segmentation import box_mask, make_run, run_main
    from synthetic_dump import write_runs

    runs = []
    for r, (prompt, word) in enumerate((("a red circle next to a blue square", "circle"), ("a cat on a sofa", "cat"),
                                        ("a dog and a ball", "dog"))):
        folder = f"{r:04d}-run"
        make_run(tmp_path / "d" / folder, prompt, [(word, slice(2, 6), slice(1, 4))], seed=r)
        box_mask(str(tmp_path / "m" / folder / f"{word}.png"))
        runs.append({"run": r, "folder": folder, "prompt": [prompt], "seed": r, "status": "done"})
    box_mask(str(tmp_path / "m" / "0000-run" / "square.png"), pixels=(slice(40, 60), slice(40, 60)))
    box_mask(str(tmp_path / "m" / "0001-run" / "sofa.png"), value=0)  # empty: skipped
    write_runs(tmp_path / "d", runs)
    if damaged:
        (tmp_path / "d" / "0002-run" / "stepavg_token_maps_v1.npz").write_bytes(b"junk")
    code, _, err = run_main(["--dumps", tmp_path / "d", "--masks", tmp_path / "m", "--out", tmp_path / "o"], capsys)
    assert code == (1 if damaged else 0), err
    return tmp_path / "o"


def test_index_html_tables_match_the_csv_files_and_every_link_resolves(tmp_path, capsys):
    import csv

    out = _evaluation(tmp_path, capsys)
    dom = _parse(out / "index.html")
    assert dom.find("meta", name="viewport")
    assert not dom.find("p", **{"class": "warn"})
    # every table scrolls inside its own box
    tables = dom.find("table")
    assert len(tables) >= 3 and all(t["parent"]["tag"] == "div" and t["parent"]["attrs"].get("class") == "scroll" for t in tables)
    box = dom.find("div", id="summary-table")[0]
    rows = [_cells(r) for r in box["children"][0]["children"] if r["tag"] == "tr"]
    header, body = rows[0], rows[1:]
    assert header[:5] == ["method", "encoder", "images", "n", "mIoU (%)"] and header[7] == "mAP (%)"
    assert header[9:] == ["word pixel acc. (%)", "image pixel acc. (%)"]
    with open(out / "summary.csv", newline="") as fh:
        csv_rows = {(r["method"], r["encoder"]): r for r in csv.DictReader(fh)}
    shown = [(r[0].replace(" (baseline)", ""), r[1]) for r in body]
    methods = [(m, e) for m in ("daam", "argmax") for e in ("clip", "t5", "both")]
    assert shown == methods + [("whole", "none"), ("centre", "none"), ("random", "none")]  # baselines once
    for cells in body[:6]:
        ref = csv_rows[(cells[0], cells[1])]
        assert cells[3] == ref["n"] and cells[4] == f"{100 * float(ref['mIoU']):.1f}"  # percent of the CSV's fraction
        assert cells[5] == f"\u00b1\u202f{100 * 1.96 * float(ref['mIoU_se']):.1f}"
        assert cells[7] == f"{100 * float(ref['mAP']):.1f}"
        assert cells[10] == (f"{100 * float(ref['image_pixel_acc']):.1f}" if cells[0] == "argmax" else "")
    # the baselines' rows: every pair once (here the same under each encoder)
    whole = next(c for c in body if c[0] == "whole (baseline)")
    assert whole[4] == f"{100 * float(csv_rows[('whole', 't5')]['mIoU']):.1f}"
    # skipped: counts per reason as in skipped.csv
    with open(out / "skipped.csv", newline="") as fh:
        reasons = [r["reason"] for r in csv.DictReader(fh)]
    box = dom.find("div", id="skipped-reasons")[0]
    listed = {c[0]: int(c[1]) for c in (_cells(r) for r in box["children"][0]["children"][1:])}
    assert listed == {r: reasons.count(r) for r in reasons} and listed
    # per image: one row per image, linked to its CSV
    box = dom.find("div", id="images-table")[0]
    keys = [_cells(r)[0] for r in box["children"][0]["children"][1:]]
    assert keys == ["0000-run", "0001-run", "0002-run"]
    # every image and link points at a file of the folder
    for node in dom.find("img"):
        assert (out / node["attrs"]["src"]).is_file()
        assert node["parent"]["tag"] == "a" and node["parent"]["attrs"]["href"] == node["attrs"]["src"]  # full size on a tap
    for node in dom.find("a"):
        assert (out / node["attrs"]["href"]).is_file(), node["attrs"]["href"]
    assert {n["attrs"]["src"] for n in dom.find("img")} == {"summary.png", "cases.png"}


def test_index_html_says_when_the_evaluation_is_incomplete(tmp_path, capsys):
    out = _evaluation(tmp_path, capsys, damaged=True)
    warns = [n["text"] for n in _parse(out / "index.html").find("p", **{"class": "warn"})]
    assert warns[0].startswith("error: 0002-run: not scored: ")
    assert warns[1].startswith("error: 1 of 3 runs could not be scored")


@pytest.mark.parametrize("methods, encoders, baseline", [(("argmax",), ("t5",), False), (("argmax",), ("t5",), True),
                                                        (("daam", "argmax"), ("clip", "t5", "both"), True)])
def test_summary_text_stays_on_the_canvas(methods, encoders, baseline):
    """Rendered as the report renders it (its fonts, 150 dpi): the picture's outermost pixels are all
    background, so no text runs off an edge."""
    from attention_map_diffusers.analysis.fonts import use_fonts

    rows = [_row(m, e, 0.5, 0.1) for m in methods for e in encoders] + [_row("whole", NO_ENCODER, 0.1, 0.01)] * baseline
    with use_fonts(None):
        fig = summary_figure(rows, "zero-shot segmentation: 4 images, tau 0.4, maps of all blocks and steps")
        img = render_rgba(fig, 150)[..., :3].astype(int)
    edges = np.concatenate([img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3), img[:2].reshape(-1, 3),
                            img[-2:].reshape(-1, 3)])
    assert (edges >= 250).all(), "text or drawing reaches the edge of the picture"


@pytest.mark.parametrize("n", [0, 1, 4])
def test_cases_text_stays_on_the_canvas(n):
    from attention_map_diffusers.analysis.fonts import use_fonts

    heat = np.tile(np.arange(64) / 63, (64, 1))
    gt = np.zeros((64, 64), bool)
    gt[10:50, 30:60] = True
    cases = [Case(f"best {k}", "a-rather-long-key-of-an-image", "potted plant", 0.5, 0.6, None, gt, heat >= 0.4, heat,
                  None, 0.4) for k in range(n)]
    with use_fonts(None):
        fig = cases_figure(cases, "best and worst pairs of the best method: argmax (both), tau 0.4", "bg threshold")
        img = render_rgba(fig, 110)[..., :3].astype(int)
    edges = np.concatenate([img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3), img[:2].reshape(-1, 3),
                            img[-2:].reshape(-1, 3)])
    assert (edges >= 250).all(), "text or drawing reaches the edge of the picture"
