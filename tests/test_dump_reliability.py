"""The dump command under faults: resume, kills, full disks, bad input, and special tokens typed in a prompt."""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

import analyse_stepavg
import sd_35_stepavg_dump as dump
from attention_map_diffusers.contract import FINGERPRINT_KEY, prompt_tokens, read_runs_jsonl, run_is_complete
from conftest import CLIP_BPE, ROOT

SMALL = ["--steps", "2", "--height", "64", "--width", "64", "--max-sequence-length", "16", "--device", "cpu"]


def run_main(args):
    return dump.main([str(a) for a in args])


def messages(err: str) -> list[str]:
    """The lines of stderr that are messages (not a progress bar's redraws)."""
    lines = (ln.replace("\x1b[A", "") for ln in err.splitlines())
    return [ln for ln in lines if ln.strip() and "%|" not in ln]


def one_line(err: str) -> str:
    lines = messages(err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def snapshot(folder):
    """Every file under ``folder`` with its size and modification time."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            st = os.lstat(p)
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns)
    return out


def no_model(monkeypatch):
    """Make loading a model fail the test: what follows must be decided before the model loads."""
    import attention_map_diffusers.dump.cli as cli

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "load_pipeline", refuse)


def read_words(folder, encoder):
    """(word, mass) rows of an analysis' words_summary.csv."""
    with open(os.path.join(folder, encoder, "tables", "words_summary.csv"), newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))[1:]
    return [(r[0], float(r[1])) for r in rows]


# ---------------------------------------------------------------------------------------------
# Resume: a folder is complete only with the same settings and a readable npz


@pytest.fixture(scope="module")
def single(sd3_dir, tmp_path_factory):
    """A single run (into --out itself) and the arguments that made it."""
    out = tmp_path_factory.mktemp("single") / "run"
    args = ["--model", sd3_dir, "--prompt", "a cat", "--no-image", "--out", out, *SMALL]
    assert run_main(args) == 0
    return out, args


CHANGES = {
    "prompt": (["--prompt", "a dog"], "prompt"),
    "steps": (["--steps", "3"], "steps 2 there, 3 now"),
    "size": (["--height", "80"], "height 64 there, 80 now"),
    "guidance": (["--guidance-scale", "5"], "guidance_scale 7.5 there, 5.0 now"),
    "images per prompt": (["--num-images-per-prompt", "2"], "num_images_per_prompt 1 there, 2 now"),
    "model": (["--model", "{sd35m}"], "model"),
    "negative prompt": (["--neg", "blurry"], "negative_prompt"),
}


@pytest.mark.parametrize("case", list(CHANGES))
def test_changed_settings_are_refused_before_the_model_loads(case, single, sd35m_dir, monkeypatch, capsys):
    out, args = single
    change, expected = CHANGES[case]
    change = [a.replace("{sd35m}", sd35m_dir) for a in change]
    if case == "prompt":
        args = [a for a in args if a != "a cat"]
        args.remove("--prompt")
    if case == "model":
        i = args.index("--model")
        args = args[:i] + args[i + 2:]
    before = snapshot(out)
    no_model(monkeypatch)
    capsys.readouterr()
    assert run_main(args + change) == 2
    line = one_line(capsys.readouterr().err)
    assert "made with other settings" in line and expected in line, line
    assert "--overwrite" in line and "new --out" in line
    assert snapshot(out) == before


def test_a_run_without_a_settings_fingerprint_is_refused(single, monkeypatch, capsys, tmp_path):
    """A folder from an older version (or the original tool) records no settings: not resumed blindly."""
    src, args = single
    out = tmp_path / "old"
    shutil.copytree(src, out)
    meta = json.loads((out / "metadata.json").read_text())
    del meta[FINGERPRINT_KEY]
    (out / "metadata.json").write_text(json.dumps(meta))
    no_model(monkeypatch)
    i = args.index("--out")
    capsys.readouterr()
    assert run_main(args[:i] + args[i + 2:] + ["--out", out]) == 2
    line = one_line(capsys.readouterr().err)
    assert "no settings fingerprint" in line and "--overwrite" in line


def test_overwrite_replaces_a_run_made_with_other_settings(single, tmp_path, capsys):
    src, args = single
    out = tmp_path / "over"
    shutil.copytree(src, out)
    i = args.index("--out")
    args = args[:i] + args[i + 2:] + ["--out", out, "--steps", "3"]
    assert run_main(args) == 2
    assert run_main(args + ["--overwrite"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["steps"] == 3 and meta["settings"]["steps"] == 3
    capsys.readouterr()
    assert run_main(args) == 0  # the same settings again: complete, skipped
    assert "0 run(s) written, 1 skipped" in capsys.readouterr().out


def test_same_settings_from_another_folder_spelling_resume(single, monkeypatch, capsys, sd3_dir):
    """--model ./rel and /abs/rel name the same folder: the fingerprint records its real path."""
    out, args = single
    i = args.index("--model")
    rel = os.path.relpath(sd3_dir, os.getcwd())
    no_model(monkeypatch)
    capsys.readouterr()
    assert run_main(args[:i] + ["--model", rel] + args[i + 2:]) == 0
    assert "0 run(s) written, 1 skipped" in capsys.readouterr().out


def test_damaged_npz_or_metadata_is_redone_with_a_warning(sd3_dir, tmp_path, capsys):
    out = tmp_path / "damaged"
    args = ["--model", sd3_dir, "--prompt", "a cat", "--prompt", "a dog", "--prompt", "a owl", "--out", out,
            "--no-image", *SMALL]
    assert run_main(args) == 0
    npz = out / "0000-a-cat" / "stepavg_token_maps_v1.npz"
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])  # a copy cut short
    (out / "0001-a-dog" / "metadata.json").write_text('{"prompt": ["a dog"], "seed":')
    untouched = snapshot(out / "0002-a-owl")
    capsys.readouterr()
    assert run_main(args) == 0
    cap = capsys.readouterr()
    assert "2 run(s) written, 1 skipped" in cap.out
    warnings = [ln for ln in messages(cap.err) if ln.startswith("warning:")]
    assert len(warnings) == 2
    assert "0000-a-cat" in warnings[0] and "stepavg_token_maps_v1.npz" in warnings[0] and "done again" in warnings[0]
    assert "0001-a-dog" in warnings[1] and "metadata.json is damaged" in warnings[1]
    with np.load(npz) as z:
        assert z["sum_token_map"].shape[0] == 1
    assert json.loads((out / "0001-a-dog" / "metadata.json").read_text())["prompt"] == ["a dog"]
    assert snapshot(out / "0002-a-owl") == untouched
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["done", "done", "skipped"]


def _flip_a_bit_in_the_data(npz):
    """Flip one bit inside the first large member's array data (the zip directory stays valid)."""
    import zipfile

    raw = bytearray(npz.read_bytes())
    with zipfile.ZipFile(npz) as zf:
        info = next(i for i in zf.infolist() if i.compress_size > 400)
    assert info.compress_type == zipfile.ZIP_STORED
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    data = info.header_offset + 30 + name_len + extra_len
    raw[data + 300] ^= 0x04  # past the 128-byte npy header: an array value
    npz.write_bytes(bytes(raw))


def test_resume_verifies_npz_crc_finite_values_and_listed_images(sd3_dir, tmp_path, capsys):
    """Issue 21.6: a bit-flipped npz, an npz holding NaN and a run whose image was deleted are redone
    with a one-line warning each, not skipped as complete."""
    from attention_map_diffusers.contract import npz_problem

    out = tmp_path / "verify"
    args = ["--model", sd3_dir, *[a for w in ("cat", "dog", "owl", "cow") for a in ("--prompt", f"a {w}")],
            "--out", out, *SMALL]
    assert run_main(args) == 0
    flipped = out / "0000-a-cat" / "stepavg_token_maps_v1.npz"
    _flip_a_bit_in_the_data(flipped)
    nan = out / "0001-a-dog" / "stepavg_token_maps_v1.npz"
    with np.load(nan) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["sum_token_map"] = arrays["sum_token_map"].copy()
    arrays["sum_token_map"].flat[7] = np.nan
    np.savez(nan, **arrays)
    image = out / "0002-a-owl" / "images" / "seed42-64x64-idx0.png"
    image.unlink()
    assert npz_problem(flipped) is None and npz_problem(nan) is None  # the zip directories still open
    untouched = snapshot(out / "0003-a-cow")
    capsys.readouterr()
    assert run_main(args) == 0
    cap = capsys.readouterr()
    assert "3 run(s) written, 1 skipped" in cap.out
    warnings = [ln for ln in messages(cap.err) if ln.startswith("warning:")]
    assert len(warnings) == 3 and all(ln.endswith("; the run is done again") for ln in warnings)
    assert "0000-a-cat" in warnings[0] and "CRC" in warnings[0]
    assert "0001-a-dog" in warnings[1] and "sum_token_map holds 1 NaN or infinite value(s)" in warnings[1]
    assert "0002-a-owl" in warnings[2] and "images/seed42-64x64-idx0.png" in warnings[2] and "missing" in warnings[2]
    for npz in (flipped, nan):
        with np.load(npz) as z:
            assert all(np.isfinite(z[k]).all() for k in z.files)
    assert image.is_file()
    assert snapshot(out / "0003-a-cow") == untouched
    assert [r.status for r in read_runs_jsonl(out / "runs.jsonl")] == ["done", "done", "done", "skipped"]


def test_single_run_and_folder_of_runs_do_not_mix(single, sd3_dir, tmp_path, monkeypatch, capsys):
    """The analysis reads runs.jsonl when there is one: the other kind would be silently ignored."""
    out, args = single
    no_model(monkeypatch)
    before = snapshot(out)
    capsys.readouterr()
    assert run_main(args + ["--prompt", "a dog"]) == 2  # two runs into a single run's folder
    line = one_line(capsys.readouterr().err)
    assert "holds a single run (metadata.json)" in line and "new --out" in line
    assert snapshot(out) == before

    runs = tmp_path / "runs"
    (runs / "0000-a-cat").mkdir(parents=True)
    (runs / "0000-a-cat" / "metadata.json").write_text("{}")
    for extra in ([], ["runs.jsonl"]):
        for name in extra:
            (runs / name).write_text("")
        before = snapshot(runs)
        assert run_main(["--model", sd3_dir, "--prompt", "a cat", "--out", runs, *SMALL]) == 2
        line = one_line(capsys.readouterr().err)
        assert "holds several runs" in line and "new --out" in line
        assert snapshot(runs) == before


def test_temp_files_left_by_a_kill_are_removed(sd3_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tidy"
    args = ["--model", sd3_dir, "--prompt", "a cat", "--prompt", "a dog", "--out", out, *SMALL]
    assert run_main(args) == 0
    run = out / "0000-a-cat"
    leftovers = [
        run / ".stepavg_token_maps_v1.attnmap-k2j4h5l1.tmp.npz",
        run / ".metadata.attnmap-ab_d1234.tmp.json",
        run / "images" / ".seed42-64x64-idx0.attnmap-zzzzzzzz.tmp.png",
        out / ".runs.attnmap-q1w2e3r4.tmp.jsonl",
        out / "..runs-part-3.attnmap-q1w2e3r4.tmp.jsonl",
        out / ".runs-part-3.jsonl",
        out / ".runs.lock",
    ]
    # a user's files, and (left alone, as docs/FORMAT.md says) the temporary names of older versions
    keep = [out / ".hidden", out / "notes.tmp", run / "images" / "mine.tmp.png",
            run / ".stepavg_token_maps_v1.k2j4h5l1.tmp.npz"]
    for p in leftovers + keep:
        p.write_bytes(b"x")
    (out / ".runs-part-3.jsonl").write_text(json.dumps(
        {"run": 0, "folder": "0000-a-cat", "prompt": ["a cat"], "seed": 42, "status": "done", "process": 3}) + "\n")
    (out / ".runs.lock").write_bytes(b"")
    no_model(monkeypatch)  # both runs are complete: only the tidying is left
    capsys.readouterr()
    assert run_main(args) == 0
    assert "removed 7 temporary file(s)" in capsys.readouterr().err
    assert [p for p in leftovers if p.exists()] == []
    assert all(p.exists() for p in keep)


def test_leftover_cleanup_keeps_user_files_named_like_temp_files(sd3_dir, tmp_path, monkeypatch, capsys):
    """Issue 21.1: only the temporary files of this tool's own files go; a user's look-alikes stay."""
    from attention_map_diffusers.atomic import atomic_path

    out = tmp_path / "mine"
    args = ["--model", sd3_dir, "--prompt", "a cat", "--prompt", "a dog", "--out", out, "--no-image", *SMALL]
    assert run_main(args) == 0
    run = out / "0000-a-cat"
    user = {}
    for folder in (out, run):
        for name in (".notes.20241201.tmp", ".draft.abcdefgh.tmp.txt"):  # the two names
            user[folder / name] = f"my notes in {folder.name}".encode()
    # a user's files that read like the tool's own: a part of runs.jsonl that is no such thing, a lock
    # with text in it
    user[out / ".runs-part-0.jsonl"] = b"my own log\n"
    user[out / ".runs.lock"] = b"do not delete"
    for p, data in user.items():
        p.write_bytes(data)
    # a genuine leftover: the temporary file atomic_path made for the npz, kept as a kill would keep it
    with pytest.raises(ZeroDivisionError):
        with atomic_path(run / "stepavg_token_maps_v1.npz") as tmp:
            shutil.copy(tmp, tmp + ".kept")
            1 / 0
    genuine = run / os.path.basename(tmp)
    os.rename(tmp + ".kept", genuine)
    no_model(monkeypatch)
    capsys.readouterr()
    assert run_main(args) == 0
    assert "removed 1 temporary file(s)" in capsys.readouterr().err
    assert not genuine.exists()
    assert {p: p.read_bytes() for p in user} == user


# ---------------------------------------------------------------------------------------------
# runs.jsonl lists the finished runs at every moment


def test_runs_jsonl_lists_finished_runs_while_running_and_after_ctrl_c(sd3_dir, tmp_path, monkeypatch, capsys):
    import attention_map_diffusers.dump.run as run_mod

    real = run_mod.run_one
    out = tmp_path / "live"
    seen = []

    def run_one(pipe, run, settings, placement, folder, *rest):
        listed = read_runs_jsonl(out / "runs.jsonl") if (out / "runs.jsonl").exists() else []
        seen.append([(r.folder, r.status) for r in listed])
        if run.index == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the third run
            time.sleep(5)
        return real(pipe, run, settings, placement, folder, *rest)

    monkeypatch.setattr(run_mod, "run_one", run_one)
    handler = signal.getsignal(signal.SIGINT)
    args = ["--model", sd3_dir, "--prompt", "a cat", "--prompt", "a dog", "--prompt", "a owl", "--prompt", "a cow",
            "--out", out, "--no-image", *SMALL]
    capsys.readouterr()
    assert run_main(args) == 130
    line = one_line(capsys.readouterr().err)
    assert "interrupted by SIGINT: 2 run(s) finished" in line and "run the same command again" in line
    # before each run, runs.jsonl already listed every run finished so far, and nothing else
    assert seen == [[], [("0000-a-cat", "done")], [("0000-a-cat", "done"), ("0001-a-dog", "done")]]
    rows = read_runs_jsonl(out / "runs.jsonl")
    assert [(r.folder, r.status) for r in rows] == [("0000-a-cat", "done"), ("0001-a-dog", "done")]
    assert signal.getsignal(signal.SIGINT) is handler  # the handlers are restored

    monkeypatch.setattr(run_mod, "run_one", real)
    capsys.readouterr()
    assert run_main(args) == 0  # the same command resumes
    assert "2 run(s) written, 2 skipped" in capsys.readouterr().out
    assert [r.status for r in read_runs_jsonl(out / "runs.jsonl")] == ["skipped", "skipped", "done", "done"]


def test_ctrl_c_during_a_metadata_write_leaves_no_half_run(sd3_dir, tmp_path, monkeypatch, capsys):
    """Issue 21.19: Ctrl-C while a run's metadata.json is being written. The half run is neither listed
    in runs.jsonl nor left on disk for the analysis to count as failed; the same command resumes."""
    import attention_map_diffusers.atomic as atomic
    from attention_map_diffusers.analysis.discover import discover

    out = tmp_path / "stopped"
    real = atomic.write_bytes

    def write_bytes(path, data):
        if os.path.basename(path) == "metadata.json" and "0001-a-dog" in str(path):
            with atomic.atomic_path(path) as tmp:
                with open(tmp, "wb") as fh:
                    fh.write(data[: len(data) // 2])
                    fh.flush()
                    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C half way through the file
                    time.sleep(5)
        return real(path, data)

    monkeypatch.setattr(atomic, "write_bytes", write_bytes)
    args = ["--model", sd3_dir, "--prompt", "a cat", "--prompt", "a dog", "--prompt", "a owl", "--out", out, *SMALL]
    capsys.readouterr()
    assert run_main(args) == 130
    assert "interrupted by SIGINT: 1 run(s) finished" in one_line(capsys.readouterr().err)
    assert [(r.folder, r.status) for r in read_runs_jsonl(out / "runs.jsonl")] == [("0000-a-cat", "done")]
    assert sorted(os.listdir(out)) == ["0000-a-cat", "runs.jsonl"]  # the half run's npz and image are gone
    entries, _ = discover(str(out), str(tmp_path / "analysis"))
    assert [(e.folder, e.status, e.problem) for e in entries] == [("0000-a-cat", "done", None)]

    monkeypatch.setattr(atomic, "write_bytes", real)
    capsys.readouterr()
    assert run_main(args) == 0
    assert "2 run(s) written, 1 skipped" in capsys.readouterr().out


def test_a_stop_keeps_a_run_being_redone_whole_and_user_files(tmp_path):
    """discard_unfinished removes only what makes a half run: nothing in a folder whose metadata.json
    is there, and never a file that is not the run's own."""
    from attention_map_diffusers.dump.writer import discard_unfinished

    whole = tmp_path / "0000-whole"
    (whole / "images").mkdir(parents=True)
    for name in ("metadata.json", "stepavg_token_maps_v1.npz", "images/seed1-64x64-idx0.png"):
        (whole / name).write_bytes(b"x")
    assert discard_unfinished(str(whole), own_folder=True) == [] and len(snapshot(whole)) == 3
    half = tmp_path / "0001-half"
    (half / "images").mkdir(parents=True)
    for name in ("stepavg_token_maps_v1.npz", "images/seed1-64x64-idx0.png", "images/seed-2-64x64-idx1.jpg",
                 "images/.seed1-64x64-idx0.attnmap-abcdefgh.tmp.png", "notes.txt", "images/mine.png"):
        (half / name).write_bytes(b"x")
    assert len(discard_unfinished(str(half), own_folder=True)) == 4
    assert sorted(snapshot(half)) == ["images/mine.png", "notes.txt"]


@pytest.mark.slow
def test_sigterm_leaves_a_folder_the_analysis_reads(sd3_dir, tmp_path):
    """A cluster's time limit: SIGTERM after the first run; runs.jsonl lists what finished."""
    out = tmp_path / "killed"
    prompts = [p for w in ("cat", "dog", "owl", "cow", "fox", "bee", "elk", "yak") for p in ("--prompt", f"a {w}")]
    cmd = [sys.executable, str(ROOT / "sd_35_stepavg_dump.py"), "--model", sd3_dir, *prompts, "--out", str(out),
           "--no-image", "--steps", "30", "--height", "128", "--width", "128", "--max-sequence-length", "16",
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    first = out / "0000-a-cat" / "metadata.json"
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted by SIGTERM" in messages(stderr)[-1] and "Traceback" not in stderr
    rows = read_runs_jsonl(out / "runs.jsonl")
    assert 1 <= len(rows) < 8 and all(r.status == "done" for r in rows)
    assert rows[0].folder == "0000-a-cat"
    assert all(run_is_complete(out / r.folder) for r in rows)
    assert [p for _, _, fs in os.walk(out) for p in fs if ".tmp" in p] == []
    assert analyse_stepavg.main(["--root", str(out), "--tables-only", "--out", str(tmp_path / "analysis")]) == 0
    for r in rows:
        assert (tmp_path / "analysis" / r.folder / "clip" / "tables" / "words_summary.csv").is_file()


# ---------------------------------------------------------------------------------------------
# A full disk


def _full_disk(monkeypatch):
    def savez(fh, **arrays):
        fh.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", savez)


def test_full_disk_single_run_is_one_line_and_exit_1(sd3_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "full"
    _full_disk(monkeypatch)
    capsys.readouterr()
    assert run_main(["--model", sd3_dir, "--out", out, *SMALL]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("sd_35_stepavg_dump.py: error: cannot write") and os.strerror(errno.ENOSPC) in line
    assert "run the same command again" in line
    assert not (out / "metadata.json").exists()
    assert [p for _, _, fs in os.walk(out) for p in fs if ".tmp" in p] == []


def test_full_disk_stops_a_job_of_several_runs(sd3_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "full-many"
    _full_disk(monkeypatch)
    capsys.readouterr()
    assert run_main(["--model", sd3_dir, "--prompt", "a cat", "--prompt", "a dog", "--out", out, "--no-image",
                     *SMALL]) == 1
    cap = capsys.readouterr()
    errors = [ln for ln in messages(cap.err) if ln.startswith("error:")]
    assert len(errors) == 1 and "run 0" in errors[0] and "stopping" in errors[0]
    assert "0 run(s) written, 0 skipped (already complete), 1 failed" in cap.out
    rows = read_runs_jsonl(out / "runs.jsonl")
    assert [(r.folder, r.status) for r in rows] == [("0000-a-cat", "failed")]  # run 1 never started: not listed


# ---------------------------------------------------------------------------------------------
# Results that are not numbers


def test_non_finite_maps_fail_the_run_and_are_never_marked_complete(sd3_dir, tmp_path, capsys):
    """Issue 21.7: --guidance-scale 1e30 overflows the pipeline into NaN maps: the run fails (one line,
    exit 1; listed as failed with its error) and its folder holds no metadata.json or npz."""
    huge = ["--guidance-scale", "1e30"]
    single = tmp_path / "single"
    args = ["--model", sd3_dir, "--prompt", "a cat", "--out", single, *SMALL]
    assert run_main(args) == 0  # a complete run with sane settings, then redone with the huge scale
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a warning would be a second line on stderr
        assert run_main(args + huge + ["--overwrite"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("sd_35_stepavg_dump.py: error: the attention maps hold NaN or infinite values")
    assert "--guidance-scale" in line
    assert sorted(os.listdir(single)) == ["images"]  # the earlier run's npz and metadata are gone
    assert os.listdir(single / "images") == ["seed42-64x64-idx0.png"]  # the earlier run's image: not replaced

    many = tmp_path / "many"
    assert run_main(["--model", sd3_dir, "--prompt", "a cat", "--prompt", "a dog", "--out", many, "--no-image", *SMALL,
                     *huge]) == 1
    cap = capsys.readouterr()
    assert "0 run(s) written, 0 skipped (already complete), 2 failed" in cap.out
    errors = [ln for ln in messages(cap.err) if ln.startswith("error:")]
    assert len(errors) == 2 and all("NaN or infinite" in ln for ln in errors)
    rows = read_runs_jsonl(many / "runs.jsonl")
    assert [(r.folder, r.status) for r in rows] == [("0000-a-cat", "failed"), ("0001-a-dog", "failed")]
    assert all("NaN or infinite" in r.error for r in rows)
    for r in rows:
        names = set(os.listdir(many / r.folder)) if (many / r.folder).exists() else set()
        assert not names & {"metadata.json", "stepavg_token_maps_v1.npz"}, names


# ---------------------------------------------------------------------------------------------
# Bad input refused before the model loads


def test_bad_input_refused_before_the_model_loads(sd3_dir, tmp_path, monkeypatch, capsys):
    """Sizes beyond the model's pos_embed_max_size, read from a local folder's config."""
    no_model(monkeypatch)
    before = snapshot(tmp_path)
    # the tiny test model: pos_embed_max_size 96 patches of 2, VAE factor 2 -> at most 384 pixels
    assert run_main(["--model", sd3_dir, "--out", tmp_path / "o", *SMALL, "--width", "400"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "--width 400 is larger than this model accepts: at most 384 pixels" in line
    assert snapshot(tmp_path) == before


def _fake_hub_cache(monkeypatch, tmp_path, repo_id, model_dir):
    """A Hugging Face cache holding ``repo_id``'s configs (copied from ``model_dir``), no weights."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "hub-cache"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    sha = "0" * 40
    for sub in ("", "vae/", "transformer/"):
        name = "model_index.json" if not sub else "config.json"
        target = repo / "snapshots" / sha / sub / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(model_dir, sub, name), target)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))


UPPER_BOUNDS = {
    "canonical size": (["--canonical-size", "100000", "100000"],
                       "--canonical-size 100000 100000 is finer than the image (64 x 64 pixels)"),
    "steps": (["--steps", "100000000000"], "--steps must be at most 1000"),
    "images per prompt": (["--num-images-per-prompt", "100000000"], "--num-images-per-prompt must be at most 64"),
    "images per call": (["--batch-size", "3", "--num-images-per-prompt", "30"],
                        "--batch-size 3 x --num-images-per-prompt 30 makes 90 images per pipeline call; at most 64"),
    "skip layer, local folder": (["--skip-guidance-layers", "99"], "this model has blocks 0..1, got [99]"),
    "skip layer, cached hub id": (["--skip-guidance-layers", "2", "--model", "someone/tiny-sd3"],
                                  "this model has blocks 0..1, got [2]"),
    "skip layer, tiny-random": (["--skip-guidance-layers", "4", "--model", "tiny-random"],
                                "this model has blocks 0..3, got [4]"),
}


@pytest.mark.parametrize("case", list(UPPER_BOUNDS))
def test_upper_bounds_refused_before_the_model_loads(case, sd3_dir, tmp_path, monkeypatch, capsys):
    """Issue 21.8: sizes, steps, images and block indices beyond what can run are refused with one line
    and exit 2 before any model loads (block counts from a local folder's or the cache's config)."""
    no_model(monkeypatch)
    _fake_hub_cache(monkeypatch, tmp_path, "someone/tiny-sd3", sd3_dir)  # sd3_dir: 2 transformer blocks
    _refused_before_loading(sd3_dir, tmp_path, capsys, *UPPER_BOUNDS[case])


def _refused_before_loading(model, tmp_path, capsys, flags, expected):
    """Three prompts with ``flags``: one line holding ``expected``, exit 2, nothing written."""
    prompts = ["--prompt", "a cat", "--prompt", "a dog", "--prompt", "a owl"]
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert run_main(["--model", model, *prompts, "--out", tmp_path / "o", *SMALL, *flags]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("sd_35_stepavg_dump.py: error: ") and expected in line, line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("flags, expected", [
    (["--skip-guidance-layers", "1", "1"], "block 1 is given twice, got [1, 1]"),
    (["--skip-guidance-layers", "0", "1", "--skip-guidance-layers", "0"], "block 0 is given twice, got [0, 1, 0]"),
], ids=["one flag", "repeated flags"])
def test_skip_guidance_layers_given_twice_is_refused(flags, expected, sd3_dir, tmp_path, monkeypatch, capsys):
    """Issue 21.20 (dump part): a block named twice in --skip-guidance-layers."""
    no_model(monkeypatch)
    _refused_before_loading(sd3_dir, tmp_path, capsys, flags, expected)


def test_upper_bounds_are_named_in_help(capsys):
    with pytest.raises(SystemExit):
        dump.build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(at most 1000)" in text and "at most 64" in text and "at most the image size" in text
    assert "each once and below the model's number of blocks" in text


@pytest.mark.parametrize("out", ["", " ", os.fsdecode(b"out\xff")], ids=["empty", "blank", "not utf-8"])
def test_out_empty_or_not_utf8_is_refused(out, sd3_dir, tmp_path, monkeypatch, capsys):
    """Issue 21.9: --out "" would write into the current folder; a non-UTF-8 --out crashes the analysis
    later. Both: one line, exit 2, nothing written."""
    no_model(monkeypatch)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert dump.main(["--model", sd3_dir, "--prompt", "a cat", "--out", out, *SMALL]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("sd_35_stepavg_dump.py: error: --out ")
    assert ("names no folder" in line) if not out.strip() else ("not valid UTF-8" in line and "folder name" in line)
    assert os.listdir(tmp_path) == []


def test_repeated_seed_flags_add_up():
    parser = dump.build_parser()
    assert parser.parse_args(["--seed", "1", "--seed", "2"]).seed == [1, 2]
    assert parser.parse_args(["--seed", "1", "2", "--seed", "3"]).seed == [1, 2, 3]
    assert parser.parse_args(["--skip-guidance-layers", "7", "--skip-guidance-layers", "8"]).skip_guidance_layers == [7, 8]
    from attention_map_diffusers.dump.cli import _seeds
    from attention_map_diffusers.dump.runs import plan_runs

    assert _seeds(parser.parse_args([])) == [42]
    runs = plan_runs(["a cat"], _seeds(parser.parse_args(["--seed", "1", "--seed", "2"])), 1)
    assert [(r.seed, r.folder) for r in runs] == [(1, "0000-a-cat-s1"), (2, "0001-a-cat-s2")]


def test_prompts_file_with_a_byte_order_mark(tmp_path):
    from attention_map_diffusers.dump.runs import read_prompts_file

    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa cat\r\n# note\r\na dog\r\n".encode("utf-8"))
    assert read_prompts_file(str(path)) == ["a cat", "a dog"]
    path.write_bytes("\ufeff# only a comment\n".encode("utf-8"))
    assert read_prompts_file(str(path)) == []


def test_prompts_file_splits_on_newlines_only(tmp_path):
    """Issue 21.13: a prompt holding U+2028, \\x0b, \\x0c, \\x85, U+2029, \\x1c or a lone \\r is one prompt;
    lines end at \\n or \\r\\n."""
    from attention_map_diffusers.dump.runs import read_prompts_file

    inner = ["a cat\u2028on a mat", "a dog\x0bin fog", "a owl\x0cat night", "a cow\x85in snow",
             "a fox\u2029by a box", "a bee\x1cin a tree", "a yak\ron a track"]
    path = tmp_path / "prompts.txt"
    path.write_bytes(("\n".join(inner[:4]) + "\r\n" + "\r\n".join(inner[4:]) + "\n").encode("utf-8"))
    assert read_prompts_file(str(path)) == inner


@pytest.mark.slow
def test_undecodable_prompt_byte_in_a_subprocess(tmp_path):
    """A byte the shell cannot decode reaches Python as a lone surrogate: one line, exit 2."""
    proc = subprocess.run(
        [sys.executable, os.fsencode(ROOT / "sd_35_stepavg_dump.py"), b"--model", b"tiny-random", b"--prompt",
         b"a caf\xe9 table", b"--out", b"o"],
        capture_output=True, cwd=tmp_path, timeout=300, env=dict(os.environ, LC_ALL="C.UTF-8", PYTHONUTF8="1"),
    )
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    assert one_line(err).startswith("sd_35_stepavg_dump.py: error: --prompt") and "not valid UTF-8" in err
    assert os.listdir(tmp_path) == []


def test_abbreviated_flags_are_rejected(tmp_path, capsys):
    for argv in (["--image-f", "png"], ["--images-c", "x.csv"], ["--noise", "0.5"], ["--over"]):
        assert dump.main(argv + ["--out", str(tmp_path / "o")]) == 2
        assert "unrecognized arguments" in one_line(capsys.readouterr().err)
    for argv in (["--tables"], ["--t5", "x"], ["--enc", "clip"]):
        assert analyse_stepavg.main(["--root", str(tmp_path)] + argv) == 2
        assert "unrecognized arguments" in one_line(capsys.readouterr().err)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Special tokens typed in a prompt

LITERAL = "a cat <|endoftext|> dog </s> barn <pad> tree <unk> owl on a café"


def _special_positions(tokens, special, offsets, which):
    return [(t, s, o) for t, s, o in zip(tokens, special, offsets) if t in which]


def _check_literal_specials(meta):
    tokens, special, offsets = meta["tokens"][0], meta["special_mask"][0], meta["token_offsets_clip"][0]
    assert special[0] == 1 and special[-1] == 1
    middle = [(s, o) for j, (t, s, o) in enumerate(zip(tokens, special, offsets)) if t == "<|endoftext|>" and 0 < j < len(tokens) - 1]
    assert middle == [(1, None)], "the typed <|endoftext|> is CLIP's special id"
    assert sum(special) == 3
    t5, sp5, off5 = meta["tokens_t5"][0], meta["special_mask_t5"][0], meta["token_offsets_t5"][0]
    typed = _special_positions(t5[:-1], sp5, off5, {"</s>", "<pad>", "<unk>"})
    assert [t for t, s, o in typed if s == 1 and o is None] == ["</s>", "<pad>", "<unk>"]
    # the é of café is unknown to the tiny T5 vocabulary: its <unk> stays part of the word
    assert [t for t, s, o in typed if s == 0] == ["<unk>"]


def _words(folder, encoder):
    """The words, without the ' #n' that numbers a repeated word in every table."""
    return [re.sub(r" #\d+$", "", w).lower() for w, _ in read_words(folder, encoder)]


def test_special_tokens_typed_in_a_prompt_belong_to_no_word(sd3_dir, tmp_path, capsys):
    out = tmp_path / "typed"
    assert run_main(["--model", sd3_dir, "--prompt", LITERAL, "--out", out, "--no-image", *SMALL,
                     "--max-sequence-length", 64]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    _check_literal_specials(meta)
    assert analyse_stepavg.main(["--root", str(out), "--tables-only", "--out", str(tmp_path / "a")]) == 0
    clip, t5 = _words(tmp_path / "a", "clip"), _words(tmp_path / "a", "t5")
    assert "endoftext" not in clip
    assert clip == ["a", "cat", "dog", "s", "barn", "pad", "tree", "unk", "owl", "on", "a", "café"]  # text to CLIP
    assert t5 == ["a", "cat", "endoftext", "dog", "barn", "tree", "owl", "on", "a", "café"]  # text to T5
    for enc in ("clip", "t5"):
        assert sum(m for _, m in read_words(tmp_path / "a", enc)) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.skipif(not CLIP_BPE.exists(), reason="needs ../shared/data/clip_bpe_simple_vocab_16e6.txt.gz")
def test_special_tokens_with_the_real_clip_vocabulary():
    from attention_map_diffusers.models.tiny import build_clip_tokenizer

    tok = build_clip_tokenizer(CLIP_BPE)
    t = prompt_tokens(tok, "a photo of <|endoftext|> a cat <|startoftext|>", 77)
    assert t.tokens == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "<|endoftext|>", "a</w>", "cat</w>",
                        "<|startoftext|>", "<|endoftext|>"]
    assert t.special == [1, 0, 0, 0, 1, 0, 0, 1, 1]
    assert [o is None for o in t.offsets] == [bool(s) for s in t.special]
    # "</s>", "<pad>" and "<unk>" are plain text to CLIP
    t = prompt_tokens(tok, "a </s> <pad> <unk>", 77)
    assert sum(t.special) == 2 and "<unk>" not in t.tokens


def test_original_format_view_gives_the_same_words(sd3_dir, tmp_path, capsys):
    """Without offsets and special masks (the original tool's view) the analysis finds specials by
    their strings; with --t5-tokenizer it tokenises T5 itself. Both must give the same words."""
    prompt = "a cat <|endoftext|> dog </s> barn <pad> tree"
    out = tmp_path / "fmt2"
    assert run_main(["--model", sd3_dir, "--prompt", prompt, "--out", out, "--no-image", *SMALL,
                     "--max-sequence-length", 64]) == 0
    assert analyse_stepavg.main(["--root", str(out), "--tables-only", "--out", str(tmp_path / "a2")]) == 0
    reference = {enc: read_words(tmp_path / "a2", enc) for enc in ("clip", "t5")}
    assert [w for w, _ in reference["clip"]] == ["a", "cat", "dog", "s", "barn", "pad", "tree"]
    assert [w for w, _ in reference["t5"]] == ["a", "cat", "endoftext", "dog", "barn", "tree"]

    def view(name, drop, t5_tokenizer=None):
        folder = tmp_path / name
        shutil.copytree(out, folder)
        meta = json.loads((folder / "metadata.json").read_text())
        for key in drop:
            meta.pop(key)
        (folder / "metadata.json").write_text(json.dumps(meta))
        extra = ["--t5-tokenizer", t5_tokenizer] if t5_tokenizer else []
        assert analyse_stepavg.main(["--root", str(folder), "--tables-only", "--out", str(tmp_path / f"a-{name}"), *extra]) == 0
        return {enc: read_words(tmp_path / f"a-{name}", enc) for enc in ("clip", "t5")}

    bare = view("bare", ["special_mask", "special_mask_t5", "token_offsets_clip", "token_offsets_t5"])
    retokenised = view("t5tok", ["tokens_t5", "special_mask_t5", "token_offsets_t5"], os.path.join(sd3_dir, "tokenizer_3"))
    for got in (bare, retokenised):
        for enc in ("clip", "t5"):
            assert [w.lower() for w, _ in got[enc]] == [w for w, _ in reference[enc]], enc
            np.testing.assert_allclose([m for _, m in got[enc]], [m for _, m in reference[enc]], rtol=1e-6)
