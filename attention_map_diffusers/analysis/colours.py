"""One colour per word for a whole analysis (every run, seed and figure), chosen from the words'
text, never from their rank (standard library only: no matplotlib, no numpy).

A word that names a colour ("red", "navy", "grey" ...) is drawn in that colour. Every other word
gets a colour from :data:`PALETTE` with the hues of the colour words of the analysis removed (no
hue within :data:`CLOSE_HUE` degrees of theirs), so that "circle" in "a red circle next to a blue
square" is neither reddish nor bluish. Words that share a prompt get different colours while the
palette lasts (a greedy colouring of the "same prompt" graph, visited in a fixed order), so the
colours depend only on the set of prompts' words, not on the order of runs, seeds or ranks.
The key of a word is its lower-cased text without punctuation or number suffix: "Red", "red," and
"red #3" share one colour.
"""

from __future__ import annotations

import colorsys
import re
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

# a word that names a colour -> the colour drawn for it (darkened where the pure colour would not
# read as a line on white: yellow, white)
NAMED = {
    "red": "#d62728", "crimson": "#b0142e", "scarlet": "#e0301e", "maroon": "#7a1020", "burgundy": "#7a1030",
    "orange": "#ff7f0e", "amber": "#f0a000", "yellow": "#d9b800", "gold": "#c99a06", "golden": "#c99a06",
    "green": "#2ca02c", "lime": "#6cc417", "olive": "#7a7a10", "emerald": "#119160", "teal": "#0f8b8d",
    "cyan": "#17becf", "turquoise": "#26b5a8", "aqua": "#17becf",
    "blue": "#1f4fd6", "navy": "#1b2a80", "azure": "#2f8fe0", "indigo": "#4b2a9a",
    "purple": "#7b3fb0", "violet": "#8f5fd6", "lavender": "#a58fd8", "magenta": "#d01fc8", "pink": "#f06ba8", "rose": "#e0457b",
    "brown": "#8b5a2b", "tan": "#c19a6b", "beige": "#c8b48a",
    "black": "#1a1a1a", "white": "#d0d0d0", "grey": "#7f7f7f", "gray": "#7f7f7f", "silver": "#a9a9a9",
}
# colours for every other word, in order of preference: distinct on white, as lines and as areas
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#e377c2", "#17becf", "#bcbd22", "#d62728", "#8c564b",
    "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#5254a3", "#e7969c", "#9edae5", "#c5b0d5",
    "#98df8a", "#ffbb78", "#aec7e8", "#dbdb8d",
    # further shades (matplotlib's tab20b / tab20c): a prompt of 30 words still gets 30 colours
    "#3182bd", "#e6550d", "#31a354", "#756bb1", "#ad494a", "#a55194", "#8ca252", "#bd9e39", "#6b6ecf", "#d6616b",
    "#ce6dbd", "#6baed6", "#fd8d3c", "#74c476", "#9e9ac8", "#b5cf6b", "#e7ba52", "#9c9ede", "#de9ed6", "#cedb9c",
)
CLOSE_HUE = 30.0  # degrees: a palette colour this close in hue to a colour word's is not given to other words
MIN_PALETTE = 4  # when the colour words leave fewer colours, the ones farthest in hue from theirs are kept


def word_key(text: str) -> str:
    """The colour key of a word or label: lower-cased, without a `` #N`` suffix or punctuation."""
    text = re.sub(r"\s+#\d+$", "", text.strip())
    return re.sub(r"[^\w\s]+", "", text.casefold()).strip()


def hue(colour: str) -> Optional[float]:
    """Hue of ``#rrggbb`` in degrees, or None for a colour without a clear hue (grey, black, white)."""
    r, g, b = (int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5))
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    return h * 360.0 if s >= 0.25 and v >= 0.2 else None


def hue_distance(a: float, b: float) -> float:
    """Degrees between two hues on the colour circle (0 to 180)."""
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def palette_without(named: Iterable[str]) -> tuple[str, ...]:
    """:data:`PALETTE` without the colours within :data:`CLOSE_HUE` of the hue of any colour in
    ``named`` (``#rrggbb``); at least :data:`MIN_PALETTE` colours, the farthest ones, are kept."""
    hues = [h for h in (hue(c) for c in named) if h is not None]

    def distance(c: str) -> float:
        h = hue(c)
        return min((hue_distance(h, x) for x in hues), default=180.0) if h is not None else 180.0

    kept = tuple(c for c in PALETTE if distance(c) >= CLOSE_HUE)
    if len(kept) >= MIN_PALETTE:
        return kept
    far = sorted(PALETTE, key=lambda c: -distance(c))[:MIN_PALETTE]
    return tuple(c for c in PALETTE if c in far)


@dataclass(frozen=True)
class WordColours:
    """A word -> colour map for one analysis (:meth:`build` it from every prompt's words).

    >>> colours = WordColours.build([["a", "red", "circle", "next", "to", "a", "blue", "square"]])
    >>> colours.colour("red"), colours.colour("Blue #6")
    ('#d62728', '#1f4fd6')
    """

    assigned: Mapping[str, str] = field(default_factory=dict)  # word key -> colour
    palette: tuple[str, ...] = PALETTE  # the colours other words may take (colour words' hues removed)

    @classmethod
    def build(cls, prompts: Iterable[Sequence[str]]) -> "WordColours":
        """The colours of the words of ``prompts`` (each a list of its words' texts, or labels).

        The result depends on the set of prompts' word sets only (not on their order). Words are
        coloured most frequent first (then alphabetically), each with the first palette colour no
        word of a shared prompt has yet; when the palette runs out, the colour its key hashes to.
        """
        groups = sorted({tuple(sorted({word_key(w) for w in words} - {""})) for words in prompts})
        keys = sorted({k for g in groups for k in g})
        named = {k: NAMED[k] for k in keys if k in NAMED}
        palette = palette_without(named.values())
        neighbours: dict[str, set[str]] = {k: set() for k in keys}
        count: dict[str, int] = {k: 0 for k in keys}
        for g in groups:
            for k in g:
                neighbours[k].update(g)
                count[k] += 1
        assigned = dict(named)
        for k in sorted(keys, key=lambda k: (-count[k], k)):
            if k in assigned:
                continue
            taken = {assigned[n] for n in neighbours[k] if n in assigned and n != k}
            free = [c for c in palette if c not in taken]
            assigned[k] = free[0] if free else palette[zlib.crc32(k.encode()) % len(palette)]
        return cls(assigned, palette)

    def colour(self, text: str) -> str:
        """``#rrggbb`` of a word (or a label such as ``"a #6"``, or a phrase); a word not seen by
        :meth:`build` gets its named colour, or the palette colour its key hashes to."""
        key = word_key(text)
        if key in self.assigned:
            return self.assigned[key]
        if key in NAMED:
            return NAMED[key]
        return self.palette[zlib.crc32(key.encode()) % len(self.palette)]

    def colours(self, texts: Sequence[str]) -> list[str]:
        return [self.colour(t) for t in texts]
