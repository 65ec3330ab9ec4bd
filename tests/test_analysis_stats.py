"""Numbers of stats.py against independent reference computations (plain loops, float64)."""

from __future__ import annotations

import numpy as np
import pytest

from attention_map_diffusers.analysis.stats import (
    analyse_encoder,
    auc,
    mass_shares,
    parse_blocks,
    peaks,
    phrase_weights,
    renormalise,
    step_average,
    table_values,
    top_k,
    word_maps,
    word_summary,
)
from attention_map_diffusers.analysis.words import map_words


def wordmap(prompt="a cat on a mat", length=8):
    """Tokens = words, one per position from 1 (position 0 is a special, the rest padding)."""
    import re

    ms = list(re.finditer(r"\S+", prompt))
    tokens = ["<s>"] + [m.group() for m in ms]
    special = [True] + [False] * len(ms)
    offsets = [None] + [m.span() for m in ms]
    return map_words(tokens, special, prompt, length, offsets)


def test_word_that_owns_a_square():
    """'cat' holds all the attention of a 3x3 square; elsewhere the words share equally."""
    H = W = 6
    L = 8
    wm = wordmap()  # words: a(1) cat(2) on(3) a(4) mat(5)
    maps = np.full((H, W, L), 0.2)
    maps[..., 0] = 5.0  # the special token: ignored by word maps
    maps[..., 6:] = 3.0  # padding: ignored
    maps[:3, :3, 1:6] = 0.0
    maps[:3, :3, 2] = 0.7
    shares = renormalise(word_maps(maps, wm.weights))
    assert np.allclose(shares[:3, :3, 1], 1.0, atol=1e-6) and np.allclose(shares[:3, :3, [0, 2, 3, 4]], 0)
    assert np.allclose(shares[3:, :, :], 0.2, atol=1e-6)
    mass = mass_shares(shares)
    # reference: cat = (9 * 1 + 27 * 0.2) / 36; the others 27 * 0.2 / 36
    np.testing.assert_allclose(mass, [27 * 0.2 / 36, (9 + 27 * 0.2) / 36, 0.15, 0.15, 0.15], atol=1e-6)
    assert top_k(mass, 2) == [1, 0]  # ties keep prompt order


def test_renormalise_and_word_maps_reference():
    rng = np.random.default_rng(1)
    maps = rng.uniform(0, 1, size=(4, 5, 8))
    wm = wordmap()
    got = renormalise(word_maps(maps, wm.weights))
    ref = np.zeros((4, 5, 5))
    for y in range(4):
        for x in range(5):
            per_word = [maps[y, x, 1 + k] for k in range(5)]
            total = sum(per_word) + 1e-8
            ref[y, x] = [v / total for v in per_word]
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_auc_of_known_curves():
    S = 11
    s = np.arange(S, dtype=np.float64)
    lin = 0.5 * s + 2.0  # trapezoid is exact for a line: integral over [0, 10]
    assert auc(lin, axis=0) == pytest.approx(0.25 * 100 + 2.0 * 10)
    quad = s**2  # trapezoid over unit steps: sum of (s^2 + (s+1)^2)/2 = integral + (S-1)/6
    assert auc(quad, axis=0) == pytest.approx(1000 / 3 + 10 / 6)
    curves = np.stack([lin, quad], axis=-1)[None]  # (1, S, 2)
    np.testing.assert_allclose(auc(curves, axis=1), [[45.0, 1000 / 3 + 10 / 6]])
    np.testing.assert_allclose(step_average(curves, axis=1), [[lin.mean(), quad.mean()]])
    assert auc(np.ones((1, 1, 3)), axis=1).tolist() == [[0.0, 0.0, 0.0]]  # one step: no area


def test_peaks_first_maximum():
    c = np.zeros((3, 4, 2))
    c[2, 1, 0] = 5
    c[0, 3, 1] = 2
    c[1, 0, 1] = 2  # tie: block 0 step 3 comes first in (block, step) order
    pb, ps = peaks(c)
    assert pb.tolist() == [2, 0] and ps.tolist() == [1, 3]


def test_phrase_weights():
    mass = np.array([0.1, 0.3, 0.2, 0.4])
    np.testing.assert_allclose(phrase_weights([1, 2], mass, "attention"), [0, 0.6, 0.4, 0])
    np.testing.assert_allclose(phrase_weights([1, 2, 1], mass, "uniform"), [0, 0.5, 0.5, 0])
    np.testing.assert_allclose(phrase_weights([0, 3], np.zeros(4), "attention"), [0.5, 0, 0, 0.5])
    with pytest.raises(ValueError, match="attention, uniform"):
        phrase_weights([0], mass, "mean")


def test_analyse_encoder_phrases_tables_summary():
    rng = np.random.default_rng(3)
    wm = wordmap()  # a cat on a mat
    H, W, L, Bk, S = 4, 4, 8, 3, 5
    maps = rng.uniform(0.1, 1, size=(H, W, L))
    step_mean = rng.uniform(0, 0.1, size=(Bk, S, L))
    res = analyse_encoder(
        maps, step_mean, wm, encoder="clip", item=0, block_ids=[3, 7, 9], timesteps=np.linspace(1000, 200, S),
        topk=2, phrases=["A", "on a mat", "dog"], weights="attention",
    )  # fmt: skip
    assert res.missing_phrases == ["dog"]
    a, mat = res.phrases[0], res.phrases[1]
    assert a.occurrences == [[0], [3]] and mat.occurrences == [[2, 3, 4]]
    # reference phrase map / curves: mass-weighted average over the phrase's words
    shares = res.shares
    m = [shares[..., k].sum() / shares.sum() for k in range(5)]
    wa = np.array([m[0], m[3]]) / (m[0] + m[3])
    np.testing.assert_allclose(a.map, wa[0] * shares[..., 0] + wa[1] * shares[..., 3])
    curve = lambda k: step_mean[:, :, 1 + k]  # word k is token 1 + k  # noqa: E731
    np.testing.assert_allclose(a.curves, wa[0] * curve(0) + wa[1] * curve(3))
    names, auc_v, mean_v = table_values(res, "phrases")
    assert names == ["A", "on a mat"]
    ref_auc = np.array([[sum((a.curves[b, s] + a.curves[b, s + 1]) / 2 for s in range(S - 1))] for b in range(Bk)])
    np.testing.assert_allclose(auc_v[:, :1], ref_auc)
    np.testing.assert_allclose(mean_v[:, 1], mat.curves.mean(axis=1))
    names, auc_v, mean_v = table_values(res, "words")
    assert names == ["a", "cat", "on", "a", "mat"]
    np.testing.assert_allclose(mean_v[:, 4], step_mean[:, :, 5].mean(axis=1))
    rows = word_summary(res)
    for k, (w, mass, pb, ps) in enumerate(rows):
        c = curve(k)
        b, s = np.unravel_index(np.argmax(c), c.shape)
        assert (w, pb, ps) == (names[k], [3, 7, 9][b], s)
        assert mass == pytest.approx(m[k])


def test_uniform_phrase_weights_in_analysis():
    wm = wordmap()
    maps = np.random.default_rng(0).uniform(size=(3, 3, 8))
    res = analyse_encoder(
        maps, np.ones((1, 2, 8)), wm, encoder="t5", item=0, block_ids=[0], timesteps=np.array([2.0, 1.0]),
        topk=3, phrases=["cat on"], weights="uniform",
    )  # fmt: skip
    np.testing.assert_allclose(res.phrases[0].map, (res.shares[..., 1] + res.shares[..., 2]) / 2)


def test_parse_blocks():
    assert parse_blocks("0-5,12") == ((0, 5), (12, 12))
    assert parse_blocks(" 3 , 1,1 ") == ((1, 1), (3, 3))
    assert parse_blocks("4-6,0-2,3,10-12,11-20") == ((0, 6), (10, 20))  # sorted and merged
    assert parse_blocks("0-99999999999") == ((0, 99999999999),)  # a range stays a range
    assert parse_blocks(None) is None and parse_blocks("") is None
    for bad in ("a", "5-2", "-1", "1,,2", "1-"):
        with pytest.raises(ValueError, match="--blocks"):
            parse_blocks(bad)
