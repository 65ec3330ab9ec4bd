"""Image files that tests need and Pillow would not write directly (standard library and Pillow).

    bomb_png(path, 30000, 30000)          # a few hundred KB declaring 900 million pixels
    with_orientation(upright, 6).save(p)  # stored sideways with the EXIF tag that turns it back
"""

from __future__ import annotations

import functools
import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path, width: int, height: int) -> str:
    """A valid 1-bit greyscale PNG of ``width`` x ``height`` black pixels (the file is about 1/1000
    of the 1-bit raw size; no image is held in memory)."""
    with open(path, "wb") as fh:
        fh.write(_bomb_bytes(width, height))
    return str(path)


@functools.lru_cache(maxsize=4)
def _bomb_bytes(width: int, height: int) -> bytes:
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * min(256, height - start)) for start in range(0, height, 256)]
    parts.append(comp.flush())
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b""))


#: The transpose that stores an upright image so that EXIF orientation n turns it back (the
#: inverse of what ``ImageOps.exif_transpose`` applies for n).
_STORE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_90",
          7: "TRANSVERSE", 8: "ROTATE_270"}


def with_orientation(upright, orientation: int):
    """``upright`` (a PIL image) stored as a camera would with EXIF ``orientation``: the pixels turned
    or mirrored, and ``image.info['exif']`` holding the tag; save it with ``exif=img.info['exif']``."""
    from PIL import Image

    stored = upright.transpose(getattr(Image.Transpose, _STORE[orientation]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.info["exif"] = exif.tobytes()
    return stored
