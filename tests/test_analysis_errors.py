"""Every bad input: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import analyse_stepavg  # noqa: E402
from synthetic_dump import make_layout, random_arrays, write_dump, write_runs  # noqa: E402

PROMPT = "A rusty bicycle in front of a barn"


def snapshot(folder):
    return sorted(
        (os.path.relpath(os.path.join(d, f), folder), os.path.getsize(os.path.join(d, f)))
        for d, _, files in os.walk(folder)
        for f in files
    )


def good_dump(folder, *, original=False, arrays_fn=None, meta=None):
    layout = make_layout([PROMPT], clip_len=77, t5_len=16)
    arrays = random_arrays(layout, num_blocks=2, num_steps=3, grid=(4, 4))
    if arrays_fn:
        arrays_fn(arrays)
    write_dump(folder, layout, arrays, original=original, meta=meta)
    return folder


def rewrite_npz(folder, fn):
    path = os.path.join(folder, "stepavg_token_maps_v1.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    fn(arrays)
    np.savez(path, **arrays)


def rewrite_meta(folder, fn):
    path = os.path.join(folder, "metadata.json")
    with open(path) as fh:
        meta = json.load(fh)
    fn(meta)
    with open(path, "w") as fh:
        json.dump(meta, fh)


def _set(d, k, v):
    d[k] = v


def _del(d, k):
    del d[k]


CASES = {
    # files
    "no npz": (lambda f: os.remove(f / "stepavg_token_maps_v1.npz"), [], "stepavg_token_maps_v1.npz is missing"),
    "no metadata": (lambda f: os.remove(f / "metadata.json"), [], "metadata.json is missing"),
    "bad json": (lambda f: (f / "metadata.json").write_text("{not json"), [], "not valid JSON"),
    "json list": (lambda f: (f / "metadata.json").write_text("[1, 2]"), [], "JSON object"),
    "garbage npz": (lambda f: (f / "stepavg_token_maps_v1.npz").write_bytes(b"garbage" * 10), [], "damaged"),
    "truncated npz": (
        lambda f: (f / "stepavg_token_maps_v1.npz").write_bytes((f / "stepavg_token_maps_v1.npz").read_bytes()[:2000]),
        [],
        "damaged",
    ),
    # arrays
    "missing key": (lambda f: rewrite_npz(f, lambda a: _del(a, "per_block_step_token_mean")), [], "lacks the array 'per_block_step_token_mean'"),
    "missing N": (lambda f: rewrite_npz(f, lambda a: _del(a, "N")), [], "lacks the array 'N'"),
    "map ndim": (lambda f: rewrite_npz(f, lambda a: _set(a, "sum_token_map", a["sum_token_map"][0])), [], "expected (B, Hc, Wc, T)"),
    "mean T": (
        lambda f: rewrite_npz(f, lambda a: _set(a, "per_block_step_token_mean", a["per_block_step_token_mean"][..., :-1])),
        [],
        "per_block_step_token_mean has shape",
    ),
    "timesteps S": (lambda f: rewrite_npz(f, lambda a: _set(a, "timesteps", a["timesteps"][:-1])), [], "timesteps has shape"),
    "max shape": (
        lambda f: rewrite_npz(f, lambda a: _set(a, "per_block_step_token_max", a["per_block_step_token_max"][:, :1])),
        [],
        "per_block_step_token_max has shape",
    ),
    "nan": (lambda f: rewrite_npz(f, lambda a: a["sum_token_map"].__setitem__((0, 1, 1, 5), np.nan)), [], "NaN or inf"),
    "inf": (lambda f: rewrite_npz(f, lambda a: a["per_block_step_token_mean"].__setitem__((0, 0, 0, 0), np.inf)), [], "NaN or inf"),
    "N zero": (lambda f: rewrite_npz(f, lambda a: _set(a, "N", np.asarray(0))), [], "N must be one positive integer"),
    "no timesteps (format 2)": (lambda f: rewrite_npz(f, lambda a: _del(a, "timesteps")), [], "lacks the array 'timesteps'"),
    "negative map": (lambda f: rewrite_npz(f, lambda a: a["sum_token_map"].__setitem__((0, 1, 1, 5), -0.5)), [], "sum_token_map holds negative values"),
    "negative curve": (
        lambda f: rewrite_npz(f, lambda a: a["per_block_step_token_mean"].__setitem__((0, 0, 0, 0), -1e-3)),
        [],
        "per_block_step_token_mean holds negative values",
    ),
    "all-zero map": (lambda f: rewrite_npz(f, lambda a: a["sum_token_map"].__imul__(0)), [], "sum_token_map of item 0 is all zero"),
    "all-zero curves": (
        lambda f: rewrite_npz(f, lambda a: a["per_block_step_token_mean"].__imul__(0)),
        [],
        "per_block_step_token_mean of item 0 is all zero",
    ),
    "words get nothing": (
        lambda f: rewrite_npz(f, lambda a: a["sum_token_map"][..., :77].__imul__(0)),
        [],
        "the CLIP words get no attention at all",
    ),
    # metadata against arrays
    "B": (lambda f: rewrite_meta(f, lambda m: _set(m, "prompt", [PROMPT, PROMPT])), [], "prompt must be"),
    "batch_size": (lambda f: rewrite_meta(f, lambda m: _set(m, "batch_size", 2)), [], "batch_size=2"),
    "Bk": (lambda f: rewrite_meta(f, lambda m: _set(m, "num_blocks", 5)), [], "num_blocks=5"),
    "blocks list": (lambda f: rewrite_meta(f, lambda m: _set(m, "blocks", ["transformer_blocks.0.attn"])), [], "metadata blocks"),
    "S": (lambda f: rewrite_meta(f, lambda m: _set(m, "num_steps", 7)), [], "num_steps=7"),
    "T": (lambda f: rewrite_meta(f, lambda m: _set(m, "T_from_model", 333)), [], "T_from_model=333"),
    "grid": (lambda f: rewrite_meta(f, lambda m: _set(m, "canonical_size", [64, 64])), [], "canonical_size"),
    "grid not a list": (lambda f: rewrite_meta(f, lambda m: _set(m, "canonical_size", 16)), [], "canonical_size=16 but"),
    "block sizes not a list": (lambda f: rewrite_meta(f, lambda m: _set(m, "block_latent_sizes", 5)), [], "block_latent_sizes is 5"),
    "spans overlap": (
        lambda f: rewrite_meta(f, lambda m: _set(m, "text_spans", {"clip": [0, 77], "t5": [50, 93]})),
        [],
        "text_spans clip [0, 77] and t5 [50, 93] overlap",
    ),
    "step order": (lambda f: rewrite_meta(f, lambda m: _set(m, "step_order", "ascending")), [], "step_order='ascending'"),
    "spans": (lambda f: rewrite_meta(f, lambda m: _set(m, "text_spans", {"clip": [0, 77], "t5": [77, 500]})), [], "text_spans.t5"),
    "too many tokens": (lambda f: rewrite_meta(f, lambda m: _set(m, "tokens_t5", [["▁a"] * 40])), [], "tokens_t5[0] has 40 tokens"),
    "mask length": (lambda f: rewrite_meta(f, lambda m: _set(m, "special_mask", [[0, 1]])), [], "special mask"),
    "offsets": (lambda f: rewrite_meta(f, lambda m: m["token_offsets_clip"][0].__setitem__(1, [0, 999])), [], "token_offsets_clip[0][1]"),
    "no tokens": (lambda f: rewrite_meta(f, lambda m: _del(m, "tokens")), [], "no CLIP tokens"),
    "version": (lambda f: rewrite_meta(f, lambda m: _set(m, "format_version", 3)), [], "format_version 3"),
    "image gone": (lambda f: os.remove(f / "images" / "seed42-64x64-idx0.png"), [], "missing or unreadable"),
    "image garbage": (lambda f: (f / "images" / "seed42-64x64-idx0.png").write_bytes(b"nope"), [], "--no-overlay"),
    # flags
    "blocks syntax": (None, ["--blocks", "1-x"], "--blocks"),
    "blocks absent": (None, ["--blocks", "0-9"], "block 2 is not in this dump, which has blocks 0-1"),
    "encoders": (None, ["--encoders", "clip,bert"], "'bert' is not an encoder"),
    "topk": (None, ["--topk", "0"], "--topk must be at least 1"),
    "dpi": (None, ["--dpi", "0"], "--dpi must be between"),
    "phrase": (None, ["--phrases", "a barn|--"], "contains no word"),
    "weights": (None, ["--weights", "mean"], "invalid choice: 'mean'"),
    "format": (None, ["--format", "gif"], "invalid choice: 'gif'"),
    "unknown flag": (None, ["--colour"], "unrecognized arguments"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, case):
    breaker, extra, message = CASES[case]
    folder = good_dump(tmp_path / "run")
    if breaker:
        breaker(folder)
    before = snapshot(tmp_path)
    rc = analyse_stepavg.main(["--root", str(folder), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("analyse_stepavg.py: error: ") and err.count("\n") == 1, err
    assert message in err
    assert snapshot(tmp_path) == before  # nothing written, no temp folder left


def test_missing_root_and_empty_root(tmp_path, capsys):
    assert analyse_stepavg.main(["--root", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert analyse_stepavg.main(["--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds neither a run" in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_out_is_a_file(tmp_path, capsys):
    folder = good_dump(tmp_path / "run")
    (tmp_path / "file").write_text("x")
    assert analyse_stepavg.main(["--root", str(folder), "--out", str(tmp_path / "file")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_runs_jsonl_problems(tmp_path, capsys):
    good_dump(tmp_path / "0000-a")
    row = {"run": 0, "folder": "0000-a", "prompt": [PROMPT], "seed": 1, "status": "done"}
    for runs, message in (
        ([row, dict(row, run="x")], '"run" must be a whole number >= 0, got \'x\''),
        ([row, dict(row, prompt=5)], '"prompt" must be a string or a list of strings, got 5'),
        ([row, dict(row, folder="../elsewhere")], "must be a sub-folder"),
        ([row, dict(row, status="weird")], "status 'weird'"),
        ([row, row], "twice"),
    ):
        write_runs(tmp_path, runs)
        before = snapshot(tmp_path)
        assert analyse_stepavg.main(["--root", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert snapshot(tmp_path) == before
    (tmp_path / "runs.jsonl").write_text(json.dumps(row) + "\n{oops\n")
    assert analyse_stepavg.main(["--root", str(tmp_path)]) == 2
    assert "line 2 is not JSON" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    write_runs(tmp_path / "empty", [])
    assert analyse_stepavg.main(["--root", str(tmp_path / "empty")]) == 2
    assert "lists no runs and" in capsys.readouterr().err


def test_original_dump_with_bad_t5_tokenizer(tmp_path, capsys):
    folder = good_dump(tmp_path / "old", original=True)
    before = snapshot(tmp_path)
    assert analyse_stepavg.main(["--root", str(folder), "--t5-tokenizer", str(tmp_path / "no-such-tokenizer")]) == 2
    err = capsys.readouterr().err
    assert "--t5-tokenizer" in err and "could not be loaded" in err and err.count("\n") == 1
    assert snapshot(tmp_path) == before


def test_original_dump_flat_tokens_with_different_prompts(tmp_path, capsys):
    layout = make_layout([PROMPT, "A cat"], clip_len=77, t5_len=16)
    write_dump(tmp_path / "old", layout, random_arrays(layout, 2, 3, (4, 4)), original=True, meta={"tokens": layout.clip[0].tokens})
    assert analyse_stepavg.main(["--root", str(tmp_path / "old")]) == 2
    assert "one flat list but the dump has B=2 items with different prompts" in capsys.readouterr().err


def test_missing_image_with_no_overlay_is_a_note(tmp_path, capsys):
    folder = good_dump(tmp_path / "run")
    os.remove(folder / "images" / "seed42-64x64-idx0.png")
    assert analyse_stepavg.main(["--root", str(folder), "--no-overlay", "--topk", "1", "--encoders", "clip", "--blocks", "0"]) == 0
    assert "missing or unreadable" in capsys.readouterr().err
    assert (folder / "analysis" / "clip" / "summary.png").is_file()
    assert not (folder / "analysis" / "image.png").exists()
