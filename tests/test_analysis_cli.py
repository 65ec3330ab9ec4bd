"""analyse_stepavg.py end to end on synthetic dumps: numbers against references, layouts, report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from urllib.parse import unquote

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import analyse_stepavg  # noqa: E402
from synthetic_dump import make_layout, random_arrays, read_csv, run_analysis, write_dump, write_runs  # noqa: E402

from attention_map_diffusers.analysis.outdir import MANIFEST  # noqa: E402
from attention_map_diffusers.contract import slugify  # noqa: E402

CLIP_BPE = os.path.join(REPO, "..", "shared", "data", "clip_bpe_simple_vocab_16e6.txt.gz")
BICYCLE = "A rusty bicycle in front of a barn"
WORDS = ["A", "rusty", "bicycle", "in", "front", "of", "a", "barn"]


run = run_analysis


def word_positions(layout, enc, item=0, words=WORDS):
    """Per word (prompt order), its text positions, from the synthetic layout's offsets."""
    seen: dict[str, int] = {}
    out = []
    for w in words:
        k = seen.get(w, 0)
        seen[w] = k + 1
        out.append(layout.positions(enc, item, w, occurrence=k))
    return out


def stored(folder):
    with np.load(os.path.join(folder, "stepavg_token_maps_v1.npz")) as z:
        return {k: z[k].astype(np.float64) for k in z.files}


def reference(arrays, positions, item=0, blocks=None, original=False):
    """Word curves, AUC, step means, masses and peaks with plain loops (float64)."""
    mean = arrays["per_block_step_token_mean"][item]
    if original:
        mean = mean[:, ::-1]
    Bk, S, _ = mean.shape
    blocks = list(range(Bk)) if blocks is None else blocks
    n = len(positions)
    curves = np.zeros((len(blocks), S, n))
    for bi, b in enumerate(blocks):
        for s in range(S):
            for k, pos in enumerate(positions):
                curves[bi, s, k] = sum(mean[b, s, p] for p in pos)
    auc = np.zeros((len(blocks), n))
    for s in range(S - 1):
        auc += (curves[:, s] + curves[:, s + 1]) / 2
    avg = arrays["sum_token_map"][item] / arrays["N"]
    H, W, _ = avg.shape
    share_sum = np.zeros(n)
    for y in range(H):
        for x in range(W):
            v = [sum(avg[y, x, p] for p in pos) for pos in positions]
            t = sum(v) + 1e-8
            share_sum += np.array(v) / t
    mass = share_sum / share_sum.sum()
    peaks = []
    for k in range(n):
        best = (-1.0, 0, 0)
        for bi, b in enumerate(blocks):
            for s in range(S):
                if curves[bi, s, k] > best[0]:
                    best = (curves[bi, s, k], b, s)
        peaks.append(best[1:])
    return {"curves": curves, "auc": auc, "mean": curves.mean(axis=1), "mass": mass, "peaks": peaks}


def labels(words):
    """Column names of the wide tables: repeated words (any case) numbered by their position, "a #6"."""
    low = [w.casefold() for w in words]
    return [f"{w} #{i}" if low.count(w.casefold()) > 1 else w for i, w in enumerate(words)]


def check_tables(folder, ref, words=WORDS, blocks=None):
    blocks = list(range(ref["auc"].shape[0])) if blocks is None else blocks
    for name, key in (("words_auc.csv", "auc"), ("words_stepavg.csv", "mean")):
        header, rows = read_csv(os.path.join(folder, "tables", name))
        assert header == ["block", *labels(words)]
        assert [int(r[0]) for r in rows] == blocks
        np.testing.assert_allclose(np.array([[float(v) for v in r[1:]] for r in rows]), ref[key], rtol=2e-6, atol=1e-9)
    header, rows = read_csv(os.path.join(folder, "tables", "words_summary.csv"))
    assert header == ["word", "mass", "peak_block", "peak_step", "word_index"]
    assert [r[0] for r in rows] == labels(words) and [int(r[4]) for r in rows] == list(range(len(words)))
    np.testing.assert_allclose([float(r[1]) for r in rows], ref["mass"], rtol=2e-6)
    assert [(int(r[2]), int(r[3])) for r in rows] == ref["peaks"]


@pytest.fixture
def bicycle(tmp_path):
    layout = make_layout([BICYCLE], clip_len=77, t5_len=32)
    arrays = random_arrays(layout, num_blocks=3, num_steps=5, grid=(8, 8), seed=7)
    folder = tmp_path / "run"
    write_dump(folder, layout, arrays)
    return folder, layout


# --- numbers -----------------------------------------------------------------------------------


def test_tables_match_reference(bicycle, capsys):
    folder, layout = bicycle
    assert run("--root", folder, "--tables-only") == 0
    out = folder / "analysis"
    arrays = stored(folder)
    for enc in ("clip", "t5"):
        check_tables(out / enc, reference(arrays, word_positions(layout, enc)))
    assert not list(out.rglob("*.png"))  # tables only: no figures, no image copy
    assert sorted(p.name for p in (out / "clip" / "tables").iterdir()) == [
        "README.txt", "words_auc.csv", "words_auc_norm.csv", "words_stepavg.csv", "words_summary.csv",
    ]  # fmt: skip
    assert "wrote" in capsys.readouterr().out


def test_word_owning_a_square_end_to_end(tmp_path):
    layout = make_layout([BICYCLE], clip_len=77, t5_len=32)
    arrays = random_arrays(layout, num_blocks=2, num_steps=3, grid=(8, 8), seed=1)
    smap = np.full_like(arrays["sum_token_map"], 0.01)
    barn = layout.positions("clip", 0, "barn") + layout.positions("t5", 0, "barn")
    words = [p for w in WORDS for p in layout.positions("clip", 0, w) + layout.positions("t5", 0, w)]
    smap[0, 2:6, 2:6, :] = 0.0
    smap[0, 2:6, 2:6, barn] = 0.5  # barn owns a 4x4 square: share 1 there, 1/8 elsewhere
    arrays["sum_token_map"] = smap
    write_dump(tmp_path / "run", layout, arrays, store_dtype="float32")
    assert len(set(words)) == len(words)
    assert run("--root", tmp_path / "run", "--topk", "1", "--blocks", "0") == 0
    for enc in ("clip", "t5"):
        header, rows = read_csv(tmp_path / "run" / "analysis" / enc / "tables" / "words_summary.csv")
        mass = {r[0]: float(r[1]) for r in rows}
        expected_barn = (16 * 1.0 + 48 * 0.125) / 64
        assert mass["barn"] == pytest.approx(expected_barn, rel=1e-5)
        assert mass["rusty"] == pytest.approx(48 * 0.125 / 64, rel=1e-5)
        assert (tmp_path / "run" / "analysis" / enc / "heatmaps" / "words" / "007-barn.png").is_file()


def test_original_format_dump_flips_steps(tmp_path, capsys):
    layout = make_layout([BICYCLE], clip_len=77, t5_len=32)
    arrays = random_arrays(layout, num_blocks=3, num_steps=6, grid=(4, 4), seed=2)
    barn = layout.positions("clip", 0, "barn")
    arrays["per_block_step_token_mean"][0, 1, 0, barn] = 0.9  # barn peaks at the FIRST denoising step
    write_dump(tmp_path / "old", layout, arrays, original=True)
    write_dump(tmp_path / "new", layout, arrays)
    meta = json.loads((tmp_path / "old" / "metadata.json").read_text())
    assert "format_version" not in meta and isinstance(meta["prompt"], str) and len(meta["tokens"]) == 77
    assert run("--root", tmp_path / "old", "--tables-only") == 0
    err = capsys.readouterr().err
    assert "T5 not analysed" in err and "--t5-tokenizer" in err
    assert not (tmp_path / "old" / "analysis" / "t5").exists()
    old = tmp_path / "old" / "analysis" / "clip"
    ref = reference(stored(tmp_path / "old"), word_positions(layout, "clip"), original=True)
    check_tables(old, ref)
    assert ref["peaks"][7] == (1, 0)
    assert run("--root", tmp_path / "new", "--tables-only", "--encoders", "clip") == 0
    for name in ("words_auc.csv", "words_stepavg.csv", "words_summary.csv"):
        assert (old / "tables" / name).read_text() == (tmp_path / "new" / "analysis" / "clip" / "tables" / name).read_text()


def test_original_format_with_t5_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from attention_map_diffusers.models.tiny import build_t5_tokenizer

    tok_dir = tmp_path / "t5tok"
    build_t5_tokenizer().save_pretrained(str(tok_dir))
    layout = make_layout([BICYCLE, "Two cats"], clip_len=77, t5_len=16)
    arrays = random_arrays(layout, num_blocks=2, num_steps=3, grid=(4, 4), seed=3)
    write_dump(tmp_path / "old", layout, arrays, original=True)
    assert run("--root", tmp_path / "old", "--tables-only", "--t5-tokenizer", tok_dir) == 0
    out = tmp_path / "old" / "analysis"
    for i, words in ((0, WORDS), (1, ["Two", "cats"])):
        for enc in ("clip", "t5"):
            header, _ = read_csv(out / f"item{i}" / enc / "tables" / "words_auc.csv")
            assert header == ["block", *labels(words)]


def test_batch_of_two(tmp_path):
    prompts = [BICYCLE, "A furry cat on a sofa, a cat"]
    layout = make_layout(prompts, clip_len=77, t5_len=24)
    arrays = random_arrays(layout, num_blocks=2, num_steps=4, grid=(4, 4), seed=5)
    write_dump(tmp_path / "run", layout, arrays)
    assert run("--root", tmp_path / "run", "--phrases", "a cat|in front of", "--topk", "2", "--blocks", "1") == 0
    out = tmp_path / "run" / "analysis"
    arrays = stored(tmp_path / "run")
    words1 = ["A", "furry", "cat", "on", "a", "sofa", "a", "cat"]
    for enc in ("clip", "t5"):
        check_tables(out / "item0" / enc, reference(arrays, word_positions(layout, enc, 0), 0, [1]), blocks=[1])
        check_tables(out / "item1" / enc, reference(arrays, word_positions(layout, enc, 1, words1), 1, [1]), words1, [1])
        header, _ = read_csv(out / "item0" / enc / "tables" / "phrases_auc.csv")
        assert header == ["block", "in front of"]
        header, _ = read_csv(out / "item1" / enc / "tables" / "phrases_auc.csv")
        assert header == ["block", "a cat"]
        assert (out / "item1" / enc / "heatmaps" / "phrases" / "000-a-cat.png").is_file()
        assert not (out / "item1" / enc / "heatmaps" / "phrases" / "001-in-front-of.png").exists()
    assert (out / "item0" / "image.png").is_file() and (out / "item1" / "image.png").is_file()
    assert not (out / "clip").exists()
    check_report(out / "index.html")


# --- figures and report ------------------------------------------------------------------------


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href") and v:
                self.refs.append(unquote(v))


def check_report(page):
    """Every src/href of the page is a relative path to an existing file; every written file is linked."""
    parser = Links()
    parser.feed(page.read_text(encoding="utf-8"))
    base = page.parent
    parser.refs = [r for r in parser.refs if not r.startswith("#")]  # in-page anchors: test_report_browser.py
    for ref in parser.refs:
        assert not re.match(r"^[a-z]+:", ref) and not ref.startswith("/"), ref
        assert (base / ref).is_file(), ref
    linked = {os.path.normpath(base / r) for r in parser.refs}
    written = {os.path.normpath(p) for p in base.rglob("*") if p.is_file() and p.name not in ("index.html", MANIFEST)}

    def has_own_page(p):
        return any((d / "index.html").exists() for d in p.parents if d != base and base in d.parents)

    nested = {os.path.normpath(p) for p in base.rglob("*") if p.is_file() and has_own_page(p)}
    assert written - nested <= linked, sorted(written - nested - linked)[:5]
    return parser.refs


def test_figures_and_report(bicycle):
    folder, _ = bicycle
    assert run("--root", folder, "--phrases", "in front of|A|zebra", "--topk", "3") == 0
    out = folder / "analysis"
    for enc in ("clip", "t5"):
        d = out / enc
        heat = sorted(p.name for p in (d / "heatmaps" / "words").iterdir())
        assert len(heat) == 3 and all(re.fullmatch(r"\d{3}-[\w-]+\.png", n) for n in heat)
        assert sorted(p.name for p in (d / "heatmaps" / "phrases").iterdir()) == ["000-in-front-of.png", "001-A.png"]
        assert sorted(p.name for p in (d / "curves").iterdir()) == sorted(
            [f"words_mean_block{b}.png" for b in range(3)] + [f"phrases_mean_block{b}.png" for b in range(3)]
        )
        assert (d / "summary.png").is_file() and (d / "overview.png").is_file()
        header, _ = read_csv(d / "tables" / "phrases_stepavg.csv")
        assert header == ["block", "in front of", "A"]
    from PIL import Image

    with Image.open(out / "clip" / "summary.png") as im:
        assert im.size[0] > 300 and im.size[1] > 300
    refs = check_report(out / "index.html")
    assert "image.png" in refs and "clip/summary.png" in refs and "t5/tables/words_auc.csv" in refs
    html = (out / "index.html").read_text(encoding="utf-8")
    assert BICYCLE in html and "zebra" in html  # the missing phrase is reported on the page
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".analysis")]  # no temp folders left


def test_svg_and_no_overlay(bicycle):
    folder, _ = bicycle
    assert run("--root", folder, "--format", "svg", "--no-overlay", "--topk", "1", "--encoders", "t5", "--blocks", "2") == 0
    out = folder / "analysis"
    assert not (out / "clip").exists()
    assert (out / "t5" / "summary.svg").read_text().lstrip().startswith("<?xml")
    assert [p.name for p in (out / "t5" / "curves").iterdir()] == ["words_mean_block2.svg"]
    check_report(out / "index.html")


@pytest.mark.skipif(not os.path.isfile(CLIP_BPE), reason="../shared/data/clip_bpe_simple_vocab_16e6.txt.gz is absent")
def test_long_prompt_real_tokens_truncation_noted(tmp_path, capsys):
    from attention_map_diffusers.models.tiny import build_clip_tokenizer, build_t5_tokenizer

    prompt = ", ".join(f"a red cat number {i} near a blue bird" for i in range(12))
    layout = make_layout([prompt], clip_len=77, t5_len=256, clip_tokenizer=build_clip_tokenizer(CLIP_BPE), t5_tokenizer=build_t5_tokenizer())
    assert layout.clip[0].truncated and not layout.t5[0].truncated
    arrays = random_arrays(layout, num_blocks=2, num_steps=3, grid=(4, 4))
    write_dump(tmp_path / "run", layout, arrays)
    assert run("--root", tmp_path / "run", "--tables-only", "--phrases", "blue bird") == 0
    assert "CLIP: the encoder truncated the prompt" in capsys.readouterr().err
    out = tmp_path / "run" / "analysis"
    clip_words = read_csv(out / "clip" / "tables" / "words_auc.csv")[0][1:]
    t5_words = read_csv(out / "t5" / "tables" / "words_auc.csv")[0][1:]
    assert len(t5_words) == 12 * 9 and clip_words == t5_words[: len(clip_words)] and len(clip_words) < len(t5_words)
    assert "truncated the prompt" in (out / "index.html").read_text(encoding="utf-8")
    for enc in ("clip", "t5"):
        assert read_csv(out / enc / "tables" / "phrases_auc.csv")[0] == ["block", "blue bird"]


# --- several runs, --blocks, re-runs -----------------------------------------------------------


def test_several_runs(tmp_path):
    root = tmp_path / "out"
    for k, prompt in enumerate([BICYCLE, "A furry cat"]):
        layout = make_layout([prompt], t5_len=16)
        write_dump(root / f"000{k}-x", layout, random_arrays(layout, 2, 3, (4, 4), seed=k))
    write_runs(
        root,
        [
            {"run": 0, "folder": "0000-x", "prompt": [BICYCLE], "seed": 1, "status": "done"},
            {"run": 1, "folder": "0001-x", "prompt": ["A furry cat"], "seed": 1, "status": "skipped"},
            {"run": 2, "folder": "0002-x", "prompt": ["broken"], "seed": 1, "status": "failed", "error": "CUDA OOM"},
        ],
    )
    assert run("--root", root, "--tables-only") == 0
    out = root / "analysis"
    assert (out / "0000-x" / "clip" / "tables" / "words_auc.csv").is_file()
    assert (out / "0001-x" / "t5" / "tables" / "words_summary.csv").is_file()
    assert not (out / "0002-x").exists()
    refs = check_report(out / "index.html")
    assert refs == ["0000-x/index.html", "0001-x/index.html"]
    assert "CUDA OOM" in (out / "index.html").read_text()
    check_report(out / "0000-x" / "index.html")


def test_workers_start_before_planning_and_write_the_same_files(tmp_path):
    """Several runs: early_pool starts the worker processes before the runs are planned (none for one
    run, --tables-only or a missing root), and an analysis through them writes the same files, with
    the same tables, as one that starts its own."""
    from attention_map_diffusers.analysis import write as writer
    from attention_map_diffusers.analysis.cli import build_parser, options_from_args
    from attention_map_diffusers.analysis.plan import make_plan

    root = tmp_path / "runs"
    for k in range(3):
        layout = make_layout([BICYCLE if k % 2 == 0 else "A furry cat"], t5_len=16)
        write_dump(root / f"000{k}-x", layout, random_arrays(layout, 2, 3, (4, 4), seed=k))
    write_runs(root, [{"run": k, "folder": f"000{k}-x", "prompt": [BICYCLE if k % 2 == 0 else "A furry cat"], "seed": k,
                       "status": "done"} for k in range(3)])

    def options(*extra, out="a"):
        return options_from_args(build_parser().parse_args(["--root", str(root), "--out", str(tmp_path / out), *extra]))

    assert writer.early_pool(options("--tables-only")) is None
    assert writer.early_pool(options_from_args(build_parser().parse_args(["--root", str(root / "0000-x")]))) is None
    assert writer.early_pool(options_from_args(build_parser().parse_args(["--root", str(tmp_path / "none")]))) is None
    if writer._cpus() < 2:
        pytest.skip("one CPU: the runs are written in this process")
    pool = writer.early_pool(options("--dpi", "40"))
    assert pool is not None
    with pool:
        assert writer.write_plan(make_plan(options("--dpi", "40")), pool) > 0
    assert writer.write_plan(make_plan(options("--dpi", "40", out="b"))) > 0
    a, b = tmp_path / "a", tmp_path / "b"
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    assert any(f.startswith("aggregate/") for f in files)
    for f in files:
        if f.endswith(".csv"):
            assert (a / f).read_text() == (b / f).read_text(), f


def test_blocks_selection(bicycle):
    folder, layout = bicycle
    assert run("--root", folder, "--tables-only", "--blocks", "0,2") == 0
    ref = reference(stored(folder), word_positions(layout, "clip"), blocks=[0, 2])
    check_tables(folder / "analysis" / "clip", ref, blocks=[0, 2])


def test_rerun_replaces_earlier_analysis_and_refuses_foreign_folder(bicycle, capsys):
    folder, _ = bicycle
    assert run("--root", folder, "--topk", "2", "--encoders", "clip", "--blocks", "0") == 0
    assert len(list((folder / "analysis" / "clip" / "heatmaps" / "words").iterdir())) == 2
    assert run("--root", folder, "--topk", "1", "--encoders", "clip", "--blocks", "0") == 0
    assert len(list((folder / "analysis" / "clip" / "heatmaps" / "words").iterdir())) == 1  # no stale files
    foreign = folder / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert run("--root", folder, "--out", foreign, "--tables-only") == 2
    assert "does not hold an earlier analysis" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


# --- command line ------------------------------------------------------------------------------


def test_help_explains_every_flag(capsys):
    assert run("--help") == 0
    text = capsys.readouterr().out
    for flag in ("--root", "--out", "--topk", "--phrases", "--weights", "--encoders", "--format", "--dpi", "--blocks",
                 "--no-overlay", "--tables-only", "--t5-tokenizer", "--vmax-percentile"):  # fmt: skip
        assert flag in text


def test_slugify():
    assert slugify("in front of", 60) == "in-front-of"
    assert slugify("capybara's", 60) == "capybara-s"
    assert slugify("café", 60) == "café"
    assert slugify('a/b\\c:d*e?"f<g>h|i\x00j', 60) == "a-b-c-d-e-f-g-h-i-j"
    assert slugify("...", 60) == "x"
    assert len(slugify("w" * 300, 60)) == 60
    assert slugify("A Red CIRCLE") == "A-Red-CIRCLE"


def test_subprocess_imports_no_model_libraries(bicycle):
    folder, _ = bicycle
    code = (
        "import sys; import analyse_stepavg as a\n"
        f"rc = a.main(['--root', {str(folder)!r}, '--topk', '1', '--blocks', '0'])\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'matplotlib.pyplot') if m in sys.modules)\n"
        "print('RC', rc, 'HEAVY', heavy)\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "RC 0 HEAVY []" in res.stdout
    assert (folder / "analysis" / "clip" / "summary.png").is_file()


def _tree_bytes(root):
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def test_encoders_written_in_parallel_give_the_same_files(tmp_path, monkeypatch, capsys):
    """A single run on two or more cores writes its second encoder in a forked process: the files are
    byte for byte those of the serial path, and an error in that process reaches the command."""
    from attention_map_diffusers.analysis import write as W

    if "fork" not in __import__("multiprocessing").get_all_start_methods() or sys.platform != "linux":
        pytest.skip("the parallel path needs fork (Linux)")
    layout = make_layout(["A rusty bicycle in front of a barn"], clip_len=77, t5_len=16)
    arrays = random_arrays(layout, num_blocks=3, num_steps=5, grid=(6, 6), seed=3)
    write_dump(tmp_path / "run", layout, arrays, image_size=(48, 48))
    forks = []
    real_fork = W._fork_encoder
    monkeypatch.setattr(W, "_fork_encoder", lambda *a: forks.append(a[2].encoder) or real_fork(*a))
    trees = {}
    for cpus in (1, 2):
        monkeypatch.setattr(W, "_cpus", lambda cpus=cpus: cpus)
        assert analyse_stepavg.main(["--root", str(tmp_path / "run"), "--out", str(tmp_path / f"out{cpus}"), "--dpi", "60"]) == 0
        trees[cpus] = _tree_bytes(tmp_path / f"out{cpus}")
    assert forks == ["t5"]  # only the run on 2 cores forked, for its second encoder
    assert trees[1].keys() == trees[2].keys() and len(trees[1]) > 20
    assert [k for k in trees[1] if trees[1][k] != trees[2][k]] == []

    def broken(folder, rel, res, *a):
        if res.encoder == "t5":
            raise OSError(28, "No space left on device")
        return real_write(folder, rel, res, *a)

    real_write = W.write_encoder
    monkeypatch.setattr(W, "write_encoder", broken)
    capsys.readouterr()
    assert analyse_stepavg.main(["--root", str(tmp_path / "run"), "--out", str(tmp_path / "out3"), "--dpi", "60"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0]
    assert not (tmp_path / "out3").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".out3")]
