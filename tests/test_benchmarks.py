"""Smoke tests: each benchmark runs at a toy size and writes its JSON keys (no timing asserts)."""

from __future__ import annotations

import csv
import json
import os
import re
import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

pytestmark = pytest.mark.slow  # benchmarks: `pytest -m "not slow"` leaves them out


def test_bench_capture_toy(tmp_path, capsys):
    import bench_capture

    out = tmp_path / "capture.json"
    assert bench_capture.main(["--preset", "toy", "--kernel-report", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("ratio_capture_vs_stock", "ratio_fallback_vs_stock", "ratio_fullmatrix_vs_capture",
                "ratio_kernel_vs_stock", "ratio_side_vs_stock", "ratio_chunked_vs_stock",
                "capture_state_bytes", "capture_state_bytes_sd35_large_1024_50",
                "fullmatrix_host_bytes_sd35_large_1024_50"):
        assert res[key] > 0, key
    assert res["capture_output_identical_to_stock"] is True
    assert res["output_identical_to_stock"] == {"kernel": True, "side": True, "chunked": True}
    assert res["auto_path"] == "flash-lse" and res["ratio_capture_vs_stock"] == res["ratio_kernel_vs_stock"]
    assert {n: p["path"] for n, p in res["paths"].items() if n != "capture"} == {
        "kernel": "flash-lse", "side": "sdpa+side-lse", "chunked": "chunked"}
    assert [v["path"] for v in res["capture_verdicts"]] == ["flash-lse", "sdpa+side-lse", "chunked"]
    report = {(r["dtype"], r["restricted_to"]): r["path"] for r in res["kernel_report"]}
    assert report[("float32", "default")] == "flash-lse" and report[("float32", "math")] == "sdpa+side-lse"
    # the computed sizes follow from the shapes: (64*64*333*4 + 2*38*50*333*2 + 50*4) and 50*38*2*38*4096*333*2
    assert res["capture_state_bytes_sd35_large_1024_50"] == 64 * 64 * 333 * 4 + 2 * 38 * 50 * 333 * 2 + 200
    assert res["capture_state_bytes_sd35_large_1024_50"] <= 8 * 2**20
    assert res["fullmatrix_host_bytes_sd35_large_1024_50"] == 50 * 38 * 2 * 38 * 4096 * 333 * 2
    printed = capsys.readouterr().out
    assert "capture / stock" in printed and "side / stock" in printed and "kernel report" in printed


def test_bench_capture_flux_toy(tmp_path):
    import bench_capture

    out = tmp_path / "flux.json"
    assert bench_capture.main(["--preset", "flux-toy", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["model_family"] == "flux" and res["capture_output_identical_to_stock"] is True
    assert res["output_identical_to_stock"] == {"kernel": True, "side": True, "chunked": True}
    assert "ratio_fullmatrix_vs_capture" not in res  # the baseline is SD3's processor
    # 64*64*512*4 + 2*57*28*512*2 + 28*4: sum map, per-(block, step) mean and max, timesteps
    assert res["capture_state_bytes_flux_dev_1024_28"] == 64 * 64 * 512 * 4 + 2 * 57 * 28 * 512 * 2 + 112


def _word_masses(folder):
    """Per encoder, the word masses the benchmark's dump should give, recomputed here from its npz and
    offsets (float64): per pixel each word's share of the words' attention, averaged, normalised."""
    with np.load(os.path.join(folder, "stepavg_token_maps_v1.npz")) as z:
        avg = z["sum_token_map"][0].astype(np.float64) / float(z["N"].reshape(-1)[0])
    with open(os.path.join(folder, "metadata.json"), encoding="utf-8") as fh:
        meta = json.load(fh)
    prompt = meta["prompt"][0]
    words = [m.span() for m in re.finditer(r"[^\W_]+", prompt)]
    out = {}
    for enc, key in (("clip", "token_offsets_clip"), ("t5", "token_offsets_t5")):
        start = meta["text_spans"][enc][0]
        pos = [[start + j for j, o in enumerate(meta[key][0]) if o is not None and a <= o[0] and o[1] <= b]
               for a, b in words]
        v = np.stack([avg[..., p].sum(axis=-1) for p in pos], axis=-1)  # (Hc, Wc, words)
        share = (v / (v.sum(axis=-1, keepdims=True) + 1e-8)).mean(axis=(0, 1))
        out[enc] = [(prompt[a:b], m) for (a, b), m in zip(words, share / share.sum())]
    return out


def test_bench_analysis_small(tmp_path, monkeypatch):
    """The benchmark times what it claims: every timed call analyses its dump (figures only in the
    plots mode) into tables with the right word masses, the reported times are those calls', and
    its full-size dump has the shapes the README states."""
    import bench_analysis

    calls = []
    real_run = bench_analysis.run

    def run(dump, out, extra):
        seconds = real_run(dump, out, extra)
        files = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs]
        tables = {}
        for enc in ("clip", "t5"):
            with open(os.path.join(out, enc, "tables", "words_summary.csv"), newline="", encoding="utf-8") as fh:
                tables[enc] = [(r[0], float(r[1])) for r in list(csv.reader(fh))[1:]]
        calls.append({"mode": "tables_only" if "--tables-only" in extra else "with_plots", "seconds": seconds,
                      "files": files, "tables": tables, "expected": _word_masses(dump)})
        return seconds

    monkeypatch.setattr(bench_analysis, "run", run)
    out = tmp_path / "analysis.json"
    assert bench_analysis.main(["--size", "small", "--repeats", "1", "--modes", "with_plots,tables_only", "--json", str(out)]) == 0
    res = json.loads(out.read_text())

    assert sorted(c["mode"] for c in calls) == ["tables_only"] * 2 + ["with_plots"] * 2  # 1 warm-up + 1 timed
    for mode in ("tables_only", "with_plots"):
        timed = [c["seconds"] for c in calls if c["mode"] == mode][1:]
        assert sorted(res["runs"][mode]) == sorted(timed)
        assert res[f"seconds_{mode}"] == pytest.approx(float(np.median(timed)))
    for c in calls:
        pngs = [f for f in c["files"] if f.endswith(".png")]
        if c["mode"] == "tables_only":
            assert pngs == [], "--tables-only must write no figure"
        else:
            assert {"clip/summary.png", "t5/summary.png"} <= set(pngs)
        for enc in ("clip", "t5"):
            got, want = c["tables"][enc], c["expected"][enc]
            assert [w.split(" #")[0] for w, _ in got] == [w for w, _ in want]  # repeated words are numbered: "a #6"
            np.testing.assert_allclose([m for _, m in got], [m for _, m in want], rtol=1e-5, err_msg=enc)

    full = tmp_path / "full"
    bench_analysis.build_dump(str(full), "full")
    with np.load(full / "stepavg_token_maps_v1.npz") as z:
        assert z["sum_token_map"].shape == (1, 64, 64, 333)
        assert z["per_block_step_token_mean"].shape == (1, 24, 50, 333)
    meta = json.loads((full / "metadata.json").read_text())
    assert meta["image_size"] == [1024, 1024] and meta["text_spans"] == {"clip": [0, 77], "t5": [77, 333]}


def test_bench_segmentation_toy_small(tmp_path):
    """Two scenes per set through the benchmark: the rendered set's true masks are written per word,
    both sets are scored per method / encoder, per level for the rendered one, and the whole-image
    baseline's IoU equals the masks' area share (recomputed here from the mask files)."""
    import json

    import numpy as np
    from PIL import Image

    from test_toy_shapes import _weights_present

    if not _weights_present():
        pytest.skip("no trained toy-shapes weights in this checkout")
    import bench_segmentation_toy as bench

    assert bench.main(["--n", "2", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["rendered"]) == {"all levels", "level 0.7", "level 0.5", "level 0.3", *(f"block {b}" for b in range(4))}
    rows = res["rendered"]["all levels"]["summary"]
    assert {r["method"] for r in rows} == {"daam", "argmax", "whole", "centre", "random"}
    assert {r["encoder"] for r in rows} == {"clip", "t5", "both"}
    shares = [np.asarray(Image.open(p)).astype(bool).mean() for p in sorted((tmp_path / "rendered" / "masks").glob("*/*.png"))]
    whole = next(r for r in rows if r["method"] == "whole" and r["encoder"] == "t5")
    assert float(whole["mIoU"]) == pytest.approx(np.mean(shares), abs=1e-5)
    assert res["generated_masks"]["objects"] >= 2 and res["generated"]["all steps"]["summary"]
    kinds = res["rendered"]["all levels"]["by_word_kind"]
    assert {(r["words"], r["encoder"]) for r in kinds if r["method"] == "daam"} == {
        (k, e) for k in ("color", "shape") for e in ("clip", "t5", "both")}
    n_words = sum(r["n"] for r in kinds if r["method"] == "daam" and r["encoder"] == "t5")
    assert n_words == len(shares)  # every mask is a colour or a shape word


def test_bench_analysis_baseline_ratio(tmp_path, monkeypatch):
    """--baseline times both checkouts' scripts in the same rounds and reports the median of the
    rounds' ratios; both really analyse the dump; an unknown mode or a folder without the script is
    refused."""
    import bench_analysis

    calls = []
    fake = iter([2.0, 4.0, 3.0, 3.0, 1.0, 4.0])  # warm-up (this, baseline), then 2 rounds: (this, baseline), (baseline, this)

    def run_script(script, root, out, extra):
        assert extra == ["--tables-only"]
        real = bench_analysis.subprocess.run([sys.executable, script, "--root", root, "--out", out, *extra], capture_output=True)
        assert real.returncode == 0 and os.path.isfile(os.path.join(out, "t5", "tables", "words_summary.csv"))
        calls.append(script)
        return next(fake)

    monkeypatch.setattr(bench_analysis, "run_script", run_script)
    out = tmp_path / "ratio.json"
    base = str(ROOT)  # this checkout as its own baseline
    assert bench_analysis.main(["--size", "small", "--repeats", "2", "--modes", "tables_only", "--baseline", base,
                                "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert len(calls) == 6
    # round 1: this 3.0, baseline 3.0 -> 1.0; round 2 (reversed order): baseline 1.0, this 4.0 -> 4.0
    assert res["runs"]["tables_only"] == [3.0, 4.0] and res["runs"]["tables_only @baseline"] == [3.0, 1.0]
    assert res["ratio_tables_only"] == pytest.approx(2.5)
    with pytest.raises(SystemExit):
        bench_analysis.main(["--modes", "runs8"])
    with pytest.raises(SystemExit):
        bench_analysis.main(["--modes", "tables_only", "--baseline", str(tmp_path)])


def test_png_bytes_counts_every_file_and_a_toy_run_fits_in_4_mb(tmp_path, capsys):
    """benchmarks/png_bytes.py: its kinds add up to the bytes on disk, and a toy-shapes-sized run
    with every view (16x16 grid, 4 blocks, 20 steps, step and block maps, a photograph) writes at
    most 4 MB (issue 22: it wrote ~21 MB before palette PNGs and the figures' own dpi)."""
    import png_bytes

    out = tmp_path / "out"
    assert png_bytes.main(["--size", "toy", "--keep", str(out), "--json", str(tmp_path / "b.json")]) == 0
    res = json.loads((tmp_path / "b.json").read_text())
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    assert res["total"] == on_disk == sum(k["bytes"] for k in res["kinds"].values())
    # every step and block offered by the sliders: (20 steps + 4 blocks) x 8 top words x 2 encoders maps at grid
    # size, and one colour bar per (kind, word, encoder)
    assert res["kinds"]["slider frames"]["files"] == (20 + 4) * 8 * 2 + 2 * 8 * 2 and res["kinds"]["curves per block"]["files"] == 8
    assert res["total"] <= 4_000_000, res["kinds"]
    assert "figures" in capsys.readouterr().out


def test_bench_concepts_toy_small(tmp_path, capsys):
    """Two rendered scenes through the concepts benchmark: the colour concepts' pointing rate (all
    blocks and block 0) and its chance rate, recomputed here from the dumps' npz with a brute-force
    4 px distance test; the evaluation has the concept methods next to daam and the baselines, over
    all blocks and per block; the output-space control covers the blocks with a text output."""
    import json

    import numpy as np

    from attention_map_diffusers.models.toy_shapes.data import eval_seeds, render
    from test_toy_shapes import _weights_present

    if not _weights_present():
        pytest.skip("no trained toy-shapes weights in this checkout")
    import bench_concepts_toy as bench

    out = tmp_path / "c.json"
    assert bench.main(["--n", "2", "--out", str(tmp_path / "run"), "--json", str(out), "--level-sweep", "0.5", "0.2"]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 2 and res["level"] == 0.5 and len(res["blocks"]) == 4
    assert set(res["segmentation"]) == {"all blocks", *(f"block {k}" for k in range(4))}
    for sel in res["segmentation"].values():
        assert {(r["method"], r["encoder"]) for r in sel["summary"]} >= {
            ("concept", "concepts"), ("concept-argmax", "concepts"), ("daam", "t5"), ("argmax", "t5"), ("whole", "t5")}

    def near(mask, y, x):  # the pixel (y, x) lies within 4 px of the mask
        ys, xs = np.nonzero(mask)
        return bool((((ys - y) ** 2 + (xs - x) ** 2) <= 16).any())

    hits_all, hits_b0, chance = [], [], []
    dumps = tmp_path / "run" / "rendered" / "dumps"
    for seed in eval_seeds(2):
        s = render(seed)
        folder = next(d for d in dumps.iterdir() if d.name.endswith(f"scene{seed}"))
        with np.load(folder / "stepavg_token_maps_v1.npz") as z:
            full, b0 = z["concept_sum_map"][0], z["concept_per_block_map"][0, 0]  # (16, 16, C)
        names = json.loads((folder / "metadata.json").read_text())["concepts"]
        centres = [4 + 8 * i for i in range(16)]  # the centre pixel of each 8 px cell of the 128 px image
        for obj, mask in zip(s.objects, s.masks):
            c = names.index(obj.color)
            for maps, acc in ((full, hits_all), (b0, hits_b0)):
                i, j = np.unravel_index(int(np.argmax(maps[..., c])), (16, 16))
                acc.append(near(mask, centres[i], centres[j]))
            chance.append(np.mean([near(mask, y, x) for y in centres for x in centres]))
    p = res["pointing"]
    assert p["all blocks"]["concept"]["color"] == {"rate": pytest.approx(np.mean(hits_all), abs=1e-4), "n": len(hits_all)}
    assert p["block 0"]["concept"]["color"]["rate"] == pytest.approx(np.mean(hits_b0), abs=1e-4)
    assert p["chance"]["color"] == pytest.approx(np.mean(chance), abs=1e-4)
    # the control (the caption's words in the output space) has every block with a text output: not
    # SD3's context_pre_only last block
    assert res["control_blocks"] == [0, 1, 2]
    assert set(p["all blocks"]) == {"concept", "t5", "clip", "t5-output-space"} and "t5-output-space" not in p["block 3"]
    assert p["block 2"]["t5-output-space"]["shape"]["n"] == len(hits_all)
    # the level sweep dumps the scenes again: its 0.5 level, from that level's map alone, is the table's
    sweep = res["level_sweep"]
    assert set(sweep) == {"0.5", "0.2"} and sweep["0.5"]["concept"]["color"] == p["all blocks"]["concept"]["color"]
    assert sweep["0.5"]["t5"]["color"] == p["all blocks"]["t5"]["color"]
    # the concepts' inputs against the captions' tokens: one cosine per caption word
    cos = res["concept_input_cosine"]
    assert cos and all(-1 <= v["min"] <= v["mean"] <= 1 and v["n"] >= 1 for v in cos.values())
    assert "pointing game" in capsys.readouterr().out
