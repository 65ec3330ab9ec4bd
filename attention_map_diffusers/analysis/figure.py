"""A figure's canvas and its way to disk: figures on their own Agg canvas (no pyplot), the run's
facts in a footer fitted to the figure's width, and PNGs rendered by savefig and written by the
analysis's own writer (:mod:`.pngfile`; palette PNGs for figures without a photograph), or blitted (:class:`Blitter`) when only part of a figure
changes from one file to the next. What is drawn on the figures lives in :mod:`.plots` and
:mod:`.group_plots`.
"""

from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..atomic import atomic_path
from .layout import text_width
from .pngfile import write_png
from .views import FigureFacts

FOOTER_HEIGHT = 0.22  # inches kept free at the bottom of a figure for its footer
# (prompt characters kept, points) of the footer, tried in this order until the line fits: the prompt
# cut shorter and shorter, then in smaller type, then without the prompt
FOOTER_TRIES = tuple([(p, 6.5) for p in range(110, 29, -10)] + [(p, 5.5) for p in (50, 40, 30)] + [(0, 6.5), (0, 5.5), (0, 5.0)])
GLYPH_SLACK = 0.95  # glyphs drawn at low dpi come out a few per cent wider than measured


def new_figure(width: float, height: float, layout: Optional[str] = "constrained", facts: Optional[FigureFacts] = None) -> Figure:
    """A figure of ``width`` x ``height`` inches on its own Agg canvas (no pyplot), with the run's footer.

    With ``facts``, the footer takes a strip of :data:`FOOTER_HEIGHT` inches at the bottom, kept free
    by the constrained layout.
    """
    fig = Figure(figsize=(width, height + (FOOTER_HEIGHT if facts else 0.0)), layout=layout)
    FigureCanvasAgg(fig)
    if facts is not None:
        add_footer(fig, facts)
    return fig


def footer_band(facts: Optional[FigureFacts]) -> float:
    """Inches the footer takes at the bottom of a figure (none without facts)."""
    return FOOTER_HEIGHT if facts is not None else 0.0


def _footer_weight(facts: FigureFacts) -> str:
    return "bold" if facts.random_weights else "normal"


def _footer_room(width: float) -> float:
    """Inches of footer text that fit on a figure ``width`` inches wide (:func:`footer_width` inverts it)."""
    return GLYPH_SLACK * width - 0.05


def footer_width(facts: Optional[FigureFacts]) -> float:
    """The narrowest figure (inches) whose footer still fits on one line (:func:`add_footer`'s last
    try: no prompt, 5 pt); 0 without facts."""
    if facts is None:
        return 0.0
    cut, size = FOOTER_TRIES[-1]
    return (text_width([facts.footer(max_prompt=cut)], size, _footer_weight(facts)) + 0.05) / GLYPH_SLACK


def add_footer(fig: Figure, facts: FigureFacts) -> None:
    """The run's facts in small type at the bottom (red when the weights are random); PNG text chunks too.

    Fitted to the figure's width: the prompt is cut shorter, the type made smaller (down to 5 pt),
    the prompt left out, and failing all that the line is broken in two.
    """
    weight = _footer_weight(facts)
    room = _footer_room(fig.get_figwidth())
    for cut, size in FOOTER_TRIES:  # the first that fits
        text = facts.footer(max_prompt=cut)
        if text_width([text], size, weight) <= room:
            break
    else:  # still too wide: two lines, split at the separator nearest the middle
        cuts = [i for i in range(len(text)) if text.startswith(" | ", i)]
        if cuts:
            mid = min(cuts, key=lambda i: abs(i - len(text) / 2))
            text = text[:mid] + "\n" + text[mid + 3 :]
    frac = FOOTER_HEIGHT / fig.get_figheight()
    for old in [t for t in fig.texts if t.get_gid() == "footer"]:
        old.remove()
    if text:
        fig.text(0.005, 0.25 * frac, text, fontsize=size, ha="left", va="bottom", gid="footer",
                 color="#b00000" if facts.random_weights else "#555555", fontweight=weight)
    engine = fig.get_layout_engine()
    if engine is not None and hasattr(engine, "set"):
        try:
            engine.set(rect=(0.0, frac, 1.0, 1.0 - frac))
        except TypeError:  # tight layout: no rect parameter in set()
            pass


def set_width(fig: Figure, width: float, facts: Optional[FigureFacts]) -> None:
    """Make ``fig`` ``width`` inches wide, its footer fitted again; the axes keep their places and sizes in inches."""
    ratio = fig.get_figwidth() / width
    for ax in fig.axes:
        pos = ax.get_position(original=True)
        ax.set_position((pos.x0 * ratio, pos.y0, pos.width * ratio, pos.height))
    fig.set_figwidth(width)
    if facts is not None:
        add_footer(fig, facts)


def _suptitle(fig: Figure) -> str:
    """The figure's suptitle text ("" when none); Figure.get_suptitle is matplotlib >= 3.8 only."""
    text = getattr(fig, "_suptitle", None)
    return text.get_text() if text is not None else ""


def write_figure(fig: Figure, path: str, fmt: str = "png", dpi: int = 100, facts: Optional[FigureFacts] = None) -> None:
    """Write ``fig`` to ``path`` (temp name, then rename); the figure stays usable.

    PNGs carry the figure's title and, with ``facts``, the run's facts in their text chunks.
    """
    if fmt != "png":
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi)
        return
    pixels = render_rgba(fig, dpi)
    write_png(path, pixels, png_meta(fig, facts), dpi, palette=not has_photo(fig), dither=dither_boxes(fig, *pixels.shape[:2]))


PHOTO = "photo"  # the gid of an image artist that shows a photograph in colour (the run's image)


def has_photo(fig: Figure) -> bool:
    """Whether ``fig`` shows a photograph in colour (an image artist marked :data:`PHOTO`): then it
    is written in full colour, else as a palette PNG (:mod:`.pngfile`; lines, text and maps alone
    lose a level or two where the palette merges neighbouring shades)."""
    return any(im.get_gid() == PHOTO for ax in fig.axes for im in ax.images)


def dither_boxes(fig: Figure, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """Pixel boxes (top, left, bottom, right) of ``fig``'s panels that show maps over the image, and
    of its colour bars, as last drawn (``height``: the picture's rows): blends of a grey image and a
    colour map, too many for 256 colours, and gradients, which a dithered palette renders within a
    few levels without bands. ``height`` x ``width``: the picture's pixels (the panels' places are
    fractions of the figure: right at any dpi)."""
    from .raster import MapRaster

    boxes = []
    for ax in fig.axes:
        over = any(isinstance(a, MapRaster) and a.image is not None for a in ax.artists)
        over |= any(im.get_alpha() is not None and im.get_alpha() < 1 for im in ax.images)  # segmentation over the image
        over |= getattr(ax, "_colorbar", None) is not None  # matplotlib marks a colour bar's axes so
        if over:
            b = ax.get_position()
            boxes.append((max(0, int((1 - b.y1) * height)), max(0, int(b.x0 * width)),
                          min(height, int(np.ceil((1 - b.y0) * height))), min(width, int(np.ceil(b.x1 * width)))))
    return boxes


def png_meta(fig: Figure, facts: Optional[FigureFacts]) -> dict[str, str]:
    """A PNG's text chunks: the run's facts (with ``facts``) and the figure's title."""
    meta = facts.png_text() if facts is not None else {}
    title = _suptitle(fig)
    if title:
        meta["Title"] = title
    return meta


def render_rgba(fig: Figure, dpi: float) -> np.ndarray:
    """(H, W, 4) uint8: the pixels ``fig.savefig(..., dpi=dpi)`` would write to a PNG.

    Rendered by savefig itself (raw RGBA), so that the picture is exactly the one savefig draws;
    the PNG is then written by :func:`~.pngfile.write_png`, ~2x faster than Pillow's encoder.
    """
    fig.savefig(io.BytesIO(), format="rgba", dpi=dpi)  # the raw bytes are a copy of the canvas's buffer
    return np.asarray(fig.canvas.buffer_rgba())  # (H, W, 4) view of the buffer savefig just rendered


class Blitter:
    """Frames of one figure of which only ``dynamic`` artists change (maps, titles, colour bars, lines).

    The rest (the footer, static axes) is rendered once at ``dpi``; each :meth:`render` restores that
    background and draws only the dynamic artists over it (Agg blitting). The pixels are those of a
    full render as long as no static artist overlaps a dynamic one (the fixed layouts see to that).
    """

    def __init__(self, fig: Figure, dynamic: Sequence, dpi: float):
        self.fig, self.dynamic, self.dpi = fig, list(dynamic), dpi
        self.palette = not has_photo(fig)
        fig.set_dpi(dpi)
        shown = [a.get_visible() for a in self.dynamic]
        for a in self.dynamic:
            a.set_visible(False)
        fig.canvas.draw()
        self.background = fig.canvas.copy_from_bbox(fig.bbox)
        for a, v in zip(self.dynamic, shown):
            a.set_visible(v)

    def render(self) -> np.ndarray:
        """(H, W, 4) uint8: the figure as it stands now (a view of the canvas, valid until the next render)."""
        canvas = self.fig.canvas
        canvas.restore_region(self.background)
        for a in self.dynamic:
            self.fig.draw_artist(a)
        return np.asarray(canvas.buffer_rgba())

    def write(self, path: str, facts: Optional[FigureFacts] = None) -> None:
        """:meth:`render` as a PNG at ``path``, with the text chunks :func:`write_figure` gives it."""
        pixels = self.render()
        write_png(path, pixels, png_meta(self.fig, facts), self.dpi, palette=self.palette,
                  dither=dither_boxes(self.fig, *pixels.shape[:2]))


def save_figure(fig: Figure, path: str, fmt: str = "png", dpi: int = 100, facts: Optional[FigureFacts] = None) -> None:
    """Write ``fig`` to ``path`` (temp name, then rename); the figure is not to be used afterwards."""
    write_figure(fig, path, fmt, dpi, facts)
