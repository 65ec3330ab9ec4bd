"""Fixed figure margins measured from the figure's own texts, instead of a layout engine.

matplotlib's constrained layout measures every artist of a figure (each tick label of each axis)
twice before the figure is drawn: for a figure of a few panels that is about as long as drawing it.
Here the few texts that decide a margin (the longest word on a y axis, a colour bar's tick labels,
the number of lines of a title) are measured with FreeType's metrics, without drawing, and the
panels are placed with :meth:`Figure.subplots_adjust`. Every size is in inches.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

PT = 1.0 / 72.0  # inches per point
LINE_SPACING = 1.2  # matplotlib's default line spacing of a text
TICK_BAND = (3.5 + 3.5 + 1.0) * PT  # tick length + pad of its label (rc defaults), and a point of slack
LABEL_PAD = 4.0 * PT  # between tick labels and an axis label (rc default)
TITLE_PAD = 6.0 * PT  # between an axes and its title (rc default)
EDGE = 0.08  # free space kept at each edge of the figure


def text_width(texts: Iterable[str], fontsize: float, weight: str = "normal") -> float:
    """Width of the widest line of ``texts`` at ``fontsize`` points in the current font family."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import text_to_path

    prop = FontProperties(size=fontsize, weight=weight)
    widest = 0.0
    for text in texts:
        for line in str(text).split("\n"):
            if line:
                widest = max(widest, text_to_path.get_text_width_height_descent(line, prop, ismath=False)[0])
    return widest * PT * 1.04 + 1.0 * PT  # hinting at draw time makes glyphs up to a few % wider


def text_height(fontsize: float, lines: int = 1) -> float:
    """Height of ``lines`` lines of text at ``fontsize`` points."""
    return lines * fontsize * LINE_SPACING * PT if lines > 0 else 0.0


def lines_of(text: str) -> int:
    return text.count("\n") + 1 if text else 0


def fontsize_of(size) -> float:
    """Points of a matplotlib font size ("large", 10, ...)."""
    from matplotlib.font_manager import FontProperties

    return FontProperties(size=size).get_size_in_points()


def _title_points(fontsize) -> float:
    import matplotlib as mpl

    return fontsize_of(fontsize if fontsize is not None else mpl.rcParams["figure.titlesize"])


def suptitle_height(text: str, fontsize=None) -> float:
    """The band a figure title of ``text`` takes at the top (:func:`suptitle_band` puts it there)."""
    return EDGE + text_height(_title_points(fontsize), lines_of(text)) + 0.06 if text else EDGE


def suptitle_width(texts, fontsize=None) -> float:
    """The narrowest figure (inches) on which every one of ``texts`` fits as its title (:func:`suptitle_band`)."""
    return text_width([t for t in texts if t], _title_points(fontsize)) + 2 * EDGE


def suptitle_band(fig, text: str, fontsize=None) -> float:
    """Put ``text`` as the figure's title, its top :data:`EDGE` below the figure's top; the band it takes."""
    if text:
        fig.suptitle(text, y=1.0 - EDGE / fig.get_figheight(), va="top", fontsize=_title_points(fontsize))
    return suptitle_height(text, fontsize)


def x_axis_band(tick_size: float, tick_lines: int = 1, label_size: Optional[float] = None, label_lines: int = 1) -> float:
    """Height below an axes taken by its x tick labels and its x label."""
    band = TICK_BAND + text_height(tick_size, tick_lines)
    if label_size is not None and label_lines:
        band += LABEL_PAD + text_height(label_size, label_lines)
    return band


def y_axis_band(tick_labels: Sequence[str], tick_size: float, label_size: Optional[float] = None, label_lines: int = 1) -> float:
    """Width left of an axes taken by its y tick labels and its (rotated) y label."""
    band = TICK_BAND + text_width(tick_labels, tick_size)
    if label_size is not None and label_lines:
        band += LABEL_PAD + text_height(label_size, label_lines)
    return band


def title_band(fontsize: float, lines: int = 1) -> float:
    """Height above an axes taken by its title."""
    return TITLE_PAD + text_height(fontsize, lines) if lines else 0.0


def fixed_layout(fig, *, top: float = 0.55, bottom: float = 0.15, left: float = 0.15, right: float = 0.1, wspace: float = 0.3,
                 hspace: float = 0.3) -> None:
    """Margins in inches (no layout engine: constrained layout costs a full extra draw per figure).
    Margins that would leave the panels less than :data:`MIN_PANELS` of the figure are shrunk in
    proportion (the texts may then be clipped, but the figure is drawn)."""
    W, H = fig.get_size_inches()
    left, right = _fit(left, right, W)
    top, bottom = _fit(top, bottom, H)
    fig.subplots_adjust(left=left / W, right=1 - right / W, top=1 - top / H, bottom=bottom / H, wspace=wspace, hspace=hspace)


MIN_PANELS = 0.2  # the least share of a figure's width (height) that fixed_layout leaves to its panels


def _fit(a: float, b: float, size: float) -> tuple[float, float]:
    """Margins ``a`` + ``b`` (inches) shrunk in proportion to leave :data:`MIN_PANELS` of ``size``."""
    room = size * (1.0 - MIN_PANELS)
    a, b = max(a, 0.0), max(b, 0.0)
    return (a, b) if a + b <= room else (a * room / (a + b), b * room / (a + b))


def colorbar_band(cbar, ticks_size: Optional[float] = None) -> float:
    """Width right of a vertical colour bar's axes taken by its tick labels (as the locator and
    formatter will write them at the bar's current height) and its label. ``ticks_size``: the tick
    labels' points when the caller knows them (reading them from the axis creates all its ticks)."""
    axis = cbar.ax.yaxis
    band = TICK_BAND + text_width(tick_labels(axis), tick_size(axis) if ticks_size is None else ticks_size)
    label = axis.get_label()
    if label.get_text():
        band += LABEL_PAD + text_height(label.get_fontsize(), lines_of(label.get_text()))
    return band


def tick_size(axis) -> float:
    """Points of ``axis``'s tick labels."""
    return axis.get_major_ticks()[0].label1.get_fontsize()


def place_colorbar(fig, cax, axes: Sequence, *, gap: float, width: float) -> None:
    """Put ``cax`` ``gap`` inches right of ``axes`` (their common right edge), ``width`` inches wide,
    as high as they are together."""
    W = fig.get_figwidth()
    boxes = [ax.get_position() for ax in axes]
    x1 = max(b.x1 for b in boxes)
    y0 = min(b.y0 for b in boxes)
    y1 = max(b.y1 for b in boxes)
    cax.set_position((x1 + gap / W, y0, width / W, y1 - y0))


def new_colorbar(fig, mappable, *, bottom: float, top: float, label: str = "", label_size: float = 8, ticks_size: float = 8,
                 **kwargs):
    """A vertical colour bar in its own axes, first as high as the panels will be (``bottom`` and
    ``top`` margins in inches), so that :func:`colorbar_band` measures the ticks it will have.
    ``kwargs`` go to :meth:`Figure.colorbar` (e.g. ``extend``)."""
    H = fig.get_figheight()
    cax = fig.add_axes((0.0, bottom / H, 0.01, max(1.0 - (top + bottom) / H, 0.01)))
    cbar = fig.colorbar(mappable, cax=cax, **kwargs)
    cbar.ax.tick_params(labelsize=ticks_size)
    if label:
        cbar.set_label(label, fontsize=label_size)
    return cbar


def legend_width(labels: Sequence[str], fontsize: float) -> float:
    """Width of a frameless legend of ``labels`` (handles of the default length), with its pad to the anchor."""
    em = fontsize * PT
    return (0.5 + 0.4 + 2.0 + 0.8 + 0.4) * em + text_width(labels, fontsize)  # borderaxespad, borderpad, handle, its gap, borderpad


def legend_height(rows: int, fontsize: float, title: bool = False) -> float:
    """Height of a frameless one-column legend of ``rows`` entries."""
    em = fontsize * PT
    n = rows + (1 if title else 0)
    return (0.5 + 2 * 0.4) * em + n * text_height(fontsize) + max(n - 1, 0) * 0.5 * em


def tick_labels(axis) -> list[str]:
    """The tick labels ``axis`` will draw at its current size and limits (locator + formatter, no drawing)."""
    lo, hi = sorted(axis.get_view_interval())
    eps = 1e-12 * max(abs(lo), abs(hi), 1)  # a tick at the limit, give or take rounding, is drawn
    locs = [v for v in axis.get_majorticklocs() if lo - eps <= v <= hi + eps]
    return list(axis.get_major_formatter().format_ticks(locs)) if locs else []


EVEN_LABEL = "even"  # the tick of the even split (1/n for n words) on a word-share colour bar
EVEN_COLOUR = "#3fd0ff"  # its line across the bar: visible on every colour of inferno
EVEN_ROOM = 0.07  # ticks closer than this share of the bar to the even tick are left out (their labels would overlap)


def mark_even(cbar, even: float) -> None:
    """On a vertical word-share colour bar, a tick labelled :data:`EVEN_LABEL` at ``even`` (the share
    each word would have if the attention were split evenly: 1/n) and a line across the bar there.

    The tick comes and goes with the bar's limits (a bar redrawn with another ``vmax``), and
    :func:`tick_labels` (so :func:`colorbar_band`) measures it like any other tick.
    """
    from matplotlib.ticker import Formatter, Locator

    base_loc, base_fmt = cbar.locator, cbar.formatter

    class EvenLocator(Locator):
        def __call__(self):
            base_loc.set_axis(self.axis)
            lo, hi = sorted(self.axis.get_view_interval())
            ticks = list(base_loc())
            if lo <= even <= hi:
                ticks = sorted([t for t in ticks if abs(t - even) > EVEN_ROOM * (hi - lo)] + [even])
            return ticks

    class EvenFormatter(Formatter):
        def set_axis(self, axis):
            super().set_axis(axis)
            base_fmt.set_axis(axis)

        def format_ticks(self, values):
            others = [v for v in values if v != even]
            labels = dict(zip(others, base_fmt.format_ticks(others))) if others else {}
            return [EVEN_LABEL if v == even else labels[v] for v in values]

        def __call__(self, x, pos=None):
            return EVEN_LABEL if x == even else base_fmt(x, pos)

        def get_offset(self):
            return base_fmt.get_offset()

    from matplotlib.lines import Line2D

    cbar.locator = EvenLocator()
    cbar.formatter = EvenFormatter()
    # an artist, not axhline: the bar's limits must not grow to an even split above its scale
    cbar.ax.add_artist(Line2D([0.0, 1.0], [even, even], transform=cbar.ax.get_yaxis_transform(), color=EVEN_COLOUR, lw=1.2))


def place_labels(points, sizes, bounds, *, offset: tuple[float, float] = (3.0, 2.0), avoid: float = 3.0,
                 step: float = 4.0, rings: int = 40) -> tuple[list[tuple[float, float]], list[bool]]:
    """Where to put a label beside each of ``points`` so that no two labels overlap (numbers only,
    no drawing): each label, in order, takes the first free place on rings of growing radius around
    its point (right-above first, the usual place; then right, left, above, below and the corners).

    Args:
        points: (x, y) of each point; sizes: (width, height) of each label; bounds: (x0, y0, x1, y1)
            the labels stay within. One unit for all, y upwards (e.g. points of the axes).
        avoid: the labels keep clear of every point by this much (its marker).

    Returns:
        the lower-left corner of each label, and whether it left the usual place (draw a leader line).
        When no free place is found within ``rings`` rings, the one overlapping least is taken.
    """
    import numpy as np

    x0, y0, x1, y1 = bounds
    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    marks = np.column_stack([pts - avoid, pts + avoid])  # (n, 4) the points' markers
    placed = np.zeros((0, 4))
    corners, moved = [], []
    dx, dy = offset
    r = step * np.arange(1, rings + 1)[:, None]  # (rings, 1)

    def overlap(boxes, others):  # (c, 4) x (k, 4) -> (c,) summed overlap areas
        w = np.minimum(boxes[:, None, 2], others[None, :, 2]) - np.maximum(boxes[:, None, 0], others[None, :, 0])
        h = np.minimum(boxes[:, None, 3], others[None, :, 3]) - np.maximum(boxes[:, None, 1], others[None, :, 1])
        return (np.clip(w, 0, None) * np.clip(h, 0, None)).sum(axis=1)

    for (px, py), (w, h) in zip(pts, sizes):
        ring = [(px + dx + r, py - h / 2 + 0 * r), (px - dx - r - w, py - h / 2 + 0 * r), (px - w / 2 + 0 * r, py + dy + r),
                (px - w / 2 + 0 * r, py - dy - r - h), (px + dx + r, py + dy + r), (px - dx - r - w, py + dy + r),
                (px + dx + r, py - dy - r - h), (px - dx - r - w, py - dy - r - h)]
        cx = np.concatenate([[px + dx], np.concatenate([c[0] for c in ring], axis=1).ravel()])  # ring by ring, 8 places each
        cy = np.concatenate([[py + dy], np.concatenate([c[1] for c in ring], axis=1).ravel()])
        cx = np.clip(cx, x0, x1 - w)  # kept within the bounds
        cy = np.clip(cy, y0, y1 - h)
        boxes = np.column_stack([cx, cy, cx + w, cy + h])
        cost = overlap(boxes, placed) + overlap(boxes, marks)
        free = np.flatnonzero(cost <= 0)
        k = int(free[0]) if free.size else int(np.argmin(cost))
        placed = np.vstack([placed, boxes[k]])
        corners.append((float(cx[k]), float(cy[k])))
        moved.append(abs(cx[k] - (px + dx)) > 0.5 or abs(cy[k] - (py + dy)) > 0.5)
    return corners, moved
