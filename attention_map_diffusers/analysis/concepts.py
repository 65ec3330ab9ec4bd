"""Concept maps of a dump (ConceptAttention, issue #23): reading, checking and the numbers; numpy only.

A dump made with ``--concepts`` holds, besides the word maps, these optional npz arrays and
metadata keys (docs/FORMAT.md); dumps without them are read exactly as before.

- ``concept_sum_map`` (B, Hc, Wc, C): the sum over the chosen (step, block) updates of each image
  token's softmax over the C concepts, resized to the canonical grid;
- ``concept_N`` (): the number of updates in that sum (so ``concept_sum_map / concept_N`` sums to 1
  over the concepts at every pixel);
- ``concept_per_block_step_mean`` (B, Bk, S, C): per recorded block and step, the softmax over the
  concepts averaged over the image tokens; NaN for blocks without a concept stream (FLUX.1's
  single-stream blocks);
- ``concept_per_block_map`` (B, Bk, Hc, Wc, C), optional: the map kept per block (NaN likewise);
- ``concept_per_step_map`` (B, S, Hc, Wc, C), optional: per step, the sum over the chosen blocks;
- metadata ``concepts`` (C names), ``concept_blocks`` / ``concept_steps`` (positions on the Bk / S
  axes that the map averages), ``concept_rule``.

Notation: C concepts, (Hc, Wc) the canonical grid, (H, W) the image.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..contract import UserError

SUM_KEY = "concept_sum_map"
N_KEY = "concept_N"
STEP_MEAN_KEY = "concept_per_block_step_mean"
BLOCK_MAP_KEY = "concept_per_block_map"
STEP_MAP_KEY = "concept_per_step_map"
#: The npz arrays of a dump with concepts (the last two optional).
NPZ_KEYS = (SUM_KEY, N_KEY, STEP_MEAN_KEY, BLOCK_MAP_KEY, STEP_MAP_KEY)
NPZ_REQUIRED = (SUM_KEY, N_KEY, STEP_MEAN_KEY)
#: How far the concept shares of a pixel (and of a block and step) may sum away from 1.
SUM_TOLERANCE = 1e-2


@dataclass(frozen=True)
class ConceptData:
    """The concept arrays of a validated dump, float32, steps in denoising order.

    Shapes: B items, Bk blocks, S steps, C concepts, (Hc, Wc) the canonical grid.
    """

    names: tuple[str, ...]  # (C,) the concepts, in the dump's order
    sum_map: np.ndarray  # (B, Hc, Wc, C) concept_sum_map
    N: int  # concept_N
    step_mean: np.ndarray  # (B, Bk, S, C); NaN on blocks without a concept stream
    blocks: tuple[int, ...]  # positions on the Bk axis the map averages (all blocks with a stream when not recorded)
    steps: tuple[int, ...]  # positions on the S axis the map averages (all steps when not recorded)
    rule: str  # concept_rule ("" when not recorded)
    block_maps: Optional[np.ndarray] = None  # (B, Bk, Hc, Wc, C) concept_per_block_map, when read
    step_maps: Optional[np.ndarray] = None  # (B, S, Hc, Wc, C) concept_per_step_map, when read

    @property
    def C(self) -> int:
        return len(self.names)

    def mean_map(self, item: int) -> np.ndarray:
        """(Hc, Wc, C) float64: ``concept_sum_map / concept_N``, each pixel's softmax over the concepts."""
        return self.sum_map[item].astype(np.float64) / float(self.N)

    def stream_blocks(self) -> list[int]:
        """Positions on the Bk axis of the blocks that have a concept stream (no NaN in their curves)."""
        return [k for k in range(self.step_mean.shape[1]) if np.isfinite(self.step_mean[:, k]).all()]

    def flipped_steps(self) -> "ConceptData":
        """The same data with the step axis reversed (for dumps stored by ascending timestep)."""
        S = self.step_mean.shape[2]
        step_maps = None if self.step_maps is None else np.ascontiguousarray(self.step_maps[:, ::-1])
        return dataclasses.replace(self, step_mean=np.ascontiguousarray(self.step_mean[:, :, ::-1]),
                                   steps=tuple(sorted(S - 1 - s for s in self.steps)), step_maps=step_maps)


def split_arrays(arrays: dict) -> dict:
    """Remove the concept arrays from ``arrays`` (the word maps' checks refuse NaN) and return them."""
    return {k: arrays.pop(k) for k in NPZ_KEYS if k in arrays}


def _int_list(value, key: str, limit: int, axis: str, where: str) -> tuple[int, ...]:
    ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok or not value or len(set(value)) != len(value) or not all(0 <= v < limit for v in value):
        raise UserError(
            f"{where}: metadata {key}={value!r} must be a non-empty list of distinct positions on the {axis} axis "
            f"(0 to {limit - 1}); re-run the dump"
        )
    return tuple(value)


def _check_shares(values: np.ndarray, key: str, where: str) -> None:
    """``values`` (..., C), finite: each in [0, 1 + tol] and summing to 1 over the last axis within tolerance."""
    if values.size == 0:
        return
    if values.min() < 0:
        raise UserError(f"{where}: {key} holds negative values (min {float(values.min()):.3g}); softmax shares are "
                        "never negative, the file is damaged: re-run the dump")
    sums = values.sum(axis=-1, dtype=np.float64)
    worst = float(np.abs(sums - 1.0).max())
    if worst > SUM_TOLERANCE:
        raise UserError(
            f"{where}: {key} does not sum to 1 over the concepts (off by up to {worst:.3g}, more than "
            f"{SUM_TOLERANCE:g}); it is not a softmax over the concepts, re-run the dump"
        )


def _check_shape(arr: np.ndarray, key: str, axes: str, expected: tuple, where: str) -> None:
    if arr.shape != expected:
        raise UserError(f"{where}: {key} has shape {arr.shape}, expected {axes} = {expected}; re-run the dump")


def read_concepts(arrays: dict, meta: dict, B: int, Hc: int, Wc: int, Bk: int, S: int, where: str) -> Optional[ConceptData]:
    """Check the concept arrays (:func:`split_arrays`) against each other, the metadata and the word maps'
    dimensions; None when the dump has no concepts. Raises :class:`UserError` with one line."""
    if not arrays and "concepts" not in meta:
        return None
    missing = [k for k in NPZ_REQUIRED if k not in arrays]
    if missing:
        have = ", ".join(sorted(arrays)) or "none of the concept arrays"
        raise UserError(f"{where}: the dump has concepts but its npz lacks {missing[0]!r} (has {have}); re-run the dump")
    names = meta.get("concepts")
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n.strip() for n in names)):
        raise UserError(f"{where}: metadata concepts={names!r} must be a non-empty list of concept names "
                        f"(the npz has {SUM_KEY}); re-run the dump")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"{where}: metadata concepts names {dup!r} twice; re-run the dump with distinct concepts")
    C = len(names)
    smap, n_arr, mean = arrays[SUM_KEY], arrays[N_KEY], arrays[STEP_MEAN_KEY]
    for key, arr in arrays.items():
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise UserError(f"{where}: {key} has dtype {arr.dtype}, expected a number array; re-run the dump")
    if smap.shape != (B, Hc, Wc, C):
        raise UserError(f"{where}: {SUM_KEY} has shape {smap.shape}, expected (B, Hc, Wc, C) = {(B, Hc, Wc, C)} "
                        f"(like sum_token_map, C = {C} concepts in the metadata); re-run the dump")
    first = n_arr.reshape(-1)[0] if n_arr.size else None
    if n_arr.size != 1 or first is None or not float(first).is_integer() or float(first) < 1:
        raise UserError(f"{where}: {N_KEY} must be one positive integer (the number of updates), got "
                        f"{n_arr.reshape(-1)[:3].tolist()}; re-run the dump")
    N = int(first)
    _check_shape(mean, STEP_MEAN_KEY, "(B, Bk, S, C)", (B, Bk, S, C), where)
    if not np.isfinite(smap).all():
        bad = int(smap.size - np.isfinite(smap).sum())
        raise UserError(f"{where}: {SUM_KEY} holds {bad} NaN or inf values; re-run the dump (e.g. --store-dtype float32)")
    _check_shares(smap.astype(np.float64) / N, f"{SUM_KEY} / {N_KEY}", where)
    mean = mean.astype(np.float32)
    per_block = np.isfinite(mean).reshape(B, Bk, -1)
    partial = [k for k in range(Bk) if per_block[:, k].any() and not per_block[:, k].all()]
    if partial:
        raise UserError(f"{where}: {STEP_MEAN_KEY} of block position {partial[0]} is partly NaN or inf; NaN marks a whole "
                        "block without a concept stream, re-run the dump")
    stream = [k for k in range(Bk) if per_block[:, k].all()]
    if not stream:
        raise UserError(f"{where}: {STEP_MEAN_KEY} is NaN for every block: no block recorded a concept stream; re-run the dump")
    _check_shares(mean[:, stream], STEP_MEAN_KEY, where)
    blocks = _int_list(meta["concept_blocks"], "concept_blocks", Bk, "block", where) if "concept_blocks" in meta else tuple(stream)
    without = [b for b in blocks if b not in stream]
    if without:
        raise UserError(f"{where}: metadata concept_blocks lists block position {without[0]}, whose {STEP_MEAN_KEY} is NaN "
                        "(no concept stream); re-run the dump")
    steps = _int_list(meta["concept_steps"], "concept_steps", S, "step", where) if "concept_steps" in meta else tuple(range(S))
    rule = meta.get("concept_rule", "")
    if not isinstance(rule, str):
        raise UserError(f"{where}: metadata concept_rule={rule!r} must be a string; re-run the dump")
    pbm = arrays.get(BLOCK_MAP_KEY)
    if pbm is not None:
        _check_shape(pbm, BLOCK_MAP_KEY, "(B, Bk, Hc, Wc, C)", (B, Bk, Hc, Wc, C), where)
        pbm = pbm.astype(np.float32)
        bad = [k for k in stream if not np.isfinite(pbm[:, k]).all()]
        if bad:
            raise UserError(f"{where}: {BLOCK_MAP_KEY} of block position {bad[0]} (a block with a concept stream) holds NaN "
                            "or inf values; re-run the dump")
        if any(pbm[:, k].min() < 0 for k in stream):
            raise UserError(f"{where}: {BLOCK_MAP_KEY} holds negative values; the file is damaged, re-run the dump")
    psm = arrays.get(STEP_MAP_KEY)
    if psm is not None:
        _check_shape(psm, STEP_MAP_KEY, "(B, S, Hc, Wc, C)", (B, S, Hc, Wc, C), where)
        psm = psm.astype(np.float32)
        if not np.isfinite(psm).all():
            raise UserError(f"{where}: {STEP_MAP_KEY} holds NaN or inf values; re-run the dump (e.g. --store-dtype float32)")
        # each step's map is the sum over the chosen blocks of a softmax over the concepts
        _check_shares(psm.astype(np.float64) / len(blocks), f"{STEP_MAP_KEY} / {len(blocks)} blocks", where)
    return ConceptData(tuple(names), smap.astype(np.float32), N, mean, blocks, steps, rule, pbm, psm)


# ---------------------------------------------------------------------------------------------
# The numbers


def _renormalised(parts: np.ndarray) -> np.ndarray:
    """(k, Hc, Wc, C) maps of k blocks or steps -> (Hc, Wc, C) float64: summed, then renormalised over
    the concepts at each pixel."""
    total = parts.astype(np.float64).sum(axis=0)
    return total / np.maximum(total.sum(axis=-1, keepdims=True), 1e-30)


def item_maps(data: ConceptData, item: int, block_positions: Optional[Sequence[int]] = None,
              step_positions: Optional[Sequence[int]] = None) -> np.ndarray:
    """(C, Hc, Wc) float64: the concepts' maps of one item, each pixel's softmax over the concepts
    averaged over the dump's chosen updates.

    With ``block_positions`` (and per-block maps in the dump), only those blocks that have a concept
    stream: their per-block maps summed and renormalised over the concepts at each pixel. With
    ``step_positions`` (denoising order; and per-step maps in the dump), only those steps, likewise.
    """
    if step_positions is not None and data.step_maps is not None:
        if block_positions is not None:
            raise UserError("concept maps are kept per block and per step, not per block and step: choose one")
        grid = _renormalised(data.step_maps[item, list(step_positions)])
    elif block_positions is None or data.block_maps is None:
        grid = data.mean_map(item)
    else:
        keep = [p for p in block_positions if p in set(data.stream_blocks())]
        if not keep:
            raise UserError("--blocks: none of the chosen blocks has a concept stream (their concept maps are NaN)")
        grid = _renormalised(data.block_maps[item, keep])
    return np.ascontiguousarray(np.moveaxis(grid, -1, 0))


def upsample(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, h, w) -> (C, height, width) float64 by bilinear interpolation with pixel centres aligned
    (``align_corners=False``, edges clamped), the way the dump resized its maps to the grid."""
    maps = np.asarray(maps, dtype=np.float64)
    _, h, w = maps.shape

    def axis(n_out: int, n_in: int):
        x = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
        i0 = np.floor(x).astype(np.int64)
        return i0, np.minimum(i0 + 1, n_in - 1), x - i0

    y0, y1, fy = axis(height, h)
    x0, x1, fx = axis(width, w)
    rows = maps[:, y0] * (1.0 - fy)[None, :, None] + maps[:, y1] * fy[None, :, None]
    return rows[:, :, x0] * (1.0 - fx) + rows[:, :, x1] * fx


def winners(maps: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W) int64: each pixel's concept with the largest share (the first on ties)."""
    return np.asarray(maps).argmax(axis=0).astype(np.int64)


def step_winners(data: ConceptData, item: int, steps: Sequence[int], size: tuple[int, int]) -> np.ndarray:
    """(K, H, W) int64: at each of ``steps`` (denoising order), each pixel's winning concept of that
    step's map alone (``concept_per_step_map``, upsampled to ``size`` = (H, W))."""
    if data.step_maps is None:
        raise ValueError("the dump kept no per-step concept maps (concept_per_step_map)")
    return np.stack([winners(upsample(item_maps(data, item, step_positions=[s]), *size)) for s in steps])


def mass(maps: np.ndarray) -> np.ndarray:
    """(C, Hc, Wc) -> (C,): each concept's mean share over the pixels (they sum to 1)."""
    return np.asarray(maps, dtype=np.float64).mean(axis=(1, 2))


def image_size(meta: dict, grid: tuple[int, int]) -> tuple[int, int]:
    """(H, W) from metadata ``image_size``, or the grid when the dump does not say."""
    size = meta.get("image_size")
    if isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        return int(size[0]), int(size[1])
    return int(grid[0]), int(grid[1])


def maps_arrays(maps_up: np.ndarray, names: Sequence[str], size: tuple[int, int]) -> dict[str, np.ndarray]:
    """The arrays of ``concept_maps.npz``: maps (C, H, W) float32, concepts (C,) str, image_size (2,) int64."""
    return {
        "maps": np.ascontiguousarray(maps_up, dtype=np.float32),
        "concepts": np.asarray(list(names), dtype=str),
        "image_size": np.asarray(list(size), dtype=np.int64),
    }


def curves(step_mean: np.ndarray, positions: Sequence[int]) -> tuple[list[int], np.ndarray]:
    """The positions among ``positions`` whose blocks have a concept stream, and their (k, S, C) curves.

    ``step_mean``: (Bk, S, C) one item's ``concept_per_block_step_mean``.
    """
    keep = [p for p in positions if np.isfinite(step_mean[p]).all()]
    return keep, np.asarray(step_mean[keep], dtype=np.float64).reshape(len(keep), *step_mean.shape[1:])


def colours(names: Sequence[str]) -> np.ndarray:
    """(C, 3) uint8: the concepts' colours, by the analysis' word-colour rule (:mod:`.colours`): a
    concept that names a colour ("red") is drawn in it, no other concept gets a hue near it, and the
    concepts of a run are told apart (a list's colours do not depend on the concepts' order)."""
    from .colours import WordColours

    hexes = WordColours.build([list(names)]).colours(list(names))
    return np.asarray([[int(h[i:i + 2], 16) for i in (1, 3, 5)] for h in hexes], dtype=np.uint8)


def label_picture(labels: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """(H, W) concept positions -> (H, W, 3) uint8, each pixel in its concept's colour (``rgb``:
    (C, 3) uint8, :func:`colours`)."""
    return rgb[labels]


def owners(labels: np.ndarray, C: int) -> list[int]:
    """The concepts that win at least one pixel, in the concepts' order."""
    return [int(k) for k in np.flatnonzero(np.bincount(labels.ravel(), minlength=C))]
