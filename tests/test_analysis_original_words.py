"""``--words original``: the original tool's words, columns and phrase rule, against tables derived by hand.

Every expected word list below is written out by hand from the printed token list (the original rule:
``</w>`` ends a CLIP word, ``▁`` starts a T5 word, specials end a word); the expected numbers are
computed here with plain loops from the stored arrays and those hand-made token groups.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from conftest import CLIP_BPE  # noqa: E402
from original_dump import write_original_dump  # noqa: E402
from synthetic_dump import make_layout, random_arrays, read_csv, run_analysis, write_dump  # noqa: E402

from attention_map_diffusers.analysis.original_words import original_phrase, original_words  # noqa: E402
from attention_map_diffusers.analysis.words import Word  # noqa: E402

needs_bpe = pytest.mark.skipif(not CLIP_BPE.is_file(), reason="../shared/data/clip_bpe_simple_vocab_16e6.txt.gz (the real CLIP merges) is absent")

BOB = "Bob's red barn, don't you see? Peppers, a barn!"
CAPS = "A barn, a Barn! A BARN"


def clip_tok():
    from attention_map_diffusers.models.tiny import build_clip_tokenizer

    return build_clip_tokenizer(str(CLIP_BPE))


def t5_tok():
    from attention_map_diffusers.models.tiny import build_t5_tokenizer

    return build_t5_tokenizer()


run = run_analysis


def stored(folder):
    with np.load(os.path.join(folder, "stepavg_token_maps_v1.npz")) as z:
        return {k: z[k].astype(np.float64) for k in z.files}


def groups_by_hand(tokens, hand):
    """Token positions of each hand-written word (a list of its token strings, in order), checked against ``tokens``."""
    out, j = [], 0
    for pieces in hand:
        while tokens[j] != pieces[0]:  # specials between words
            j += 1
        assert tokens[j : j + len(pieces)] == pieces, (tokens[j : j + len(pieces)], pieces)
        out.append(list(range(j, j + len(pieces))))
        j += len(pieces)
    return out


def expected_tables(arrays, groups, start, steps_reversed=False):
    """Per word (token group; positions relative to the encoder's span ``start``): curves summed over the
    group's tokens, AUC by the trapezoid rule written out, step mean, heatmap mass (shares summed over pixels)."""
    mean = arrays["per_block_step_token_mean"][0]
    if steps_reversed:
        mean = mean[:, ::-1]
    Bk, S, _ = mean.shape
    n = len(groups)
    curves = np.zeros((Bk, S, n))
    for k, g in enumerate(groups):
        for j in g:
            curves[:, :, k] += mean[:, :, start + j]
    auc = np.zeros((Bk, n))
    for s in range(S - 1):
        auc += (curves[:, s] + curves[:, s + 1]) / 2
    avg = arrays["sum_token_map"][0] / arrays["N"]
    H, W, _ = avg.shape
    maps = np.zeros((H, W, n))
    for k, g in enumerate(groups):
        for j in g:
            maps[:, :, k] += avg[:, :, start + j]
    shares = maps / (maps.sum(axis=-1, keepdims=True) + 1e-8)
    return {"curves": curves, "auc": auc, "mean": curves.mean(axis=1), "mass": shares.sum(axis=(0, 1))}


def check(folder, names, ref, cols=None):
    for table, key in (("words_auc.csv", "auc"), ("words_stepavg.csv", "mean")):
        header, rows = read_csv(os.path.join(folder, "tables", table))
        assert header == ["block", *names]
        got = np.array([[float(v) for v in r[1:]] for r in rows])
        np.testing.assert_allclose(got, ref[key], rtol=2e-6, atol=1e-9)


# --- the rule on token lists -------------------------------------------------------------------


def test_rule_on_hand_written_tokens():
    # a CLIP-like list: specials end words; </w> ends one; a piece without it continues
    tokens = ["<|startoftext|>", "cap", "y", "bara</w>", "don</w>", "'t</w>", "!</w>", "<|endoftext|>", "<|endoftext|>"]
    wm = original_words(tokens, [1, 0, 0, 0, 0, 0, 0, 1, 1], 10, "clip")
    assert [w.text for w in wm.words] == ["capybara", "don", "'t", "!"]
    assert wm.weights[1:4, 0].tolist() == [1, 1, 1] and wm.weights[0].sum() == 0 and wm.weights[7:].sum() == 0
    # the original dump's list marks <unk> and "...|>" tokens special even when the dump did not
    wm = original_words(["a</w>", "<unk>", "x|>", "b</w>"], [0, 0, 0, 0], 4, "clip")
    assert [w.text for w in wm.words] == ["a", "b"]
    # T5: ▁ starts a word; a lone ▁ too; <unk> is a piece of a word; only <pad> <s> </s> are special
    tokens = ["▁Bob", "!", "▁", "(", "x", "<unk>", "▁a", "</s>", "<pad>"]
    wm = original_words(tokens, [0, 0, 0, 0, 0, 1, 0, 1, 1], 9, "t5")
    assert [w.text for w in wm.words] == ["Bob!", "(x<unk>", "a"]
    assert wm.weights[:, 1].tolist() == [0, 0, 1, 1, 1, 1, 0, 0, 0]


def test_phrase_rule_by_hand():
    words = [Word(k, t, 0, 0) for k, t in enumerate(["a", "barn", ",", "a", "Barn!"])]
    mass = np.array([1.0, 3.0, 5.0, 2.0, 7.0])
    pos, w = original_phrase(words, "a  barn", mass, "attention")  # every "a" and "barn", anywhere; case counts
    assert pos == [0, 1, 3] and np.allclose(w, [1 / 6, 3 / 6, 0, 2 / 6, 0])
    pos, w = original_phrase(words, "a barn", mass, "uniform")
    assert np.allclose(w, [1 / 3, 1 / 3, 0, 1 / 3, 0])
    pos, w = original_phrase(words, "Barn", mass, "attention")
    assert pos == [] and not w.any()
    pos, w = original_phrase(words, "a", np.zeros(5), "attention")  # no mass: all-zero weights, as the original
    assert pos == [0, 3] and not w.any()


# --- the tool's tables on synthetic dumps --------------------------------------------------------


@needs_bpe
def test_tables_with_punctuation_contractions_capitals_and_repeats(tmp_path):
    layout = make_layout([BOB], clip_len=77, t5_len=40, clip_tokenizer=clip_tok(), t5_tokenizer=t5_tok())
    clip, t5 = layout.clip[0].tokens, layout.t5[0].tokens
    # the token lists, as the tokenizers give them (printed once and copied here)
    assert clip == ["<|startoftext|>", "bob</w>", "'s</w>", "red</w>", "barn</w>", ",</w>", "don</w>", "'t</w>", "you</w>",
                    "see</w>", "?</w>", "peppers</w>", ",</w>", "a</w>", "barn</w>", "!</w>", "<|endoftext|>"]  # fmt: skip
    assert t5 == ["▁B", "o", "b", "'", "s", "▁red", "▁barn", ",", "▁d", "o", "n", "'", "t", "▁y", "o", "u", "▁s", "e", "e",
                  "?", "▁P", "e", "p", "p", "er", "s", ",", "▁a", "▁barn", "!", "</s>"]  # fmt: skip
    clip_words = ["bob", "'s", "red", "barn", ",", "don", "'t", "you", "see", "?", "peppers", ",", "a", "barn", "!"]
    clip_hand = [[w + "</w>"] for w in clip_words]
    t5_words = ["Bob's", "red", "barn,", "don't", "you", "see?", "Peppers,", "a", "barn!"]
    t5_hand = [["▁B", "o", "b", "'", "s"], ["▁red"], ["▁barn", ","], ["▁d", "o", "n", "'", "t"], ["▁y", "o", "u"],
               ["▁s", "e", "e", "?"], ["▁P", "e", "p", "p", "er", "s", ","], ["▁a"], ["▁barn", "!"]]  # fmt: skip
    arrays = random_arrays(layout, num_blocks=3, num_steps=5, grid=(6, 6), seed=11)
    write_dump(tmp_path / "run", layout, arrays, store_dtype="float32")
    assert run("--root", tmp_path / "run", "--tables-only", "--words", "original", "--phrases", "a barn|red|zebra") == 0
    a = stored(tmp_path / "run")
    out = tmp_path / "run" / "analysis"
    for enc, names, hand, start in (("clip", clip_words, clip_hand, 0), ("t5", t5_words, t5_hand, 77)):
        ref = expected_tables(a, groups_by_hand(getattr(layout, enc)[0].tokens, hand), start)
        check(out / enc, names, ref)
        # phrases: "a barn" takes every "a" and every "barn" (CLIP: a, barn, barn; T5: "a" only, "barn," and
        # "barn!" are other words), weighted by mass; "zebra" matches nothing: an all-zero column
        take = [k for k, w in enumerate(names) if w in ("a", "barn")]
        alpha = ref["mass"][take] / ref["mass"][take].sum()
        red = names.index("red")
        for table, key in (("phrases_auc.csv", "auc"), ("phrases_stepavg.csv", "mean")):
            header, rows = read_csv(out / enc / "tables" / table)
            assert header == ["block", "a barn", "red", "zebra"]
            got = np.array([[float(v) for v in r[1:]] for r in rows])
            np.testing.assert_allclose(got[:, 0], ref[key][:, take] @ alpha, rtol=2e-6)
            np.testing.assert_allclose(got[:, 1], ref[key][:, red], rtol=2e-6)
            assert not got[:, 2].any()
    assert len([k for k, w in enumerate(clip_words) if w in ("a", "barn")]) == 3  # a, barn, barn
    # the default stays the prompt's words
    assert run("--root", tmp_path / "run", "--tables-only") == 0
    header, _ = read_csv(out / "clip" / "tables" / "words_auc.csv")
    assert header[1:] == ["Bob's", "red", "barn #2", "don't", "you", "see", "Peppers", "a", "barn #8"]


@needs_bpe
def test_repeats_and_capitals_stay_bare_columns_with_heatmaps_by_mass(tmp_path):
    layout = make_layout([CAPS], clip_len=77, t5_len=16, clip_tokenizer=clip_tok(), t5_tokenizer=t5_tok())
    assert layout.clip[0].tokens[1:-1] == ["a</w>", "barn</w>", ",</w>", "a</w>", "barn</w>", "!</w>", "a</w>", "barn</w>"]
    clip_words = ["a", "barn", ",", "a", "barn", "!", "a", "barn"]  # lower-cased by CLIP, repeats left bare
    t5 = layout.t5[0].tokens
    arrays = random_arrays(layout, num_blocks=2, num_steps=3, grid=(4, 4), seed=5)
    write_dump(tmp_path / "run", layout, arrays, store_dtype="float32")
    assert run("--root", tmp_path / "run", "--words", "original", "--topk", "3", "--blocks", "0") == 0
    a = stored(tmp_path / "run")
    out = tmp_path / "run" / "analysis"
    ref = expected_tables(a, groups_by_hand(layout.clip[0].tokens, [[w + "</w>"] for w in clip_words]), 0)
    header, _ = read_csv(out / "clip" / "tables" / "words_auc.csv")
    assert header == ["block", *clip_words]
    # the word heatmaps: the top 3 by mass, named "<word number>-<word>" as the original named them
    top = np.argsort(-ref["mass"], kind="stable")[:3]
    slug = {",": "x", "!": "x"}
    want = sorted(f"{k:03d}-{slug.get(clip_words[k], clip_words[k])}.png" for k in top)
    assert sorted(os.listdir(out / "clip" / "heatmaps" / "words")) == want
    assert not (out / "clip_vs_t5.png").exists()  # CLIP's and T5's words differ: nothing to pair
    header, _ = read_csv(out / "t5" / "tables" / "words_auc.csv")
    assert t5 == ["▁A", "▁barn", ",", "▁a", "▁Barn", "!", "▁A", "▁B", "A", "R", "N", "</s>"]
    assert header[1:] == ["A", "barn,", "a", "Barn!", "A", "BARN"]  # case kept, "A" twice and bare


def test_dump_of_the_original_tool(tmp_path):
    from attention_map_diffusers.models.tiny import build_t5_tokenizer

    prompt = "A dog's toy, a ball!"
    layout = make_layout([prompt], clip_len=77, t5_len=24)
    arrays = random_arrays(layout, num_blocks=3, num_steps=4, grid=(4, 4), seed=9)
    meta = write_original_dump(tmp_path / "old", prompt, arrays)
    assert meta["tokens"][:9] == ["<|startoftext|>", "a</w>", "dog</w>", "'</w>", "s</w>", "toy</w>", ",</w>", "a</w>", "ball</w>"]
    tok_dir = tmp_path / "t5tok"
    build_t5_tokenizer().save_pretrained(str(tok_dir))
    assert run("--root", tmp_path / "old", "--tables-only", "--words", "original", "--t5-tokenizer", tok_dir) == 0
    a = stored(tmp_path / "old")  # steps stored by ascending timestep; AUC and mean do not depend on the order
    words = ["a", "dog", "'", "s", "toy", ",", "a", "ball", "!"]
    ref = expected_tables(a, groups_by_hand(meta["tokens"], [[w + "</w>"] for w in words]), 0, steps_reversed=True)
    check(tmp_path / "old" / "analysis" / "clip", words, ref)
    header, _ = read_csv(tmp_path / "old" / "analysis" / "t5" / "tables" / "words_auc.csv")
    assert header[1:] == ["A", "dog's", "toy,", "a", "ball!"]
