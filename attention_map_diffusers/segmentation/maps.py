"""Maps to score: word maps of a dump brought to the image, and the baselines (numpy only).

Notation: (Hc, Wc) the dump's canonical grid, (H, W) the image the masks describe, T all text
positions, n words.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..analysis.stats import renormalise, word_maps
from ..analysis.words import Word, find_phrase, map_words
from .concepts import METHODS as CONCEPT_METHODS

BASELINES = ("whole", "centre", "random")
#: Scoring methods, in the order they are reported; the last three are baselines. The concept methods
#: score a dump's concept maps (:mod:`.concepts`), not its word maps.
METHODS = ("daam", "argmax") + CONCEPT_METHODS + BASELINES
#: Methods whose pixel accuracy is the image's multi-class accuracy (the same on each of its rows).
MULTICLASS = ("argmax", "concept-argmax")


def upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w) -> (height, width) float64 by bilinear interpolation with pixel centres aligned
    (``align_corners=False``; edges clamp), the way the dump resized its maps to the canonical grid."""
    grid = np.asarray(grid, dtype=np.float64)
    h, w = grid.shape

    def axis(n_out: int, n_in: int):
        x = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
        i0 = np.floor(x).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, x - i0

    y0, y1, fy = axis(height, h)
    x0, x1, fx = axis(width, w)
    rows = grid[y0] * (1.0 - fy)[:, None] + grid[y1] * fy[:, None]  # (height, w)
    return rows[:, x0] * (1.0 - fx) + rows[:, x1] * fx


def centre_prior(height: int, width: int) -> np.ndarray:
    """(height, width) a Gaussian centred on the image, sigma = a quarter of each side, peak 1."""
    y = (np.arange(height) + 0.5 - height / 2.0) / (height / 4.0)
    x = (np.arange(width) + 0.5 - width / 2.0) / (width / 4.0)
    return np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2))


def random_grids(seed: Sequence[int], n: int, grid: tuple[int, int]) -> np.ndarray:
    """(n, Hc, Wc) uniform random maps on the dump's grid from a seed sequence (reproducible per image)."""
    return np.random.default_rng(list(seed)).uniform(size=(n,) + tuple(grid))


def encoder_word_maps(dump, item: int, encoder: str, token_map: np.ndarray) -> tuple[list[Word], np.ndarray]:
    """The prompt's words and their maps for one encoder, from a (Hc, Wc, T) token map.

    The same computation as :meth:`~attention_map_diffusers.analysis.dumpfile.Dump.word_maps`, on any
    token map (``dump.avg_map[item]``, or one restricted to some blocks or steps).

    Returns:
        (words, maps): the words some token reaches and (n, Hc, Wc) float64 maps renormalised over
        the words at each pixel.
    """
    enc = dump.encoders[encoder]
    offs = enc.offsets[item] if enc.offsets is not None else None
    wm = map_words(enc.tokens[item], enc.special[item], dump.prompts[item], enc.length, offsets=offs)
    a, b = enc.span
    shares = renormalise(word_maps(np.asarray(token_map)[:, :, a:b], wm.weights))
    return list(wm.words), np.moveaxis(shares, -1, 0)


def phrase_map(words: Sequence[Word], maps: np.ndarray, phrases: Sequence[str]) -> Optional[np.ndarray]:
    """(Hc, Wc) the map of the first of ``phrases`` that occurs in ``words``, or None when none does.

    Per occurrence, the mean of its words' maps; several occurrences are summed (a word that appears
    twice in the prompt gets the sum of its two maps). Phrases match case-insensitively
    (:func:`~attention_map_diffusers.analysis.words.find_phrase`).
    """
    for phrase in phrases:
        occ = find_phrase(words, phrase)
        if occ:
            return sum(maps[o].mean(axis=0) for o in occ)
    return None
