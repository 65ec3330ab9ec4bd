"""The evaluation's report, ``OUT/index.html``: the tables and figures of the output folder on one
self-contained page (inline CSS, no script, relative links), readable at 420 px wide: every table
scrolls sideways inside its own box, figures shrink to the page and open at full size on a tap.

Standard library only; it formats what :mod:`.report` computed and links only files it names.
"""

from __future__ import annotations

import html
import math
from collections import Counter
from typing import Optional, Sequence
from urllib.parse import quote

from .maps import MULTICLASS
from .tables import NO_ENCODER, Z95, SummaryRow, pct
from .write import GENERATOR, safe_name

_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1em auto;max-width:1400px;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em;overflow-wrap:anywhere} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
a{color:#0645ad} p,li{overflow-wrap:anywhere}
.note{background:#f5f5f5;border-left:4px solid #888;padding:.4em .8em;margin:.3em 0}
.warn{background:#ffe3e3;border-left:6px solid #c00000;padding:.6em .9em;margin:.6em 0;font-weight:600;color:#800}
.scroll{max-width:100%;overflow-x:auto;border:1px solid #eee}
table{border-collapse:collapse;font-size:.9em} td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;vertical-align:top}
th{white-space:nowrap} td{white-space:nowrap} td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tr.baseline td{color:#555;background:#f4f4f4}
td:first-child,th:first-child{position:sticky;left:0;background:#fff} tr.baseline td:first-child{background:#f4f4f4}
figure{margin:.6em 0;max-width:100%} figure img{display:block;max-width:100%;height:auto;border:1px solid #ddd;background:#fff}
figcaption{font-size:.85em;color:#555}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.1em 1em;margin:.5em 0} dl.facts dt{font-weight:600}
dl.facts dd{margin:0;overflow-wrap:anywhere}
"""

#: Rows of the lists that can be long (per image, skipped) shown on the page; the CSV files hold all.
MAX_ROWS = 500


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _href(path: str) -> str:
    return html.escape(quote(path.replace("\\", "/")), quote=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], num: Sequence[int] = (), classes: Sequence[str] = (),
           ident: str = "") -> str:
    """A table inside its own horizontally scrolling box; cells are HTML already."""
    def cells(tag, values):
        return "".join(f'<{tag}{" class=num" if k in num else ""}>{v}</{tag}>' for k, v in enumerate(values))

    body = "".join(f'<tr{f" class={c}" if c else ""}>{cells("td", r)}</tr>'
                   for r, c in zip(rows, list(classes) + [""] * (len(rows) - len(classes))))
    box_id = f' id="{_e(ident)}"' if ident else ""
    return f'<div class="scroll"{box_id}><table><tr>{cells("th", header)}</tr>{body}</table></div>'


def _figure(path: str, caption: str) -> str:
    return (f'<figure><a href="{_href(path)}" title="open at full size"><img src="{_href(path)}" alt="{_e(caption)}">'
            f"</a><figcaption>{_e(caption)} (tap or click: full size)</figcaption></figure>")


def _pm(se: float) -> str:
    return "" if math.isnan(se) else "\u00b1\u202f" + pct(Z95 * se)


def summary_table(rows: Sequence[SummaryRow]) -> str:
    header = ["method", "encoder", "images", "n", "mIoU (%)", "\u00b1 (%)", "class mIoU (%)", "mAP (%)", "\u00b1 (%)",
              "word pixel acc. (%)", "image pixel acc. (%)"]
    body, classes = [], []
    for r in rows:
        body.append([
            _e(r.method + (" (baseline)" if r.baseline else "")), _e(r.encoder),
            str(r.images), str(r.n), pct(r.miou), _pm(r.miou_se), pct(r.class_miou), pct(r.map), _pm(r.map_se),
            pct(r.word_pixel_acc), pct(r.image_pixel_acc) if r.method in MULTICLASS else "",
        ])
        classes.append("baseline" if r.baseline else "")
    return _table(header, body, num=range(2, 11), classes=classes, ident="summary-table")


def report_page(*, title: str, facts: Sequence[tuple[str, str]], rows: Sequence[SummaryRow], figures: Sequence[tuple[str, str]],
                images: Sequence, best: Optional[SummaryRow], skipped: Sequence, problems: Sequence[tuple[str, str]],
                csv_files: Sequence[str]) -> str:
    """The whole page.

    Args:
        facts: (name, value) lines of what was evaluated. rows: the summary as shown (baselines once).
        figures: (path, caption). images: the :class:`~.evaluate.ImageEval` scored. best: the best
        method's row (its per-image IoU is listed), or None. skipped: the :class:`~.evaluate.Skip`
        list. problems: (level, line) of an incomplete evaluation. csv_files: the CSV files written.
    """
    parts = [f"<h1>{_e(title)}</h1>"]
    parts += [f'<p class="warn">{_e(level)}: {_e(line)}</p>' for level, line in problems]
    parts.append('<dl class="facts">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts) + "</dl>")
    parts.append('<h2 id="summary">Summary</h2>')
    parts.append(
        '<p class="note">In percent (the CSV files hold fractions, 0 to 1). \u00b1: '
        f"{Z95:g} standard errors of the mean over the (image, word) pairs, a 95 % interval under the normal "
        "approximation (pairs of one image are not independent: read it as a lower bound). n: pairs scored. "
        "Word pixel accuracy: the share of pixels where the word's predicted mask is right. Image pixel accuracy "
        "(argmax only): the multi-class accuracy of each image, background included, averaged over the images. "
        f"Baselines use no text encoder (encoder {NO_ENCODER}) and are listed once.</p>"
    )
    parts.append(summary_table(rows))
    for path, caption in figures:
        parts.append(_figure(path, caption))
    parts.append('<h2 id="images">Per image</h2>')
    if best is not None:
        iou = {}
        for im in images:
            vals = [s.iou for s in im.scores if s.method == best.method and s.encoder == best.encoder]
            iou[im.key] = (sum(vals) / len(vals)) if vals else float("nan")
        acc_enc = best.encoder if best.method in MULTICLASS else None
        header = ["image (key)", "words scored", f"mean IoU of {best.method} ({best.encoder}) (%)"]
        if any(im.argmax_acc for im in images):
            header.append("argmax image pixel acc. (%)")
        body = []
        for im in images[:MAX_ROWS]:
            words = sorted({s.word for s in im.scores})
            row = [f'<a href="{_href("per_image/" + safe_name(im.key) + ".csv")}">{_e(im.key)}</a>', _e(", ".join(words)),
                   pct(iou[im.key])]
            if len(header) == 4:
                enc = acc_enc if acc_enc in im.argmax_acc else next(iter(im.argmax_acc), None)
                row.append(pct(im.argmax_acc[enc]) + ("" if enc == acc_enc else f" ({_e(enc)})") if enc else "")
            body.append(row)
        parts.append(_table(header, body, num=range(2, len(header)), ident="images-table"))
        if len(images) > MAX_ROWS:
            parts.append(f'<p class="note">The first {MAX_ROWS} of {len(images)} images; every one is in per_image/.</p>')
    else:
        parts.append('<p class="note">No image could be scored.</p>')
    parts.append('<h2 id="skipped">Skipped</h2>')
    if skipped:
        counts = Counter(s.reason for s in skipped)
        parts.append(_table(["reason", "times"], [[_e(r), str(n)] for r, n in counts.most_common()], num=(1,),
                            ident="skipped-reasons"))
        body = [[_e(s.key), _e(s.name), _e(s.reason)] for s in skipped[:MAX_ROWS]]
        parts.append(f"<details><summary>every skip ({len(skipped)}; all in "
                     f'<a href="skipped.csv">skipped.csv</a>)</summary>'
                     + _table(["key", "name", "reason"], body, ident="skipped-table") + "</details>")
    else:
        parts.append('<p class="note">Nothing was skipped.</p>')
    parts.append('<h2 id="files">Files</h2><ul>'
                 + "".join(f'<li><a href="{_href(f)}">{_e(f)}</a></li>' for f in csv_files) + "</ul>")
    return _page(title, "\n".join(parts))


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta name="generator" content="{_e(GENERATOR)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
