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
