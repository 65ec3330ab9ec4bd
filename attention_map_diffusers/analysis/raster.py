"""Maps drawn as exact-size rasters: computed in numpy at the pixel size their axes have when drawn.

``imshow`` sends every picture through matplotlib's generic image pipeline (conversion to float
RGBA, affine resampling, compositing): drawing the panel of a 64x64 map on 640 pixels takes ~23 ms,
of a map over a 512-pixel image ~58 ms, for every map of every figure. :class:`MapRaster` computes
the same picture directly at the panel's size (a colour-table lookup, and for an overlay one bilinear
upsampling and an integer blend) and hands it to the renderer unchanged: ~4 ms and ~5 ms for the
pixels. It is an ordinary artist of its axes, so vector formats, ``draw_artist`` and blitting work
as with any image.

The picture is the one ``imshow`` would draw up to resampling: the map's cells as nearest-neighbour
squares (``interpolation="nearest"``), or the map upsampled bilinearly (pixel centres aligned) to
the image and blended over its greyscale copy (:func:`greyscale`: a red object under the overlay
must not read as "heat"); colours come from the colour map's own 8-bit table, indexed as
:class:`~matplotlib.colors.Colormap` indexes it (``floor(value / vmax * N)``, clipped to the table).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from matplotlib.artist import Artist
from matplotlib.cm import ScalarMappable
from PIL import Image


def colour_table(mappable: ScalarMappable) -> np.ndarray:
    """(N, 4) uint8: the mappable's colour map as 8-bit RGB and an opaque alpha, as ``cmap(x, bytes=True)`` gives it."""
    cmap = mappable.get_cmap()
    table = np.array(cmap(np.arange(cmap.N), bytes=True), dtype=np.uint8)
    table[:, 3] = 255
    return table


def colour_indices(values: np.ndarray, vmax: float, n: int) -> np.ndarray:
    """Indices into an ``n``-colour table of ``values`` on a 0..``vmax`` scale (above saturates, below
    and NaN are 0: validated dumps have no NaN, but a NaN must not index outside the table)."""
    scaled = np.multiply(values, np.float32(n / vmax), dtype=np.float32)
    np.nan_to_num(scaled, copy=False, nan=0.0)
    return np.clip(scaled, 0, n - 1).astype(np.intp)


def nearest_cells(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    """(height, width): each pixel takes the cell its centre falls in (nearest-neighbour upsampling)."""
    h, w = heat.shape
    rows = np.minimum(((np.arange(height) + 0.5) * (h / height)).astype(np.intp), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * (w / width)).astype(np.intp), w - 1)
    return heat[rows[:, None], cols[None, :]]


def bilinear(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    """(Hc, Wc) -> (height, width) float32 by bilinear interpolation (pixel centres aligned, as align_corners=False)."""
    img = Image.fromarray(np.ascontiguousarray(heat, dtype=np.float32), mode="F")
    return np.asarray(img.resize((width, height), Image.BILINEAR), dtype=np.float32)


def resized_rgb(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w, 3+) uint8 -> (height, width, 3) uint8 (Pillow's bilinear filter, antialiased when shrinking)."""
    rgb = np.ascontiguousarray(image[..., :3])
    if rgb.shape[:2] == (height, width):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))


LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B: Pillow's convert("L")


def greyscale(rgb: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 -> (h, w, 3) uint8 with R = G = B = the pixel's luma (:data:`LUMA`), rounded."""
    luma = np.rint(np.asarray(rgb[..., :3], dtype=np.float32) @ np.asarray(LUMA, dtype=np.float32))
    return np.repeat(np.clip(luma, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


class MapRaster(Artist):
    """A (Hc, Wc) map drawn at its box's exact pixel size: alone, as squares, in the data box
    [-0.5, Wc-0.5] x [-0.5, Hc-0.5]; or over an (h, w) ``image``, smooth, in the image's box
    [-0.5, w-0.5] x [-0.5, h-0.5] (so that things can be drawn on it in image pixels), the image
    in greyscale (:func:`greyscale`). Top row first.

    The colour scale is the ``mappable``'s (its colour map, and its norm's ``vmax`` at draw time, 0 at
    the bottom), so a colour bar of the same mappable always agrees with the picture. ``aspect``: as
    ``imshow``'s ("equal": square cells; "auto": the cells fill the axes).
    """

    zorder = 0  # below spines, ticks and titles, as images are

    def __init__(self, ax, heat: np.ndarray, mappable: ScalarMappable, *, image: Optional[np.ndarray] = None,
                 alpha: float = 0.6, aspect: str = "equal"):
        super().__init__()
        self.mappable = mappable
        self.image = image
        self.blend = alpha
        self._base: dict[tuple[int, int], np.ndarray] = {}  # the image resized, per pixel size drawn
        self._lut: Optional[tuple[object, np.ndarray]] = None  # (colour map, its weighted table)
        self.set_heat(heat)
        ax.add_artist(self)
        self.set_clip_path(ax.patch)
        h, w = self.box
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_aspect(aspect)

    @property
    def box(self) -> tuple[int, int]:
        """(height, width) of the data box: the image's, else the map's."""
        return tuple(self.image.shape[:2]) if self.image is not None else tuple(self.heat.shape)

    def set_heat(self, heat: np.ndarray) -> None:
        """A new map of the same shape."""
        self.heat = np.asarray(heat, dtype=np.float32)
        self.stale = True

    def _table(self) -> np.ndarray:
        """The colour table: (N,) packed RGBA for a map alone; over an image, (N, 4) uint16 in 1/256 steps,
        the colours times the blend's weight and an opaque alpha."""
        cmap = self.mappable.get_cmap()
        if self._lut is None or self._lut[0] is not cmap:
            table = colour_table(self.mappable)
            if self.image is None:
                table = table.view(np.uint32).ravel()  # one gather of 4-byte pixels
            else:
                weighted = np.rint(table * np.float32(256 * self.blend))
                weighted[:, 3] = 255 * 256  # the image's share adds 0 to the alpha
                table = weighted.astype(np.uint16)
            self._lut = (cmap, table)
        return self._lut[1]

    def pixels(self, height: int, width: int) -> np.ndarray:
        """(height, width, 4) uint8 RGBA (opaque), top row first: the picture at that size.

        Over an image, the blend is computed in 1/256 steps (uint16): within one level of the exact
        ``(1 - alpha) * greyscale(image) + alpha * colour``, ~4x faster than in floats.
        """
        vmax = float(self.mappable.norm.vmax or 0.0)
        vmax = vmax if vmax > 0 else 1.0
        lut = self._table()
        if self.image is None:
            idx = colour_indices(nearest_cells(self.heat, height, width), vmax, len(lut))
            return np.take(lut, idx).view(np.uint8).reshape(height, width, 4)
        base = self._base.get((height, width))
        if base is None:  # the image's share of the blend (and 0 alpha), once per size
            base = np.zeros((height, width, 4), np.uint16)
            grey = greyscale(resized_rgb(self.image, height, width))
            base[..., :3] = np.rint(grey * np.float32(256 * (1.0 - self.blend)))
            self._base[(height, width)] = base
        mix = np.take(lut, colour_indices(bilinear(self.heat, height, width), vmax, len(lut)), axis=0)
        mix += base  # at most 255 * 256: no overflow
        mix += 128  # round to nearest
        mix >>= 8
        return mix.astype(np.uint8)

    def draw(self, renderer) -> None:
        if not self.get_visible():
            self.stale = False
            return
        h, w = self.box
        (x0, y0), (x1, y1) = self.axes.transData.transform([(-0.5, h - 0.5), (w - 0.5, -0.5)])
        x0, x1 = sorted((x0, x1))
        y0, y1 = sorted((y0, y1))
        mag = renderer.get_image_magnification()
        width, height = round((x1 - x0) * mag), round((y1 - y0) * mag)
        if width < 1 or height < 1:
            self.stale = False
            return
        gc = renderer.new_gc()
        self._set_gc_clip(gc)
        gc.set_gid(self.get_gid())
        # the renderer takes the rows bottom first
        renderer.draw_image(gc, round(x0), round(y0), self.pixels(height, width)[::-1])
        gc.restore()
        self.stale = False
