"""Scoring toy-shapes images and attention maps against the prompt (numpy only).

Fidelity, judged strictly: an object counts as drawn only if its colour forms one clean blob (the
largest 4-connected region of that hue holds >= 70 % of the hue's pixels and 300-3000 px) and the
colours not named in the prompt cover < 1 % of the image. Its shape is right when the blob's fill
ratio of its bounding box says so (square ~1, circle ~0.79, triangle ~0.5). A noisy image holding
every colour fails: its hues are fragmented and foreign colours are everywhere.

Pointing game: the hottest cell of a word's map must lie on the word's object (the drawn blob
dilated by 4 px; a cell is "on" it when its centre pixel is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .data import COLORS, SHAPES

HUES = tuple(COLORS)  # label i of hue_labels() is HUES[i]
MIN_SATURATION = 0.45
MIN_VALUE = 0.35
BLOB_SHARE = 0.70
BLOB_MIN_PX, BLOB_MAX_PX = 300, 3000
MAX_FOREIGN = 0.01
DILATE_PX = 4
# Fill ratio of the bounding box: triangle 0.5 | circle pi/4 | square 1; the bounds are midpoints.
FILL_BOUNDS = (0.64, 0.89)


def hue_labels(image: np.ndarray) -> np.ndarray:
    """(H, W) int: the index into ``HUES`` of each saturated pixel's hue, -1 for grey / dark / light.

    Hue sectors (degrees): red [330, 30), yellow [30, 90), green [90, 180), blue [180, 330): every
    saturated pixel has one of the four colours.

    Args:
        image: (H, W, 3) uint8 RGB.
    """
    rgb = image.astype(np.float32) / 255.0
    mx = rgb.max(axis=-1)
    mn = rgb.min(axis=-1)
    chroma = mx - mn
    sat = np.where(mx > 0, chroma / np.maximum(mx, 1e-6), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    c = np.maximum(chroma, 1e-6)
    hue = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4)) * 60.0
    label = np.full(hue.shape, -1, dtype=np.int64)
    sector = np.select(
        [(hue >= 330) | (hue < 30), hue < 90, hue < 180],
        [HUES.index("red"), HUES.index("yellow"), HUES.index("green")],
        default=HUES.index("blue"),
    )
    ok = (sat >= MIN_SATURATION) & (mx >= MIN_VALUE)
    label[ok] = sector[ok]
    return label


def largest_component(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: the largest 4-connected region of ``mask`` (all False when ``mask`` is empty)."""
    h, w = mask.shape
    if not mask.any():
        return np.zeros_like(mask, dtype=bool)
    big = np.iinfo(np.int64).max
    lab = np.where(mask, np.arange(h * w, dtype=np.int64).reshape(h, w), big)
    while True:  # propagate the smallest index through each region (pointer jumping would be faster; this is enough at 128 px)
        new = lab.copy()
        new[1:] = np.minimum(new[1:], lab[:-1])
        new[:-1] = np.minimum(new[:-1], lab[1:])
        new[:, 1:] = np.minimum(new[:, 1:], lab[:, :-1])
        new[:, :-1] = np.minimum(new[:, :-1], lab[:, 1:])
        new[~mask] = big
        flat = new.ravel()
        inside = flat != big
        flat[inside] = flat[flat[inside]]  # jump to the label's own label
        if np.array_equal(new, lab):
            break
        lab = new
    vals, counts = np.unique(lab[mask], return_counts=True)
    return lab == vals[np.argmax(counts)]


def fill_shape(blob: np.ndarray) -> Optional[str]:
    """The shape whose fill ratio of the bounding box the blob has; None for an empty blob."""
    ys, xs = np.nonzero(blob)
    if len(ys) == 0:
        return None
    area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    ratio = len(ys) / area
    if ratio < FILL_BOUNDS[0]:
        return "triangle"
    if ratio < FILL_BOUNDS[1]:
        return "circle"
    return "square"


@dataclass(frozen=True)
class ObjectScore:
    color: str
    shape: str  # the prompt's
    drawn: bool
    shape_pred: Optional[str]  # from the blob's fill ratio
    blob: np.ndarray  # (H, W) bool, the colour's largest region
    blob_px: int
    blob_share: float

    @property
    def shape_correct(self) -> bool:
        return self.drawn and self.shape_pred == self.shape


@dataclass(frozen=True)
class ImageScore:
    objects: tuple[ObjectScore, ...]
    foreign_share: float  # share of the image in colours the prompt does not name


def prompt_objects(prompt: str) -> list[tuple[str, str, tuple[int, int], tuple[int, int]]]:
    """(colour, shape, colour span, shape span) of each "colour shape" pair in ``prompt``, in order."""
    words = []
    pos = 0
    for tok in prompt.split(" "):
        words.append((tok, pos))
        pos += len(tok) + 1
    out = []
    for (a, pa), (b, pb) in zip(words, words[1:]):
        if a in COLORS and b in SHAPES:
            out.append((a, b, (pa, pa + len(a)), (pb, pb + len(b))))
    return out


def score_image(image: np.ndarray, prompt: str) -> ImageScore:
    """Fidelity of one (H, W, 3) uint8 image to ``prompt`` (see the module docstring)."""
    labels = hue_labels(image)
    objs = prompt_objects(prompt)
    named = {HUES.index(c) for c, *_ in objs}
    foreign = float(np.isin(labels, [i for i in range(len(HUES)) if i not in named]).mean())
    scores = []
    for color, shape, *_ in objs:
        mask = labels == HUES.index(color)
        total = int(mask.sum())
        blob = largest_component(mask)
        px = int(blob.sum())
        share = px / total if total else 0.0
        drawn = share >= BLOB_SHARE and BLOB_MIN_PX <= px <= BLOB_MAX_PX and foreign < MAX_FOREIGN
        scores.append(ObjectScore(color, shape, drawn, fill_shape(blob), blob, px, share))
    return ImageScore(tuple(scores), foreign)


#: The strict criteria an object can miss, as :func:`misses` names them.
MISSES = ("foreign colours", "fragmented", "too small", "too large")


def misses(obj: ObjectScore, foreign_share: float) -> tuple[str, ...]:
    """The criteria ``obj`` misses (empty when it is drawn), in :data:`MISSES` order: colours the
    prompt does not name cover >= 1 % of the image; its colour's largest region holds < 70 % of the
    colour's pixels; that region is under 300 px; or over 3000 px. Tells a trainer what to fix."""
    out = []
    if foreign_share >= MAX_FOREIGN:
        out.append("foreign colours")
    if obj.blob_share < BLOB_SHARE:
        out.append("fragmented")
    if obj.blob_px < BLOB_MIN_PX:
        out.append("too small")
    if obj.blob_px > BLOB_MAX_PX:
        out.append("too large")
    return tuple(out)


def dilate(mask: np.ndarray, radius: int = DILATE_PX) -> np.ndarray:
    """(H, W) bool ``mask`` grown by a disk of ``radius`` px."""
    h, w = mask.shape
    out = np.zeros_like(mask, dtype=bool)
    padded = np.pad(mask, radius)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius:
                out |= padded[radius + dy : radius + dy + h, radius + dx : radius + dx + w]
    return out


def cell_hits(region: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(Hc, Wc) bool: grid cells whose centre pixel lies in ``region`` ((H, W) bool)."""
    h, w = region.shape
    gh, gw = grid
    ys = ((np.arange(gh) + 0.5) * h / gh).astype(int)
    xs = ((np.arange(gw) + 0.5) * w / gw).astype(int)
    return region[np.ix_(ys, xs)]


def pointing_hit(word_map: np.ndarray, region: np.ndarray) -> bool:
    """Whether the hottest cell of ``word_map`` ((Hc, Wc)) lies in ``region`` ((H, W) bool)."""
    hits = cell_hits(region, word_map.shape)
    return bool(hits.flat[int(np.argmax(word_map))])


def chance_rate(region: np.ndarray, grid: tuple[int, int]) -> float:
    """Share of grid cells that would hit ``region``: the pointing game's chance level."""
    return float(cell_hits(region, grid).mean())


def word_token_indices(offsets: Sequence[Optional[Sequence[int]]], span: tuple[int, int]) -> list[int]:
    """Positions of the tokens whose character offsets overlap ``span`` (special tokens: None)."""
    a, b = span
    return [i for i, off in enumerate(offsets) if off is not None and off[0] < b and off[1] > a and off[1] > off[0]]


@dataclass(frozen=True)
class PointingRecord:
    """The pointing game for one word of one drawn object under one text encoder.

    Attributes:
        encoder: "clip" or "t5".
        kind: "color" or "shape".
        hit: the word's step- and block-averaged map points at the object.
        baseline_hit: the map averaged over all the prompt's words does.
        chance: share of grid cells that would hit.
        held_out_pair: the object's colour-shape pair was never seen in training.
        block_hits: per block, from the word's step-averaged map of that block (empty if not given).
        step_hits: per step, from the word's block-averaged map of that step (empty if not given).
    """

    encoder: str
    kind: str
    hit: bool
    baseline_hit: bool
    chance: float
    held_out_pair: bool
    block_hits: tuple[bool, ...] = ()
    step_hits: tuple[bool, ...] = ()


def pointing_records(
    score: ImageScore,
    prompt: str,
    encoder: str,
    offsets: Sequence[Optional[Sequence[int]]],
    token_map: np.ndarray,
    block_maps: Optional[np.ndarray] = None,
    step_maps: Optional[np.ndarray] = None,
    held_out_pairs: frozenset = frozenset(),
) -> list[PointingRecord]:
    """Pointing-game records of the drawn objects of one image, for one encoder.

    Args:
        offsets: character offsets of the encoder's tokens (None for special tokens), length T.
        token_map: (Hc, Wc, T) the encoder's part of the step- and block-averaged map.
        block_maps: (Bk, Hc, Wc, T) per block, or None.
        step_maps: (S, Hc, Wc, T) per step, or None.
    """
    words = [i for i, off in enumerate(offsets) if off is not None and off[1] > off[0]]
    baseline = token_map[..., words].mean(axis=-1)
    out = []
    for obj, (color, shape, cspan, sspan) in zip(score.objects, prompt_objects(prompt)):
        if not obj.drawn:
            continue
        region = dilate(obj.blob)
        chance = chance_rate(region, token_map.shape[:2])
        base = pointing_hit(baseline, region)
        for kind, span in (("color", cspan), ("shape", sspan)):
            idx = word_token_indices(offsets, span)
            if not idx:
                continue
            hit = pointing_hit(token_map[..., idx].mean(axis=-1), region)
            bh = () if block_maps is None else tuple(pointing_hit(m[..., idx].mean(axis=-1), region) for m in block_maps)
            sh = () if step_maps is None else tuple(pointing_hit(m[..., idx].mean(axis=-1), region) for m in step_maps)
            out.append(PointingRecord(encoder, kind, hit, base, chance, (color, shape) in held_out_pairs, bh, sh))
    return out
