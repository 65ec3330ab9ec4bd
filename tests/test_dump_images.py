"""The dump's image mode (--image): folders the analysis reads, maps against the float64 reference
for noise levels and for img2img, fitting of the image, resume, and bad images refused up front."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import analyse_stepavg
import sd_35_stepavg_dump as dump
from attention_map_diffusers.dump.image_run import run_image
from attention_map_diffusers.dump.loading import Placement
from attention_map_diffusers.dump.runs import Run
from attention_map_diffusers.dump.source_images import cover_crop_box, read_source
from conftest import load_pipeline
from image_files import bomb_png
from reference import ReferenceTap, reference_aggregate
from test_dump import files_under

SMALL = ["--height", "64", "--width", "64", "--max-sequence-length", "16", "--device", "cpu"]


def _write_picture(path, size=(96, 80), mode="RGB"):
    """A red disc on the left and a blue square on the right, on grey (deterministic)."""
    w, h = size
    yy, xx = np.mgrid[:h, :w]
    img = np.full((h, w, 3), 200, np.uint8)
    img[(yy - h * 0.5) ** 2 + (xx - w * 0.3) ** 2 < (min(w, h) * 0.2) ** 2] = (220, 30, 30)
    img[int(h * 0.3): int(h * 0.7), int(w * 0.6): int(w * 0.9)] = (30, 60, 220)
    Image.fromarray(img).convert(mode).save(path)
    return str(path)


def test_cover_crop_box_and_fitting_match_an_independent_crop(tmp_path):
    assert cover_crop_box(200, 100, 64, 64) == (50.0, 0.0, 150.0, 100.0)
    assert cover_crop_box(100, 300, 64, 32) == (0.0, 125.0, 100.0, 175.0)
    assert cover_crop_box(64, 64, 64, 64) == (0.0, 0.0, 64.0, 64.0)
    path = _write_picture(tmp_path / "p.png", (200, 100))
    src = read_source(path, 64, 64)
    assert src.size == (200, 100) and src.crop_box == (50.0, 0.0, 150.0, 100.0)
    # the same as cropping first (integer box here) and resizing the crop, but for the outermost
    # pixels, where resizing with a box also reads the source just outside it
    expected = Image.open(path).convert("RGB").crop((50, 0, 150, 100)).resize((64, 64), Image.Resampling.BICUBIC)
    got, want = np.asarray(src.fitted).astype(int), np.asarray(expected).astype(int)
    np.testing.assert_array_equal(got[:, 3:-3], want[:, 3:-3])
    assert np.abs(got - want).max() <= 8
    # alpha is composited over white
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :20, 3] = 255  # left half opaque red, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    fitted = np.asarray(read_source(str(tmp_path / "a.png"), 32, 32).fitted)
    assert tuple(fitted[16, 2]) == (255, 0, 0) and tuple(fitted[16, 30]) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["noise-levels", "img2img"])
def test_image_run_matches_the_float64_reference(sd35m_pipe, tmp_path, mode):
    """run_image under an independent tap: the written npz equals the float64 reference of the
    transformer calls it made (noise levels: one per level; img2img: int(steps x strength))."""
    from attention_map_diffusers.dump.cli import build_parser, settings_from_args

    path = _write_picture(tmp_path / "pic.png")
    flags = ["--model", "x", "--steps", "4", "--guidance-scale", "3.0", "--height", "64", "--width", "64",
             "--max-sequence-length", "16", "--store-dtype", "float32"]
    args = build_parser().parse_args(flags)
    args.noise_levels, args.strength = ((0.8, 0.4), None) if mode == "noise-levels" else (None, 0.5)
    args.save_step_maps = mode == "noise-levels"
    settings = settings_from_args(args)
    out = tmp_path / "run"
    with ReferenceTap(sd35m_pipe.transformer) as tap:
        run_image(sd35m_pipe, Run(0, ("a red disc",), 7, "", path), settings, Placement("cpu", "float32"), str(out))
    ref = reference_aggregate(tap, cfg=True)
    z = np.load(out / "stepavg_token_maps_v1.npz")
    np.testing.assert_allclose(z["sum_token_map"] / z["N"], ref["sum_token_map"] / ref["N"], rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(z["per_block_step_token_mean"], ref["per_block_step_token_mean"], rtol=2e-4, atol=1e-5)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["mode"] == "image" and meta["source_image"]["name"] == "pic.png"
    assert meta["source_image"]["size"] == [96, 80] and meta["source_image"]["crop_box"] == [8.0, 0.0, 88.0, 80.0]
    if mode == "noise-levels":
        assert meta["noise_levels"] == [0.8, 0.4] and meta["timesteps"] == pytest.approx([800.0, 400.0])
        assert meta["num_steps"] == 2 and "per_step_token_map" in z.files
        assert meta["images"] == ["images/source-pic-64x64.png"]
        shown = np.asarray(Image.open(out / meta["images"][0]).convert("RGB"))
        np.testing.assert_array_equal(shown, np.asarray(read_source(path, 64, 64).fitted))
    else:
        assert meta["strength"] == 0.5 and meta["num_steps"] == 2  # int(4 x 0.5)
        assert meta["images"] == ["images/seed7-64x64-idx0.png"]
        assert os.path.isfile(out / meta["source_image"]["saved"])


def test_dump_then_analysis_and_resume(sd3_dir, tmp_path, capsys):
    a = _write_picture(tmp_path / "a.png")
    b = _write_picture(tmp_path / "b.jpg", (120, 60))
    out = tmp_path / "out"
    argv = ["--model", sd3_dir, "--image", a, b, "--prompt", "a red disc", "--prompt", "a blue square",
            "--timesteps", "300", "600", "--out", out, *SMALL]
    assert dump.main([str(x) for x in argv]) == 0, capsys.readouterr().err
    assert "2 run(s) written" in capsys.readouterr().out
    metas = {d: json.loads((out / d / "metadata.json").read_text()) for d in ("0000-a", "0001-b")}
    assert metas["0000-a"]["prompt"] == ["a red disc"] and metas["0001-b"]["prompt"] == ["a blue square"]
    assert metas["0001-b"]["noise_levels"] == [0.6, 0.3] and metas["0001-b"]["timesteps"] == pytest.approx([600, 300])
    assert dump.main([str(x) for x in argv]) == 0
    assert "0 run(s) written, 2 skipped" in capsys.readouterr().out
    # another image under the same name is another run: refused before the model loads
    _write_picture(tmp_path / "a.png", (80, 96))
    assert dump.main([str(x) for x in argv]) == 2
    assert "other settings" in capsys.readouterr().err
    # the analysis reads the folders as it reads generated ones
    assert analyse_stepavg.main(["--root", str(out), "--out", str(tmp_path / "an"), "--tables-only"]) == 0
    rows = (tmp_path / "an" / "0000-a" / "clip" / "tables" / "words_summary.csv").read_text()
    assert "red" in rows and "disc" in rows


def test_images_csv_pairs_images_with_prompts(sd3_dir, tmp_path, capsys):
    _write_picture(tmp_path / "x.png")
    os.makedirs(tmp_path / "sub")
    _write_picture(tmp_path / "sub" / "y.png")
    (tmp_path / "list.csv").write_text('image,prompt\nx.png,"a red disc, left"\nsub/y.png,a blue square\n')
    out = tmp_path / "out"
    code = dump.main(["--model", sd3_dir, "--images-csv", str(tmp_path / "list.csv"), "--noise-levels", "0.5",
                      "--guidance-scale", "1", "--out", str(out), *SMALL])
    assert code == 0, capsys.readouterr().err
    m0 = json.loads((out / "0000-x" / "metadata.json").read_text())
    m1 = json.loads((out / "0001-y" / "metadata.json").read_text())
    assert m0["prompt"] == ["a red disc, left"] and m1["prompt"] == ["a blue square"]
    assert m0["cfg"] is False and m0["num_steps"] == 1


def _bad_files(tmp):
    _write_picture(tmp / "ok.png")
    (tmp / "text.png").write_text("not an image")
    Image.new("RGB", (20, 40)).save(tmp / "tiny.png")
    Image.new("I;16", (40, 40)).save(tmp / "deep.png")
    frames = [Image.new("RGB", (40, 40), c) for c in ("red", "blue")]
    frames[0].save(tmp / "anim.gif", save_all=True, append_images=frames[1:])
    (tmp / "nocols.csv").write_text("file,text\nok.png,a\n")
    (tmp / "extra.csv").write_text("image,prompt\nok.png,a\nok.png,a cat,left\n")  # unquoted comma
    (tmp / "twice.csv").write_text("Image,prompt,image\nok.png,a,ok.png\n")
    (tmp / "quote.csv").write_text('image,prompt\nok.png,a\nok.png,"a cat\nok.png,b\n')  # never closed
    bomb_png(tmp / "bomb.png", 30000, 30000)  # past 2 x MAX_IMAGE_PIXELS: Pillow raises
    bomb_png(tmp / "big.png", 10000, 10000)  # past MAX_IMAGE_PIXELS: Pillow only warns


BAD_IMAGES = {
    "missing": (["--image", "{tmp}/none.png", "--prompt", "a"], "does not exist"),
    "not an image": (["--image", "{tmp}/text.png", "--prompt", "a"], "cannot be read as an image"),
    "too small": (["--image", "{tmp}/tiny.png", "--prompt", "a"], "too small"),
    "16-bit": (["--image", "{tmp}/deep.png", "--prompt", "a"], "has pixel mode 'I"),  # 'I;16' ('I' in Pillow < 10)
    "animation": (["--image", "{tmp}/anim.gif", "--prompt", "a"], "has 2 frames"),
    "decompression bomb": (["--image", "{tmp}/bomb.png", "--prompt", "a"], "bomb.png': Image size (900000000 pixels)"),
    "past the pixel limit": (["--image", "{tmp}/big.png", "--prompt", "a"], "more than the 89,478,485 pixels"),
    "no prompt": (["--image", "{tmp}/ok.png"], "--image needs the prompt"),
    "csv columns": (["--images-csv", "{tmp}/nocols.csv"], "columns image,prompt"),
    "csv extra cell": (["--images-csv", "{tmp}/extra.csv"], "row 3: 3 cells but the header names 2 columns"),
    "csv column twice": (["--images-csv", "{tmp}/twice.csv"], "the header names the column 'image' 2 times"),
    "csv open quote": (["--images-csv", "{tmp}/quote.csv"], "row 3: not valid CSV from there on (unexpected end"),
    "levels without image": (["--noise-levels", "0.5"], "add --image"),
    "level out of range": (["--image", "{tmp}/ok.png", "--prompt", "a", "--noise-levels", "1.2"], "must lie in [0, 1]"),
    "timestep out of range": (["--image", "{tmp}/ok.png", "--prompt", "a", "--timesteps", "1001"], "[0, 1000]"),
    "levels twice": (["--image", "{tmp}/ok.png", "--prompt", "a", "--noise-levels", "0.5", "0.5"], "each value once"),
    "both level flags": (["--image", "{tmp}/ok.png", "--prompt", "a", "--noise-levels", "0.5", "--timesteps", "5"],
                         "not both"),
    "strength and levels": (["--image", "{tmp}/ok.png", "--prompt", "a", "--strength", "0.5", "--noise-levels", "0.3"],
                            "give one"),
    "strength zero": (["--image", "{tmp}/ok.png", "--prompt", "a", "--strength", "0"], "(0, 1]"),
    "strength without steps": (["--image", "{tmp}/ok.png", "--prompt", "a", "--strength", "0.1", "--steps", "5"],
                               "runs no denoising step"),
    "prompt count": (["--image", "{tmp}/ok.png", "{tmp}/ok.png", "--prompt", "a", "--prompt", "b", "--prompt", "c"],
                     "2 --image with 3 --prompt"),
    "flux img2img": (["--image", "{tmp}/ok.png", "--prompt", "a", "--model", "tiny-random-flux", "--strength", "0.5"],
                     "--strength (img2img) supports SD3 / SD3.5 for now, not FLUX.1: use --noise-levels"),
    "true cfg": (["--image", "{tmp}/ok.png", "--prompt", "a", "--model", "tiny-random-flux", "--true-cfg-scale", "2"],
                 "--true-cfg-scale applies to generation"),
    "images per prompt": (["--image", "{tmp}/ok.png", "--prompt", "a", "--num-images-per-prompt", "2"],
                          "each run is one image"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_images_exit_2_before_the_model_loads(case, tmp_path, capsys, monkeypatch):
    import attention_map_diffusers.dump.cli as cli

    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    _bad_files(tmp_path)
    before = files_under(tmp_path)
    args, message = BAD_IMAGES[case]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args] + ["--out", str(tmp_path / "out")]
    if "--model" not in argv:
        argv += ["--model", "tiny-random"]
    assert dump.main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], lines
    assert files_under(tmp_path) == before


def test_image_mode_on_the_loaded_pipeline_is_the_library_call(sd3_dir, tmp_path, capsys):
    """The dump's npz equals record_on_image on the same fitted image (the notebook path)."""
    from attention_map_diffusers.capture.on_image import record_on_image

    path = _write_picture(tmp_path / "p.png", (64, 128))
    out = tmp_path / "o"
    assert dump.main(["--model", sd3_dir, "--image", path, "--prompt", "a blue square", "--seed", "11",
                      "--guidance-scale", "1", "--store-dtype", "float32", "--out", str(out), *SMALL]) == 0
    pipe = load_pipeline(sd3_dir)
    res = record_on_image(pipe, read_source(path, 64, 64).fitted, "a blue square", (0.7, 0.5, 0.3), seed=11,
                          max_sequence_length=16, recorder=dict(keep_step_maps=True))
    z = np.load(out / "stepavg_token_maps_v1.npz")
    for key, value in res.arrays().items():
        np.testing.assert_allclose(z[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    assert torch.is_tensor(torch.as_tensor(z["per_step_token_map"]))


def test_flux_image_mode_with_concepts_is_the_library_call(flux_dir, tmp_path, capsys):
    """FLUX.1 in image mode: the dump's npz (word maps and concept maps, per level) equals
    record_on_image on the same fitted image; the metadata says image mode and T5 only; the analysis
    reads it and draws the concepts per level."""
    from attention_map_diffusers.capture.concepts import ConceptOptions
    from attention_map_diffusers.capture.on_image import record_on_image
    from conftest import load_flux_pipeline

    path = _write_picture(tmp_path / "p.png", (64, 128))
    out = tmp_path / "o"
    code = dump.main(["--model", flux_dir, "--image", path, "--prompt", "a blue square", "--seed", "11",
                      "--guidance-scale", "3.5", "--concepts", "square", "background", "--store-dtype", "float32",
                      "--out", str(out), *SMALL])
    assert code == 0, capsys.readouterr().err
    pipe = load_flux_pipeline(flux_dir)
    res = record_on_image(pipe, read_source(path, 64, 64).fitted, "a blue square", (0.7, 0.5, 0.3), seed=11,
                          guidance_scale=3.5, max_sequence_length=16,
                          recorder=dict(keep_step_maps=True, concepts=ConceptOptions(
                              ("square", "background"), max_sequence_length=16, keep_step_maps=True)))
    z = np.load(out / "stepavg_token_maps_v1.npz")
    arrays = res.arrays()
    assert "concept_per_step_map" in arrays and set(arrays) == set(z.files)
    for key, value in arrays.items():
        np.testing.assert_allclose(z[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["mode"] == "image" and meta["model_family"] == "flux" and meta["text_spans"] == {"t5": [0, 16]}
    assert meta["noise_levels"] == [0.7, 0.5, 0.3]
    assert analyse_stepavg.main(["--root", str(out), "--out", str(tmp_path / "an"), "--dpi", "30"]) == 0
    assert (tmp_path / "an" / "concepts" / "segmentation_steps.png").is_file()
    assert "mode <b>image</b>" in (tmp_path / "an" / "index.html").read_text(encoding="utf-8")
    # the built-in random FLUX.1 model: the report's warning names FLUX.1 too
    assert dump.main(["--model", "tiny-random-flux", "--image", path, "--prompt", "a", "--out", str(tmp_path / "r"),
                      "--no-image", *SMALL]) == 0
    assert analyse_stepavg.main(["--root", str(tmp_path / "r"), "--out", str(tmp_path / "ra"), "--tables-only"]) == 0
    assert "say nothing about SD3.5 or FLUX.1" in (tmp_path / "ra" / "index.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_orientation_is_applied_before_fitting(tmp_path, orientation):
    """A photo stored sideways with the EXIF tag that turns it upright is read as the upright photo:
    same size, crop box and fitted pixels (PNG: exactly; JPEG: as its decoded pixels turned by hand)."""
    from image_files import with_orientation

    upright = Image.open(_write_picture(tmp_path / "up.png", (96, 64)))
    stored = with_orientation(upright, orientation)
    stored.save(tmp_path / "side.png", exif=stored.info["exif"])
    stored.save(tmp_path / "side.jpg", exif=stored.info["exif"], quality=95)
    assert Image.open(tmp_path / "side.png").size != (96, 64) or orientation == 3  # stored turned
    want = read_source(str(tmp_path / "up.png"), 64, 64)
    got = read_source(str(tmp_path / "side.png"), 64, 64)
    assert (got.size, got.crop_box, got.orientation) == (want.size, want.crop_box, orientation) == ((96, 64), want.crop_box, orientation)
    np.testing.assert_array_equal(np.asarray(got.fitted), np.asarray(want.fitted))
    assert got.record()["exif_orientation"] == orientation and want.record()["exif_orientation"] == 1
    assert got.record()["size"] == [96, 64]
    # JPEG: the decoded stored pixels, turned back by hand (the transpose that undoes each tag)
    undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90}[orientation]
    by_hand = Image.open(tmp_path / "side.jpg").convert("RGB").transpose(undo)
    assert by_hand.size == (96, 64)
    ref = by_hand.resize((64, 64), Image.Resampling.BICUBIC, box=cover_crop_box(96, 64, 64, 64))
    jpg = read_source(str(tmp_path / "side.jpg"), 64, 64)
    assert jpg.size == (96, 64) and jpg.orientation == orientation
    np.testing.assert_array_equal(np.asarray(jpg.fitted), np.asarray(ref))


def test_sideways_photo_dump_takes_the_upright_masks(sd3_dir, tmp_path, capsys):
    """The dump of a photo stored sideways (EXIF 6) records the upright size and crop box, so that the
    masks drawn on the upright photo are accepted and scored like those of the same photo stored upright."""
    from image_files import with_orientation

    import evaluate_segmentation

    upright = Image.open(_write_picture(tmp_path / "up.png", (96, 64)))
    stored = with_orientation(upright, 6)
    stored.save(tmp_path / "side.png", exif=stored.info["exif"])
    out = tmp_path / "out"
    argv = ["--model", sd3_dir, "--image", tmp_path / "up.png", tmp_path / "side.png", "--prompt", "a red disc",
            "--noise-levels", "0.5", "--guidance-scale", "1", "--out", out, *SMALL]
    assert dump.main([str(x) for x in argv]) == 0, capsys.readouterr().err
    up, side = (json.loads((out / d / "metadata.json").read_text())["source_image"] for d in ("0000-up", "0001-side"))
    assert side["size"] == up["size"] == [96, 64] and side["crop_box"] == up["crop_box"]
    assert (side["exif_orientation"], up["exif_orientation"]) == (6, 1)
    disc = np.zeros((64, 96), np.uint8)
    disc[(np.mgrid[:64, :96][0] - 32) ** 2 + (np.mgrid[:64, :96][1] - 28.8) ** 2 < 12.8 ** 2] = 255
    for key in ("up", "side"):
        os.makedirs(tmp_path / "m" / key)
        Image.fromarray(disc).save(tmp_path / "m" / key / "disc.png")
    capsys.readouterr()
    code = evaluate_segmentation.main(["--dumps", str(out), "--masks", str(tmp_path / "m"), "--out",
                                       str(tmp_path / "seg"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    import csv

    rows = {k: list(csv.DictReader(open(tmp_path / "seg" / "per_image" / f"{k}.csv"))) for k in ("up", "side")}
    # the model saw the same pixels, so every score is the same (but the random baseline's, seeded by the key)
    same = [[r for r in rows[k] if r["method"] != "random"] for k in ("side", "up")]
    assert same[0] == same[1] and len(same[0]) == 12 and int(same[0][0]["gt_px"]) > 0


def test_a_damaged_exif_block_reads_as_upright_without_a_warning(tmp_path, recwarn):
    """Pillow warns "Corrupt EXIF data" for a truncated block; the image is read as stored, silently."""
    path = _write_picture(tmp_path / "p.png", (64, 48))
    Image.open(path).save(tmp_path / "bad.png", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12")
    src = read_source(str(tmp_path / "bad.png"), 32, 32)
    assert src.orientation == 1 and src.size == (64, 48)
    np.testing.assert_array_equal(np.asarray(src.fitted), np.asarray(read_source(path, 32, 32).fitted))
    assert not [w for w in recwarn if "EXIF" in str(w.message)]
