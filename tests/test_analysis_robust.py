"""The analysis on inputs from the field: the original tool's dumps, damaged or hand-edited runs,
stale runs.jsonl, output folders holding other files, leftovers of a killed run, scripts without spaces."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import analyse_stepavg  # noqa: E402
from original_dump import ORIGINAL_METADATA_KEYS, ORIGINAL_NPZ_KEYS, write_original_dump  # noqa: E402
from synthetic_dump import make_layout, random_arrays, write_dump, write_runs  # noqa: E402

from attention_map_diffusers.analysis import outdir  # noqa: E402
from attention_map_diffusers.analysis.dumpfile import first_missing, load_dump  # noqa: E402
from attention_map_diffusers.contract import UserError, parse_runs_jsonl  # noqa: E402

BICYCLE = "A rusty bicycle in front of a barn"
WORDS = ["A", "rusty", "bicycle", "in", "front", "of", "a", "barn"]


def run(*argv):
    return analyse_stepavg.main([str(a) for a in argv])


def header(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return next(csv.reader(fh))


def tree(folder):
    return sorted(
        (os.path.relpath(os.path.join(d, f), folder), open(os.path.join(d, f), "rb").read())
        for d, _, files in os.walk(folder)
        for f in files
    )


def good_run(folder, prompt=BICYCLE, seed=0, **kw):
    layout = make_layout([prompt], clip_len=77, t5_len=16)
    write_dump(folder, layout, random_arrays(layout, num_blocks=2, num_steps=3, grid=(4, 4), seed=seed), **kw)
    return layout


# --- the original tool's dumps -----------------------------------------------------------------


def test_original_tool_dump_without_timesteps_is_read(tmp_path, capsys):
    layout = make_layout([BICYCLE], clip_len=77, t5_len=32)
    arrays = random_arrays(layout, num_blocks=3, num_steps=5, grid=(4, 4), seed=4)
    barn = layout.positions("clip", 0, "barn")
    arrays["per_block_step_token_mean"][0, 2, 0, barn] = 0.9  # barn peaks in block 2 at the FIRST denoising step
    meta = write_original_dump(tmp_path / "old", BICYCLE, arrays)
    with np.load(tmp_path / "old" / "stepavg_token_maps_v1.npz") as z:  # the fixture is what the original wrote
        assert tuple(z.files) == ORIGINAL_NPZ_KEYS and z["N"].dtype.kind == "i" and z["sum_token_map"].dtype == np.float32
    assert tuple(meta) == ORIGINAL_METADATA_KEYS and isinstance(meta["block_latent_sizes"], dict)
    assert meta["negative_prompt"] is None and meta["special_mask"][0] is True and "format_version" not in meta

    d = load_dump(str(tmp_path / "old"))
    assert d.format_version == 1 and d.timesteps is None and d.steps_flipped
    np.testing.assert_array_equal(d.step_mean, arrays["per_block_step_token_mean"])  # back in denoising order
    assert any("no timesteps" in n.text for n in d.notes)

    # the same numbers as a format 2 dump of the same arrays
    write_dump(tmp_path / "new", layout, arrays, store_dtype="float32")
    assert run("--root", tmp_path / "old", "--tables-only") == 0
    assert run("--root", tmp_path / "new", "--tables-only", "--encoders", "clip") == 0
    for name in ("words_auc.csv", "words_stepavg.csv", "words_summary.csv"):
        old = (tmp_path / "old" / "analysis" / "clip" / "tables" / name).read_text()
        assert old == (tmp_path / "new" / "analysis" / "clip" / "tables" / name).read_text()
    summary = (tmp_path / "old" / "analysis" / "clip" / "tables" / "words_summary.csv").read_text().splitlines()
    assert summary[0] == "word,mass,peak_block,peak_step,word_index"
    assert summary[-1].startswith("barn,") and summary[-1].split(",")[2:4] == ["2", "0"]

    # figures and report: steps by index, no invented timesteps
    capsys.readouterr()
    assert run("--root", tmp_path / "old", "--topk", "2") == 0
    assert "no timesteps" in capsys.readouterr().err
    out = tmp_path / "old" / "analysis"
    assert (out / "clip" / "curves" / "words_mean_block2.png").is_file() and (out / "clip" / "overview.png").is_file()
    assert (out / "image.png").is_file()
    html = (out / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"\(t=\d", html) and "the dump has no timesteps" in html


def test_step_axis_without_timesteps_says_step():
    from attention_map_diffusers.analysis import plots

    curves = np.random.default_rng(0).uniform(size=(4, 2))
    fig = plots.curves_figure(curves, ["a", "b"], None, "t")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "denoising step (left = first, noisiest)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]
    fig = plots.curves_figure(curves, ["a", "b"], np.array([900.0, 600, 300, 100]), "t")
    assert fig.axes[0].get_xticklabels()[1].get_text() == "1\nt=600"


def test_step_order_is_trusted_without_format_version(tmp_path, capsys):
    layout = good_run(tmp_path / "new", store_dtype="float32")
    arrays = random_arrays(layout, num_blocks=2, num_steps=3, grid=(4, 4), seed=0)
    # a format 2 dump that lost its format_version but says step_order "denoising": not flipped
    write_dump(tmp_path / "edited", layout, arrays, store_dtype="float32", meta={"format_version": None})
    d = load_dump(str(tmp_path / "edited"))
    assert d.format_version == 1 and not d.steps_flipped
    np.testing.assert_array_equal(d.step_mean, arrays["per_block_step_token_mean"])
    np.testing.assert_array_equal(d.timesteps, arrays["timesteps"])
    assert d.encoders["t5"].offsets is not None  # its text_spans and T5 tokens are read too
    assert run("--root", tmp_path / "edited", "--tables-only", "--out", tmp_path / "a1") == 0
    assert run("--root", tmp_path / "new", "--tables-only", "--out", tmp_path / "a2") == 0
    for enc in ("clip", "t5"):
        for name in ("words_auc.csv", "words_summary.csv"):
            assert (tmp_path / "a1" / enc / "tables" / name).read_text() == (tmp_path / "a2" / enc / "tables" / name).read_text()
    # no step_order and no format_version, but decreasing timesteps: kept as stored, with a note
    write_dump(tmp_path / "bare", layout, arrays, meta={"format_version": None, "step_order": None})
    d = load_dump(str(tmp_path / "bare"))
    assert not d.steps_flipped and any("timesteps decrease" in n.text for n in d.notes)
    # any other step_order is refused
    write_dump(tmp_path / "asc", layout, arrays, meta={"format_version": None, "step_order": "ascending"})
    capsys.readouterr()
    assert run("--root", tmp_path / "asc") == 2
    err = capsys.readouterr().err
    assert "step_order='ascending' is not supported" in err and err.count("\n") == 1


# --- one damaged run of many -------------------------------------------------------------------


def test_a_damaged_run_is_listed_and_the_others_are_analysed(tmp_path, capsys):
    for k, name in enumerate(["0000-a", "0001-b", "0002-c"]):
        good_run(tmp_path / name, seed=k)
    (tmp_path / "0001-b" / "stepavg_token_maps_v1.npz").write_bytes(b"garbage")
    write_runs(tmp_path, [{"run": k, "folder": f, "prompt": [BICYCLE], "status": "done"} for k, f in enumerate(["0000-a", "0001-b", "0002-c"])])
    assert run("--root", tmp_path, "--tables-only") == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 2 and "0001-b" in lines[0] and "damaged" in lines[0]
    assert "1 of 3 runs could not be analysed" in lines[1]
    out = tmp_path / "analysis"
    assert (out / "0000-a" / "clip" / "tables" / "words_auc.csv").is_file()
    assert (out / "0002-c" / "t5" / "tables" / "words_auc.csv").is_file()
    assert not (out / "0001-b").exists()
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "0001-b" in html and "not analysed" in html and "damaged" in html
    assert 'href="0001-b/index.html"' not in html and 'href="0002-c/index.html"' in html


def _png_header_only(path, width, height):
    """A PNG that declares ``width`` x ``height`` pixels (signature, IHDR, IEND: no pixel data)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def _npz_claiming(path, key, shape):
    """Rewrite ``key``'s member of the npz at ``path`` so that its npy header claims ``shape`` (data unchanged)."""
    import io
    import zipfile

    with zipfile.ZipFile(path) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    arr = np.lib.format.read_array(io.BytesIO(members[key + ".npy"]))
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": False,
                                                "shape": shape})
    members[key + ".npy"] = head.getvalue() + arr.tobytes()
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def test_bad_runs_memory_recursion_and_image_bomb_are_one_line_each(tmp_path, capsys):
    """Issue 21.5: an npy header claiming 56 PiB, metadata nested 200,000 deep and a listed 30000x30000
    image: one line per bad run and the others analysed (exit 1); a single bad run: one line, exit 2."""
    names = ["0000-good", "0001-huge", "0002-deep", "0003-bomb"]
    for k, name in enumerate(names):
        good_run(tmp_path / name, seed=k)
    _npz_claiming(tmp_path / "0001-huge" / "stepavg_token_maps_v1.npz", "sum_token_map", (2**20, 2**20, 2**14, 1))
    # claimed: 2**54 values (32 PiB of the float16 stored; 56 PiB in the report)
    meta = json.loads((tmp_path / "0002-deep" / "metadata.json").read_text())
    meta["notes"] = "x"
    text = json.dumps(meta)
    (tmp_path / "0002-deep" / "metadata.json").write_text(text[:-1] + ', "deep": ' + "[" * 200_000 + "]" * 200_000 + "}")
    meta = json.loads((tmp_path / "0003-bomb" / "metadata.json").read_text())
    _png_header_only(tmp_path / "0003-bomb" / meta["images"][0], 30000, 30000)
    write_runs(tmp_path, [{"run": k, "folder": f, "prompt": [BICYCLE], "status": "done"} for k, f in enumerate(names)])
    capsys.readouterr()
    assert run("--root", tmp_path, "--tables-only") == 1  # --tables-only does not open images: the bomb is analysed
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith(("analyse_stepavg.py", "error"))]
    assert len(lines) == 3, err
    assert "0001-huge" in lines[0] and "0002-deep" in lines[1] and "2 of 4 runs" in lines[2]
    assert (tmp_path / "analysis" / "0000-good" / "clip" / "tables" / "words_auc.csv").is_file()
    assert run("--root", tmp_path) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith(("analyse_stepavg.py", "error"))]
    assert "Traceback" not in err and len(lines) == 4 and "0003-bomb" in lines[2] and "900000000 pixels" in lines[2], err
    with open(tmp_path / "runs.jsonl", "a", encoding="utf-8") as fh:  # runs.jsonl itself nested too deeply
        fh.write("[" * 200_000 + "]" * 200_000 + "\n")
    assert run("--root", tmp_path, "--tables-only") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 5" in err and "too deeply" in err, err
    for name in names[1:]:  # each alone: one line, exit 2
        assert run("--root", tmp_path / name, "--tables-only" if name != "0003-bomb" else "--dpi=50") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err


def test_a_run_that_changes_after_planning_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    from attention_map_diffusers.analysis import write

    for k, name in enumerate(["0000-a", "0001-b"]):
        good_run(tmp_path / name, seed=k)
    write_runs(tmp_path, [{"run": k, "folder": f, "prompt": [BICYCLE], "status": "done"} for k, f in enumerate(["0000-a", "0001-b"])])
    real = write.plan_run

    def flaky(folder, run_dir, options, loader=None):
        if folder == "0000-a":
            raise UserError(f"{run_dir}: changed on disk")
        return real(folder, run_dir, options, loader)

    monkeypatch.setattr(write, "plan_run", flaky)
    monkeypatch.setattr(write, "_jobs", lambda plan: 1)  # the patch cannot reach worker processes
    assert run("--root", tmp_path, "--tables-only") == 1
    assert "changed on disk" in capsys.readouterr().err
    assert (tmp_path / "analysis" / "0001-b" / "index.html").is_file()
    assert "changed on disk" in (tmp_path / "analysis" / "index.html").read_text(encoding="utf-8")


def test_a_run_damaged_after_planning_is_listed_by_parallel_writers(tmp_path, monkeypatch):
    from attention_map_diffusers.analysis import write
    from attention_map_diffusers.analysis.options import AnalysisOptions
    from attention_map_diffusers.analysis.plan import make_plan

    for k, name in enumerate(["0000-a", "0001-b", "0002-c"]):
        good_run(tmp_path / name, seed=k)
    write_runs(tmp_path, [{"run": k, "folder": f, "prompt": [BICYCLE], "status": "done"}
                          for k, f in enumerate(["0000-a", "0001-b", "0002-c"])])
    plan = make_plan(AnalysisOptions(root=str(tmp_path), tables_only=True))
    (tmp_path / "0001-b" / "stepavg_token_maps_v1.npz").write_bytes(b"not a zip")  # damaged after planning
    monkeypatch.setattr(write, "_jobs", lambda plan: 2)  # worker processes, whatever this machine's CPUs
    write.write_plan(plan)
    problems = {r.folder: r.problem for r in (s.entry for s in plan.runs)}
    assert problems["0000-a"] is None and problems["0002-c"] is None and "0001-b" in problems["0001-b"]
    assert (tmp_path / "analysis" / "0000-a" / "index.html").is_file()
    assert (tmp_path / "analysis" / "0002-c" / "index.html").is_file()
    assert not (tmp_path / "analysis" / "0001-b").exists()
    assert "not a zip" in (tmp_path / "analysis" / "index.html").read_text(encoding="utf-8") or \
        "damaged" in (tmp_path / "analysis" / "index.html").read_text(encoding="utf-8")


# --- runs.jsonl missing or stale ---------------------------------------------------------------


def test_run_folders_without_runs_jsonl(tmp_path, capsys):
    good_run(tmp_path / "0000-a", seed=0)
    good_run(tmp_path / "0001-b", prompt="A furry cat", seed=1)
    (tmp_path / "notes").mkdir()  # not a run: ignored
    assert run("--root", tmp_path, "--tables-only") == 0
    err = capsys.readouterr().err
    assert "has no runs.jsonl: analysing the 2 complete run folders in it (0000-a, 0001-b)" in err
    out = tmp_path / "analysis"
    assert header(out / "0001-b" / "clip" / "tables" / "words_auc.csv") == ["block", "A", "furry", "cat"]
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "A furry cat" in html and "not in runs.jsonl" in html  # the prompt comes from the run's metadata


def test_stale_runs_jsonl(tmp_path, capsys):
    good_run(tmp_path / "0000-a", seed=0)
    good_run(tmp_path / "0001-b", prompt="A furry cat", seed=1)  # on disk, not listed
    write_runs(tmp_path, [
        {"run": 0, "folder": "0000-a", "prompt": [BICYCLE], "status": "done"},
        {"run": 2, "folder": "0002-c", "prompt": ["gone"], "status": "done"},  # listed, not on disk
    ])  # fmt: skip
    assert run("--root", tmp_path, "--tables-only") == 1
    err = capsys.readouterr().err
    assert "does not list 1 complete run folders found next to it (0001-b); they are analysed too" in err
    assert "'0002-c' is marked done" in err and "does not exist" in err
    out = tmp_path / "analysis"
    assert (out / "0000-a" / "index.html").is_file() and (out / "0001-b" / "index.html").is_file()
    assert not (out / "0002-c").exists()


def test_runs_jsonl_folder_spellings_count_one_run_once(tmp_path, capsys):
    """Issue 21.17: ``./0000-a`` and ``0000-a/`` name the run ``0000-a``: compared normalised, a run is
    analysed and aggregated once (two lines for it are refused like an exact duplicate)."""
    for k, name in enumerate(["0000-a", "0001-a"]):
        good_run(tmp_path / name, seed=k)
    row = {"prompt": [BICYCLE], "status": "done"}
    write_runs(tmp_path, [dict(row, run=0, folder="./0000-a"), dict(row, run=1, folder="0001-a/")])
    assert [r.folder for r in parse_runs_jsonl((tmp_path / "runs.jsonl").read_text(), "runs.jsonl")] == ["0000-a", "0001-a"]
    capsys.readouterr()
    assert run("--root", tmp_path, "--tables-only") == 0
    assert "does not list" not in capsys.readouterr().err  # both folders recognised as listed
    out = tmp_path / "analysis"
    (summary,) = list(out.glob("aggregate/*/clip/tables/words_summary.csv"))
    with open(summary, newline="", encoding="utf-8") as fh:
        assert {r["n_runs"] for r in csv.DictReader(fh)} == {"2"}
    write_runs(tmp_path, [dict(row, run=0, folder="0000-a"), dict(row, run=1, folder="./0000-a"), dict(row, run=2, folder="0001-a/")])
    shutil.rmtree(out)
    assert run("--root", tmp_path, "--tables-only") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'0000-a' twice" in err and "'./0000-a'" in err and not out.exists()
    # a prompt holding U+2028 (json.dumps(ensure_ascii=False) leaves it as is) is one line
    (rec,) = parse_runs_jsonl(json.dumps(dict(row, run=0, folder="0000-a", prompt=["a\u2028b\x85c"]), ensure_ascii=False) + "\n", "r")
    assert rec.prompt == ("a\u2028b\x85c",)


def test_interrupted_run_folder_without_runs_jsonl(tmp_path, capsys):
    good_run(tmp_path / "0000-a")
    good_run(tmp_path / "0001-b")
    os.remove(tmp_path / "0001-b" / "metadata.json")  # a dump killed between its two files
    assert run("--root", tmp_path, "--tables-only") == 1
    err = capsys.readouterr().err
    assert "0001-b lacks metadata.json (an interrupted dump?)" in err
    assert (tmp_path / "analysis" / "0000-a" / "index.html").is_file()
    shutil.rmtree(tmp_path / "0000-a")
    shutil.rmtree(tmp_path / "analysis")
    assert run("--root", tmp_path, "--tables-only") == 2  # nothing complete: one line, nothing written
    assert "holds no complete run" in capsys.readouterr().err
    assert not (tmp_path / "analysis").exists()


# --- --blocks ranges ---------------------------------------------------------------------------


def test_huge_blocks_range_is_checked_arithmetically(tmp_path):
    good_run(tmp_path / "run")
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
        "import analyse_stepavg as a\n"
        f"sys.exit(a.main(['--root', {str(tmp_path / 'run')!r}, '--tables-only', '--blocks', sys.argv[1]]))\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    for spec, rc, message in (("0-99999999999", 2, "block 2 is not in this dump, which has blocks 0-1"),
                              ("1-1,3-99999999999", 2, "block 3 is not in this dump"),
                              ("1-1", 0, "")):  # fmt: skip
        res = subprocess.run([sys.executable, "-c", code, spec], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == rc, res.stderr
        assert message in res.stderr and "Traceback" not in res.stderr
    assert header(tmp_path / "run" / "analysis" / "clip" / "tables" / "words_auc.csv")[0] == "block"


def test_first_missing():
    assert first_missing([(0, 99999999999)], [0, 1]) == 2
    assert first_missing([(0, 1)], [1, 0]) is None
    assert first_missing([(5, 7), (2, 2)], [0, 1, 2, 5, 6]) == 7
    assert first_missing([(3, 10**12)], [0, 1]) == 3


def test_long_word_in_prompt_is_cut_in_figures_and_kept_in_tables(tmp_path, capsys):
    """Issue 21.4: a prompt with a 100-letter word (wide glyphs) used to stop the whole analysis in
    fixed_layout ("left cannot be >= right"); figures now show it cut, tables keep it whole."""
    long = "W" * 100
    prompt = f"A {long} in front of a barn"
    runs = [("0000-a", prompt, 0), ("0001-a", prompt, 1)]
    for folder, p, seed in runs:
        good_run(tmp_path / folder, prompt=p, seed=seed)
    write_runs(tmp_path, [{"run": k, "folder": f, "prompt": [p], "seed": s, "status": "done"} for k, (f, p, s) in enumerate(runs)])
    assert run("--root", tmp_path, "--phrases", f"{long} in front") == 0
    out = tmp_path / "analysis"
    for folder, _, _ in runs:
        for enc in ("clip", "t5"):
            assert (out / folder / enc / "overview.png").is_file()
    for enc in ("clip", "t5"):
        assert long in header(out / "0000-a" / enc / "tables" / "words_auc.csv")
    assert list((out / "aggregate").glob("*/t5/heatmaps_mean.png"))

    from attention_map_diffusers.analysis.layout import MIN_PANELS, fixed_layout
    from attention_map_diffusers.analysis.views import MAX_LABEL_CHARS, figure_labels

    class W:  # the two fields figure_labels reads
        def __init__(self, text, index):
            self.text, self.index = text, index

    cut = "W" * (MAX_LABEL_CHARS - 1) + "\u2026"
    assert figure_labels([W(long, 0), W("barn", 1), W(long.lower(), 2)]) == [f"{cut} #0", "barn", f"{cut.lower()[:-1]}\u2026 #2"]
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3))
    fig.subplots()
    fixed_layout(fig, left=30.0, right=10.0, top=5.0, bottom=5.0)  # margins wider than the figure: no error
    p = fig.subplotpars
    assert p.right - p.left == pytest.approx(MIN_PANELS) and p.top - p.bottom == pytest.approx(MIN_PANELS)
    assert p.left == pytest.approx(0.8 * 30 / 40)


def test_encoders_clip_on_a_flux_dump_is_refused(tmp_path, capsys):
    """Issue 21.15: --encoders clip on a FLUX.1 dump (T5 only) used to write an empty report with exit 0;
    refused like evaluate_segmentation.py --encoder clip (exit 2, nothing written); t5 is analysed."""
    layout = make_layout([BICYCLE], clip_len=77, t5_len=16)
    arrays = random_arrays(layout, num_blocks=2, num_steps=3, grid=(4, 4))
    write_dump(tmp_path / "f", layout, arrays, meta={
        "model_family": "flux", "text_spans": {"t5": [77, layout.T]}, "tokens": None, "special_mask": None,
        "token_offsets_clip": None})
    capsys.readouterr()
    assert run("--root", tmp_path / "f", "--encoders", "clip", "--tables-only") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no clip tokens" in err and "FLUX.1" in err and "--encoders t5" in err
    assert not (tmp_path / "f" / "analysis").exists()
    assert run("--root", tmp_path / "f", "--encoders", "t5", "--tables-only") == 0
    assert header(tmp_path / "f" / "analysis" / "t5" / "tables" / "words_auc.csv")[1:] == ["A #0"] + WORDS[1:6] + ["a #6", "barn"]
    # in a folder of runs: that run is listed, the others analysed (exit 1)
    shutil.rmtree(tmp_path / "f" / "analysis")
    (tmp_path / "runs").mkdir()
    os.replace(tmp_path / "f", tmp_path / "runs" / "f")
    good_run(tmp_path / "runs" / "g")
    capsys.readouterr()
    assert run("--root", tmp_path / "runs", "--encoders", "clip", "--tables-only") == 1
    err = capsys.readouterr().err
    assert "has no clip tokens" in err and (tmp_path / "runs" / "analysis" / "g" / "clip" / "tables" / "words_auc.csv").is_file()


# --- the output folder -------------------------------------------------------------------------


def test_out_holding_other_files_is_refused_and_left_alone(tmp_path, capsys):
    good_run(tmp_path / "run")
    out = tmp_path / "run" / "analysis"
    assert run("--root", tmp_path / "run", "--tables-only") == 0
    assert (out / outdir.MANIFEST).is_file()
    shutil.copytree(tmp_path / "run", tmp_path / "copy", ignore=shutil.ignore_patterns("analysis"))
    shutil.copytree(tmp_path / "copy", out / "my-copied-run")  # a user puts a run folder there
    before = tree(out)
    capsys.readouterr()
    assert run("--root", tmp_path / "run", "--tables-only") == 2
    err = capsys.readouterr().err
    assert "holds my-copied-run/" in err and "which this analysis did not write" in err and err.count("\n") == 1
    assert tree(out) == before  # nothing deleted, nothing written
    # a foreign file next to our files, and an empty folder of the user's: refused too
    shutil.rmtree(out / "my-copied-run")
    (out / "clip" / "tables" / "mine.csv").write_text("x")
    assert run("--root", tmp_path / "run", "--tables-only") == 2
    assert "holds clip/tables/mine.csv" in capsys.readouterr().err
    os.remove(out / "clip" / "tables" / "mine.csv")
    (out / "empty").mkdir()
    assert run("--root", tmp_path / "run", "--tables-only") == 2
    assert "holds empty/" in capsys.readouterr().err
    (out / "empty").rmdir()
    assert run("--root", tmp_path / "run", "--tables-only") == 0  # only our files: replaced


def test_out_under_a_regular_file_is_refused_up_front(tmp_path, capsys, monkeypatch):
    """Issue 21.18: --out file.txt/sub used to fail with exit 1 after all the work; refused first (exit 2)."""
    from attention_map_diffusers.analysis import plan

    good_run(tmp_path / "run")
    (tmp_path / "file.txt").write_text("mine")
    planned = []
    monkeypatch.setattr(plan, "plan_run", lambda *a, **k: planned.append(a) or pytest.fail("planned a run"))
    for out in (tmp_path / "file.txt" / "sub", tmp_path / "file.txt" / "a" / "b"):
        capsys.readouterr()
        assert run("--root", tmp_path / "run", "--out", out) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "file.txt is a file, not a folder" in err, err
    assert not planned and (tmp_path / "file.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "run"]


def test_out_of_an_earlier_version_without_manifest_is_refused(tmp_path, capsys):
    good_run(tmp_path / "run")
    out = tmp_path / "run" / "analysis"
    assert run("--root", tmp_path / "run", "--tables-only") == 0
    os.remove(out / outdir.MANIFEST)
    before = tree(out)
    capsys.readouterr()
    assert run("--root", tmp_path / "run", "--tables-only") == 2
    assert "earlier version of this tool" in capsys.readouterr().err
    assert tree(out) == before


def test_leftovers_of_a_killed_analysis_are_removed(tmp_path, capsys):
    good_run(tmp_path / "run")
    root = tmp_path / "run"
    assert run("--root", root, "--tables-only") == 0
    # what a kill leaves: a temp folder being written, and an earlier analysis moved aside
    tmp = outdir.new_folder(str(root / "analysis"))  # killed after its manifest listed its files
    (open(os.path.join(tmp, "done.csv"), "w")).write("x")
    json.dump({"generator": json.load(open(os.path.join(tmp, outdir.MANIFEST)))["generator"], "files": ["done.csv"]},
              open(os.path.join(tmp, outdir.MANIFEST), "w"))
    os.replace(root / "analysis", root / ".analysis.old-abcd1234")
    # look-alikes that are not ours stay
    (root / ".analysis.tmp-notours1").mkdir()
    (root / ".analysis.tmp-notours1" / "keep.txt").write_text("keep")
    (root / ".other.tmp-abcdefgh").mkdir()
    capsys.readouterr()
    assert run("--root", root, "--tables-only") == 0
    assert "removing what an interrupted analysis left" in capsys.readouterr().err
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == [".analysis.tmp-notours1", ".other.tmp-abcdefgh"]
    assert (root / ".analysis.tmp-notours1" / "keep.txt").read_text() == "keep"
    assert (root / "analysis" / "index.html").is_file()


def test_leftover_holding_user_files_is_kept(tmp_path, capsys):
    """Issue 21.2: a leftover-looking folder with a manifest is removed only when it holds nothing but
    the files its manifest lists; a user file, an extra folder or a link keeps it, with one warning."""
    root = tmp_path / "run"
    good_run(root)
    assert run("--root", root, "--tables-only") == 0
    listed = json.load(open(root / "analysis" / outdir.MANIFEST))
    folders = {}
    for name, extra in [("old-notes", "notes.txt"), ("old-dir", "mine/"), ("old-link", "link"), ("tmp-half", "half.csv")]:
        path = root / f".analysis.{name}"
        shutil.copytree(root / "analysis", path)
        if extra == "notes.txt":
            (path / "notes.txt").write_text("my notes")
        elif extra == "mine/":
            (path / "mine").mkdir()
        elif extra == "link":
            os.symlink(root / "metadata.json", path / "link")
        else:  # killed half way: the manifest lists nothing yet
            json.dump(dict(listed, files=[]), open(path / outdir.MANIFEST, "w"))
        folders[path] = tree(path)
    capsys.readouterr()
    assert run("--root", root, "--tables-only") == 0
    err = capsys.readouterr().err
    warnings_ = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings_) == 1 and "leaving alone" in warnings_[0]
    for path, before in folders.items():
        assert tree(path) == before, path  # nothing in them deleted
        assert path.name in warnings_[0]
    assert "notes.txt" in warnings_[0]
    assert "removing what an interrupted analysis left" not in err


def test_edited_output_file_is_refused_without_overwrite(tmp_path, capsys):
    """Issue 21.3: the manifest records each file's size and sha256; a re-run into an analysis whose
    table was edited is refused (one line naming it, exit 2, nothing changed) unless --overwrite."""
    import hashlib

    root = tmp_path / "run"
    good_run(root)
    out = root / "analysis"
    assert run("--root", root, "--tables-only") == 0
    listed = json.load(open(out / outdir.MANIFEST))["files"]
    on_disk = {os.path.relpath(os.path.join(d, f), out).replace(os.sep, "/") for d, _, fs in os.walk(out) for f in fs}
    assert {e["path"] for e in listed} == on_disk - {outdir.MANIFEST}
    for e in listed:  # recorded: each file's own size and hash
        data = (out / e["path"]).read_bytes()
        assert e["size"] == len(data) and e["sha256"] == hashlib.sha256(data).hexdigest()
    table = out / "clip" / "tables" / "words_auc.csv"
    with open(table, "a", encoding="utf-8") as fh:
        fh.write("my,own,line\n")
    before = tree(out)
    capsys.readouterr()
    assert run("--root", root, "--tables-only") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "clip/tables/words_auc.csv" in err and "--overwrite" in err
    assert tree(out) == before
    assert "--overwrite" in analyse_stepavg.build_parser().format_help()
    assert run("--root", root, "--tables-only", "--overwrite") == 0
    assert "my,own,line" not in table.read_text(encoding="utf-8")
    # a manifest of an earlier version (names only) is still read: replaced without a check
    names = json.load(open(out / outdir.MANIFEST))
    json.dump(dict(names, files=[e["path"] for e in names["files"]]), open(out / outdir.MANIFEST, "w"))
    with open(table, "a", encoding="utf-8") as fh:
        fh.write("x\n")
    assert run("--root", root, "--tables-only") == 0
    assert isinstance(json.load(open(out / outdir.MANIFEST))["files"][0], dict)


# --- hand-edited inputs ------------------------------------------------------------------------


BAD_VALUES = (5, -1, 1.5, True, "x", None, [], {}, [[1]], [1, 2], {"a": 1})


@pytest.mark.parametrize("original", [False, True])
def test_every_hand_edited_metadata_value_gives_a_user_error(tmp_path, original):
    """Each metadata key set to each wrong type: the dump loads, or UserError (never another exception)."""
    folder = tmp_path / "run"
    layout = make_layout([BICYCLE], clip_len=77, t5_len=16)
    arrays = random_arrays(layout, num_blocks=2, num_steps=3, grid=(4, 4))
    meta = write_dump(folder, layout, arrays, original=original)
    path = folder / "metadata.json"
    unexpected = []
    for key in meta:
        for value in BAD_VALUES:
            edited = dict(meta)
            edited[key] = value
            path.write_text(json.dumps(edited))
            try:
                load_dump(str(folder))
            except UserError as exc:
                assert "\n" not in str(exc)
            except Exception as exc:  # noqa: BLE001 - what this test looks for
                unexpected.append(f"{key}={value!r}: {type(exc).__name__}: {exc}")
    assert not unexpected, unexpected[:5]


@pytest.mark.parametrize("value", ["no", "false", 0, 1, None, []])
def test_random_weights_of_the_wrong_type_is_refused(tmp_path, capsys, value):
    """Issue 21.20: ``"random_weights": "no"`` used to show the random-weights warning; only true/false is read."""
    good_run(tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "metadata.json").read_text())
    (tmp_path / "run" / "metadata.json").write_text(json.dumps(dict(meta, random_weights=value)))
    capsys.readouterr()
    assert run("--root", tmp_path / "run", "--tables-only") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"metadata random_weights must be true or false, got {value!r}" in err
    assert "random weights (--model" not in err
    good_run(tmp_path / "ok", meta={"random_weights": False})
    assert run("--root", tmp_path / "ok", "--tables-only") == 0
    assert "random weights" not in capsys.readouterr().err


@pytest.mark.parametrize("key", ["num_blocks", "num_steps", "batch_size", "T_from_model"])
def test_metadata_count_as_a_string_names_the_key_and_type(tmp_path, capsys, key):
    """Issue 21.20: ``num_blocks: "4"`` gave "num_blocks='4' but the arrays have Bk=4"; now the key and the type."""
    good_run(tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "metadata.json").read_text())
    meta[key] = str(meta[key])
    (tmp_path / "run" / "metadata.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert run("--root", tmp_path / "run", "--tables-only") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"metadata {key} must be a whole number" in err and f"got {meta[key]!r} (a string)" in err


def test_duplicate_phrases_are_analysed_once(tmp_path, capsys):
    """Issue 21.20: --phrases "a barn|a barn" gave duplicate columns; each phrase once, one warning line."""
    good_run(tmp_path / "run")
    capsys.readouterr()
    assert run("--root", tmp_path / "run", "--tables-only", "--phrases", "a barn|in front|A  barn|a barn") == 0
    err = capsys.readouterr().err
    assert len([ln for ln in err.splitlines() if "more than once" in ln]) == 1
    for enc in ("clip", "t5"):
        tables = tmp_path / "run" / "analysis" / enc / "tables"
        heads = [header(p)[1:] for p in sorted(tables.glob("phrases_*.csv"))]
        assert heads and all(h == ["a barn", "in front"] for h in heads), heads


def test_every_hand_edited_runs_jsonl_value_gives_a_user_error():
    row = {"run": 0, "folder": "0000-a", "prompt": [BICYCLE], "seed": 1, "status": "done", "process": 0, "error": None}
    unexpected = []
    for key in row:
        for value in BAD_VALUES + ("a\x00b", "../x", "/abs"):
            try:
                parse_runs_jsonl(json.dumps(dict(row, **{key: value})) + "\n", "runs.jsonl")
            except UserError as exc:
                assert "\n" not in str(exc)
            except Exception as exc:  # noqa: BLE001
                unexpected.append(f"{key}={value!r}: {type(exc).__name__}: {exc}")
    assert not unexpected, unexpected[:5]


# --- scripts without spaces, fonts -------------------------------------------------------------


def test_prompt_without_spaces_gives_a_word_per_character(tmp_path, capsys):
    from attention_map_diffusers.analysis.fonts import choose_fonts

    prompt = "一只红色的猫 on a sofa"
    layout = make_layout([prompt], clip_len=77, t5_len=16)
    write_dump(tmp_path / "run", layout, random_arrays(layout, num_blocks=2, num_steps=3, grid=(4, 4)))
    assert run("--root", tmp_path / "run", "--tables-only", "--phrases", "红色") == 0
    words = ["一", "只", "红", "色", "的", "猫", "on", "a", "sofa"]
    for enc in ("clip", "t5"):
        assert header(tmp_path / "run" / "analysis" / enc / "tables" / "words_auc.csv") == ["block", *words]
        assert header(tmp_path / "run" / "analysis" / enc / "tables" / "phrases_auc.csv") == ["block", "红色"]
    assert "font" not in capsys.readouterr().err  # no figures, no font question
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Glyph ... missing" warnings
        assert run("--root", tmp_path / "run", "--topk", "2", "--blocks", "0", "--encoders", "clip", "--phrases", "红色") == 0
    assert (tmp_path / "run" / "analysis" / "clip" / "heatmaps" / "phrases" / "000-红色.png").is_file()
    err = capsys.readouterr().err
    choice = choose_fonts(words)
    if choice.missing:  # no CJK font installed: said once
        assert err.count("no installed font has glyphs for") == 1 and "fonts-noto-cjk" in err
    else:
        assert "no installed font" not in err and choice.families


def test_font_fallback_is_found_and_used():
    """With a base font that lacks a character, an installed font that has it is chosen and drawn
    without warnings (cmr10, shipped with matplotlib, has no 'é'; DejaVu Sans has)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from attention_map_diffusers.analysis.fonts import choose_fonts, use_fonts

    choice = choose_fonts(["café"], base="cmr10")
    assert choice.missing == "" and choice.families[0] == "cmr10" and len(choice.families) >= 2
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with use_fonts(choice):
            fig = Figure()
            FigureCanvasAgg(fig)
            fig.subplots().set_title("café")
            fig.canvas.draw()
    assert not [w for w in seen if "missing from font" in str(w.message)]
    nothing = choose_fonts(["\U0010fffd"], base="cmr10")  # a private-use character no font has
    assert nothing.missing == "\U0010fffd" and "no installed font has glyphs for" in nothing.note()
