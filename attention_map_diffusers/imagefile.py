"""Image files read the same way by every layer (Pillow and the standard library only): upright, and
never past Pillow's decompression-bomb limit.

*Upright*: a photo's EXIF ``Orientation`` tag (a camera held sideways stores the pixels sideways and
says so in the tag) is applied, as photo viewers and mask-drawing tools show the image; sizes and
boxes are then in the upright image's pixels. *Limit*: an image of more than
``PIL.Image.MAX_IMAGE_PIXELS`` pixels (about 89 million by default) is refused. Pillow itself only
warns between that and twice it, and a small file (a PNG of one colour) can declare 30000 x 30000
pixels: decoding it would take gigabytes of memory.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL.Image import Image

#: EXIF tag 0x0112; values 2-8 turn or mirror the stored pixels, 1 (or none) leaves them.
ORIENTATION_TAG = 0x0112


class TooManyPixels(ValueError):
    """An image larger than ``PIL.Image.MAX_IMAGE_PIXELS`` (a possible decompression bomb)."""


@dataclass(frozen=True)
class Opened:
    """An image file, decoded and upright.

    Attributes:
        image: the first frame, turned upright (a PIL image of the file's mode).
        orientation: the EXIF orientation that was applied, 1 when none was (2-8: see the EXIF spec).
        frames: the number of frames in the file (animations, multi-page files).
    """

    image: "Image"
    orientation: int
    frames: int


def bomb_errors() -> tuple[type, ...]:
    """What Pillow raises for an image past its limit (the warning turned into an error here)."""
    from PIL import Image

    return (Image.DecompressionBombError, Image.DecompressionBombWarning)


def open_upright(path: str) -> Opened:
    """The image at ``path``, decoded and turned upright (see :class:`Opened`).

    Raises :class:`TooManyPixels` past the limit (before any pixel is decoded), else what Pillow
    raises for a file it cannot read (``OSError``, ``UnidentifiedImageError``, ``SyntaxError``,
    ``ValueError``).
    """
    from PIL import Image, ImageOps

    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except bomb_errors() as exc:
            raise TooManyPixels(_too_many(exc, limit)) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
        orientation = _orientation(img)
        upright = ImageOps.exif_transpose(img) if orientation != 1 else img.copy()
        return Opened(upright, orientation, int(getattr(img, "n_frames", 1)))
    except bomb_errors() as exc:
        raise TooManyPixels(_too_many(exc, limit)) from None
    finally:
        img.close()


def _orientation(img) -> int:
    """The EXIF orientation of a decoded image, 1 when it has none or when its EXIF block cannot be
    parsed (a damaged block is no reason to refuse the pixels)."""
    import struct

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Corrupt EXIF data", category=UserWarning)
            value = img.getexif().get(ORIENTATION_TAG, 1)
    except (OSError, SyntaxError, ValueError, KeyError, IndexError, TypeError, struct.error):
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _too_many(exc: BaseException, limit) -> str:
    """Pillow's message says how many pixels the file declares; say what the limit protects from."""
    text = str(exc).split(", could be")[0]
    return (f"{text}: more than the {limit:,} pixels read safely (PIL.Image.MAX_IMAGE_PIXELS; a small file can "
            "declare a huge image, a decompression bomb); scale it down first")
