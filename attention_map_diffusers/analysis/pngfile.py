"""Writing 8-bit RGB(A) arrays as PNG files fast: one filter for the whole image, zlib at level 1.

Pillow chooses a filter per row by trying four of them, which costs more than compressing: for a
figure at 200 dpi (1700 x 1484) it takes ~120 ms where this takes ~55 ms. The "up" filter
(each row minus the row above) suits figures well, being mostly rows of one colour, so the files
stay about the size Pillow writes at the same zlib level (within ~10 %). The pixels are the
same: PNG is lossless; only the file's bytes differ.
"""

from __future__ import annotations

import struct
import zlib
from typing import Mapping, Optional

import numpy as np

from ..atomic import write_bytes

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOUR_TYPES = {3: 2, 4: 6}  # channels -> PNG colour type (RGB, RGBA)
UP = 2  # PNG filter type "Up"


def png_bytes(pixels: np.ndarray, text: Optional[Mapping[str, str]] = None, dpi: Optional[float] = None,
              level: int = 1) -> bytes:
    """The PNG file of ``pixels`` ((H, W, 3) RGB or (H, W, 4) RGBA, uint8).

    ``text``: key -> value chunks (``Image.open(path).text``), tEXt when the value is Latin-1, else
    iTXt (UTF-8), as Pillow writes them. ``dpi``: a pHYs chunk (``Image.open(path).info["dpi"]``).
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in COLOUR_TYPES:
        raise ValueError(f"png_bytes takes an (H, W, 3) or (H, W, 4) uint8 array, got {pixels.dtype} {pixels.shape}")
    h, w, c = pixels.shape
    flat = np.ascontiguousarray(pixels).reshape(h, w * c)  # contiguous rows: the subtraction runs ~50x faster
    rows = np.empty((h, 1 + w * c), np.uint8)  # each row: its filter byte, then the filtered pixels
    rows[:, 0] = UP
    rows[:1, 1:] = flat[:1]  # the first row has no row above: "up" leaves it as it is
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])  # uint8: wraps modulo 256, as PNG wants

    out = [SIGNATURE, _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, COLOUR_TYPES[c], 0, 0, 0))]
    if dpi:
        ppm = round(dpi / 0.0254)  # pixels per metre
        out.append(_chunk(b"pHYs", struct.pack(">IIB", ppm, ppm, 1)))
    for key, value in (text or {}).items():
        try:
            out.append(_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1")))
        except UnicodeEncodeError:  # iTXt: uncompressed, no language, no translated keyword
            out.append(_chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8")))
    out.append(_chunk(b"IDAT", zlib.compress(rows, level)))
    out.append(_chunk(b"IEND", b""))
    return b"".join(out)


def write_png(path: str, pixels: np.ndarray, text: Optional[Mapping[str, str]] = None, dpi: Optional[float] = None,
              level: int = 1) -> None:
    """:func:`png_bytes` of ``pixels`` into ``path`` (temp name, then rename)."""
    write_bytes(path, png_bytes(pixels, text, dpi, level))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))
