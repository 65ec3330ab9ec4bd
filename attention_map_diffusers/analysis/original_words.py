"""The original tool's words and phrases (``--words original``), standard library + numpy only.

attention-map-diffusers' SD3.5 step-average analysis did not look at the prompt text: it built its
words from each encoder's token list alone, and this module re-implements those rules so that
tables can be compared column for column with results published with it.

Words
-----
Tokens are read in order. A special token belongs to no word and ends the word being built. A
token that starts with a word-start marker (``▁`` SentencePiece/T5, ``Ġ`` GPT-2) ends the word
being built and starts a new one; every other token is appended to the word being built; a token
that ends with CLIP's ``</w>`` ends its word. A word's text is its tokens' texts joined, with the
markers removed (one trailing ``</w>``, every leading ``▁``/``Ġ``) and nothing else changed: CLIP
words are lower-case BPE pieces (byte-level: a non-ASCII letter keeps the BPE alphabet's spelling,
``café`` is ``cafÃ©``), and since every CLIP piece ends in ``</w>``, punctuation and the pieces of a
contraction are words of their own (``barn``, ``,``, ``don``, ``'t``); T5 words run from one ``▁``
to the next, so punctuation stays glued to them (``barn,``, ``Bob!``). A word occurring twice is
two words with the same text. A word's map and curves are the **sum** of its tokens' (the same
weight 1 for every token), as in the prompt rule.

Which tokens are special: for CLIP, those the dump marks (``special_mask``) and those the original
dump would have marked (its fixed list ``<|startoftext|>``, ``<|endoftext|>``, ``<s>``, ``</s>``,
``<pad>``, ``[BOS]``, ``[EOS]``, ``[PAD]``, ``<BOS>``, ``<EOS>``, ``<SEP>``, ``</w>``, ``<unk>``,
``<UNK>``, and any token that starts with ``Ġ<|`` or ends with ``|>``); for T5, whose tokens the
original analysis re-made itself, exactly ``<pad>``, ``<s>`` and ``</s>`` (an ``<unk>`` is a piece
of a word there).

Phrases
-------
A phrase is split at whitespace; it takes **every** word whose text equals one of its words
(exactly: case and punctuation count), wherever it stands in the prompt. Its weights: ``uniform``
gives each such word ``1 / count``; ``attention`` gives each its heatmap mass divided by their
total (all zero when that total is 0). Its name is its words joined by single spaces.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .words import Word, WordMap

#: :attr:`WordMap.source` of a word map built by the original rule.
ORIGINAL = "original"

# The original dump's list of special token strings (it marked CLIP's tokens with it).
_DUMP_SPECIALS = frozenset(
    {"<|startoftext|>", "<|endoftext|>", "<s>", "</s>", "<pad>", "[BOS]", "[EOS]", "[PAD]", "<BOS>", "<EOS>", "<SEP>",
     "</w>", "<unk>", "<UNK>"}
)  # fmt: skip
# The original analysis' T5 specials (it tokenised the prompt for T5 itself).
_T5_SPECIALS = frozenset({"<pad>", "<s>", "</s>"})
_END = "</w>"
_STARTS = ("Ġ", "▁")


def original_special(tokens: Sequence[str], special: Sequence[bool], encoder: str) -> list[bool]:
    """The tokens the original analysis skipped, for ``encoder`` "clip" or "t5" (see the module docstring)."""
    if encoder == "t5":
        return [t in _T5_SPECIALS for t in tokens]
    return [bool(s) or t in _DUMP_SPECIALS or t.startswith("Ġ<|") or t.endswith("|>") for t, s in zip(tokens, special)]


def _piece(token: str) -> str:
    """A token's text without its markers: one trailing ``</w>``, every leading ``▁`` / ``Ġ``."""
    if token.endswith(_END):
        token = token[: -len(_END)]
    return token.lstrip("".join(_STARTS))


def original_words(tokens: Sequence[str], special: Sequence[bool], length: int, encoder: str) -> WordMap:
    """One encoder's words by the original rule.

    Args:
        tokens: the encoder's tokens (unpadded, or padded with special tokens); token j is text position j.
        special: the dump's special mask, aligned with ``tokens`` (used for CLIP only).
        length: L, the encoder's number of text positions.
        encoder: "clip" or "t5" (which special rule applies).
    Returns:
        a :class:`WordMap` whose ``weights`` (L, n) are 1 where token j is part of word k, whose
        ``text`` is the words joined by spaces (the spans refer to it), source :data:`ORIGINAL`, no
        dropped words (the original rule does not know the prompt).
    """
    if len(tokens) > length:
        raise ValueError(f"{len(tokens)} tokens do not fit in {length} text positions")
    skip = original_special(tokens, special, encoder)
    groups: list[list[int]] = []  # per word, its token positions
    open_word = False
    for j, tok in enumerate(tokens):
        if skip[j]:
            open_word = False
            continue
        if tok.startswith(_STARTS) or not open_word:
            groups.append([])
        groups[-1].append(j)
        open_word = not tok.endswith(_END)
    weights = np.zeros((length, len(groups)), dtype=np.float64)
    words, pos = [], 0
    for k, group in enumerate(groups):
        weights[group, k] = 1.0
        text = "".join(_piece(tokens[j]) for j in group)
        words.append(Word(k, text, pos, pos + len(text)))
        pos += len(text) + 1
    return WordMap(tuple(words), weights, " ".join(w.text for w in words), ORIGINAL, ())


def original_phrase_name(phrase: str) -> str:
    """The phrase's column name: its whitespace-separated words joined by single spaces."""
    return " ".join(phrase.split())


def original_phrase(words: Sequence[Word], phrase: str, mass: np.ndarray, mode: str) -> tuple[list[int], np.ndarray]:
    """The words a phrase takes by the original rule and its (n,) weights over the words.

    Args:
        mass: (n,) the words' heatmap masses (any positive scale: only ratios count).
        mode: "attention" or "uniform".
    Returns:
        (positions of the matching words in ``words``, weights); no positions: all-zero weights.
    """
    targets = set(phrase.split())
    positions = [k for k, w in enumerate(words) if w.text in targets]
    weights = np.zeros(len(words), dtype=np.float64)
    if not positions:
        return positions, weights
    if mode == "uniform":
        weights[positions] = 1.0 / len(positions)
    else:
        m = np.asarray(mass, dtype=np.float64)[positions]
        total = m.sum()
        weights[positions] = m / (total if total > 0 else 1.0)
    return positions, weights
