"""What a given-image run is (metadata ``mode: "image"``, docs/FORMAT.md): the source image, its
crop, and the noise levels σ the transformer saw, read from the metadata for the pages and figures.

With ``noise_levels`` the dump's "steps" are independent noise levels of one given image (each is
its own forward pass from the same clean image), not a denoising trajectory: figures put σ on the
x axis and draw one marker per level without joining lines. With img2img (``strength``) the steps
are a real trajectory that starts from the given image, and the run's image is the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class GivenImage:
    """The source of a given-image run."""

    name: str  # file name of the source image
    size: Optional[tuple[int, int]]  # (W, H) of the source
    crop_box: Optional[tuple[float, float, float, float]]  # (left, top, right, bottom) in source pixels
    levels: Optional[np.ndarray]  # (S,) noise levels σ, noisiest first; None for img2img
    strength: Optional[float]  # img2img strength; None with noise levels

    @property
    def crop_text(self) -> str:
        """``crop (l, t)-(r, b) of W x H`` or "" when unknown."""
        if self.crop_box is None:
            return ""
        l, t, r, b = (f"{v:g}" for v in self.crop_box)
        of = f" of {self.size[0]}\u00d7{self.size[1]}" if self.size else ""
        return f"crop ({l}, {t})\u2013({r}, {b}){of}"

    @property
    def describe(self) -> str:
        """One line: what the run's image is."""
        crop = f", {self.crop_text}" if self.crop_text else ""
        if self.levels is None:
            what = "img2img output" + (f" (strength {self.strength:g})" if self.strength is not None else "")
            return f"{what} from the given image {self.name}{crop}"
        return f"given image {self.name}{crop}"

    @property
    def levels_text(self) -> str:
        return ", ".join(f"{s:g}" for s in self.levels) if self.levels is not None else ""


def given_image(meta: dict, steps: Optional[int] = None) -> Optional[GivenImage]:
    """The run's :class:`GivenImage`, or None for a generation (``mode`` absent or ``"generate"``).

    ``steps``: the dump's number of steps; noise levels of another length are ignored (figures then
    fall back to steps)."""
    if meta.get("mode") != "image":
        return None
    src = meta.get("source_image") if isinstance(meta.get("source_image"), dict) else {}
    size = src.get("size")
    box = src.get("crop_box")
    levels = meta.get("noise_levels")
    arr = None
    if isinstance(levels, list) and levels and all(isinstance(v, (int, float)) for v in levels):
        arr = np.asarray(levels, dtype=float)
        if steps is not None and arr.size != steps:
            arr = None
    strength = meta.get("strength")
    return GivenImage(
        name=str(src.get("name") or src.get("path") or "(unnamed)"),
        size=tuple(int(v) for v in size) if isinstance(size, list) and len(size) == 2 else None,
        crop_box=tuple(float(v) for v in box) if isinstance(box, list) and len(box) == 4 else None,
        levels=arr,
        strength=float(strength) if isinstance(strength, (int, float)) else None,
    )
