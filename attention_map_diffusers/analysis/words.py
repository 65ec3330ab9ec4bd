"""Tokens -> words, and phrases, for one encoder's token list (standard library + numpy only).

What a word is
--------------
A *word* is a maximal run of letters and digits (Unicode ``[^\\W_]``), where single internal
apostrophes (``'`` ``’``) or hyphens (``-`` ``‐`` ``‑``) between two such runs keep the run going:
``capybara's``, ``well-known``, ``rock’n’roll``, ``42nd`` and ``3`` are one word each; ``e.g.`` is the
two words ``e`` and ``g``; punctuation, whitespace and underscores separate words and belong to none.
Combining marks (Unicode category M: accents of a prompt in NFD, Devanagari vowel signs, Thai
tone marks, the variation selectors U+FE00-FE0F and U+E0100-E01EF), the zero-width (non-)joiners
U+200C/U+200D and the emoji skin-tone modifiers belong to the character they follow: in a word they
stay in it, after anything else (``❤️`` is U+2764 U+FE0F) they belong to no word, never start one.
In scripts written without spaces
between words (Han, Hiragana, Katakana, Bopomofo, Yi, Thai, Lao, Khmer, Myanmar; see
:data:`NO_SPACE_SCRIPTS`) **each character is a word** (with its combining marks), since nothing
in the text says where their words end: ``a 红色 circle`` is the four words ``a`` ``红`` ``色``
``circle``. Words are found in the *prompt text* (:func:`find_words`), so every encoder of a prompt
sees the same word list, spelled as in the prompt; a word is numbered by its position in that list
(0-based).

A token belongs to the words its character span overlaps, with weight = the share of its span's
characters that fall in each word (a token inside one word has weight 1 for it; one spanning
``e.g`` would be split by characters). A token whose span overlaps no word (punctuation only,
whitespace), special tokens and padding belong to no word. SentencePiece can emit the word-start
marker ``▁`` as a token of its own; it belongs to the word it starts (its span is that of the
character that follows, as the tokenizers' own offsets say). A word no token reaches (cut by the
encoder's truncation) is absent from that encoder's analysis (:attr:`WordMap.dropped`); a word
inside a special token typed in the prompt (``<|endoftext|>``, which the tokenizer turns into the
special token, so no token is that word's) is no word either (:attr:`WordMap.in_specials`).

Spans come from the character offsets the dump stores (``token_offsets_*``). Without offsets
(dumps of the original tool), the tokens are decoded (CLIP's byte-level BPE, SentencePiece's ``▁``,
GPT-2's ``Ġ``) and aligned to the prompt character by character, ignoring whitespace and case and
comparing NFKC forms; ``<unk>`` matches any one character. When that fails, the words are read from
the decoded token text itself, whose word boundaries are the sub-word markers (``</w>`` ends a word,
a leading ``▁`` / ``Ġ`` starts one): then the spelling is the tokenizer's (lower case for CLIP).
"""

from __future__ import annotations

import codecs
import functools
import unicodedata
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..bytelevel import bytes_to_unicode
from ..contract import UserError

# U+FFFD stands for an unknown token in decoded text: it counts as a word character so that an
# ``<unk>`` inside a word does not split it.
_JOINERS = frozenset("'’-‐‑")
# Not category M, yet they modify the character before them: ZWNJ, ZWJ, the emoji skin-tone modifiers.
_ATTACHED = frozenset("\u200c\u200d\U0001F3FB\U0001F3FC\U0001F3FD\U0001F3FE\U0001F3FF")

#: Code point ranges (inclusive) of the scripts written without spaces between words, whose
#: letters are one word each: nothing but a dictionary could say where their words end.
NO_SPACE_SCRIPTS = (
    (0x0E00, 0x0E7F),  # Thai
    (0x0E80, 0x0EFF),  # Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x19E0, 0x19FF),  # Khmer symbols
    (0x2E80, 0x2FDF),  # CJK radicals, Kangxi radicals
    (0x3005, 0x3007),  # 々 〆 〇
    (0x3021, 0x3029),  # Hangzhou numerals
    (0x3031, 0x3035),  # kana repeat marks
    (0x3038, 0x303C),  # more iteration marks
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3100, 0x312F),  # Bopomofo
    (0x31A0, 0x31FF),  # Bopomofo extended, CJK strokes, Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xA000, 0xA4CF),  # Yi
    (0xA9E0, 0xA9FF),  # Myanmar extended B
    (0xAA60, 0xAA7F),  # Myanmar extended A
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFF9F),  # halfwidth Katakana
    (0x16FE0, 0x16FFF),  # ideographic symbols
    (0x1B000, 0x1B16F),  # Kana supplement and extended
    (0x20000, 0x323AF),  # CJK extensions B-H, compatibility supplement
)


@functools.lru_cache(maxsize=4096)
def _kind(ch: str) -> str:
    """"solo" (a letter of a script without spaces: a word on its own), "word" (letter or digit),
    "mark" (combining: stays with the character before it), "joiner" (apostrophe, hyphen) or "other"."""
    if unicodedata.category(ch).startswith("M") or ch in _ATTACHED:
        return "mark"
    if ch == "\uFFFD":
        return "word"
    if not ch.isalnum():
        return "joiner" if ch in _JOINERS else "other"
    cp = ord(ch)
    if any(a <= cp <= b for a, b in NO_SPACE_SCRIPTS):
        return "solo"
    return "word"


UNKNOWN_TOKENS = frozenset({"<unk>", "[UNK]", "<|unk|>"})


@dataclass(frozen=True)
class Word:
    """A word of the prompt: its number in the prompt's word list, its spelling and its span."""

    index: int  # position in the prompt's word list (0-based): the same for every encoder
    text: str  # the word as spelled in ``WordMap.text``
    start: int  # [start, end) character span in ``WordMap.text``
    end: int


@dataclass(frozen=True)
class WordMap:
    """How one encoder's text positions make up the prompt's words.

    ``weights`` has shape (L, n_words), L = the encoder's number of text positions: row j says how
    much of position j belongs to each word (rows sum to 1, or to 0 for specials, punctuation and
    padding). A word map is then ``token_maps @ weights``.
    """

    words: tuple[Word, ...]  # the words some token reaches, in prompt order
    weights: np.ndarray  # (L, n_words) float64
    text: str  # the text the word spans refer to (the prompt, or the decoded tokens)
    source: str  # "offsets" (stored by the dump), "aligned" (decoded + aligned) or "markers"
    dropped: tuple[Word, ...]  # prompt words that no token reaches (truncation)
    in_specials: tuple[Word, ...] = ()  # prompt words inside special tokens typed in it (``<|endoftext|>``): no words


def find_words(text: str) -> list[Word]:
    """The words of ``text`` (see the module docstring), numbered in order."""
    spans = []
    i, n = 0, len(text)
    while i < n:
        kind = _kind(text[i])
        if kind in ("joiner", "other", "mark"):  # a mark here follows no word character: it starts no word
            i += 1
            continue
        j = i + 1
        if kind == "solo":
            while j < n and _kind(text[j]) == "mark":
                j += 1
        else:
            while True:
                while j < n and _kind(text[j]) in ("word", "mark"):
                    j += 1
                if j + 1 < n and _kind(text[j]) == "joiner" and _kind(text[j + 1]) in ("word", "mark"):
                    j += 2
                    continue
                break
        spans.append((i, j))
        i = j
    return [Word(k, text[a:b], a, b) for k, (a, b) in enumerate(spans)]


def normalise_word(text: str) -> str:
    """The form words are compared in: NFKC, case-folded, typographic apostrophes/hyphens unified."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return text.replace("’", "'").replace("‐", "-").replace("‑", "-")


# ---------------------------------------------------------------------------------------------
# Decoding token strings


_BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}


def token_scheme(tokens: Sequence[str]) -> str:
    """Which sub-word convention a token list follows.

    ``"clip"`` (byte-level BPE, ``</w>`` ends a word), ``"gpt2"`` (byte-level, a leading ``Ġ``
    starts one) or ``"sentencepiece"`` (a leading ``▁`` starts one; T5).
    """
    if any(t.endswith("</w>") for t in tokens):
        return "clip"
    if any(t.startswith("▁") for t in tokens):
        return "sentencepiece"
    if any(t.startswith("Ġ") for t in tokens):
        return "gpt2"
    return "sentencepiece"


def _token_bytes(token: str) -> bytes:
    """Bytes of a byte-level token string (characters outside the table are UTF-8 encoded)."""
    out = bytearray()
    for ch in token:
        b = _BYTE_OF_CHAR.get(ch)
        if b is None:
            out += ch.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


def decode_stream(tokens: Sequence[str], special: Sequence[bool], scheme: str) -> tuple[str, list[list[int]]]:
    """Decode tokens into one string and say which characters each token produced.

    Word-boundary markers become spaces; ``<unk>`` becomes U+FFFD; special tokens produce nothing.
    With byte-level schemes a character split over several tokens belongs to all of them.

    Returns:
        (text, chars): ``chars[j]`` = indices into ``text`` of token j's characters.
    """
    text: list[str] = []
    chars: list[list[int]] = [[] for _ in tokens]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending: list[int] = []  # tokens whose bytes wait for the end of a multi-byte character

    def emit(s: str, owners: list[int]) -> None:
        for ch in s:
            for j in owners:
                chars[j].append(len(text))
            text.append(ch)

    for j, tok in enumerate(tokens):
        if special[j]:
            continue
        if tok in UNKNOWN_TOKENS:
            emit("\uFFFD", [j])
            continue
        if scheme == "sentencepiece":
            emit(tok.replace("▁", " "), [j])
            continue
        end_marker = scheme == "clip" and tok.endswith("</w>")
        body = tok[: -len("</w>")] if end_marker else tok
        decoded = decoder.decode(_token_bytes(body))
        if decoded:
            emit(decoded[:1], pending + [j])
            emit(decoded[1:], [j])
            pending = []
        else:
            pending.append(j)
        if end_marker:
            tail = decoder.decode(b"", final=True)
            if tail:
                emit(tail, pending + [j])
            pending = []
            decoder.reset()
            emit(" ", [j])
    tail = decoder.decode(b"", final=True)
    if tail and pending:
        emit(tail, pending)
    return "".join(text), chars


def _align(stream: str, prompt: str) -> Optional[list[Optional[int]]]:
    """Map each non-space character of ``stream`` to a character of ``prompt``, or None if they differ.

    Whitespace on both sides is skipped; a prompt character matches its own, lower-case, NFKC or
    case-folded form (which may be several stream characters); U+FFFD in the stream matches any one
    prompt character.
    """
    where: list[Optional[int]] = [None] * len(stream)
    s = 0
    n = len(stream)
    for p, ch in enumerate(prompt):
        if ch.isspace():
            continue
        while s < n and stream[s].isspace():
            s += 1
        if s == n:
            break  # the tokens end here (truncation): the rest of the prompt is not covered
        if stream[s] == "\uFFFD":
            where[s] = p
            s += 1
            continue
        nf = unicodedata.normalize("NFKC", ch)
        forms = sorted({ch, ch.lower(), nf, nf.lower(), ch.casefold(), nf.casefold()} - {""}, key=len, reverse=True)
        for form in forms:
            if stream.startswith(form, s):
                for k in range(s, s + len(form)):
                    where[k] = p
                s += len(form)
                break
        else:
            if not nf.strip():
                continue  # the normaliser removed this character (e.g. a zero-width one)
            return None
    while s < n and stream[s].isspace():
        s += 1
    return where if s == n else None


def _spans_from_chars(chars: list[list[int]], where: Sequence[Optional[int]]) -> list[Optional[tuple[int, int]]]:
    """Token spans from the characters each produced; a token with none takes the next token's start."""
    spans: list[Optional[tuple[int, int]]] = []
    for cs in chars:
        pos = [where[c] for c in cs if where[c] is not None]
        spans.append((min(pos), max(pos) + 1) if pos else None)
    nxt: Optional[int] = None
    for j in range(len(spans) - 1, -1, -1):
        if spans[j] is None and chars[j] and nxt is not None:
            spans[j] = (nxt, nxt + 1)  # a lone marker token: the word it starts
        if spans[j] is not None:
            nxt = spans[j][0]
    return spans


def recover_spans(
    tokens: Sequence[str], special: Sequence[bool], prompt: str
) -> tuple[str, list[Optional[tuple[int, int]]], str]:
    """Character spans for tokens stored without offsets.

    Returns:
        (text, spans, source): spans refer to ``text``, which is ``prompt`` when the decoded tokens
        align with it (source ``"aligned"``), else the decoded token text (source ``"markers"``).
    """
    scheme = token_scheme([t for t, s in zip(tokens, special) if not s])
    stream, chars = decode_stream(tokens, special, scheme)
    where = _align(stream, prompt)
    if where is not None:
        return prompt, _spans_from_chars(chars, where), "aligned"
    ident = [None if ch.isspace() else i for i, ch in enumerate(stream)]
    return stream, _spans_from_chars(chars, ident), "markers"


# ---------------------------------------------------------------------------------------------
# Tokens -> words


def map_words(
    tokens: Sequence[str],
    special: Sequence[bool],
    prompt: str,
    length: int,
    offsets: Optional[Sequence[Optional[Sequence[int]]]] = None,
) -> WordMap:
    """Assign one encoder's tokens to the prompt's words.

    Args:
        tokens: the encoder's tokens as the model saw them (unpadded); token j is text position j
            of the encoder's span.
        special: aligned with ``tokens``; special tokens belong to no word.
        prompt: the prompt text.
        length: L, the encoder's number of text positions (>= len(tokens); the rest is padding).
        offsets: per token its [start, end) span in ``prompt`` (None for specials), or None when the
            dump has none (then :func:`recover_spans`).
    """
    if len(tokens) > length:
        raise ValueError(f"{len(tokens)} tokens do not fit in {length} text positions")
    if offsets is not None:
        text, source = prompt, "offsets"
        spans = [
            None if (special[j] or off is None or off[1] <= off[0]) else (int(off[0]), int(off[1]))
            for j, off in enumerate(offsets)
        ]
    else:
        text, spans, source = recover_spans(tokens, special, prompt)
    all_words = find_words(text)
    starts = np.array([w.start for w in all_words], dtype=np.int64)
    ends = np.array([w.end for w in all_words], dtype=np.int64)
    weights = np.zeros((length, len(all_words)), dtype=np.float64)
    for j, span in enumerate(spans):
        if span is None or special[j] or not all_words:
            continue
        a, b = span
        overlap = np.clip(np.minimum(ends, b) - np.maximum(starts, a), 0, None)
        total = overlap.sum()
        if total > 0:
            weights[j] = overlap / total
    reached = weights.sum(axis=0) > 0
    words = tuple(w for w, r in zip(all_words, reached) if r)
    hidden = _typed_specials(text, [t for t, sp in zip(tokens, special) if sp])
    missed = [w for w, r in zip(all_words, reached) if not r]
    # Truncation cuts the tail: from the first missed word that is not inside a typed special token on.
    cut = next((k for k, w in enumerate(missed) if not hidden[w.start : w.end].all()), len(missed))
    return WordMap(words, weights[:, reached], text, source, tuple(missed[cut:]), tuple(missed[:cut]))


def _typed_specials(text: str, specials: Sequence[str]) -> np.ndarray:
    """(len(text),) bool: the characters of ``text`` inside an occurrence of one of the special token strings."""
    hidden = np.zeros(len(text), dtype=bool)
    for tok in set(specials):
        if not tok:
            continue
        at = text.find(tok)
        while at >= 0:
            hidden[at : at + len(tok)] = True
            at = text.find(tok, at + 1)
    return hidden


# ---------------------------------------------------------------------------------------------
# Phrases


def parse_phrases(spec: Optional[str]) -> list[str]:
    """``"in front of|on top of"`` -> ``["in front of", "on top of"]`` (blank entries are ignored).

    Raises:
        UserError: a phrase without any word.
    """
    if not spec:
        return []
    phrases = [p.strip() for p in spec.split("|")]
    phrases = [p for p in phrases if p]
    for p in phrases:
        if not find_words(p):
            raise UserError(
                f"--phrases: {p!r} contains no word (letters or digits); phrases are '|'-separated "
                'word sequences, e.g. --phrases "in front of|on top of"'
            )
    return phrases


def find_phrase(words: Sequence[Word], phrase: str) -> list[list[int]]:
    """Every occurrence of ``phrase`` as a contiguous word sequence of ``words``.

    The phrase is split into words by the same rule as the prompt and compared case-insensitively
    (:func:`normalise_word`); words must be consecutive in the prompt (``Word.index``), so a word
    missing from the encoder (truncation) breaks an occurrence. Overlapping occurrences all count.

    Returns:
        per occurrence, the positions in ``words`` of its words.
    """
    target = [normalise_word(w.text) for w in find_words(phrase)]
    n = len(target)
    keys = [normalise_word(w.text) for w in words]
    found = []
    for i in range(len(words) - n + 1):
        if keys[i : i + n] != target:
            continue
        if all(words[i + k + 1].index == words[i + k].index + 1 for k in range(n - 1)):
            found.append(list(range(i, i + n)))
    return found
