"""Tokens -> words and phrases, on hand-written token lists and on the real CLIP / a T5 tokenizer."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

from attention_map_diffusers.analysis.words import (
    decode_stream,
    find_phrase,
    find_words,
    map_words,
    parse_phrases,
    recover_spans,
    token_scheme,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP_BPE = os.path.join(REPO, "..", "shared", "data", "clip_bpe_simple_vocab_16e6.txt.gz")
needs_bpe = pytest.mark.skipif(
    not os.path.isfile(CLIP_BPE), reason="../shared/data/clip_bpe_simple_vocab_16e6.txt.gz (the real CLIP merges) is absent"
)

BICYCLE = "A rusty bicycle in front of a barn"
TRICKY = "A capybara's hat, on top-of the well-known   café!! 42nd St."
UNICODE = "a  Ünïcode naïve “quoted” rock’n’roll e.g. cat"
CJK = "一只红色的猫 on a sofa"
LONG = (
    "A rusty bicycle in front of a barn, leaning against a weathered wooden fence at golden hour, with "
    "wildflowers in the foreground, soft clouds over distant hills, a red tractor parked by the silo, "
    "chickens pecking at the gravel, a dog asleep on the porch, warm cinematic lighting, highly detailed "
    "photograph, shot on 35mm film, shallow depth of field, and a faint rainbow over the orchard"
)


@functools.lru_cache(maxsize=None)
def clip_tok():
    from attention_map_diffusers.models.tiny import build_clip_tokenizer

    return build_clip_tokenizer(CLIP_BPE)


@functools.lru_cache(maxsize=None)
def t5_tok():
    from attention_map_diffusers.models.tiny import build_t5_tokenizer

    return build_t5_tokenizer()


def encode(tok, prompt, length):
    from attention_map_diffusers.contract import prompt_tokens

    t = prompt_tokens(tok, prompt, length)
    return t.tokens, [bool(s) for s in t.special], [None if o is None else tuple(o) for o in t.offsets]


def texts(wm):
    return [(w.index, w.text) for w in wm.words]


# --- the word definition ---------------------------------------------------------------------


def test_find_words_definition():
    got = [w.text for w in find_words(TRICKY + " rock’n’roll e.g. snake_case -dash- 'quoted' x2 (3)")]
    assert got == [
        "A", "capybara's", "hat", "on", "top-of", "the", "well-known", "café", "42nd", "St",
        "rock’n’roll", "e", "g", "snake", "case", "dash", "quoted", "x2", "3",
    ]  # fmt: skip
    w = find_words("  the  cat")
    assert [(x.index, x.start, x.end) for x in w] == [(0, 2, 5), (1, 7, 10)]
    assert find_words("!!! ... --") == []
    # NFD accents stay inside their word
    assert [x.text for x in find_words("cafe\u0301 au lait")] == ["cafe\u0301", "au", "lait"]


def test_selectors_joiners_and_marks_attach_to_the_character_before():
    def words(text):
        return [w.text for w in find_words(text)]

    # after a non-word character (an emoji, a space) they belong to no word and start none
    assert words("a \u2764\ufe0f cat") == ["a", "cat"]  # red heart: U+2764 + variation selector 16
    assert words("\ufe0f") == [] and words(" \U000E0100 x") == ["x"] and words("\u200d\u200c") == []
    assert words("\U0001F44D\U0001F3FD ok \u0301") == ["ok"]  # thumbs up + skin tone; a lone accent
    assert words("\U0001F468\u200d\U0001F469 family") == ["family"]  # a ZWJ sequence is no word
    # after a letter or digit they stay in its word
    assert words("a\ufe0f b\U000E0101 c") == ["a\ufe0f", "b\U000E0101", "c"]
    assert words("1\ufe0f\u20e3 x") == ["1\ufe0f\u20e3", "x"]  # keycap one
    assert words("क्\u200dष") == ["क्\u200dष"]  # a ZWJ inside a Devanagari word keeps it whole


@needs_bpe
def test_emoji_token_belongs_to_no_word_real_tokens():
    prompt = "a \u2764\ufe0f cat"
    tokens, special, offsets = encode(clip_tok(), prompt, 77)
    for offs in (offsets, None):  # stored offsets, and tokens aligned to the prompt
        wm = map_words(tokens, special, prompt, 77, offs)
        assert [w.text for w in wm.words] == ["a", "cat"] and not wm.dropped
        heart = [j for j, o in enumerate(offsets) if o is not None and o[0] == 2]
        assert heart and wm.weights[heart].sum() == 0


@needs_bpe
def test_typed_special_tokens_are_no_words_and_no_truncation():
    tokens, special, offsets = encode(clip_tok(), "<|endoftext|>", 77)
    assert tokens == ["<|startoftext|>", "<|endoftext|>", "<|endoftext|>"] and all(special)
    for offs in (offsets, None):
        wm = map_words(tokens, special, "<|endoftext|>", 77, offs)
        assert wm.words == () and wm.dropped == () and [w.text for w in wm.in_specials] == ["endoftext"]
    prompt = "a cat <|endoftext|> on a mat <|endoftext|>"
    wm = map_words(*encode(clip_tok(), prompt, 77)[:2], prompt, 77, encode(clip_tok(), prompt, 77)[2])
    assert [w.text for w in wm.words] == ["a", "cat", "on", "a", "mat"] and wm.dropped == ()
    assert [w.index for w in wm.in_specials] == [2, 6]
    # truncation still names the first cut word, even when a typed special token stands after the cut
    prompt = LONG + " <|endoftext|>"
    wm = map_words(*encode(clip_tok(), prompt, 77)[:2], prompt, 77, encode(clip_tok(), prompt, 77)[2])
    assert wm.dropped and wm.dropped[-1].text == "endoftext" and wm.in_specials == ()


def test_scripts_without_spaces_give_a_word_per_character():
    def words(text):
        return [w.text for w in find_words(text)]

    assert words("a 红色 circle") == ["a", "红", "色", "circle"]
    assert words("a红色circle") == ["a", "红", "色", "circle"]
    assert words("一只红色的猫。3个苹果") == ["一", "只", "红", "色", "的", "猫", "3", "个", "苹", "果"]
    assert words("ラーメンを食べる") == ["ラ", "ー", "メ", "ン", "を", "食", "べ", "る"]
    assert words("ﾗｰﾒﾝ") == ["ﾗ", "ｰ", "ﾒ", "ﾝ"]  # halfwidth Katakana
    # a combining mark stays with its character: Thai vowel and tone marks, decomposed kana
    assert words("สวัสดี") == ["ส", "วั", "ส", "ดี"]
    assert words("か\u3099き") == ["か\u3099", "き"]
    # scripts written with spaces keep their words whole, marks included (Devanagari vowel signs, virama)
    assert words("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]
    assert words("한국어 문장") == ["한국어", "문장"]
    ws = find_words("一只红色的猫")
    assert find_phrase(ws, "红色") == [[2, 3]] and find_phrase(ws, "红 色") == [[2, 3]]
    assert parse_phrases("红色|猫") == ["红色", "猫"]


def test_a_token_over_two_characters_is_shared_by_them():
    # a CLIP-like token "红色" spanning two one-character words: half each
    wm = map_words(["<s>", "a", "红色", "circle", "</s>"], [True, False, False, False, True], "a 红色 circle", 6,
                   [None, (0, 1), (2, 4), (5, 11), None])
    assert texts(wm) == [(0, "a"), (1, "红"), (2, "色"), (3, "circle")]
    np.testing.assert_allclose(wm.weights[2], [0, 0.5, 0.5, 0])


def test_map_words_offsets_hand_made():
    prompt = "a cat, a dog"
    tokens = ["<s>", "a", "cat", ",", "a", "d", "og", "</s>"]
    special = [True, False, False, False, False, False, False, True]
    offsets = [None, (0, 1), (2, 5), (5, 6), (7, 8), (9, 10), (10, 12), None]
    wm = map_words(tokens, special, prompt, 10, offsets)
    assert texts(wm) == [(0, "a"), (1, "cat"), (2, "a"), (3, "dog")]
    expected = np.zeros((10, 4))
    expected[1, 0] = expected[2, 1] = expected[4, 2] = expected[5, 3] = expected[6, 3] = 1
    np.testing.assert_array_equal(wm.weights, expected)  # punctuation, specials and padding: no word
    assert wm.source == "offsets" and wm.dropped == ()


def test_token_spanning_two_words_is_split_by_characters():
    # "e.g" as one token: 1 character in "e", 1 in "g" (the "." is in no word)
    wm = map_words(["e.g", "."], [False, False], "e.g.", 2, [(0, 3), (3, 4)])
    assert texts(wm) == [(0, "e"), (1, "g")]
    np.testing.assert_allclose(wm.weights, [[0.5, 0.5], [0, 0]])


def test_too_many_tokens_rejected():
    with pytest.raises(ValueError, match="do not fit"):
        map_words(["a", "b"], [False, False], "a b", 1, [(0, 1), (2, 3)])


# --- decoding and alignment without offsets --------------------------------------------------


def test_token_scheme():
    assert token_scheme(["a</w>", "cat</w>"]) == "clip"
    assert token_scheme(["▁a", "▁cat", "</s>"]) == "sentencepiece"
    assert token_scheme(["Ġa", "Ġcat"]) == "gpt2"


def test_decode_stream_multibyte_char_split_over_two_clip_tokens():
    # CLIP splits "“" (3 UTF-8 bytes) into 'âĢ' + 'ľ</w>': both own the character
    text, chars = decode_stream(["âĢ", "ľ</w>", "hi</w>"], [False] * 3, "clip")
    assert text == "“ hi "
    assert chars[0] == [0] and chars[1] == [0, 1]


def test_markers_fallback_when_tokens_do_not_match_prompt():
    # prompt and tokens disagree (e.g. the prompt was edited): words come from the tokens' markers
    tokens = ["<|startoftext|>", "a</w>", "cap", "y", "bara</w>", ",</w>", "barn</w>", "<|endoftext|>"]
    special = [True] + [False] * 6 + [True]
    wm = map_words(tokens, special, "something else entirely", 10)
    assert wm.source == "markers"
    assert texts(wm) == [(0, "a"), (1, "capybara"), (2, "barn")]
    assert wm.weights[2:5, 1].tolist() == [1, 1, 1] and wm.weights[5].sum() == 0

    t5 = ["▁A", "▁bi", "cycle", "▁", "(", "red", ")", "</s>"]
    wm = map_words(t5, [False] * 7 + [True], "zzz", 8)
    assert wm.source == "markers"
    assert texts(wm) == [(0, "A"), (1, "bicycle"), (2, "red")]
    assert wm.weights[3].sum() == 0  # lone ▁ before "(": starts no word

    gpt2 = ["A", "Ġrusty", "Ġbi", "cycle"]
    wm = map_words(gpt2, [False] * 4, "nothing", 4)
    assert texts(wm) == [(0, "A"), (1, "rusty"), (2, "bicycle")]


def test_alignment_gives_prompt_spelling_and_unknown_tokens():
    tokens = ["▁", "<unk>", "n", "<unk>", "code", "▁cat", "</s>"]
    wm = map_words(tokens, [False] * 6 + [True], "Ünïcode cat", 7)
    assert wm.source == "aligned"
    assert texts(wm) == [(0, "Ünïcode"), (1, "cat")]
    # the lone ▁ belongs to the word it starts
    assert wm.weights[:5, 0].tolist() == [1, 1, 1, 1, 1]


def test_recover_spans_truncated_tokens_cover_a_prefix():
    text, spans, source = recover_spans(["a</w>", "rusty</w>"], [False, False], "A rusty bicycle")
    assert (text, source) == ("A rusty bicycle", "aligned")
    assert spans == [(0, 1), (2, 7)]
    wm = map_words(["a</w>", "rusty</w>"], [False, False], "A rusty bicycle", 4)
    assert [w.text for w in wm.dropped] == ["bicycle"]


# --- real tokenizers ---------------------------------------------------------------------------


@needs_bpe
@pytest.mark.parametrize("prompt", [BICYCLE, TRICKY, UNICODE, LONG, CJK])
def test_clip_and_t5_give_the_same_words(prompt):
    clip = map_words(*(lambda t, s, o: (t, s, prompt, 77, o))(*encode(clip_tok(), prompt, 77)))
    t5 = map_words(*(lambda t, s, o: (t, s, prompt, 256, o))(*encode(t5_tok(), prompt, 256)))
    reference = [(w.index, w.text) for w in find_words(prompt)]
    assert texts(t5) == reference
    n = len(clip.words)
    assert texts(clip) == reference[:n]  # CLIP may be truncated: a prefix of the same list
    if prompt != LONG:
        assert n == len(reference)


@needs_bpe
@pytest.mark.parametrize("which", ["clip", "t5"])
@pytest.mark.parametrize("prompt", [BICYCLE, TRICKY, UNICODE])
def test_aligned_tokens_match_stored_offsets(which, prompt):
    tok, length = (clip_tok(), 77) if which == "clip" else (t5_tok(), 64)
    tokens, special, offsets = encode(tok, prompt, length)
    with_offsets = map_words(tokens, special, prompt, length, offsets)
    without = map_words(tokens, special, prompt, length, None)
    assert without.source == "aligned"
    assert texts(without) == texts(with_offsets)
    np.testing.assert_allclose(without.weights, with_offsets.weights)


@needs_bpe
def test_cjk_clip_bytes_aligned_like_offsets():
    # CLIP splits each Han character into byte-level tokens; decoded and aligned they give the offsets' words
    tokens, special, offsets = encode(clip_tok(), CJK, 77)
    assert len(tokens) > len(CJK.split()) + 6
    with_offsets = map_words(tokens, special, CJK, 77, offsets)
    without = map_words(tokens, special, CJK, 77, None)
    assert without.source == "aligned" and texts(without) == texts(with_offsets)
    assert [w.text for w in without.words] == ["一", "只", "红", "色", "的", "猫", "on", "a", "sofa"]
    np.testing.assert_allclose(without.weights, with_offsets.weights)


@needs_bpe
def test_bicycle_prompt_real_tokens():
    tokens, special, offsets = encode(clip_tok(), BICYCLE, 77)
    assert tokens[:3] == ["<|startoftext|>", "a</w>", "rusty</w>"]
    wm = map_words(tokens, special, BICYCLE, 77, offsets)
    # the two "a"s are two words, each owning its own token
    assert [w.text for w in wm.words] == ["A", "rusty", "bicycle", "in", "front", "of", "a", "barn"]
    assert wm.weights[1, 0] == 1 and wm.weights[7, 6] == 1 and wm.weights[1, 6] == 0
    assert wm.weights[0].sum() == 0 and wm.weights[9].sum() == 0 and wm.weights[10:].sum() == 0


@needs_bpe
def test_subword_splits_and_lone_marker_real_tokens():
    tokens, special, offsets = encode(clip_tok(), "A capybara holding a sign", 77)
    assert tokens[1:5] == ["a</w>", "cap", "y", "bara</w>"]
    wm = map_words(tokens, special, "A capybara holding a sign", 77, offsets)
    assert wm.words[1].text == "capybara" and wm.weights[2:5, 1].tolist() == [1, 1, 1]

    tokens, special, offsets = encode(t5_tok(), UNICODE, 64)
    lone = tokens.index("▁")
    assert offsets[lone] == offsets[lone + 1]  # HF gives the lone ▁ the span of what follows
    wm = map_words(tokens, special, UNICODE, 64, offsets)
    assert wm.weights[lone, [w.text for w in wm.words].index("Ünïcode")] == 1


@needs_bpe
def test_long_prompt_clip_truncation_drops_the_tail():
    tokens, special, offsets = encode(clip_tok(), LONG, 77)
    assert len(tokens) == 77 and tokens[-1] == "<|endoftext|>"
    clip = map_words(tokens, special, LONG, 77, offsets)
    t5 = map_words(*encode(t5_tok(), LONG, 256)[:2], LONG, 256, encode(t5_tok(), LONG, 256)[2])
    assert clip.dropped and not t5.dropped
    assert len(clip.words) + len(clip.dropped) == len(t5.words)
    assert clip.dropped[-1].text == "orchard"
    assert np.allclose(clip.weights.sum(axis=1)[: len(tokens)].max(), 1.0)


# --- phrases -----------------------------------------------------------------------------------


def test_parse_phrases():
    assert parse_phrases("in front of|on top of") == ["in front of", "on top of"]
    assert parse_phrases(" a barn || ") == ["a barn"]
    assert parse_phrases(None) == [] and parse_phrases("") == []
    with pytest.raises(ValueError, match="contains no word"):
        parse_phrases("cat|!!!")


def test_find_phrase_contiguous_case_insensitive_every_occurrence():
    words = map_words(*_plain("A cat and a Cat, a dog near a CAT"), None).words
    assert [w.text for w in words] == ["A", "cat", "and", "a", "Cat", "a", "dog", "near", "a", "CAT"]
    assert find_phrase(words, "a cat") == [[0, 1], [3, 4], [8, 9]]
    assert find_phrase(words, "A") == [[0], [3], [5], [8]]
    assert find_phrase(words, "cat a") == [[4, 5]]  # punctuation between words does not break a phrase
    assert find_phrase(words, "a dog near") == [[5, 6, 7]]
    assert find_phrase(words, "zebra") == []
    assert find_phrase(words, "cat dog") == []  # words must be adjacent in the prompt


def test_find_phrase_overlapping_and_typographic():
    words = find_words("a a a rock’n’roll")
    assert find_phrase(words, "a a") == [[0, 1], [1, 2]]
    assert find_phrase(words, "ROCK'N'ROLL") == [[3]]


def test_find_phrase_broken_by_a_missing_word():
    words = [w for w in find_words("in front of the barn") if w.text != "of"]
    assert find_phrase(words, "front the") == []


def _plain(prompt):
    """Whitespace-and-punctuation tokens with offsets, for tests that do not need a real tokenizer."""
    import re

    ms = list(re.finditer(r"\w+|[^\w\s]", prompt))
    return [m.group() for m in ms], [False] * len(ms), prompt, len(ms)


@needs_bpe
def test_prompt_of_special_tokens_only_says_so(tmp_path, capsys):
    import sys

    sys.path.insert(0, REPO)
    import analyse_stepavg
    from synthetic_dump import make_layout, random_arrays, write_dump

    layout = make_layout(["<|endoftext|>"], clip_len=77, t5_len=8, clip_tokenizer=clip_tok())
    write_dump(tmp_path / "run", layout, random_arrays(layout, 2, 2, (4, 4)))
    assert analyse_stepavg.main(["--root", str(tmp_path / "run"), "--tables-only", "--encoders", "clip"]) == 0
    err = capsys.readouterr().err
    assert "CLIP: the prompt holds only special tokens (<|endoftext|>), which are no words" in err
    assert "truncated" not in err
