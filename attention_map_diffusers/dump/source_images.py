"""Given images for the dump's image mode (``--image``): reading, checking and fitting them to the
model's size. PIL and the standard library only (no torch), so that bad images are refused before
the model loads.

Every image is first turned upright (its EXIF orientation applied, as photo viewers show it), then
resized so that it covers the target size (bicubic, aspect ratio kept) and the centre is cropped to
it. ``crop_box`` records which pixels of the upright source that is, so that ground-truth masks
drawn on the upright image can be cut and resized the same way (the segmentation evaluation does).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from typing import Optional

from ..contract import UserError, file_sha256
from ..imagefile import TooManyPixels, open_upright

MIN_SIDE = 32  # px: smaller images hold too little to be worth a map
RESAMPLE = "bicubic"
# PIL modes converted to RGB as they are; alpha is composited over white
_CONVERTIBLE = {"1", "L", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV"}
_WITH_ALPHA = {"LA", "PA", "RGBA", "RGBa", "La"}


@dataclass(frozen=True)
class ImageJob:
    """One given image and its prompt (a run per seed)."""

    path: str
    prompt: str


@dataclass
class SourceImage:
    """A given image, checked and fitted.

    Attributes:
        path: as given. name: its file name. sha256: of its bytes (the run's settings record it,
        so that resuming with another file under the same name is refused).
        size: (width, height) of the source, upright. crop_box: (left, top, right, bottom) in the
        upright source's pixels: the region resized to ``fitted``'s size. fitted: RGB PIL image of
        the target size. orientation: the EXIF orientation applied to make the source upright (1:
        none; 6 and 8: a photo taken with the camera turned).
    """

    path: str
    name: str
    sha256: str
    size: tuple[int, int]
    crop_box: tuple[float, float, float, float]
    fitted: object  # PIL.Image.Image
    orientation: int = 1

    def record(self) -> dict:
        """metadata.json's ``source_image`` (without ``saved``, added by the writer)."""
        return {
            "name": self.name,
            "path": self.path,
            "sha256": self.sha256,
            "size": [int(self.size[0]), int(self.size[1])],
            "crop_box": [round(float(v), 4) for v in self.crop_box],
            "resample": RESAMPLE,
            "exif_orientation": int(self.orientation),
        }


def cover_crop_box(src_w: int, src_h: int, width: int, height: int) -> tuple[float, float, float, float]:
    """The centred region of a ``src_w`` x ``src_h`` image with the aspect ratio of ``width`` x
    ``height``, as large as fits: what is resized to the target (left, top, right, bottom)."""
    scale = max(width / src_w, height / src_h)
    crop_w, crop_h = width / scale, height / scale
    left, top = (src_w - crop_w) / 2.0, (src_h - crop_h) / 2.0
    return (left, top, left + crop_w, top + crop_h)


def open_checked(path: str):
    """The image at ``path`` as RGB, upright (EXIF orientation applied), or UserError saying what is
    wrong with it."""
    return _open_checked(path)[0]


def _open_checked(path: str):
    """(upright RGB image, EXIF orientation applied: 1 for none) of the image at ``path``."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise UserError(f"--image {path!r} does not exist (or is not a file)")
    try:
        opened = open_upright(path)
    except TooManyPixels as exc:
        raise UserError(f"--image {path!r}: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"--image {path!r} cannot be read as an image ({type(exc).__name__}: {exc})") from None
    img = opened.image
    if opened.frames > 1:
        raise UserError(f"--image {path!r} has {opened.frames} frames (animation or multi-page); save the "
                        "frame you want as a PNG and give that")
    mode = img.mode
    if mode not in _CONVERTIBLE and mode not in _WITH_ALPHA:
        raise UserError(f"--image {path!r} has pixel mode {mode!r} (e.g. 16-bit or float), which has no "
                        "faithful 8-bit RGB form here; convert it to 8-bit RGB first")
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise UserError(f"--image {path!r} is {w}x{h} px: too small (at least {MIN_SIDE} px each side)")
    if mode in _WITH_ALPHA:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), opened.orientation
    return img.convert("RGB"), opened.orientation


def read_source(path: str, height: int, width: int) -> SourceImage:
    """Open, check and fit one image to ``height`` x ``width`` (cover + centre crop, bicubic)."""
    from PIL import Image

    rgb, orientation = _open_checked(path)
    box = cover_crop_box(rgb.width, rgb.height, width, height)
    fitted = rgb.resize((width, height), Image.Resampling.BICUBIC, box=box)
    return SourceImage(path, os.path.basename(path), file_sha256(path), rgb.size, box, fitted, orientation)


def read_images_csv(path: str) -> list[ImageJob]:
    """``image,prompt`` rows (a header naming those columns; image paths relative to the CSV's folder).

    Rows are named as a spreadsheet numbers them (the header is row 1), which is the line of the file
    a row starts on (a quoted cell may span lines)."""
    rows = _csv_rows(path)
    header = [c.strip().lower() for c in rows[0][1]] if rows else []
    if "image" not in header or "prompt" not in header:
        raise UserError(f"--images-csv {path!r} needs a header line with the columns image,prompt (found: "
                        f"{','.join(header) or 'nothing'})")
    for name in ("image", "prompt"):
        where = [i + 1 for i, c in enumerate(header) if c == name]
        if len(where) > 1:
            raise UserError(f"--images-csv {path!r}: the header names the column {name!r} {len(where)} times "
                            f"(columns {', '.join(map(str, where))}); keep one")
    col = {name: header.index(name) for name in ("image", "prompt")}
    base = os.path.dirname(os.path.abspath(path))
    jobs = []
    for row, cells in rows[1:]:
        if len(cells) > len(header):
            raise UserError(f"--images-csv {path!r} row {row}: {len(cells)} cells but the header names {len(header)} "
                            "columns; quote a cell that holds a comma (\"a cat, left\")")
        cell = {name: cells[i].strip() if i < len(cells) else "" for name, i in col.items()}
        if not any(c.strip() for c in cells):
            continue
        if not cell["image"] or not cell["prompt"]:
            raise UserError(f"--images-csv {path!r} row {row}: needs both an image and a prompt")
        image = os.path.expanduser(cell["image"])
        jobs.append(ImageJob(image if os.path.isabs(image) else os.path.join(base, image), cell["prompt"]))
    if not jobs:
        raise UserError(f"--images-csv {path!r} lists no image")
    return jobs


def _csv_rows(path: str) -> list[tuple[int, list[str]]]:
    """(row number, cells) of each row of a CSV file, blank lines left out (strict quoting)."""
    rows = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, strict=True)
            start = 1
            try:
                for cells in reader:
                    if cells:
                        rows.append((start, cells))
                    start = reader.line_num + 1
            except csv.Error as exc:
                raise UserError(
                    f"--images-csv {path!r} row {start}: not valid CSV from there on ({exc}); a quote (\") opened "
                    "in a cell must close it, and a quote inside a quoted cell is written twice (\"\")"
                ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UserError(f"cannot read --images-csv {path!r}: {reason}") from None
    return rows


def pair_images(images: list[str], prompts: list[str]) -> list[ImageJob]:
    """``--image`` paths with the ``--prompt`` flags: one prompt for every image, or one each in order."""
    if len(prompts) == 1:
        return [ImageJob(p, prompts[0]) for p in images]
    if len(prompts) == len(images):
        return [ImageJob(i, p) for i, p in zip(images, prompts)]
    raise UserError(f"{len(images)} --image with {len(prompts)} --prompt: give one prompt for all images, or one "
                    "per image in the same order (or an --images-csv of image,prompt rows)")


def check_noise_levels(levels: Optional[list[float]], timesteps: Optional[list[float]]) -> Optional[tuple[float, ...]]:
    """The noise levels sigma in [0, 1], noisiest first (denoising order), from --noise-levels or
    --timesteps (flow matching: timestep = 1000 sigma). None when neither is given."""
    if levels is not None and timesteps is not None:
        raise UserError("give --noise-levels or --timesteps, not both (timestep = 1000 x noise level)")
    if timesteps is not None:
        bad = [t for t in timesteps if not (math.isfinite(t) and 0 <= t <= 1000)]
        if bad:
            raise UserError(f"--timesteps must lie in [0, 1000], got {bad[0]}")
        levels = [t / 1000.0 for t in timesteps]
        flag = "--timesteps"
    elif levels is not None:
        flag = "--noise-levels"
        bad = [s for s in levels if not (math.isfinite(s) and 0 <= s <= 1)]
        if bad:
            raise UserError(f"--noise-levels must lie in [0, 1] (0 = the clean image, 1 = pure noise), got {bad[0]}")
    else:
        return None
    if len(set(levels)) != len(levels):
        raise UserError(f"{flag}: each value once, got {levels}")
    return tuple(sorted((float(s) for s in levels), reverse=True))
