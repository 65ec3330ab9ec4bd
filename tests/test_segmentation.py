"""Zero-shot segmentation: metrics against brute-force references, mask reading, and the command end to end."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from synthetic_dump import make_layout, random_arrays, write_dump, write_runs

from attention_map_diffusers.analysis.dumpfile import load_dump
from attention_map_diffusers.contract import UserError
from attention_map_diffusers.segmentation import masks as gtmod
from attention_map_diffusers.segmentation.cli import build_parser, main
from attention_map_diffusers.segmentation.maps import centre_prior, encoder_word_maps, phrase_map, upsample
from attention_map_diffusers.segmentation.metrics import (
    argmax_labels,
    average_precision,
    iou,
    minmax,
    multiclass_accuracy,
    pixel_accuracy,
)

GRID, SIDE = (8, 8), 64  # 8x8 grid, 64x64 image: one grid cell is 8x8 pixels
REGION = (slice(2, 6), slice(1, 4))  # grid cells of the planted word
PIXELS = (slice(16, 48), slice(8, 32))  # the same region in image pixels


# ---------------------------------------------------------------------------------------------
# metrics


def _ap_brute(score, gt):
    """Mean over positives of the precision among the pixels scoring at least as high."""
    s, g = score.ravel(), gt.ravel().astype(bool)
    precisions = []
    for i in range(s.size):
        if g[i]:
            above = [j for j in range(s.size) if s[j] >= s[i]]
            precisions.append(sum(g[j] for j in above) / len(above))
    return float(np.mean(precisions))


def _ap_pr_curve(score, gt):
    """Sum over the distinct thresholds (high to low) of (recall gain) x precision."""
    s, g = score.ravel(), gt.ravel().astype(bool)
    ap, last_recall = 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        pred = s >= t
        tp = np.sum(pred & g)
        precision, recall = tp / np.sum(pred), tp / np.sum(g)
        ap += (recall - last_recall) * precision
        last_recall = recall
    return ap


def test_iou_and_pixel_accuracy_match_pixel_loops():
    rng = np.random.default_rng(1)
    for _ in range(20):
        p, g, v = (rng.random((7, 9)) < q for q in (0.4, 0.3, 0.8))
        inter = union = right = total = 0
        for y in range(7):
            for x in range(9):
                if not v[y, x]:
                    continue
                inter += p[y, x] and g[y, x]
                union += p[y, x] or g[y, x]
                right += p[y, x] == g[y, x]
                total += 1
        assert iou(p, g, v) == pytest.approx(inter / union if union else 1.0)
        assert pixel_accuracy(p, g, v) == pytest.approx(right / total)
    assert iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0


def test_average_precision_matches_brute_force_and_the_pr_curve():
    rng = np.random.default_rng(2)
    for trial in range(30):
        # integer scores: many ties; floats: none
        score = rng.integers(0, 5, size=(6, 7)).astype(float) if trial % 2 else rng.random((6, 7))
        gt = rng.random((6, 7)) < 0.35
        gt[0, 0] = True
        ref = _ap_brute(score, gt)
        assert average_precision(score, gt) == pytest.approx(ref, abs=1e-12)
        assert average_precision(score, gt) == pytest.approx(_ap_pr_curve(score, gt), abs=1e-12)
        # the order of tied pixels does not matter
        perm = rng.permutation(score.size)
        assert average_precision(score.ravel()[perm], gt.ravel()[perm]) == pytest.approx(ref, abs=1e-12)
        v = rng.random((6, 7)) < 0.7
        v[0, 0] = True
        assert average_precision(score, gt, v) == pytest.approx(_ap_brute(score[v], gt[v]), abs=1e-12)
    # by hand: ranks 1 (pos), 2 (neg), 3 (pos), 4 (neg) -> (1/1 + 2/3) / 2
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    # a constant map: every pixel enters at once, AP = the positive rate
    assert average_precision(np.ones(10), np.arange(10) < 3) == pytest.approx(0.3)
    assert np.isnan(average_precision(np.ones(4), np.zeros(4, bool)))


def test_argmax_assignment_and_multiclass_accuracy_match_per_pixel_loops():
    rng = np.random.default_rng(3)
    maps = rng.random((3, 6, 5))
    maps[:, 0, 0] = 0.7  # a three-way tie: the first word wins
    gts = rng.random((3, 6, 5)) < 0.3
    valid = rng.random((6, 5)) < 0.9
    labels = argmax_labels(maps, 0.5)
    right = total = 0
    for y in range(6):
        for x in range(5):
            vals = list(maps[:, y, x])
            best = vals.index(max(vals))
            want = best if max(vals) >= 0.5 else -1
            assert labels[y, x] == want
            if valid[y, x]:
                total += 1
                covering = [k for k in range(3) if gts[k, y, x]]
                right += (want in covering) if want >= 0 else not covering
    assert multiclass_accuracy(labels, gts, valid) == pytest.approx(right / total)
    assert (argmax_labels(np.zeros((0, 2, 2)), 0.4) == -1).all()


def test_minmax_and_upsample_and_centre_prior():
    assert (minmax(np.full((3, 3), 2.0)) == 0).all()
    m = minmax(np.array([[1.0, 3.0], [2.0, 5.0]]))
    assert m.min() == 0 and m.max() == 1 and m[0, 1] == pytest.approx(0.5)
    # bilinear with aligned pixel centres: the same as Pillow's float resize (an independent implementation)
    grid = np.random.default_rng(4).random((5, 7)).astype(np.float32)
    pil = np.asarray(Image.fromarray(grid, mode="F").resize((21, 15), Image.BILINEAR))
    np.testing.assert_allclose(upsample(grid, 15, 21), pil, atol=1e-5)
    prior = centre_prior(40, 80)
    for y, x in ((0, 0), (13, 57), (39, 79)):
        dy, dx = (y + 0.5 - 20) / 10, (x + 0.5 - 40) / 20  # sigma = a quarter of each side
        assert prior[y, x] == pytest.approx(np.exp(-(dy * dy + dx * dx) / 2))
    assert prior[19:21, 39:41].min() == pytest.approx(prior.max())


# ---------------------------------------------------------------------------------------------
# maps of the words


def make_run(folder, prompt, plant=(), *, grid=GRID, image_size=(SIDE, SIDE), seed=0, block=None, step=None, meta=None,
             extra=None, blocks=2, steps=3):
    """A synthetic run whose maps put ``plant`` words (word, rows, cols) on known grid cells.

    ``block`` / ``step``: also keep per-block / per-step maps, with the planted attention only in that
    block / step (the others random)."""
    layout = make_layout([prompt], clip_len=77, t5_len=16)
    arrays = random_arrays(layout, num_blocks=blocks, num_steps=steps, grid=grid, seed=seed)
    N = float(arrays["N"])
    bump = np.zeros_like(arrays["sum_token_map"])
    for word, rows, cols in plant:
        for enc in ("clip", "t5"):
            bump[0, rows, cols, layout.positions(enc, 0, word)] += 5.0
    base = arrays["sum_token_map"] / N
    if block is not None:
        pbm = np.repeat(base[:, None], blocks, axis=1) * (N / blocks)
        pbm[:, block] += bump * (N / blocks)
        arrays["per_block_token_map"] = pbm.astype(np.float32)
    if step is not None:
        psm = np.repeat(base[:, None], steps, axis=1) * (N / steps)
        psm[:, step] += bump * (N / steps)
        arrays["per_step_token_map"] = psm.astype(np.float32)
    if block is None and step is None:
        arrays["sum_token_map"] = (arrays["sum_token_map"] + bump * N).astype(np.float32)
    arrays.update(extra or {})
    write_dump(folder, layout, arrays, image_size=(image_size[1], image_size[0]), meta=meta)
    return layout


def box_mask(path, shape=(SIDE, SIDE), pixels=PIXELS, value=255):
    m = np.zeros(shape, np.uint8)
    m[pixels] = value
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(m).save(path)
    return m > 0


def test_encoder_word_maps_are_the_dumps_word_maps_and_phrases_sum_occurrences(tmp_path):
    make_run(tmp_path / "r", "a cat and a potted plant and a cat", [("cat", REGION[0], REGION[1])])
    dump = load_dump(str(tmp_path / "r"))
    for enc in ("clip", "t5"):
        words, maps = encoder_word_maps(dump, 0, enc, dump.avg_map[0])
        ref_words, ref = dump.word_maps(0, enc)
        assert words == ref_words
        np.testing.assert_array_equal(maps, ref)
        texts = [w.text for w in words]
        cats = [i for i, t in enumerate(texts) if t == "cat"]
        np.testing.assert_allclose(phrase_map(words, maps, ["Cat"]), maps[cats[0]] + maps[cats[1]])
        pot, plant = texts.index("potted"), texts.index("plant")
        np.testing.assert_allclose(phrase_map(words, maps, ["pottedplant", "potted plant"]), (maps[pot] + maps[plant]) / 2)
        assert phrase_map(words, maps, ["dog"]) is None
        # a mask file named potted_plant.png names the phrase
        np.testing.assert_array_equal(phrase_map(words, maps, ["potted_plant"]), phrase_map(words, maps, ["potted plant"]))


# ---------------------------------------------------------------------------------------------
# masks


def test_crop_box_and_nearest_resize_match_pillow():
    rng = np.random.default_rng(5)
    mask = rng.integers(0, 4, size=(37, 53)).astype(np.uint8)
    for box, (H, W) in (((5, 3, 45, 30), (64, 64)), ((0, 0, 53, 37), (20, 31)), ((10, 2, 13, 9), (16, 48))):
        ref = np.asarray(Image.fromarray(mask).crop(box).resize((W, H), Image.NEAREST))
        got = gtmod.fit_mask(mask, (H, W), box, "m.png", source_hw=(37, 53))
        np.testing.assert_array_equal(got, ref)
    with pytest.raises(UserError, match="source image was 60x37"):
        gtmod.fit_mask(mask, (8, 8), (0, 0, 4, 4), "m.png", source_hw=(37, 60))
    with pytest.raises(UserError, match="crop box"):
        gtmod.fit_mask(mask, (8, 8), (0, 0, 99, 4), "m.png")
    with pytest.raises(UserError, match="is 53x37 .* image is 8x8"):
        gtmod.fit_mask(mask, (8, 8), None, "m.png")


def voc_png(path, labels):
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    palette = [0] * 768
    for i in range(256):  # VOC-like: distinct colours, void white
        palette[3 * i: 3 * i + 3] = [(i * 37) % 256, (i * 91) % 256, (i * 53) % 256]
    palette[765:768] = [255, 255, 255]
    img.putpalette(palette)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)


def test_voc_palette_png_reads_class_indices_not_colours(tmp_path):
    labels = np.zeros((10, 12), np.uint8)
    labels[2:5, 3:9] = 8
    labels[6:9, 1:4] = 16
    labels[0, :] = 255
    voc_png(str(tmp_path / "x.png"), labels)
    assert Image.open(tmp_path / "x.png").mode == "P"
    np.testing.assert_array_equal(gtmod.read_label_mask(str(tmp_path / "x.png")), labels)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(UserError, match="not a class-index PNG"):
        gtmod.read_label_mask(str(tmp_path / "rgb.png"))


def test_classes_file_with_phrases(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("background\ncat\npottedplant: potted plant | houseplant\n\nsofa\n")
    classes = gtmod.read_classes(str(path))
    assert [c.name for c in classes] == ["background", "cat", "pottedplant", "", "sofa"]
    assert classes[2].phrases == ("pottedplant", "potted plant", "houseplant")
    assert gtmod.builtin_classes()[16].phrases[:2] == ("pottedplant", "potted plant")
    assert len(gtmod.builtin_classes()) == 21
    (tmp_path / "bad.txt").write_text("cat: ...\n")
    with pytest.raises(UserError, match="has no word"):
        gtmod.read_classes(str(tmp_path / "bad.txt"))


# ---------------------------------------------------------------------------------------------
# the command end to end


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def summary(out):
    return {(r["method"], r["encoder"]): r for r in read_csv(os.path.join(out, "summary.csv"))}


def run_main(args, capsys):
    code = main([*map(str, args), "--no-progress"])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_planted_word_is_found_by_daam_and_argmax_and_baselines_score_lower(tmp_path, capsys):
    dumps, masks, out = tmp_path / "dumps", tmp_path / "masks", tmp_path / "seg"
    runs = []
    for r, (prompt, word) in enumerate((("a red circle next to a blue square", "circle"), ("a cat on a sofa", "cat"))):
        folder = f"{r:04d}-run"
        make_run(dumps / folder, prompt, [(word, REGION[0], REGION[1])], seed=r)
        box_mask(str(masks / folder / f"{word.upper()}.png"))  # case-insensitive word
        runs.append({"run": r, "folder": folder, "prompt": [prompt], "seed": 42, "status": "done"})
    write_runs(dumps, runs)
    code, stdout, err = run_main(["--dumps", dumps, "--masks", masks, "--out", out], capsys)
    assert code == 0, err
    s = summary(out)
    assert set(s) == {(m, e) for m in ("daam", "argmax", "whole", "centre", "random") for e in ("clip", "t5", "both")}
    for enc in ("clip", "t5", "both"):
        for m in ("daam", "argmax"):
            assert float(s[(m, enc)]["mIoU"]) > 0.7 and float(s[(m, enc)]["mAP"]) > 0.9
            assert int(s[(m, enc)]["n"]) == 2 and int(s[(m, enc)]["images"]) == 2
            for b in ("whole", "centre", "random"):
                assert float(s[(m, enc)]["mIoU"]) > float(s[(b, enc)]["mIoU"]) + 0.3
                assert float(s[(m, enc)]["mAP"]) > float(s[(b, enc)]["mAP"]) + 0.3
        # the whole image: IoU = AP = the mask's share of the image (32 x 24 of 64 x 64)
        share = 32 * 24 / 64 / 64
        for col in ("mIoU", "mAP", "word_pixel_acc"):
            assert float(s[("whole", enc)][col]) == pytest.approx(share, abs=1e-6)
    rows = read_csv(out / "per_image" / "0000-run.csv")
    assert len(rows) == 15 and {r["word"] for r in rows} == {"circle"}
    assert all(int(r["gt_px"]) == 32 * 24 for r in rows)
    # one concept and --bg-threshold = --tau: argmax and daam predict the same pixels
    by = {(r["method"], r["encoder"]): r for r in rows}
    assert by[("argmax", "both")]["iou"] == by[("daam", "both")]["iou"]
    for name in ("summary.png", "cases.png", "skipped.csv"):
        assert (out / name).is_file()
    assert "daam" in stdout and "(baseline)" in stdout
    # a second evaluation into the same folder replaces the first (written by this tool)
    code, _, err = run_main(["--dumps", dumps, "--masks", masks, "--out", out, "--methods", "daam", "--encoder", "t5"], capsys)
    assert code == 0, err
    assert set(summary(out)) == {("daam", "t5")}


def test_argmax_separates_two_planted_words(tmp_path, capsys):
    prompt = "a dog and a ball"
    make_run(tmp_path / "r", prompt, [("dog", slice(0, 4), slice(0, 4)), ("ball", slice(4, 8), slice(4, 8))])
    box_mask(str(tmp_path / "m" / "r" / "dog.png"), pixels=(slice(0, 32), slice(0, 32)))
    box_mask(str(tmp_path / "m" / "r" / "ball.png"), pixels=(slice(32, 64), slice(32, 64)))
    code, _, err = run_main(["--dumps", tmp_path / "r", "--masks", tmp_path / "m", "--out", tmp_path / "o",
                             "--methods", "argmax,whole"], capsys)
    assert code == 0, err
    s = summary(tmp_path / "o")
    assert float(s[("argmax", "both")]["mIoU"]) > 0.8
    assert float(s[("argmax", "both")]["image_pixel_acc"]) > 0.8  # multi-class, background included
    assert s[("whole", "both")]["image_pixel_acc"] == ""  # argmax only: one meaning per column
    assert float(s[("whole", "both")]["mIoU"]) == pytest.approx(0.25)


def test_voc_masks_void_ignored_class_phrases_and_skipped_classes(tmp_path, capsys):
    prompt = "a potted plant next to a cat"
    make_run(tmp_path / "runs" / "img1", prompt, [("plant", REGION[0], REGION[1]), ("potted", REGION[0], REGION[1])])
    labels = np.zeros((SIDE, SIDE), np.uint8)
    labels[PIXELS] = 16  # pottedplant
    labels[50:60, 40:60] = 12  # dog: in the mask, not in the prompt
    labels[0:8, :] = 255  # void
    voc_png(str(tmp_path / "voc" / "img1.png"), labels)
    code, stdout, err = run_main(["--dumps", tmp_path / "runs", "--masks", tmp_path / "voc", "--voc",
                                  "--out", tmp_path / "o", "--encoder", "clip"], capsys)
    assert code == 0, err
    rows = {(r["method"], r["word"]): r for r in read_csv(tmp_path / "o" / "per_image" / "img1.csv")}
    assert {w for _, w in rows} == {"pottedplant"}
    valid = SIDE * SIDE - 8 * SIDE
    whole = rows[("whole", "pottedplant")]
    # void pixels take no part: the whole image predicts the valid pixels only
    assert int(whole["pred_px"]) == valid and int(whole["gt_px"]) == 32 * 24
    assert float(whole["iou"]) == pytest.approx(32 * 24 / valid, abs=1e-6)
    assert float(whole["ap"]) == pytest.approx(32 * 24 / valid, abs=1e-6)
    assert float(whole["word_pixel_acc"]) == pytest.approx(32 * 24 / valid, abs=1e-6)
    assert float(rows[("daam", "pottedplant")]["iou"]) > float(whole["iou"]) + 0.4
    skipped = read_csv(tmp_path / "o" / "skipped.csv")
    assert [(r["key"], r["name"], r["reason"]) for r in skipped] == [("img1", "dog", "in the mask, not in the prompt")]
    assert "skipped: 1 x in the mask, not in the prompt" in stdout
    # a classes file: a phrase names the class; a label beyond its lines is an error
    (tmp_path / "classes.txt").write_text("\n".join(["background"] + ["x"] * 15 + ["pot: potted plant"]) + "\n")
    code, _, err = run_main(["--dumps", tmp_path / "runs", "--masks", tmp_path / "voc", "--voc", "--classes",
                             tmp_path / "classes.txt", "--out", tmp_path / "o2", "--encoder", "clip"], capsys)
    assert code == 0, err
    rows2 = {(r["method"], r["word"]): r for r in read_csv(tmp_path / "o2" / "per_image" / "img1.csv")}
    assert rows2[("daam", "pot")]["iou"] == rows[("daam", "pottedplant")]["iou"]
    assert [r["name"] for r in read_csv(tmp_path / "o2" / "skipped.csv")] == ["x"]
    (tmp_path / "short.txt").write_text("background\ncat\n")
    code, _, err = run_main(["--dumps", tmp_path / "runs", "--masks", tmp_path / "voc", "--voc", "--classes",
                             tmp_path / "short.txt", "--out", tmp_path / "o3"], capsys)
    assert code == 2 and "has label 12 but there are only 2 classes" in err and not (tmp_path / "o3").exists()


def test_image_mode_dump_crops_the_source_mask(tmp_path, capsys):
    # source image 200x100 (WxH); the model saw the square [50, 0, 150, 100] resized to 64x64
    meta = {"mode": "image", "source_image": {"name": "My Cat.jpg", "path": "/nowhere/My Cat.jpg", "sha256": "0" * 64,
                                               "size": [200, 100], "crop_box": [50, 0, 150, 100]},
            "noise_levels": [0.7, 0.5, 0.3]}
    make_run(tmp_path / "0000-a-cat", "a cat on a sofa", [("cat", REGION[0], REGION[1])], meta=meta)
    src = np.zeros((100, 200), np.uint8)
    src[25:75, 50 + 12:50 + 50] = 1  # image rows 16:48, cols 8:32 in source pixels (scale 100/64)
    os.makedirs(tmp_path / "m" / "My Cat")
    Image.fromarray(src * 255).save(tmp_path / "m" / "My Cat" / "cat.png")
    code, _, err = run_main(["--dumps", tmp_path / "0000-a-cat", "--masks", tmp_path / "m", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    rows = {(r["method"], r["encoder"]): r for r in read_csv(tmp_path / "o" / "per_image" / "My Cat.csv")}
    ref = np.asarray(Image.fromarray(src).crop((50, 0, 150, 100)).resize((64, 64), Image.NEAREST)) > 0
    assert int(rows[("whole", "clip")]["gt_px"]) == int(ref.sum())
    assert float(rows[("daam", "both")]["iou"]) > 0.7
    # the folder's name as key instead: no masks under it
    code, _, err = run_main(["--dumps", tmp_path / "0000-a-cat", "--masks", tmp_path / "m", "--out", tmp_path / "o3",
                             "--key-from", "folder"], capsys)
    assert code == 2 and "no ground truth" in err and "0000-a-cat" in err
    # a mask of another size than the source image
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "m" / "My Cat" / "cat.png")
    code, _, err = run_main(["--dumps", tmp_path / "0000-a-cat", "--masks", tmp_path / "m", "--out", tmp_path / "o2"], capsys)
    assert code == 2 and "source image was 200x100" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o2").exists()


def test_blocks_and_steps_select_the_planted_maps(tmp_path, capsys):
    make_run(tmp_path / "b", "a cat on a sofa", [("cat", REGION[0], REGION[1])], block=1, blocks=3)
    make_run(tmp_path / "s", "a cat on a sofa", [("cat", REGION[0], REGION[1])], step=2, steps=4)
    for name in ("b", "s"):
        box_mask(str(tmp_path / "m" / name / "cat.png"))

    def miou(run, *flags):
        out = tmp_path / ("o-" + run + "".join(flags).replace(" ", ""))
        code, _, err = run_main(["--dumps", tmp_path / run, "--masks", tmp_path / "m", "--out", out,
                                 "--methods", "daam", "--encoder", "both", *flags], capsys)
        assert code == 0, err
        row = summary(out)[("daam", "both")]
        return float(row["mIoU"]), row["selection"]

    hit, sel = miou("b", "--blocks", "1")
    assert sel == "blocks 1"
    assert hit > 0.7 and miou("b", "--blocks", "0,2")[0] < hit - 0.3
    hit, sel = miou("s", "--steps", "2-3")
    assert sel == "steps 2-3"
    assert hit > 0.7 and miou("s", "--steps", "0-1")[0] < hit - 0.3
    code, _, err = run_main(["--dumps", tmp_path / "s", "--masks", tmp_path / "m", "--out", tmp_path / "x", "--steps", "9"], capsys)
    assert code == 2 and "step 9" in err


def test_flux_dump_has_t5_only(tmp_path, capsys):
    layout = make_layout(["a cat on a sofa"], clip_len=77, t5_len=16)
    arrays = random_arrays(layout, grid=GRID)
    arrays["sum_token_map"][0, REGION[0], REGION[1], layout.positions("t5", 0, "cat")] += 5.0 * float(arrays["N"])
    write_dump(tmp_path / "f", layout, arrays, meta={
        "model_family": "flux", "text_spans": {"t5": [77, layout.T]}, "tokens": None, "special_mask": None,
        "token_offsets_clip": None})
    box_mask(str(tmp_path / "m" / "f" / "cat.png"))
    code, _, err = run_main(["--dumps", tmp_path / "f", "--masks", tmp_path / "m", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert {e for _, e in summary(tmp_path / "o")} == {"t5"}
    code, _, err = run_main(["--dumps", tmp_path / "f", "--masks", tmp_path / "m", "--out", tmp_path / "o2", "--encoder", "both"], capsys)
    assert code == 2 and "has no clip tokens" in err and not (tmp_path / "o2").exists()


@pytest.mark.parametrize(
    "case, flags, message",
    [
        ("no masks folder", ["--masks", "{tmp}/nowhere"], "--masks .* is not a folder"),
        ("mask size", [], "is 32x32 \\(WxH\\) but the image is 64x64"),
        ("unknown word", [], "'zebra', which is not a word of the prompt"),
        ("blocks without block maps", ["--blocks", "0-1"], "--save-block-maps"),
        ("steps without step maps", ["--steps", "0"], "--save-step-maps"),
        ("bad tau", ["--tau", "1.5"], "--tau must be between 0 and 1"),
        ("bad method", ["--methods", "daam,grabcut"], "'grabcut' is not one of"),
        ("classes without voc", ["--classes", "x.txt"], "add --voc"),
        ("bad blocks", ["--blocks", "3-1"], "--blocks: '3-1'"),
        ("image mode without source_image", [], "mode \"image\" but has no source_image"),
        ("key from image of a generated image", ["--key-from", "image"], "is not a dump of a given image"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_output(tmp_path, capsys, case, flags, message):
    meta = {"mode": "image"} if case == "image mode without source_image" else None
    make_run(tmp_path / "r", "a cat on a sofa", [("cat", REGION[0], REGION[1])], meta=meta)
    if case == "mask size":
        box_mask(str(tmp_path / "m" / "r" / "cat.png"), shape=(32, 32), pixels=(slice(0, 8), slice(0, 8)))
    else:
        box_mask(str(tmp_path / "m" / "r" / "cat.png"))
    if case == "unknown word":
        box_mask(str(tmp_path / "m" / "r" / "zebra.png"))
    args = ["--dumps", tmp_path / "r", "--masks", tmp_path / "m", "--out", tmp_path / "o"]
    args += [f.replace("{tmp}", str(tmp_path)) for f in flags]
    code, out, err = run_main(args, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("evaluate_segmentation.py: error:")
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "o").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".o.")]  # no temporary folder left


def test_out_folder_of_someone_else_is_refused_unless_overwrite(tmp_path, capsys):
    make_run(tmp_path / "r", "a cat on a sofa", [("cat", REGION[0], REGION[1])])
    box_mask(str(tmp_path / "m" / "r" / "cat.png"))
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    args = ["--dumps", tmp_path / "r", "--masks", tmp_path / "m", "--out", tmp_path / "o"]
    code, _, err = run_main(args, capsys)
    assert code == 2 and "--overwrite" in err and os.listdir(tmp_path / "o") == ["notes.txt"]
    code, _, err = run_main([*args, "--overwrite"], capsys)
    assert code == 0, err
    assert (tmp_path / "o" / "notes.txt").read_text() == "mine" and (tmp_path / "o" / "summary.csv").is_file()


def test_help_documents_every_flag(capsys):
    parser = build_parser()
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    assert len(flags) >= 16
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings
    for flag in flags:
        assert flag in text
    assert "PascalVOC" in text and "crop_box" in text


@pytest.mark.slow
def test_script_runs_as_a_subprocess(tmp_path):
    make_run(tmp_path / "r", "a cat on a sofa", [("cat", REGION[0], REGION[1])])
    box_mask(str(tmp_path / "m" / "r" / "cat.png"))
    res = subprocess.run([sys.executable, str(ROOT / "evaluate_segmentation.py"), "--dumps", str(tmp_path / "r"),
                          "--masks", str(tmp_path / "m"), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "mIoU" in res.stdout and (tmp_path / "o" / "summary.csv").is_file()


def test_summary_means_pairs_classes_and_argmax_images():
    from types import SimpleNamespace

    from attention_map_diffusers.segmentation.evaluate import Score
    from attention_map_diffusers.segmentation.tables import summarise

    S = lambda key, method, word, v, acc: Score(key, "t5", method, word, v, v / 2, acc, 1, 1)  # noqa: E731
    scores = [S("a", "daam", "cat", 0.9, 0.5), S("b", "daam", "cat", 0.7, 0.7), S("b", "daam", "Dog", 0.1, 0.9),
              S("a", "argmax", "cat", 0.8, 0.6), S("b", "argmax", "cat", 0.4, 0.2), S("b", "argmax", "dog", 0.0, 0.1)]
    images = [SimpleNamespace(key="a", argmax_acc={"t5": 0.75}), SimpleNamespace(key="b", argmax_acc={"t5": 0.25})]
    rows = {r.method: r for r in summarise(scores, ("daam", "argmax", "whole"), ("t5",), "all", images)}
    assert set(rows) == {"daam", "argmax"}
    d, a = rows["daam"], rows["argmax"]
    assert (d.n, d.images) == (3, 2)
    assert d.miou == pytest.approx((0.9 + 0.7 + 0.1) / 3)
    assert d.miou_se == pytest.approx(np.sqrt(((0.9 - 17 / 30) ** 2 + (0.7 - 17 / 30) ** 2 + (0.1 - 17 / 30) ** 2) / 2 / 3))
    assert d.class_miou == pytest.approx(((0.9 + 0.7) / 2 + 0.1) / 2)  # words compared case-insensitively
    assert d.map == pytest.approx((0.45 + 0.35 + 0.05) / 3)
    assert d.word_pixel_acc == pytest.approx((0.5 + 0.7 + 0.9) / 3) and np.isnan(d.image_pixel_acc)
    assert a.word_pixel_acc == pytest.approx((0.6 + 0.2 + 0.1) / 3)  # each word's own mask
    assert a.image_pixel_acc == pytest.approx((0.75 + 0.25) / 2)  # one multi-class accuracy per image
    assert a.class_miou == pytest.approx(((0.8 + 0.4) / 2 + 0.0) / 2)


@pytest.mark.parametrize("side, message", [(30000, "Image size (900000000 pixels)"), (10000, "more than the 89,478,485 pixels")])
def test_mask_past_the_pixel_limit_is_one_line_exit_2(tmp_path, capsys, side, message):
    """A small PNG declaring 30000 x 30000 pixels (Pillow raises) or 10000 x 10000 (Pillow only warns)."""
    from image_files import bomb_png

    make_run(tmp_path / "r", "a cat on a sofa", [("cat", REGION[0], REGION[1])])
    os.makedirs(tmp_path / "m" / "r")
    bomb_png(tmp_path / "m" / "r" / "cat.png", side, side)
    code, _, err = run_main(["--dumps", tmp_path / "r", "--masks", tmp_path / "m", "--out", tmp_path / "o"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cat.png" in err and message in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("orientation", [6, 8])
def test_masks_stored_sideways_with_exif_are_read_upright(tmp_path, capsys, orientation):
    """A mask saved sideways with the EXIF tag that turns it upright (as a phone writes a photo) is the
    upright mask: binary and VOC masks read back as the array drawn, and the scores are the same."""
    from image_files import with_orientation

    labels = np.zeros((10, 14), np.uint8)
    labels[2:5, 3:9], labels[6:9, 1:4], labels[0, :] = 8, 16, 255
    voc_png(str(tmp_path / "up.png"), labels)
    stored = with_orientation(Image.open(tmp_path / "up.png"), orientation)
    assert stored.mode == "P" and stored.size == (10, 14)
    stored.save(tmp_path / "side.png", exif=stored.info["exif"])
    np.testing.assert_array_equal(gtmod.read_label_mask(str(tmp_path / "side.png")), labels)
    np.testing.assert_array_equal(gtmod.read_binary_mask(str(tmp_path / "side.png")), labels != 0)
    # end to end: the upright mask and the sideways one of the same drawing score the same
    make_run(tmp_path / "r", "a cat on a sofa", [("cat", REGION[0], REGION[1])])
    gt = box_mask(str(tmp_path / "m1" / "r" / "cat.png"))
    side = with_orientation(Image.fromarray(gt.astype(np.uint8) * 255), orientation)
    os.makedirs(tmp_path / "m2" / "r")
    side.save(tmp_path / "m2" / "r" / "cat.png", exif=side.info["exif"])
    got = []
    for m in ("m1", "m2"):
        code, _, err = run_main(["--dumps", tmp_path / "r", "--masks", tmp_path / m, "--out", tmp_path / f"o{m}"], capsys)
        assert code == 0, err
        got.append(read_csv(tmp_path / f"o{m}" / "per_image" / "r.csv"))
    assert got[0] == got[1] and float(got[0][0]["iou"]) > 0.7


def test_one_meaning_per_column_and_argmax_accuracy_once_per_image(tmp_path, capsys):
    """per_image: each row's word_pixel_acc is its own mask's accuracy (argmax rows too), recomputed from
    its IoU and pixel counts; images.csv: argmax's multi-class accuracy once per image and encoder,
    recomputed from the kept predicted masks; summary: standard errors from the per-image rows; the
    terminal shows percent and each baseline once."""
    from attention_map_diffusers.segmentation.evaluate import evaluate_run
    from attention_map_diffusers.segmentation.cli import options_from_args

    prompt = "a dog and a ball"
    for run, seed in (("r1", 0), ("r2", 1)):
        make_run(tmp_path / "d" / run, prompt, [("dog", slice(0, 4), slice(0, 4)), ("ball", slice(4, 8), slice(4, 8))], seed=seed)
        box_mask(str(tmp_path / "m" / run / "dog.png"), pixels=(slice(0, 32), slice(0, 24)))
        box_mask(str(tmp_path / "m" / run / "ball.png"), pixels=(slice(40, 64), slice(32, 64)))
    argv = ["--dumps", tmp_path / "d", "--masks", tmp_path / "m", "--out", tmp_path / "o"]
    code, stdout, err = run_main(argv, capsys)
    assert code == 0, err
    N = SIDE * SIDE
    ious = {}
    for run in ("r1", "r2"):
        for r in read_csv(tmp_path / "o" / "per_image" / f"{run}.csv"):
            i, p, g = float(r["iou"]), int(r["pred_px"]), int(r["gt_px"])
            inter = i * (p + g) / (1 + i)  # |P & G| from IoU = I / (P + G - I)
            assert float(r["word_pixel_acc"]) == pytest.approx((N - p - g + 2 * inter) / N, abs=1e-5), r
            ious.setdefault((r["method"], r["encoder"]), []).append(i)
    images = read_csv(tmp_path / "o" / "images.csv")
    assert [(r["key"], r["encoder"], r["words"]) for r in images] == [
        (k, e, "2") for k in ("r1", "r2") for e in ("clip", "t5", "both")]
    args = build_parser().parse_args([str(a) for a in argv])
    for run in ("r1", "r2"):
        im = evaluate_run(str(tmp_path / "d" / run), options_from_args(args), None, keep=True).images[0]
        for enc in ("clip", "t5", "both"):
            preds = [im.maps[(enc, "argmax", w)][0] for w in ("dog", "ball")]
            gts = [next(c.gt for c in im.truth.concepts if c.name == w) for w in ("dog", "ball")]
            right = (~preds[0] & ~preds[1] & ~gts[0] & ~gts[1]) | (preds[0] & gts[0]) | (preds[1] & gts[1])
            got = next(float(r["image_pixel_acc"]) for r in images if r["key"] == run and r["encoder"] == enc)
            assert got == pytest.approx(right.mean(), abs=1e-6)
    s = summary(tmp_path / "o")
    for (m, e), vals in ious.items():
        assert float(s[(m, e)]["mIoU_se"]) == pytest.approx(np.std(vals, ddof=1) / np.sqrt(len(vals)), abs=1e-6)
        assert (s[(m, e)]["image_pixel_acc"] == "") == (m != "argmax")
    assert float(s[("argmax", "t5")]["image_pixel_acc"]) == pytest.approx(
        np.mean([float(r["image_pixel_acc"]) for r in images if r["encoder"] == "t5"]), abs=1e-6)
    lines = stdout.splitlines()
    assert lines[0].startswith("in % (the CSV files hold fractions)")
    for b in ("whole", "centre", "random"):
        mine = [ln for ln in lines if ln.startswith(b + " ")]
        assert len(mine) == 1 and mine[0].split()[1] == "none" and mine[0].endswith("(baseline)")
    whole = next(ln for ln in lines if ln.startswith("whole "))
    assert whole.split()[3] == f"{100 * float(s[('whole', 't5')]['mIoU']):.1f}"  # percent of the CSV's fraction
