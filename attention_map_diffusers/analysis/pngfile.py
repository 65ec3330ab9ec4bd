"""Writing 8-bit RGB(A) arrays as PNG files fast: one filter for the whole image, deflate at level 1.

Pillow chooses a filter per row by trying four of them, which costs more than compressing: for a
figure at 200 dpi (1700 x 1484) it takes ~120 ms where this takes ~55 ms with zlib. The "up"
filter (each row minus the row above) suits figures well, being mostly rows of one colour, so the
files stay about the size Pillow writes at the same zlib level (within ~10 %). The pixels are the
same: PNG is lossless; only the file's bytes differ.

Figures without a colour photograph are written as palette PNGs (``palette=True``): one byte per
pixel instead of three or four, ~3x smaller files. When the picture has at most 256 colours the
palette holds them exactly (lossless); else Pillow's fast octree chooses 256 and each pixel takes
its octree colour (lines, text and maps alone lose a level or two where neighbouring shades merge),
except within given boxes (maps over a grey image: blends too many for 256 colours), which are
Floyd-Steinberg dithered so that their gradients do not show bands (~0.1 s more per large figure).
Palette PNGs are deflated by zlib at level 3 (one byte per pixel leaves time for it). An opaque
RGBA picture is written as RGB.

The deflate stream comes from ISA-L (the ``isal`` package, a requirement) when it is installed:
at its level 1 it compresses a figure ~5x faster than zlib's level 1 (9 ms against 47 ms for the
figure above) into a slightly smaller file. Without it, zlib does the same job more slowly; the
files decode to the same pixels either way.
"""

from __future__ import annotations

import struct
import zlib
from typing import Mapping, Optional, Sequence

import numpy as np

from ..atomic import write_bytes

try:
    from isal.isal_zlib import compress as _fast_compress
except ImportError:  # pragma: no cover - isal is a requirement; zlib is the slower fallback
    _fast_compress = None

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOUR_TYPES = {3: 2, 4: 6}  # channels -> PNG colour type (RGB, RGBA)
PALETTE_TYPE = 3  # PNG colour type of palette images
NONE = 0  # PNG filter type "None": for palette indices, whose differences mean nothing
PALETTE_LEVEL = 3  # zlib level of palette PNGs
UP = 2  # PNG filter type "Up"


def png_bytes(pixels: np.ndarray, text: Optional[Mapping[str, str]] = None, dpi: Optional[float] = None,
              level: int = 1, palette: bool = False, dither: Sequence[tuple[int, int, int, int]] = ()) -> bytes:
    """The PNG file of ``pixels`` ((H, W, 3) RGB or (H, W, 4) RGBA, uint8).

    ``text``: key -> value chunks (``Image.open(path).text``), tEXt when the value is Latin-1, else
    iTXt (UTF-8), as Pillow writes them. ``dpi``: a pHYs chunk (``Image.open(path).info["dpi"]``).
    ``palette``: a palette PNG of at most 256 colours (:func:`to_palette`; exact when the picture
    has no more), dithered within the ``dither`` boxes (top, left, bottom, right: pixel rows and
    columns). An opaque RGBA picture is written without its alpha.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in COLOUR_TYPES:
        raise ValueError(f"png_bytes takes an (H, W, 3) or (H, W, 4) uint8 array, got {pixels.dtype} {pixels.shape}")
    if pixels.shape[2] == 4 and pixels[..., 3].min(initial=255) == 255:
        pixels = pixels[..., :3]
    h, w, c = pixels.shape
    plte = None
    if palette and c == 3:
        index, colours = to_palette(pixels, dither)
        rows = np.empty((h, 1 + w), np.uint8)
        rows[:, 0] = NONE
        rows[:, 1:] = index
        kind = PALETTE_TYPE
        plte = np.ascontiguousarray(colours, dtype=np.uint8).tobytes()
    else:
        flat = np.ascontiguousarray(pixels).reshape(h, w * c)  # contiguous rows: the subtraction runs ~50x faster
        rows = np.empty((h, 1 + w * c), np.uint8)  # each row: its filter byte, then the filtered pixels
        rows[:, 0] = UP
        rows[:1, 1:] = flat[:1]  # the first row has no row above: "up" leaves it as it is
        np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])  # uint8: wraps modulo 256, as PNG wants
        kind = COLOUR_TYPES[c]

    out = [SIGNATURE, _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, kind, 0, 0, 0))]
    if plte is not None:
        out.append(_chunk(b"PLTE", plte))
    if dpi:
        ppm = round(dpi / 0.0254)  # pixels per metre
        out.append(_chunk(b"pHYs", struct.pack(">IIB", ppm, ppm, 1)))
    for key, value in (text or {}).items():
        try:
            out.append(_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1")))
        except UnicodeEncodeError:  # iTXt: uncompressed, no language, no translated keyword
            out.append(_chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8")))
    # palette rows are a third (a quarter) of RGB(A) rows: zlib's level 3 costs about what ISA-L's
    # level 1 costs on RGBA, for files ~10 % smaller than ISA-L's
    out.append(_chunk(b"IDAT", deflate(rows, PALETTE_LEVEL, fast=False) if plte is not None else deflate(rows, level)))
    out.append(_chunk(b"IEND", b""))
    return b"".join(out)


def write_png(path: str, pixels: np.ndarray, text: Optional[Mapping[str, str]] = None, dpi: Optional[float] = None,
              level: int = 1, palette: bool = False, dither: Sequence[tuple[int, int, int, int]] = ()) -> None:
    """:func:`png_bytes` of ``pixels`` into ``path`` (temp name, then rename)."""
    write_bytes(path, png_bytes(pixels, text, dpi, level, palette, dither))


def to_palette(rgb: np.ndarray, dither: Sequence[tuple[int, int, int, int]] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 -> ((H, W) uint8 indices, (N, 3) uint8 colours), N <= 256: the picture's own
    colours when it has at most 256 (exact), else 256 chosen by Pillow's fast octree, each pixel
    mapped to its octree colour, or Floyd-Steinberg dithered within the ``dither`` boxes (top,
    left, bottom, right)."""
    from PIL import Image

    rgb = np.ascontiguousarray(rgb)
    img = Image.fromarray(rgb)
    found = img.getcolors(256)
    if found is None:
        q = img.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        index = np.array(q, dtype=np.uint8)
        for top, left, bottom, right in dither:
            part = Image.fromarray(rgb[top:bottom, left:right]).quantize(palette=q, dither=Image.Dither.FLOYDSTEINBERG)
            index[top:bottom, left:right] = np.asarray(part, dtype=np.uint8)
        n = len(q.getpalette()) // 3
        colours = np.asarray(q.getpalette(), dtype=np.uint8).reshape(n, 3).copy()
        # the octree's colours are its boxes' means: the background (a corner) and black text get their own colour back
        colours[index[0, 0]] = rgb[0, 0]
        step = 31  # a sample of the pixels is enough to find black text (all of them would cost ~10 ms)
        black = np.flatnonzero(rgb.reshape(-1, 3)[::step].max(axis=1) == 0)
        if black.size:
            colours[index.reshape(-1)[black[0] * step]] = 0
        return index, colours
    colours = np.array(sorted(c for _, c in found), dtype=np.uint8).reshape(-1, 3)
    keys = (colours[:, 0].astype(np.uint32) << 16) | (colours[:, 1].astype(np.uint32) << 8) | colours[:, 2]
    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    return np.searchsorted(keys, packed).astype(np.uint8), colours


def deflate(data, level: int = 1, fast: bool = True) -> bytes:
    """``data`` as a zlib stream (what a PNG's IDAT holds): ISA-L when installed and ``fast``, else zlib.

    ISA-L has levels 0-3; a zlib level above 3 is read as 3 there.
    """
    if fast and _fast_compress is not None:
        return _fast_compress(data, min(level, 3))
    return zlib.compress(data, level)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))
