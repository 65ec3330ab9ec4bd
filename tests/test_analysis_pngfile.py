"""The analysis's PNG writer: Pillow reads back the same pixels, text chunks and dpi."""

import io

import numpy as np
import pytest
from PIL import Image

from attention_map_diffusers.analysis.pngfile import png_bytes, write_png


@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 7, 4), (64, 33, 3), (3, 200, 4)])
def test_pixels_round_trip(shape):
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    with Image.open(io.BytesIO(png_bytes(pixels))) as im:
        assert im.mode == ("RGB" if shape[2] == 3 else "RGBA")
        np.testing.assert_array_equal(np.asarray(im), pixels)


def test_strided_input_text_and_dpi(tmp_path):
    rgba = np.random.default_rng(1).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    view = rgba[::2, ::-1, :3]  # not contiguous
    text = {"Title": "CLIP: top words\nsame y scale", "Description": "seed 0 | \u201ca rusty bicycle\u201d", "Prompt": "caf\u00e9 \u4e00"}
    path = tmp_path / "x.png"
    write_png(str(path), view, text, dpi=200)
    with Image.open(path) as im:
        np.testing.assert_array_equal(np.asarray(im), view)
        assert im.text == text
        assert im.info["dpi"] == pytest.approx((200, 200), abs=0.01)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temporary file left


def test_refuses_other_arrays():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) or \(H, W, 4\) uint8 array, got float64"):
        png_bytes(np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match=r"uint8 \(2, 2\)"):
        png_bytes(np.zeros((2, 2), np.uint8))


def test_both_deflate_backends_decode_to_the_data():
    """ISA-L (the requirement, the fast path) and zlib (the fallback) both write a valid zlib stream."""
    import zlib

    from attention_map_diffusers.analysis import pngfile

    assert pngfile._fast_compress is not None, "isal is a requirement: pip install -r requirements.txt"
    rng = np.random.default_rng(2)
    data = (np.repeat(rng.integers(0, 4, 5000, dtype=np.uint8), 7)).tobytes()  # runs, as in figures
    for fast in (True, False):
        for level in (1, 6):
            assert zlib.decompress(pngfile.deflate(data, level, fast=fast)) == data


def _decoded(data):
    with Image.open(io.BytesIO(data)) as im:
        return im.mode, np.asarray(im.convert("RGB")).astype(int), (len(im.getpalette()) // 3 if im.mode == "P" else 0)


def test_palette_is_exact_for_at_most_256_colours():
    rng = np.random.default_rng(3)
    colours = rng.integers(0, 256, (200, 3), dtype=np.uint8)
    pixels = colours[rng.integers(0, 200, (40, 50))]
    mode, back, n = _decoded(png_bytes(pixels, palette=True))
    assert mode == "P" and n <= 200
    np.testing.assert_array_equal(back, pixels)
    opaque = np.concatenate([pixels, np.full((40, 50, 1), 255, np.uint8)], axis=-1)
    assert _decoded(png_bytes(opaque))[0] == "RGB"  # an opaque RGBA picture loses its alpha, not its pixels


def _figure_like():
    """White, with black text-like strokes and a smooth gradient box: thousands of colours."""
    y, x = np.mgrid[0:120, 0:160]
    pixels = np.full((120, 160, 3), 255, np.uint8)
    pixels[10:20, 10:150] = 0
    box = np.stack([x[30:110, 20:140] * 2, y[30:110, 20:140] * 3, 255 - x[30:110, 20:140]], -1)
    pixels[30:110, 20:140] = np.clip(box, 0, 255)
    return pixels


def test_palette_of_many_colours_stays_close_and_keeps_white_and_black():
    pixels = _figure_like()
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 256
    mode, back, n = _decoded(png_bytes(pixels, palette=True))
    assert mode == "P" and n <= 256
    err = np.abs(back - pixels)
    assert err.mean() < 3 and err.max() < 40
    assert (back[:5, :5] == 255).all() and (back[12:18, 20:140] == 0).all()  # background and text exact


def test_dithered_boxes_keep_gradients_on_average():
    """Within a dither box, 8x8 block means of the written picture follow the gradient closer than
    the plain palette's (no bands); outside it the pixels are the plain palette's."""
    pixels = _figure_like()
    box = (30, 20, 110, 140)
    _, plain, _ = _decoded(png_bytes(pixels, palette=True))
    _, dith, _ = _decoded(png_bytes(pixels, palette=True, dither=[box]))

    def block_err(img):
        a = (img[30:110, 20:140] - pixels[30:110, 20:140].astype(int)).reshape(10, 8, 15, 8, 3).mean(axis=(1, 3))
        return np.abs(a).mean()

    assert block_err(dith) < 0.8 * block_err(plain)
    np.testing.assert_array_equal(dith[:30], plain[:30])


def test_figures_without_a_colour_photo_are_palette_pngs(tmp_path):
    from attention_map_diffusers.analysis import figure, plots

    rng = np.random.default_rng(0)
    curves = plots.curves_figure(rng.uniform(size=(6, 3)), ["a", "b", "c"], None, "t")
    photo = plots.summary_figure(rng.integers(0, 256, (32, 32, 3)).astype(np.uint8), [rng.uniform(size=(4, 4))], ["a"], overlay=False)
    over = plots.summary_figure(rng.integers(0, 256, (32, 32, 3)).astype(np.uint8), [rng.uniform(size=(4, 4))], ["a"])
    for fig, mode in ((curves, "P"), (photo, "RGB"), (over, "P")):
        figure.write_figure(fig, str(tmp_path / "f.png"), "png", 50)
        with Image.open(tmp_path / "f.png") as im:
            assert im.mode == mode


def test_each_figure_gets_the_dpi_its_maps_and_texts_need():
    from attention_map_diffusers.analysis.views import sensible_dpi

    assert sensible_dpi(200) == 120  # curves: texts only, 0.6 x 200
    assert sensible_dpi(200, 3.2, image=512, cells=64) == 160  # a 512-px image or 64 cells x 8 px on 3.2 in
    assert sensible_dpi(200, 2.45, image=512, cells=64) == 200  # would need 209: --dpi caps it
    assert sensible_dpi(200, 3.2, image=256, cells=16) == 120  # a toy run: the texts decide
    assert sensible_dpi(300, 1.5, cells=64) == 300 and sensible_dpi(600, 1.5, cells=64) == 360  # 64 x 8 / 1.5 = 341.3
    assert sensible_dpi(30) == 18
