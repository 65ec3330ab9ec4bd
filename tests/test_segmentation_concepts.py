"""Scoring concept maps (issue #23): the two protocols against per-pixel loops, and the command end to end."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from synthetic_dump import concept_arrays, make_layout, random_arrays, write_dump, write_runs

from attention_map_diffusers.segmentation import concepts as sc
from attention_map_diffusers.segmentation.cli import main

SIDE, GRID = 32, (4, 4)  # one grid cell is 8x8 pixels


@dataclass
class Cls:
    name: str
    phrases: tuple


def _ap_brute(score, gt):
    """Mean over positives of the precision among the pixels scoring at least as high."""
    s, g = score.ravel(), gt.ravel().astype(bool)
    precisions = [sum(g[j] for j in range(s.size) if s[j] >= s[i]) / sum(1 for j in range(s.size) if s[j] >= s[i])
                  for i in range(s.size) if g[i]]
    return float(np.mean(precisions))


def _torch_bilinear(grid_chw, H, W):
    import torch
    import torch.nn.functional as F

    return F.interpolate(torch.from_numpy(np.ascontiguousarray(grid_chw))[None].double(), size=(H, W), mode="bilinear",
                         align_corners=False)[0].numpy()


def _loops(names, maps, classes, gts, valid):
    """Both protocols pixel by pixel: ({(method, class): (iou, ap, the class mask's pixel accuracy)},
    concept-argmax's multi-class pixel accuracy of the image)."""
    C, H, W = maps.shape
    concept_of = []
    for c in classes:  # first concept whose lower-cased words equal the class name's, else a phrase's
        hit = None
        for p in (c.name, *c.phrases):
            hits = [j for j, n in enumerate(names) if n.lower().split() == p.lower().replace("_", " ").split()]
            if hits:
                hit = hits[0]
                break
        concept_of.append(hit)
    label = np.full((H, W), -1)
    for y in range(H):
        for x in range(W):
            vals = [maps[j, y, x] for j in range(C)]
            win = vals.index(max(vals))
            for k, j in enumerate(concept_of):
                if j == win:
                    label[y, x] = k
                    break
    right = total = 0
    for y in range(H):
        for x in range(W):
            if valid[y, x]:
                total += 1
                covering = [k for k in range(len(classes)) if gts[k, y, x]]
                right += (label[y, x] in covering) if label[y, x] >= 0 else not covering
    out = {}
    for k, c in enumerate(classes):
        j = concept_of[k]
        if j is None:
            continue
        m = maps[j]
        mean = sum(m[y, x] for y in range(H) for x in range(W)) / (H * W)
        for method, pred in (("concept", m > mean), ("concept-argmax", label == k)):
            inter = union = agree = 0
            for y in range(H):
                for x in range(W):
                    if valid[y, x]:
                        inter += pred[y, x] and gts[k, y, x]
                        union += pred[y, x] or gts[k, y, x]
                        agree += pred[y, x] == gts[k, y, x]
            out[(method, c.name)] = (inter / union if union else 1.0, _ap_brute(m[valid], gts[k][valid]), agree / total)
    return out, right / total


def test_both_protocols_match_per_pixel_loops():
    rng = np.random.default_rng(0)
    names = ["background", "Potted Plant", "cat", "sky", "dog"]
    classes = [Cls("cat", ("cat",)), Cls("pottedplant", ("pottedplant", "potted plant", "plant")), Cls("sofa", ("sofa",)),
               Cls("dog", ("dog",))]
    for trial in range(6):
        logits = rng.normal(size=(5, 7, 9)) * 2
        maps = np.exp(logits) / np.exp(logits).sum(axis=0)
        if trial == 0:
            maps[:, 0, 0] = 0.2  # a five-way tie: the first concept ("background") wins
        gts = rng.random((4, 7, 9)) < 0.3
        valid = rng.random((7, 9)) < 0.85
        keep = {}
        scores, skips, image_acc = sc.score("img", names, maps, classes, gts, valid, ("daam", "concept", "concept-argmax"), keep)
        assert [(s.name, s.reason.split(" (")[0]) for s in skips] == [("sofa", "no concept named like it")]
        ref, ref_image_acc = _loops(names, maps, classes, gts, valid)
        assert image_acc == pytest.approx(ref_image_acc, abs=1e-12)
        assert {(s.method, s.word) for s in scores} == set(ref)
        for s in scores:
            want = ref[(s.method, s.word)]
            assert s.encoder == "concepts"
            assert (s.iou, s.ap, s.pixel_acc) == pytest.approx(want, abs=1e-12), (s.method, s.word)
            pred = keep[("concepts", s.method, s.word)][0]
            assert s.pred_px == int(pred.sum()) and s.gt_px == int((gts[[c.name for c in classes].index(s.word)] & valid).sum())


def test_names_match_by_words_case_insensitively():
    classes = [Cls("pottedplant", ("pottedplant", "potted plant")), Cls("tvmonitor", ("tv monitor", "tv")), Cls("cat", ("cat",))]
    assert sc.match(["TV", "Potted  plant", "plant", "cats"], classes) == [1, 0, None]
    assert sc.match(["potted_plant"], classes[:1]) == [0]  # words split as prompts are


# ---------------------------------------------------------------------------------------------
# the command


def concept_run(folder, prompt, logits=None, *, concepts=("cat", "sofa", "background"), block_maps=False, seed=0):
    """A synthetic run (no planted word maps) whose concept maps follow ``logits`` (1, Hc, Wc, C)."""
    layout = make_layout([prompt], clip_len=77, t5_len=16)
    arrays = random_arrays(layout, num_blocks=3, num_steps=2, grid=GRID, seed=seed)
    if concepts:
        extra, keys = concept_arrays(1, list(concepts), 3, 2, GRID, seed=seed, nan_blocks=(2,), logits=logits, block_maps=block_maps)
        arrays.update(extra)
    else:
        keys = {}
    write_dump(folder, layout, arrays, image_size=(SIDE, SIDE), meta=keys, store_dtype="float32")
    return arrays


def box_mask(path, rows, cols):
    m = np.zeros((SIDE, SIDE), np.uint8)
    m[rows, cols] = 255
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(m).save(path)
    return m > 0


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_command_scores_concept_maps_next_to_the_word_maps(tmp_path, capsys):
    dumps, masks, out = tmp_path / "dumps", tmp_path / "masks", tmp_path / "seg"
    logits = np.zeros((1, 4, 4, 3))
    logits[0, :2, :2, 0] = 5.0  # "cat" top-left
    logits[0, 2:, :, 1] = 5.0  # "sofa" bottom half
    arrays = concept_run(dumps / "0000-cat", "a cat on a sofa", logits)
    concept_run(dumps / "0001-old", "a cat on a sofa", concepts=())  # no concept maps: skipped for the concept methods
    write_runs(dumps, [{"run": r, "folder": f, "prompt": ["a cat on a sofa"], "seed": 42, "status": "done"}
                       for r, f in enumerate(("0000-cat", "0001-old"))])
    for key in ("0000-cat", "0001-old"):
        gts = np.stack([box_mask(str(masks / key / "cat.png"), slice(0, 16), slice(0, 16)),
                        box_mask(str(masks / key / "sofa.png"), slice(16, 32), slice(0, 32))])
    code = main(["--dumps", str(dumps), "--masks", str(masks), "--out", str(out), "--no-progress", "--encoder", "t5",
                 "--methods", "daam,concept,concept-argmax,whole", "--cases", "1"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    summary = {(r["method"], r["encoder"]): r for r in read_csv(out / "summary.csv")}
    assert {e for m, e in summary if m.startswith("concept")} == {"concepts"}
    assert {m for m, e in summary if e == "concepts"} == {"concept", "concept-argmax"}
    assert ("daam", "t5") in summary and int(summary[("concept", "concepts")]["images"]) == 1
    rows = {(r["method"], r["word"]): r for r in read_csv(out / "per_image" / "0000-cat.csv") if r["encoder"] == "concepts"}
    maps = _torch_bilinear(np.moveaxis(arrays["concept_sum_map"][0].astype(np.float64) / float(arrays["concept_N"]), -1, 0), SIDE, SIDE)
    ref, ref_image_acc = _loops(["cat", "sofa", "background"], maps, [Cls("cat", ("cat",)), Cls("sofa", ("sofa",))], gts,
                                np.ones((SIDE, SIDE), bool))
    assert set(rows) == set(ref)
    for key, (want_iou, want_ap, want_acc) in ref.items():
        got = rows[key]
        assert float(got["iou"]) == pytest.approx(want_iou, abs=1e-6)
        assert float(got["ap"]) == pytest.approx(want_ap, abs=1e-6)
        assert float(got["word_pixel_acc"]) == pytest.approx(want_acc, abs=1e-6)
    image_rows = {(r["key"], r["encoder"]): r for r in read_csv(out / "images.csv")}
    assert float(image_rows[("0000-cat", "concepts")]["image_pixel_acc"]) == pytest.approx(ref_image_acc, abs=1e-6)
    assert float(summary[("concept-argmax", "concepts")]["image_pixel_acc"]) == pytest.approx(ref_image_acc, abs=1e-6)
    assert summary[("concept", "concepts")]["image_pixel_acc"] == ""
    assert ref[("concept-argmax", "sofa")][0] > 0.9 and ref[("concept-argmax", "cat")][0] > 0.7
    skipped = read_csv(out / "skipped.csv")
    assert [(r["key"], r["reason"]) for r in skipped] == [("0001-old", sc.NO_CONCEPTS)]
    assert "concept-argmax concepts" in " ".join(cap.out.split())


def test_no_run_with_concepts_gives_one_note_and_no_skip_rows(tmp_path, capsys):
    concept_run(tmp_path / "r", "a cat on a sofa", concepts=())
    box_mask(str(tmp_path / "m" / "r" / "cat.png"), slice(0, 16), slice(0, 16))
    base = ["--dumps", str(tmp_path / "r"), "--masks", str(tmp_path / "m"), "--no-progress"]
    # the default (every method): nothing said of the concept methods, which these dumps cannot have
    code = main(base + ["--out", str(tmp_path / "o")])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert read_csv(tmp_path / "o" / "skipped.csv") == []
    assert "concept" not in cap.err
    assert not any(r["encoder"] == "concepts" for r in read_csv(tmp_path / "o" / "summary.csv"))
    # named: one note
    code = main(base + ["--out", str(tmp_path / "o2"), "--methods", "daam,concept"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert read_csv(tmp_path / "o2" / "skipped.csv") == []
    assert cap.err.count("no run has concept maps") == 1


def test_concept_methods_alone_blocks_and_steps(tmp_path, capsys):
    logits = np.zeros((1, 4, 4, 3))
    logits[0, :2, :2, 0] = 5.0
    arrays = concept_run(tmp_path / "r", "a cat on a sofa", logits, block_maps=True)
    box_mask(str(tmp_path / "m" / "r" / "cat.png"), slice(0, 16), slice(0, 16))
    base = ["--dumps", str(tmp_path / "r"), "--masks", str(tmp_path / "m"), "--no-progress", "--methods", "concept"]
    assert main(base + ["--out", str(tmp_path / "o")]) == 0
    assert [(r["method"], r["encoder"]) for r in read_csv(tmp_path / "o" / "summary.csv")] == [("concept", "concepts")]
    # --blocks 1: that block's concept map alone (block 2 has no concept stream)
    layout = make_layout(["a cat on a sofa"], clip_len=77, t5_len=16)
    arrays["per_block_token_map"] = np.repeat(arrays["sum_token_map"][:, None] / 3, 3, axis=1)
    arrays["per_step_token_map"] = np.repeat(arrays["sum_token_map"][:, None] / 2, 2, axis=1)
    write_dump(tmp_path / "r", layout, arrays, image_size=(SIDE, SIDE), store_dtype="float32",
               meta={"concepts": ["cat", "sofa", "background"], "concept_blocks": [0, 1]})
    assert main(base + ["--out", str(tmp_path / "o2"), "--blocks", "1-2"]) == 0
    got = float(read_csv(tmp_path / "o2" / "per_image" / "r.csv")[0]["ap"])
    pb = arrays["concept_per_block_map"][0, 1].astype(np.float64)
    heat = _torch_bilinear(np.moveaxis(pb / pb.sum(axis=-1, keepdims=True), -1, 0), SIDE, SIDE)[0]
    gt = np.zeros((SIDE, SIDE), bool)
    gt[:16, :16] = True
    assert got == pytest.approx(_ap_brute(heat, gt), abs=1e-6)
    # --steps without per-step concept maps: the image is listed as skipped for the concept methods
    assert main(base[:-1] + ["concept,daam", "--out", str(tmp_path / "o3"), "--steps", "0"]) == 0
    assert {r["method"] for r in read_csv(tmp_path / "o3" / "summary.csv")} == {"daam"}
    assert [r["reason"] for r in read_csv(tmp_path / "o3" / "skipped.csv")] == [
        "concept, concept-argmax not scored: the dump kept no per-step concept maps (concept_per_step_map; "
        "dump with --save-step-maps) for --steps"]
    # --blocks without per-block concept maps: skipped likewise
    arrays.pop("concept_per_block_map")
    write_dump(tmp_path / "r", layout, arrays, image_size=(SIDE, SIDE), store_dtype="float32",
               meta={"concepts": ["cat", "sofa", "background"]})
    assert main(base[:-1] + ["concept,daam", "--out", str(tmp_path / "o4"), "--blocks", "1"]) == 0
    assert "kept no per-block concept maps" in read_csv(tmp_path / "o4" / "skipped.csv")[0]["reason"]
    capsys.readouterr()


def test_concept_steps_score_the_chosen_steps_maps(tmp_path, capsys):
    """--steps with concept_per_step_map: the chosen step's concept map alone (here cat top-left at
    step 0, bottom-right at step 1), renormalised over the concepts, against a brute-force AP."""
    layout = make_layout(["a cat on a sofa"], clip_len=77, t5_len=16)
    arrays = random_arrays(layout, num_blocks=3, num_steps=2, grid=GRID)
    arrays["per_step_token_map"] = np.repeat(arrays["sum_token_map"][:, None] / 2, 2, axis=1)
    logits = np.zeros((1, 4, 4, 3, 2))
    logits[0, :2, :2, 0, 0] = 5.0
    logits[0, 2:, 2:, 0, 1] = 5.0
    extra, keys = concept_arrays(1, ["cat", "sofa", "background"], 3, 2, GRID, nan_blocks=(2,), logits=logits,
                                 step_maps=True)
    arrays.update(extra)
    write_dump(tmp_path / "r", layout, arrays, image_size=(SIDE, SIDE), meta=keys, store_dtype="float32")
    gt = box_mask(str(tmp_path / "m" / "r" / "cat.png"), slice(0, 16), slice(0, 16))
    base = ["--dumps", str(tmp_path / "r"), "--masks", str(tmp_path / "m"), "--no-progress", "--methods", "concept"]
    aps = {}
    for step in (0, 1):
        out = tmp_path / f"s{step}"
        assert main(base + ["--out", str(out), "--steps", str(step)]) == 0, capsys.readouterr().err
        aps[step] = float(read_csv(out / "per_image" / "r.csv")[0]["ap"])
        ps = arrays["concept_per_step_map"][0, step].astype(np.float64)
        heat = _torch_bilinear(np.moveaxis(ps / ps.sum(axis=-1, keepdims=True), -1, 0), SIDE, SIDE)[0]
        assert aps[step] == pytest.approx(_ap_brute(heat, gt), abs=1e-6)
    assert aps[0] > 0.9 > 0.5 > aps[1]  # the planted step finds the cat, the other does not
    # both steps: their maps summed, as the average over all steps and chosen blocks
    assert main(base + ["--out", str(tmp_path / "both"), "--steps", "0-1"]) == 0
    mean = arrays["concept_sum_map"][0].astype(np.float64) / float(arrays["concept_N"])
    heat = _torch_bilinear(np.moveaxis(mean, -1, 0), SIDE, SIDE)[0]
    assert float(read_csv(tmp_path / "both" / "per_image" / "r.csv")[0]["ap"]) == pytest.approx(_ap_brute(heat, gt), abs=1e-6)
    capsys.readouterr()
