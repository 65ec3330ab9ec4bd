"""Fonts for the words in figures: when matplotlib's default font lacks some of their characters
(Han, Kana, Thai, ...), an installed font that has them is found at run time and used as a fallback.

Nothing is installed or downloaded; when no installed font has the characters, the analysis says so
once (the figures then show empty boxes for them) instead of matplotlib's warning per glyph.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

# Families tried first, in this order (prefix match), before every other installed font.
PREFERRED = (
    "Noto Sans CJK", "Source Han Sans", "Noto Sans", "WenQuanYi", "Droid Sans Fallback", "IPAexGothic", "IPAGothic",
    "TakaoGothic", "AR PL", "Microsoft YaHei", "SimHei", "Yu Gothic", "MS Gothic", "Hiragino", "PingFang",
    "Arial Unicode", "Tahoma", "Leelawadee", "Garuda", "Loma",
)  # fmt: skip

# Fonts that "have" every character by drawing a placeholder for it (matplotlib ships one): no help.
PLACEHOLDER_FONTS = ("Last Resort",)

# matplotlib's warning for a character its fonts lack (one per character and figure)
_GLYPH_WARNING = r"Glyph \d+ .* missing from (current )?font"  # matplotlib < 3.8 says "current font"


@dataclass(frozen=True)
class FontChoice:
    """What to draw the words with."""

    families: Optional[tuple[str, ...]]  # font.family: the default font first, then fallbacks; None: the default alone
    missing: str  # characters that no installed font has, in first-seen order

    def note(self) -> Optional[str]:
        if not self.missing:
            return None
        shown = " ".join(self.missing[:12]) + (" ..." if len(self.missing) > 12 else "")
        return (
            f"no installed font has glyphs for {shown}: the figures show them as empty boxes (the tables and "
            "the report are not affected); install a font that has them, e.g. Noto Sans CJK (Debian and Ubuntu: "
            "fonts-noto-cjk) for Chinese and Japanese"
        )


@functools.lru_cache(maxsize=None)
def _charmap(path: str) -> frozenset[int]:
    from matplotlib.ft2font import FT2Font

    try:
        return frozenset(FT2Font(path).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()


def _rank(name: str) -> tuple[int, str]:
    for k, prefix in enumerate(PREFERRED):
        if name.startswith(prefix):
            return k, name
    return len(PREFERRED), name


def choose_fonts(texts: Iterable[str], base: Optional[str] = None) -> FontChoice:
    """The fonts to draw ``texts`` with.

    Args:
        texts: the strings the figures will show (words, phrases).
        base: the family matplotlib would use (default: its ``font.family`` setting).
    """
    chars = list(dict.fromkeys(ch for t in texts for ch in t if not ch.isspace()))
    if base is None and all(ord(ch) < 128 for ch in chars):
        return FontChoice(None, "")  # matplotlib's default fonts have ASCII: no need to load any font
    from matplotlib import font_manager, rcParams

    base_path = font_manager.findfont(font_manager.FontProperties(family=base or rcParams["font.family"]))
    missing = [ch for ch in chars if ord(ch) not in _charmap(base_path)]
    if not missing:
        return FontChoice(None, "")
    base_name = font_manager.get_font(base_path).family_name
    families = [base_name]
    seen = set()
    for entry in sorted(font_manager.fontManager.ttflist, key=lambda e: _rank(e.name)):
        if not missing:
            break
        if entry.fname in seen or entry.name in families or entry.name.startswith(PLACEHOLDER_FONTS):
            continue
        seen.add(entry.fname)
        cmap = _charmap(entry.fname)
        if any(ord(ch) in cmap for ch in missing):
            families.append(entry.name)
            missing = [ch for ch in missing if ord(ch) not in cmap]
    return FontChoice(tuple(families) if len(families) > 1 else None, "".join(missing))


@contextlib.contextmanager
def use_fonts(choice: Optional[FontChoice]) -> Iterator[None]:
    """Draw figures made inside the block with ``choice``'s fonts, without matplotlib's per-glyph
    warnings (missing glyphs were reported once, by :meth:`FontChoice.note`), and with every text
    literal: a prompt's "$" is a dollar sign, not the start of mathtext (two of them would set the
    words between in math italics, and an unbalanced brace between them stops the figure with a
    parse error)."""
    from matplotlib import rc_context

    rc = {"text.parse_math": False}
    if choice is not None and choice.families is not None:
        rc["font.family"] = list(choice.families)
    with warnings.catch_warnings(), rc_context(rc):
        warnings.filterwarnings("ignore", message=_GLYPH_WARNING)
        yield
