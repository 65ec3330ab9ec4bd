"""The CSV tables: one naming rule in every table, AUC's units and its step-normalised value, against hand computations."""

from __future__ import annotations

import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from synthetic_dump import make_layout, random_arrays, read_csv, run_analysis, write_dump, write_runs  # noqa: E402

PROMPT = "A cat and a dog, a CAT"
WORDS = ["A", "cat", "and", "a", "dog", "a", "CAT"]
LABELS = ["A #0", "cat #1", "and", "a #3", "dog", "a #5", "CAT #6"]  # repeated in any case: numbered


run = run_analysis


def values(rows):
    return np.array([[float(v) for v in r[1:]] for r in rows])


def hand_curves(folder, layout, enc):
    """(Bk, S, n) word curves: per_block_step_token_mean summed over each word's tokens (plain loops)."""
    with np.load(os.path.join(folder, "stepavg_token_maps_v1.npz")) as z:
        mean = z["per_block_step_token_mean"][0].astype(np.float64)
    Bk, S, _ = mean.shape
    curves = np.zeros((Bk, S, len(WORDS)))
    seen: dict[str, int] = {}
    for k, w in enumerate(WORDS):
        occ = seen.get(w, 0)
        seen[w] = occ + 1
        for p in layout.positions(enc, 0, w, occurrence=occ):
            curves[:, :, k] += mean[:, :, p]
    return curves


def trapezoid(curves):
    """(Bk, S, n) -> (Bk, n): sum over s of (c[s] + c[s+1]) / 2."""
    out = np.zeros((curves.shape[0], curves.shape[2]))
    for s in range(curves.shape[1] - 1):
        out += (curves[:, s] + curves[:, s + 1]) / 2
    return out


def make_run(folder, steps, seed=3):
    layout = make_layout([PROMPT], clip_len=77, t5_len=16)
    write_dump(folder, layout, random_arrays(layout, num_blocks=2, num_steps=steps, grid=(4, 4), seed=seed), store_dtype="float32", seed=seed)
    return layout


def test_every_table_names_words_alike_and_auc_per_step_by_hand(tmp_path):
    layout = make_run(tmp_path / "run", steps=5)
    assert run("--root", tmp_path / "run", "--tables-only", "--phrases", "a dog") == 0
    for enc in ("clip", "t5"):
        t = tmp_path / "run" / "analysis" / enc / "tables"
        for name in ("words_auc.csv", "words_stepavg.csv", "words_auc_norm.csv"):
            assert read_csv(t / name)[0] == ["block", *LABELS]
        header, rows = read_csv(t / "words_summary.csv")
        assert header == ["word", "mass", "peak_block", "peak_step", "word_index"]
        assert [r[0] for r in rows] == LABELS and [int(r[4]) for r in rows] == list(range(7))  # "a" is "a #3", "a #5" here too
        curves = hand_curves(tmp_path / "run", layout, enc)
        auc = trapezoid(curves)
        np.testing.assert_allclose(values(read_csv(t / "words_auc.csv")[1]), auc, rtol=2e-6)
        np.testing.assert_allclose(values(read_csv(t / "words_auc_norm.csv")[1]), auc / 4, rtol=2e-6)  # S - 1 = 4 intervals
        # the phrase tables get the normalised value too: AUC / 4 of the same column
        _, p_auc = read_csv(t / "phrases_auc.csv")
        header, p_norm = read_csv(t / "phrases_auc_norm.csv")
        assert header == ["block", "a dog"]
        np.testing.assert_allclose(values(p_norm), values(p_auc) / 4, rtol=2e-6)
        readme = (t / "README.txt").read_text(encoding="utf-8")
        assert "unit spacing" in readme and "S = 5 steps, so AUC = 4 x" in readme and "AUC / (S - 1)" in readme
        assert '"a #6"' in readme


def test_auc_grows_with_steps_its_norm_does_not(tmp_path):
    # the same constant curves over 3 and over 9 steps: AUC 2c and 8c, normalised both c
    for steps in (3, 9):
        layout = make_layout([PROMPT], clip_len=77, t5_len=16)
        arrays = random_arrays(layout, num_blocks=2, num_steps=steps, grid=(4, 4), seed=1)
        base = np.random.default_rng(0).uniform(0.1, 1.0, size=(1, 2, 1, layout.T))
        arrays["per_block_step_token_mean"][:] = base / base.sum(axis=-1, keepdims=True)  # the same at every step
        write_dump(tmp_path / f"s{steps}", layout, arrays, store_dtype="float32")
        assert run("--root", tmp_path / f"s{steps}", "--tables-only", "--encoders", "clip") == 0
    t3, t9 = (tmp_path / f"s{s}" / "analysis" / "clip" / "tables" for s in (3, 9))
    a3, a9 = (values(read_csv(t / "words_auc.csv")[1]) for t in (t3, t9))
    np.testing.assert_allclose(a9, 4 * a3, rtol=2e-6)
    n3, n9 = (values(read_csv(t / "words_auc_norm.csv")[1]) for t in (t3, t9))
    np.testing.assert_allclose(n3, a3 / 2, rtol=2e-6)
    np.testing.assert_allclose(n9, n3, rtol=2e-6)


def test_one_step_norm_is_the_step_value(tmp_path):
    layout = make_run(tmp_path / "run", steps=1)
    assert run("--root", tmp_path / "run", "--tables-only", "--encoders", "t5") == 0
    t = tmp_path / "run" / "analysis" / "t5" / "tables"
    curves = hand_curves(tmp_path / "run", layout, "t5")
    assert not values(read_csv(t / "words_auc.csv")[1]).any()
    np.testing.assert_allclose(values(read_csv(t / "words_auc_norm.csv")[1]), curves[:, 0], rtol=2e-6)


def test_original_words_are_bare_in_every_table(tmp_path):
    make_run(tmp_path / "run", steps=3)
    assert run("--root", tmp_path / "run", "--tables-only", "--encoders", "clip", "--words", "original") == 0
    t = tmp_path / "run" / "analysis" / "clip" / "tables"
    bare = ["a", "cat", "and", "a", "dog", ",", "a", "cat"]  # the built-in CLIP-like tokens: lower case, "," a word
    assert read_csv(t / "words_auc.csv")[0][1:] == bare
    _, rows = read_csv(t / "words_summary.csv")
    assert [r[0] for r in rows] == bare and [int(r[4]) for r in rows] == list(range(8))
    assert "as the original tool named them" in (t / "README.txt").read_text(encoding="utf-8")


def test_group_tables_labels_and_auc_per_step(tmp_path):
    root = tmp_path / "out"
    layouts, records = [], []
    for k, seed in enumerate((1, 2, 3)):
        layouts.append(make_run(root / f"{k:04d}", steps=4, seed=seed))
        records.append({"run": k, "folder": f"{k:04d}", "prompt": [PROMPT], "seed": seed, "status": "done"})
    write_runs(root, records)
    assert run("--root", root, "--tables-only", "--encoders", "clip") == 0
    (group,) = (root / "analysis" / "aggregate").iterdir()
    t = group / "clip" / "tables"
    _, rows = read_csv(t / "words_summary.csv")
    assert [r[0] for r in rows] == LABELS
    header, rows = read_csv(t / "words_auc_norm.csv")
    assert header[1:5] == ["A #0", "A #0 std", "cat #1", "cat #1 std"]
    norms = np.stack([trapezoid(hand_curves(root / f"{k:04d}", layouts[k], "clip")) / 3 for k in range(3)])
    got = values(rows)
    np.testing.assert_allclose(got[:, 0::2], norms.mean(axis=0), rtol=2e-6)
    np.testing.assert_allclose(got[:, 1::2], norms.std(axis=0, ddof=1), rtol=1e-5, atol=1e-9)
    assert "S = 4 steps" in (t / "README.txt").read_text(encoding="utf-8")
