"""The toy-shapes data: a caption grammar and a deterministic renderer of flat shapes (numpy only).

A scene is one or two non-overlapping objects on a light background, 128x128 RGB. Each object is a
circle, square or triangle in one of four pure colours, 28-48 px across. Every sample carries each
object's pixel mask and the words that name it, so that attention maps can be scored against the
truth. ``render(seed)`` is a pure function of the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

SIZE = 128
BACKGROUND = (238, 238, 232)
# Pure, saturated colours with distinct hues (0, 55, 120, 225 degrees).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "yellow": (235, 205, 20),
    "green": (30, 170, 40),
    "blue": (35, 70, 225),
}
SHAPES = ("circle", "square", "triangle")
MIN_SIDE, MAX_SIDE = 28, 48
GAP = 6  # px between the bounding boxes of two objects
# Colour-shape pairs never shown in training (compositional hold-out).
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({("red", "triangle"), ("blue", "circle")})
CONNECTIVES = ("and", "next to")
# Seeds at or above this are evaluation seeds; training draws below it.
EVAL_SEED_BASE = 1_000_000_000


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    x: int  # left of the bounding box (px)
    y: int  # top of the bounding box (px)
    side: int  # width = height of the bounding box (px)

    @property
    def words(self) -> tuple[str, str]:
        return (self.color, self.shape)


@dataclass(frozen=True)
class Sample:
    """One scene.

    Attributes:
        caption: e.g. "a red circle next to a blue square".
        objects: the objects in caption order.
        image: (SIZE, SIZE, 3) uint8.
        masks: (K, SIZE, SIZE) bool, one per object, in caption order.
        spans: per object, the character spans (start, end) of its colour word and its shape word
            in ``caption``.
    """

    caption: str
    objects: tuple[ShapeObject, ...]
    image: np.ndarray
    masks: np.ndarray
    spans: tuple[tuple[tuple[int, int], tuple[int, int]], ...]


def caption_of(objects: tuple[tuple[str, str], ...], connective: str = "and") -> str:
    """``(("red", "circle"),)`` -> "a red circle"; two objects are joined by ``connective``."""
    parts = [f"a {c} {s}" for c, s in objects]
    return f" {connective} ".join(parts)


def word_spans(caption: str, objects: tuple[tuple[str, str], ...]) -> tuple[tuple[tuple[int, int], tuple[int, int]], ...]:
    """Character spans of each object's colour and shape word in ``caption`` (built by :func:`caption_of`)."""
    out, pos = [], 0
    for c, s in objects:
        a = caption.index(f"a {c} {s}", pos) + 2
        out.append(((a, a + len(c)), (a + len(c) + 1, a + len(c) + 1 + len(s))))
        pos = a + len(c) + 1 + len(s)
    return tuple(out)


def all_captions(include_held_out: bool = True) -> list[str]:
    """Every caption of the grammar, in a fixed order (228 with the held-out pairs, 0 without)."""
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    out = [caption_of((p,)) for p in pairs]
    for p in pairs:
        for q in pairs:
            if p[0] == q[0]:
                continue  # two objects always have different colours
            for conn in CONNECTIVES:
                out.append(caption_of((p, q), conn))
    if not include_held_out:
        out = [c for c in out if not _mentions_held_out(c)]
    return out


def _mentions_held_out(caption: str) -> bool:
    return any(f"{c} {s}" in caption for c, s in HELD_OUT_PAIRS)


def _draw(obj: ShapeObject) -> np.ndarray:
    """(SIZE, SIZE) bool mask of one object."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    yy = yy + 0.5
    xx = xx + 0.5
    x0, y0, n = obj.x, obj.y, obj.side
    if obj.shape == "square":
        return (xx >= x0) & (xx < x0 + n) & (yy >= y0) & (yy < y0 + n)
    if obj.shape == "circle":
        cx, cy, r = x0 + n / 2, y0 + n / 2, n / 2
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if obj.shape == "triangle":  # upright isosceles, base at the bottom: fills half its box
        inside_y = (yy >= y0) & (yy < y0 + n)
        half = (yy - y0) / n * (n / 2)
        cx = x0 + n / 2
        return inside_y & (np.abs(xx - cx) <= half)
    raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def render_objects(objects: tuple[ShapeObject, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(image (SIZE, SIZE, 3) uint8, masks (K, SIZE, SIZE) bool) of the given objects."""
    image = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    masks = np.stack([_draw(o) for o in objects]) if objects else np.zeros((0, SIZE, SIZE), bool)
    for o, m in zip(objects, masks):
        image[m] = COLORS[o.color]
    return image, masks


def _overlap(a: ShapeObject, b: ShapeObject) -> bool:
    return not (
        a.x + a.side + GAP <= b.x or b.x + b.side + GAP <= a.x or a.y + a.side + GAP <= b.y or b.y + b.side + GAP <= a.y
    )


def sample_scene(rng: np.random.Generator, *, p_single: float = 0.5, held_out: Optional[bool] = False) -> tuple[tuple[ShapeObject, ...], str]:
    """Draw objects and a connective from ``rng``.

    Args:
        p_single: probability of a one-object scene.
        held_out: False: never use a held-out colour-shape pair (training); True: any pair;
            None: same as True.
    """
    colors = list(COLORS)
    k = 1 if rng.random() < p_single else 2
    while True:
        cols = [colors[i] for i in rng.permutation(len(colors))[:k]]
        shapes = [SHAPES[int(rng.integers(len(SHAPES)))] for _ in range(k)]
        if held_out is False and any((c, s) in HELD_OUT_PAIRS for c, s in zip(cols, shapes)):
            continue
        break
    connective = CONNECTIVES[int(rng.integers(len(CONNECTIVES)))]
    objs: list[ShapeObject] = []
    for c, s in zip(cols, shapes):
        for _ in range(1000):
            side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
            x = int(rng.integers(2, SIZE - side - 2))
            y = int(rng.integers(2, SIZE - side - 2))
            cand = ShapeObject(c, s, x, y, side)
            if not any(_overlap(cand, o) for o in objs):
                objs.append(cand)
                break
        else:  # pragma: no cover - two 48 px boxes always fit in 128 px
            raise RuntimeError("could not place the objects")
    return tuple(objs), connective


def render(seed: int, *, p_single: float = 0.5, held_out: Optional[bool] = None) -> Sample:
    """The sample of ``seed``. Training seeds are < ``EVAL_SEED_BASE`` and use ``held_out=False``."""
    if held_out is None:
        held_out = seed >= EVAL_SEED_BASE
    rng = np.random.default_rng(seed)
    objects, connective = sample_scene(rng, p_single=p_single, held_out=held_out)
    pairs = tuple(o.words for o in objects)
    caption = caption_of(pairs, connective)
    image, masks = render_objects(objects)
    return Sample(caption, objects, image, masks, word_spans(caption, pairs))


def eval_seeds(n: int) -> list[int]:
    """The first ``n`` evaluation seeds (never drawn in training)."""
    return [EVAL_SEED_BASE + i for i in range(n)]
