"""Word and phrase maps, curves, areas under curves and summaries: numpy in, numpy out.

Notation: (H, W) the canonical grid, L one encoder's text positions, n its words, Bk blocks,
S steps in denoising order (0 = first, noisiest step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..contract import RENORM_EPS, UserError
from .original_words import ORIGINAL, original_phrase, original_phrase_name
from .words import WordMap, find_phrase

WEIGHT_MODES = ("attention", "uniform")


def word_maps(token_maps: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Sum each word's token maps.

    Args:
        token_maps: (..., L) maps of one encoder's text positions (e.g. (H, W, L) of ``sum_token_map / N``).
        weights: (L, n) token -> word weights (:attr:`WordMap.weights`).
    Returns:
        (..., n) float64.
    """
    return np.asarray(token_maps, dtype=np.float64) @ weights


def renormalise(maps: np.ndarray, eps: float = RENORM_EPS) -> np.ndarray:
    """(..., n) -> (..., n): each pixel divided by its sum over the last axis (+ eps): shares of attention."""
    return maps / (maps.sum(axis=-1, keepdims=True) + eps)


def mass_shares(shares: np.ndarray) -> np.ndarray:
    """(H, W, n) renormalised word maps -> (n,) each word's share of the total heatmap mass (sums to 1)."""
    total = shares.sum(axis=(0, 1))
    s = total.sum()
    return total / s if s > 0 else total


def top_k(mass: np.ndarray, k: int) -> list[int]:
    """Positions of the k largest masses, largest first; ties keep prompt order."""
    order = np.argsort(-np.asarray(mass), kind="stable")
    return [int(i) for i in order[: max(0, k)]]


def word_curves(step_mean: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(Bk, S, L) ``per_block_step_token_mean`` of one encoder -> (Bk, S, n) word curves (sum of the word's tokens)."""
    return np.asarray(step_mean, dtype=np.float64) @ weights


def auc(curves: np.ndarray, axis: int = -2) -> np.ndarray:
    """Area under the curve along ``axis`` (trapezoid rule over the step index, unit spacing; 0 for one step)."""
    y = np.moveaxis(np.asarray(curves, dtype=np.float64), axis, 0)
    if y.shape[0] < 2:
        return np.zeros(y.shape[1:])
    return (y[1:] + y[:-1]).sum(axis=0) / 2.0


def auc_per_step(curves: np.ndarray, axis: int = -2) -> np.ndarray:
    """:func:`auc` divided by S - 1, the number of step intervals: the trapezoid average of the curve, in the
    curve's own unit and comparable across step counts (S = 1: the single step's value)."""
    y = np.asarray(curves, dtype=np.float64)
    S = y.shape[axis]
    return auc(y, axis) / (S - 1) if S > 1 else np.take(y, 0, axis=axis)


def step_average(curves: np.ndarray, axis: int = -2) -> np.ndarray:
    """Mean over ``axis`` (steps)."""
    return np.asarray(curves, dtype=np.float64).mean(axis=axis)


def peaks(curves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Bk, S, n) -> per word, the (block position, step) of its curve's maximum (first one on ties)."""
    Bk, S, n = curves.shape
    flat = curves.reshape(Bk * S, n).argmax(axis=0)
    return flat // S, flat % S


def phrase_weights(positions: Sequence[int], mass: np.ndarray, mode: str) -> np.ndarray:
    """(n,) weights over the words, non-zero on ``positions``, summing to 1.

    ``attention``: proportional to each word's mass (uniform when they all have none); ``uniform``: equal.
    """
    if mode not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {mode!r}")
    w = np.zeros(len(mass), dtype=np.float64)
    pos = sorted(set(positions))
    if not pos:
        return w
    if mode == "attention" and mass[pos].sum() > 0:
        w[pos] = mass[pos] / mass[pos].sum()
    else:
        w[pos] = 1.0 / len(pos)
    return w


@dataclass
class PhraseResult:
    """A phrase found in the prompt."""

    index: int  # position in --phrases
    phrase: str
    occurrences: list[list[int]]  # per occurrence, word positions
    weights: np.ndarray  # (n,) over words, sums to 1
    map: np.ndarray  # (H, W) weighted sum of the word maps (renormalised shares)
    curves: np.ndarray  # (Bk, S) weighted sum of the word curves


@dataclass
class EncoderResult:
    """Everything the tables, figures and report need for one encoder of one batch item."""

    encoder: str
    item: int
    wordmap: WordMap
    block_ids: list[int]  # (Bk,) the blocks the curves cover
    timesteps: Optional[np.ndarray]  # (S,); None when the dump has none (original tool): steps by index only
    shares: np.ndarray  # (H, W, n) word maps renormalised over the words at each pixel
    mass: np.ndarray  # (n,) share of the heatmap mass
    curves: np.ndarray  # (Bk, S, n) word curves
    top: list[int]  # positions of the top-k words by mass
    phrases: list[PhraseResult] = field(default_factory=list)
    missing_phrases: list[str] = field(default_factory=list)

    @property
    def words(self):
        return self.wordmap.words


def analyse_encoder(
    token_maps: np.ndarray,
    step_mean: np.ndarray,
    wordmap: WordMap,
    *,
    encoder: str,
    item: int,
    block_ids: Sequence[int],
    timesteps: Optional[np.ndarray],
    topk: int,
    phrases: Sequence[str] = (),
    weights: str = "attention",
) -> EncoderResult:
    """Word maps, masses, curves and phrases of one encoder.

    Args:
        token_maps: (H, W, L) the encoder's slice of ``sum_token_map / N``.
        step_mean: (Bk, S, L) its slice of ``per_block_step_token_mean`` (blocks already selected).
        wordmap: its :class:`WordMap`.
        phrases: in --phrases order; those that do not occur go to ``missing_phrases`` (with the original
            tool's words, :mod:`.original_words`, they keep an all-zero column, as its phrase maps did).
    """
    shares = renormalise(word_maps(token_maps, wordmap.weights))
    mass = mass_shares(shares)
    curves = word_curves(step_mean, wordmap.weights)
    result = EncoderResult(
        encoder=encoder,
        item=item,
        wordmap=wordmap,
        block_ids=list(block_ids),
        timesteps=None if timesteps is None else np.asarray(timesteps),
        shares=shares,
        mass=mass,
        curves=curves,
        top=top_k(mass, topk),
    )
    for index, phrase in enumerate(phrases):
        if wordmap.source == ORIGINAL:  # the original tool's rule: every matching word, anywhere; a phrase never skipped
            positions, w = original_phrase(wordmap.words, phrase, mass, weights)
            if not positions:
                result.missing_phrases.append(phrase)
            occ = [positions] if positions else []
            result.phrases.append(PhraseResult(index, original_phrase_name(phrase), occ, w, shares @ w, curves @ w))
            continue
        occ = find_phrase(wordmap.words, phrase)
        if not occ:
            result.missing_phrases.append(phrase)
            continue
        w = phrase_weights([p for o in occ for p in o], mass, weights)
        result.phrases.append(PhraseResult(index, phrase, occ, w, shares @ w, curves @ w))
    return result


def table_values(result: EncoderResult, kind: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Column names and (Bk, columns) AUC and step-average values for ``kind`` "words" or "phrases"
    (:func:`table_curves` gives the curves themselves)."""
    names, curves = table_curves(result, kind)
    return names, auc(curves, axis=1), step_average(curves, axis=1)


def table_curves(result: EncoderResult, kind: str) -> tuple[list[str], np.ndarray]:
    """Column names and (Bk, S, columns) curves of ``kind`` "words" or "phrases"."""
    if kind == "words":
        return [w.text for w in result.words], result.curves  # (Bk, S, n)
    if kind == "phrases":
        names = [p.phrase for p in result.phrases]
        return names, np.stack([p.curves for p in result.phrases], axis=-1) if result.phrases else np.zeros(result.curves.shape[:2] + (0,))
    raise ValueError(f"kind must be 'words' or 'phrases', got {kind!r}")


def word_summary(result: EncoderResult) -> list[tuple[str, float, int, int]]:
    """Per word (prompt order): (word, mass, peak block id, peak step in denoising order)."""
    if not result.words:
        return []
    pb, ps = peaks(result.curves)
    return [
        (w.text, float(result.mass[i]), int(result.block_ids[pb[i]]), int(ps[i]))
        for i, w in enumerate(result.words)
    ]


def parse_blocks(spec: Optional[str], flag: str = "--blocks", noun: str = "a block index") -> Optional[tuple[tuple[int, int], ...]]:
    """``"0-5,12"`` -> ``((0, 5), (12, 12))``: inclusive ranges, sorted and merged; None for None/empty.
    ``flag`` and ``noun`` name the option and what it lists in the error message.

    Ranges stay ranges (``0-99999999999`` is one pair, not a list of 10^11 indices); a dump checks
    them with :meth:`~attention_map_diffusers.analysis.dumpfile.Dump.select_blocks`.
    """
    if spec is None or not spec.strip():
        return None
    ranges: list[tuple[int, int]] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            a, dash, b = part.partition("-")
            first, last = int(a), int(b if dash else a)
            if first < 0 or first > last:
                raise ValueError
        except ValueError:
            raise UserError(
                f"{flag}: {part!r} is not {noun} or range; use comma-separated indices and "
                "ranges like 0-5,12"
            ) from None
        ranges.append((first, last))
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return tuple(merged)
