"""Ground truth: per-word mask PNGs or VOC-style index PNGs, brought to the image the model saw.

numpy, Pillow and the standard library. Every bad file raises :class:`UserError` with one line.
Masks are read upright (an EXIF orientation tag applied, as for the dump's given images, whose
``crop_box`` is in the upright image's pixels) and never past ``PIL.Image.MAX_IMAGE_PIXELS``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..analysis.words import find_words
from ..contract import UserError
from ..imagefile import TooManyPixels, open_upright

#: VOC's label of pixels that no metric looks at (object borders, difficult regions).
VOID = 255

#: The 21 PascalVOC classes, index = label.
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

#: Other spellings of the VOC class names that prompts use; a class matches the first of its name and
#: these that occurs in the prompt.
VOC_ALIASES = {
    "aeroplane": ("airplane", "plane"),
    "diningtable": ("dining table", "table"),
    "motorbike": ("motorcycle",),
    "pottedplant": ("potted plant", "plant"),
    "tvmonitor": ("tv monitor", "monitor", "television", "tv"),
}

#: The class name never treated as a concept: its pixels are "no concept" for argmax accuracy.
BACKGROUND = "background"


@dataclass(frozen=True)
class ClassName:
    """A VOC label's class: its name and the phrases of the prompt that stand for it (name first)."""

    name: str
    phrases: tuple[str, ...]


def builtin_classes() -> list[ClassName]:
    return [ClassName(n, (n,) + VOC_ALIASES.get(n, ())) for n in VOC_CLASSES]


def read_classes(path: str) -> list[ClassName]:
    """``--classes FILE``: line i names label i, ``name`` or ``name: phrase | another phrase``.

    Blank lines count (a label without a class); ``#`` starts no comment (a class could be called so).
    """
    try:
        with open(path, encoding="utf-8-sig") as fh:  # a byte-order mark is no part of class 0's name
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--classes {path}: cannot read it ({exc})") from None
    out = []
    for i, line in enumerate(lines):
        name, _, rest = line.partition(":")
        name = name.strip()
        phrases = [p.strip() for p in rest.split("|") if p.strip()] if rest else []
        for p in [name, *phrases]:
            if p and not find_words(p):
                raise UserError(f"--classes {path} line {i + 1}: {p!r} has no word (letters or digits)")
        out.append(ClassName(name, tuple(dict.fromkeys([name, *phrases])) if name else ()))
    if not any(c.name for c in out):
        raise UserError(f"--classes {path} names no class; one class name per line, line i = label i")
    return out


def _open(path: str) -> Image.Image:
    try:
        return open_upright(path).image
    except TooManyPixels as exc:
        raise UserError(f"the mask {path}: {exc}") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise UserError(f"cannot read the mask {path} ({exc}); masks must be PNG files") from None


def read_binary_mask(path: str) -> np.ndarray:
    """(H, W) bool: nonzero pixels are inside. Colour images: nonzero in any colour channel; an alpha
    channel is used only when every colour channel is zero everywhere (a mask drawn in alpha)."""
    img = _open(path)
    if img.mode == "P":
        return np.asarray(img) != 0
    if img.mode in ("1", "L", "I", "I;16", "F"):
        return np.asarray(img) != 0
    bands = img.getbands()
    arr = np.asarray(img.convert("RGBA" if "A" in bands else "RGB"))
    colour = (arr[..., :3] != 0).any(axis=-1)
    if "A" in bands and not colour.any():
        return arr[..., 3] != 0
    return colour


def read_label_mask(path: str) -> np.ndarray:
    """(H, W) int64 labels of a VOC-style PNG: the palette index (mode P) or the grey value (L, I)."""
    img = _open(path)
    if img.mode not in ("P", "L", "I", "I;16"):
        raise UserError(
            f"{path} is a {img.mode} image, not a class-index PNG; --voc masks hold one class index per pixel "
            "(palette or greyscale PNG, like VOC2012/SegmentationClass)"
        )
    return np.asarray(img).astype(np.int64)


def fit_mask(mask: np.ndarray, size_hw: tuple[int, int], crop_box: Optional[Sequence[int]], path: str,
             source_hw: Optional[tuple[int, int]] = None) -> np.ndarray:
    """The mask in the coordinates of the image the model saw.

    Without ``crop_box`` (a generated image) the mask must already be ``size_hw``. With it (a dump of a
    given image) the mask is in the upright source's pixels (``source_hw`` when known): it is cropped to
    ``[left, top, right, bottom]`` and resized to ``size_hw`` by nearest neighbour.
    """
    H, W = size_hw
    if crop_box is None:
        if mask.shape != (H, W):
            raise UserError(
                f"the mask {path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image is {W}x{H}; masks of "
                "generated images must have the image's size"
            )
        return mask
    if source_hw is not None and mask.shape != tuple(source_hw):
        raise UserError(
            f"the mask {path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but the source image was "
            f"{source_hw[1]}x{source_hw[0]}; masks of given images are in the source image's pixels"
        )
    left, top, right, bottom = crop_box
    if not (0 <= left < right <= mask.shape[1] and 0 <= top < bottom <= mask.shape[0]):
        raise UserError(
            f"the crop box {list(crop_box)} of the dump does not fit the mask {path} "
            f"({mask.shape[1]}x{mask.shape[0]}); is it the mask of the right image?"
        )
    crop = mask[top:bottom, left:right]
    return nearest_resize(crop, H, W)


def nearest_resize(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w) -> (height, width) by nearest neighbour (output pixel centre mapped into the input)."""
    h, w = a.shape
    ys = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return a[ys][:, xs]


def word_mask_files(folder: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The per-word layout's files in ``folder``, by name: ``(word, path)`` of every ``*.png`` mask, and
    ``(name, reason)`` of every other entry, which is not read (a JPEG, a folder, a broken link or a
    link loop...). Hidden names (``.DS_Store``) are neither."""
    masks, others = [], []
    for name in sorted(os.listdir(folder)):
        if name.startswith("."):
            continue
        path = os.path.join(folder, name)
        stem, ext = os.path.splitext(name)
        problem = entry_problem(path)
        if problem is None and ext.lower() != ".png":
            problem = f"not a .png file (masks are PNG{'; JPEG artefacts change a mask' if ext.lower() in JPEG else ''})"
        if problem is None:
            masks.append((stem, path))
        else:
            others.append((name, problem))
    return masks, others


#: Extensions of the JPEG files that people save masks as by mistake.
JPEG = (".jpg", ".jpeg", ".jpe")


def entry_problem(path: str) -> Optional[str]:
    """Why ``path`` (which exists as a name) is not a file a mask can be read from, or None."""
    if os.path.isfile(path):
        return None
    if os.path.isdir(path):
        return "a folder, not a mask file"
    if os.path.islink(path):
        try:
            os.stat(path)
        except OSError as exc:  # ELOOP: a link loop; ENOENT: a broken link
            return f"a link that leads nowhere ({exc.strerror or exc})"
    return "not a regular file"
