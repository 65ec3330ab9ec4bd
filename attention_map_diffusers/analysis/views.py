"""The numbers behind the "where and when" views: numpy in, numpy out (no matplotlib here).

Notation as in :mod:`.stats`: (H, W) the canonical grid, L one encoder's text positions, T all text
positions, n words, Bk blocks, S steps in denoising order, K frames (chosen steps or blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .stats import renormalise, word_maps

DEFAULT_VMAX_PERCENTILE = 99.0
FRAMES = 6  # steps (or blocks) shown in a strip and offered by the report's slider
MAX_LINES = 8  # lines (or coloured words) per axis; more go to further axes
RANDOM_WARNING = "RANDOM WEIGHTS: these maps say nothing about SD3.5 or FLUX.1"
# The two units of the figures, named in every title and colour bar: heatmaps (renormalised per
# pixel over the prompt's words) against curves and grids (shares of all T text positions)
WORD_SHARE = "share of the words' attention"
TEXT_SHARE = "share of all text positions"


@dataclass(frozen=True)
class FigureFacts:
    """Facts of the run a figure belongs to: drawn in a small footer and stored in the PNG's text chunks."""

    prompt: str = ""
    seed: Optional[object] = None
    model: str = ""
    random_weights: bool = False

    def footer(self, max_prompt: int = 110) -> str:
        """One line: the warning (random weights), model, seed, the prompt cut to ``max_prompt`` characters."""
        parts = []
        if self.random_weights:
            parts.append(RANDOM_WARNING)
        if self.model:
            parts.append(f"model {self.model}")
        if self.seed is not None:
            parts.append(f"seed {self.seed}")
        prompt = " ".join(self.prompt.split())  # one line: a newline in the prompt would push the footer into the panels
        prompt = prompt if len(prompt) <= max_prompt else prompt[: max(max_prompt - 3, 0)] + "..."
        prompt = "" if prompt == "..." else prompt
        if prompt:
            parts.append(f"\u201c{prompt}\u201d")
        return " | ".join(parts)

    def png_text(self, title: str = "") -> dict[str, str]:
        """PNG text chunks (``Image.open(path).text``)."""
        meta = {"Software": "analyse_stepavg.py (attention_map_diffusers)", "Description": self.footer()}
        if title:
            meta["Title"] = title
        if self.prompt:
            meta["Prompt"] = self.prompt
        if self.seed is not None:
            meta["Seed"] = str(self.seed)
        if self.model:
            meta["Model"] = self.model
        if self.random_weights:
            meta["Warning"] = RANDOM_WARNING
        return meta




def word_labels(words: Sequence) -> list[str]:
    """Display labels of words: the text, plus `` #<number>`` when the text (any case) occurs twice or more.

    "A rusty bicycle in front of a barn" -> ``A #0``, ``rusty``, ..., ``a #6``, ``barn``: the number is
    the word's position in the prompt's word list (:attr:`Word.index`), as in file names and tables.
    """
    keys = [w.text.casefold() for w in words]
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    return [f"{w.text} #{w.index}" if counts[k] > 1 else w.text for w, k in zip(words, keys)]


MAX_LABEL_CHARS = 32  # a word or phrase longer than this is cut in figures (tables keep it whole)


def short_label(text: str, limit: int = MAX_LABEL_CHARS) -> str:
    """``text`` cut to ``limit`` characters, the last one an ellipsis, when it is longer."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def figure_labels(words: Sequence) -> list[str]:
    """:func:`word_labels` as figures show them: each word cut to :data:`MAX_LABEL_CHARS` characters
    (the `` #<number>`` of a repeated word kept), so that no word can push a panel off its figure."""
    return [short_label(w.text) + label[len(w.text):] for w, label in zip(words, word_labels(words))]
def scale_note(percentile: float, scale: str = "own") -> str:
    """How the maps' colour scales were chosen, said on the figures."""
    top = "the maximum" if percentile >= 100 else f"the {percentile:g}th percentile"
    if scale == "shared":
        return f"shared colour scale: 0 to {top} of all the top words' maps"
    return f"own colour scale: 0 to {top} of each map"


def even_note(even: Optional[float]) -> str:
    """The even split said in words: each of n words' share if the attention were split evenly."""
    return "" if even is None else f"even split 1/{round(1 / even)} = {even:.3g}"


CELL_PX = 8  # pixels a map cell gets at least (when --dpi allows)
TEXT_SHARE_OF_DPI = 0.6  # figures are drawn at no less than this share of --dpi: their texts stay legible (120 of 200)


def sensible_dpi(dpi: int, panel: float = 0.0, *, image: int = 0, cells: int = 0) -> int:
    """The dpi a figure is drawn at, at most ``dpi`` (``--dpi``): enough for its map panels
    (``panel`` inches on their longer side) to show the image at its display size (``image``
    pixels) and every one of the map's ``cells`` (on its longer side) with :data:`CELL_PX` pixels,
    and at least :data:`TEXT_SHARE_OF_DPI` of ``dpi`` for its texts. A small grid, a small image,
    or no map at all (curves) need fewer pixels than a 64x64 map over a 1024x1024 image: the
    viewer enlarges them, the files stay small.
    """
    need = max(image / panel, cells * CELL_PX / panel) if panel > 0 else 0.0
    return max(1, min(int(dpi), int(np.ceil(max(need, dpi * TEXT_SHARE_OF_DPI)))))


def scale_tops(maps: Sequence[np.ndarray], percentile: float = DEFAULT_VMAX_PERCENTILE, shared: bool = False) -> list[float]:
    """Each map's colour scale top: its own :func:`robust_vmax`, or (``shared``) one for all, the
    ``percentile``-th percentile of all their values together."""
    if not shared:
        return [robust_vmax(m, percentile) for m in maps]
    top = robust_vmax(np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps]), percentile) if len(maps) else 1.0
    return [top] * len(maps)


def robust_vmax(values: np.ndarray, percentile: float = DEFAULT_VMAX_PERCENTILE) -> float:
    """The colour scale's top: the ``percentile``-th percentile of ``values`` (100 = the maximum); 1.0 if it is 0."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return 1.0
    top = float(np.percentile(v, percentile)) if percentile < 100 else float(v.max())
    return top if top > 0 else (float(v.max()) if v.max() > 0 else 1.0)


FLAT_RATIO = 1.5  # a map whose max / min is below this is "flat": its colours show noise, not a place


def flat_ratio(heat: np.ndarray) -> float:
    """max / min of a map (inf when its minimum is 0 or below: not flat)."""
    h = np.asarray(heat, dtype=np.float64)
    lo, hi = (float(h.min()), float(h.max())) if h.size else (0.0, 0.0)
    return hi / lo if lo > 0 else float("inf")


def flat_note(heat: np.ndarray, short: bool = False) -> str:
    """``" (flat: max/min 1.21)"`` (``short``: ``", flat"``) for a map whose max / min is below
    :data:`FLAT_RATIO`, else ""."""
    r = flat_ratio(heat)
    if r >= FLAT_RATIO:
        return ""
    return ", flat" if short else f" (flat: max/min {r:.2f})"


def segmentation_threshold(n_words: int) -> float:
    """The top share below which a pixel counts as undecided: twice the uniform share 2/n, at most 0.5."""
    return min(0.5, 2.0 / max(n_words, 1))


def dominant_words(shares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, n) per-pixel shares -> ((H, W) position of the largest share (first on ties), (H, W) that share)."""
    s = np.asarray(shares)
    if s.shape[-1] == 0:
        return np.full(s.shape[:2], -1, dtype=np.int64), np.zeros(s.shape[:2])
    return s.argmax(axis=-1).astype(np.int64), s.max(axis=-1).astype(np.float64)


@dataclass(frozen=True)
class TokenGroups:
    """Where the pixels' text attention goes, per block and step (shares of all T text positions)."""

    names: tuple[str, ...]  # ("words", "other prompt tokens", "special tokens", "padding", "other encoder")
    shares: np.ndarray  # (G, Bk, S); summed over G it is the curve data's total over T (1 for renormalised data)


def token_group_masks(T: int, span: tuple[int, int], n_tokens: int, special: Sequence[bool], weights: np.ndarray) -> dict[str, np.ndarray]:
    """(T,) weights of each position in each group; at every position the groups add up to 1.

    Args:
        span: this encoder's [start, end) on the T axis; ``n_tokens`` of its positions hold tokens, the rest is padding.
        special: (n_tokens,) the special mask; ``weights``: (L, n) the token -> word weights.
    """
    a, b = span
    word = np.zeros(T)
    word[a:b] = np.asarray(weights).sum(axis=1)  # 1 inside a word, a fraction for a token cut between words
    spec = np.zeros(T)
    spec[a : a + n_tokens] = np.asarray(special, dtype=bool)
    pad = np.zeros(T)
    pad[a + n_tokens : b] = 1.0
    other = np.ones(T)
    other[a:b] = 0.0
    rest = np.zeros(T)  # punctuation and other tokens outside every word
    rest[a:b] = np.clip(1.0 - word[a:b] - spec[a:b] - pad[a:b], 0.0, 1.0)
    return {"words": word, "other prompt tokens": rest, "special tokens": spec, "padding": pad, "other encoder": other}


def token_groups(step_mean: np.ndarray, masks: dict[str, np.ndarray]) -> TokenGroups:
    """(Bk, S, T) ``per_block_step_token_mean`` of one item -> each group's share per block and step."""
    m = np.asarray(step_mean, dtype=np.float64)
    names = tuple(masks)
    return TokenGroups(names, np.stack([m @ masks[k] for k in names]))


def block_groups(block_ids: Sequence[int], n_groups: int = 3) -> list[tuple[str, list[int]]]:
    """Split the blocks into up to ``n_groups`` contiguous groups: [(label, positions on the Bk axis)]."""
    Bk = len(block_ids)
    parts = [p for p in np.array_split(np.arange(Bk), min(n_groups, Bk)) if len(p)]
    names = {3: ("early", "middle", "late"), 2: ("early", "late"), 1: ("all",)}.get(len(parts), ())
    out = []
    for k, p in enumerate(parts):
        lo, hi = block_ids[p[0]], block_ids[p[-1]]
        rng = f"{lo}" if lo == hi else f"{lo}-{hi}"
        label = f"{names[k]} blocks {rng}" if names else f"blocks {rng}"
        out.append((label, [int(i) for i in p]))
    return out


def pick_frames(count: int, k: int = FRAMES) -> list[int]:
    """Up to ``k`` indices spread evenly over ``range(count)``, first and last included."""
    if count <= k:
        return list(range(count))
    return sorted({int(round(x)) for x in np.linspace(0, count - 1, k)})


def frame_word_maps(frames: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(K, H, W, L) token maps of one encoder at K steps (or blocks) -> (K, H, W, n) renormalised word shares."""
    return renormalise(word_maps(frames, weights))


def common_words(words_a: Sequence, words_b: Sequence) -> list[tuple[int, int]]:
    """Pairs of positions (in a, in b) of the same prompt word (same :attr:`Word.index`), in prompt order."""
    where = {w.index: j for j, w in enumerate(words_b)}
    return [(i, where[w.index]) for i, w in enumerate(words_a) if w.index in where]


def word_maps_arrays(shares: np.ndarray, words: Sequence, image_size: Optional[Sequence[int]]) -> dict[str, np.ndarray]:
    """The arrays of ``word_maps.npz``: maps (n, H, W) float32, words (n,) str, word_index (n,) int, image_size (2,)."""
    return {
        "maps": np.ascontiguousarray(np.moveaxis(np.asarray(shares, dtype=np.float32), -1, 0)),
        "words": np.asarray([w.text for w in words], dtype=str),
        "word_index": np.asarray([w.index for w in words], dtype=np.int64),
        "image_size": np.asarray(list(image_size) if image_size else [0, 0], dtype=np.int64),
    }
