"""The CLIP vs T5 scatter's word labels never cover each other: in a crowded scatter (twelve words
of nearly equal mass) the drawn labels' boxes, measured by matplotlib's renderer, are disjoint and
inside the axes, and a label moved from its usual place has a leader line to its point."""

from __future__ import annotations

import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from matplotlib.text import Annotation, Text  # noqa: E402

from attention_map_diffusers.analysis import plots  # noqa: E402
from attention_map_diffusers.analysis.layout import place_labels  # noqa: E402


def _overlap(a, b):
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_crowded_scatter_labels_do_not_overlap():
    rng = np.random.default_rng(0)
    n = 12
    clip = 0.04 + rng.uniform(-0.002, 0.002, n)  # a tight cluster: every label's usual place is taken
    t5 = 0.04 + rng.uniform(-0.002, 0.002, n)
    clip[0], t5[0] = 0.02, 0.1  # one far away (and clear of the edges)
    labels = [f"a #{i}" if i % 2 else f"word{i}" for i in range(n)]
    heat = rng.uniform(size=(4, 4))
    fig = plots.clip_vs_t5_figure([(heat, heat)], ["a"], clip, t5, labels, "t")
    fig.set_dpi(100)
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[-1]
    notes = [t for t in ax.texts if isinstance(t, Annotation)]
    assert sorted(t.get_text() for t in notes) == sorted(labels)
    for t in notes:
        t.update_positions(renderer)
    boxes = [Text.get_window_extent(t, renderer) for t in notes]  # the text alone, not its leader line
    frame = ax.get_window_extent(renderer)
    for i, a in enumerate(boxes):
        assert frame.x0 - 1 <= a.x0 and a.x1 <= frame.x1 + 1 and frame.y0 - 1 <= a.y0 and a.y1 <= frame.y1 + 1, notes[i].get_text()
        for j in range(i + 1, len(boxes)):
            assert not _overlap(a, boxes[j]), (notes[i].get_text(), notes[j].get_text())
    moved = [t for t in notes if t.arrow_patch is not None]
    assert moved and len(moved) < n  # the crowd moved, with leader lines; the first label kept its place
    far = next(t for t in notes if t.get_text() == "word0")
    assert far.arrow_patch is None and tuple(far.xyann) == (3.0, 2.0)


def test_place_labels_against_a_brute_force_check():
    """Random crowded points: the returned boxes are disjoint and within the bounds."""
    rng = np.random.default_rng(1)
    pts = [tuple(p) for p in rng.uniform(40, 60, (15, 2))]
    sizes = [(rng.uniform(10, 30), 8.0) for _ in pts]
    corners, moved = place_labels(pts, sizes, (0, 0, 200, 200))
    boxes = [(x, y, x + w, y + h) for (x, y), (w, h) in zip(corners, sizes)]
    for i, a in enumerate(boxes):
        assert 0 <= a[0] and a[2] <= 200 and 0 <= a[1] and a[3] <= 200
        for b in boxes[i + 1 :]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])
    assert not moved[0] and any(moved)
