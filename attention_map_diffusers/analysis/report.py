"""The analysis report: one self-contained ``index.html`` per run (inline CSS, no scripts, relative links).

The page is built from what was written (paths relative to the page), so it never links a file
that does not exist.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from typing import Optional, Sequence
from urllib.parse import quote

from .stats import EncoderResult, word_summary

GENERATOR = "analyse_stepavg.py (attention_map_diffusers)"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.5em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em} h3{margin-top:1.2em}
.prompt{font-size:1.1em;background:#f5f5f5;padding:.6em .8em;border-left:4px solid #888;white-space:pre-wrap}
.note{background:#fff6d6;border-left:4px solid #e0b000;padding:.4em .8em;margin:.3em 0}
.grid{display:flex;flex-wrap:wrap;gap:10px} .grid figure{margin:0;flex:0 1 380px}
figure img{max-width:100%;border:1px solid #ddd} figcaption{font-size:.85em;color:#555}
img.wide{max-width:100%} figure.image img{max-width:512px} table{border-collapse:collapse;font-size:.9em} td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
td:first-child,th:first-child{text-align:left} details{margin:.5em 0} code{background:#f0f0f0;padding:0 3px}
"""


@dataclass
class EncoderPage:
    """What was written for one encoder of one item; paths are relative to the report page."""

    result: EncoderResult
    tables: list[str]
    summary: Optional[str] = None
    word_heatmaps: list[tuple[str, str]] = field(default_factory=list)  # (caption, path)
    phrase_heatmaps: list[tuple[str, str]] = field(default_factory=list)
    overview: Optional[str] = None
    word_curves: list[tuple[str, str]] = field(default_factory=list)
    phrase_curves: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class ItemPage:
    """One batch item: its prompt, image (relative path) and encoders."""

    item: int
    prompt: str
    image: Optional[str]
    encoders: list[EncoderPage]


def href(path: str) -> str:
    """A relative path as an attribute value (percent-encoded, ``/`` kept)."""
    return html.escape(quote(path.replace("\\", "/")), quote=True)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _figure(path: str, caption: str, fmt: str, wide: bool = False, kind: str = "") -> str:
    if fmt == "pdf":
        return f'<figure><a href="{href(path)}">{_e(caption)} ({_e(path)})</a></figure>'
    cls = ' class="wide"' if wide else ""
    fig_cls = f' class="{kind}"' if kind else ""
    return (
        f'<figure{fig_cls}><a href="{href(path)}"><img{cls} src="{href(path)}" alt="{_e(caption)}" loading="lazy"></a>'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _grid(items: Sequence[tuple[str, str]], fmt: str) -> str:
    return '<div class="grid">' + "".join(_figure(p, c, fmt) for c, p in items) + "</div>"


def _word_table(res: EncoderResult) -> str:
    rows = []
    top = set(res.top)
    for i, (w, mass, pb, ps) in enumerate(word_summary(res)):
        step = f"{ps} (t={res.timesteps[ps]:.0f})" if res.timesteps is not None else str(ps)
        mark = " *" if i in top else ""
        rows.append(
            f"<tr><td>{_e(w)}{mark}</td><td>{res.words[i].index}</td><td>{100 * mass:.2f}%</td>"
            f"<td>{pb}</td><td>{step}</td></tr>"
        )
    return (
        "<details><summary>all words (mass, peak; * = shown as a heatmap)</summary><table>"
        "<tr><th>word</th><th>#</th><th>mass</th><th>peak block</th><th>peak step</th></tr>"
        + "".join(rows)
        + "</table></details>"
    )


def _encoder_section(page: EncoderPage, fmt: str) -> str:
    res = page.result
    name = {"clip": "CLIP", "t5": "T5"}.get(res.encoder, res.encoder)
    out = [f"<h3>{_e(name)}</h3>"]
    src = {"offsets": "token offsets stored in the dump", "aligned": "tokens aligned to the prompt", "markers": "sub-word markers (prompt alignment failed)"}
    out.append(f"<p>{len(res.words)} words, from {_e(src.get(res.wordmap.source, res.wordmap.source))}.</p>")
    if res.wordmap.dropped:
        first = res.wordmap.dropped[0]
        out.append(
            f'<p class="note">The {_e(name)} encoder truncated the prompt: {len(res.wordmap.dropped)} words from '
            f"&ldquo;{_e(first.text)}&rdquo; (word {first.index}) on are absent from its analysis.</p>"
        )
    if page.summary:
        out.append(_figure(page.summary, "top words by mass", fmt, wide=True))
    if res.words:
        out.append(_word_table(res))
    if page.word_heatmaps:
        out.append("<h4>Word heatmaps</h4>" + _grid(page.word_heatmaps, fmt))
    if page.phrase_heatmaps:
        out.append("<h4>Phrase heatmaps</h4>" + _grid(page.phrase_heatmaps, fmt))
    if page.overview:
        out.append("<h4>Words x blocks x steps</h4>" + _figure(page.overview, "step- and block-averaged attention", fmt, wide=True))
    if page.word_curves:
        out.append("<h4>Word curves per block</h4>" + _grid(page.word_curves, fmt))
    if page.phrase_curves:
        out.append("<h4>Phrase curves per block</h4>" + _grid(page.phrase_curves, fmt))
    if page.tables:
        links = " &middot; ".join(f'<a href="{href(t)}">{_e(t.rsplit("/", 1)[-1])}</a>' for t in page.tables)
        out.append(f"<p>Tables: {links}</p>")
    return "\n".join(out)


def run_page(
    title: str, items: Sequence[ItemPage], metadata: dict, notes: Sequence[str], fmt: str, settings: dict
) -> str:
    """HTML of one run's report."""
    keys = ("model_family", "model_id", "scheduler", "steps", "num_steps", "guidance_scale", "seed", "image_size", "canonical_size", "num_blocks", "store_dtype", "timestamp")
    facts = "".join(f"<tr><td>{_e(k)}</td><td>{_e(json.dumps(metadata[k]))}</td></tr>" for k in keys if k in metadata)
    setting_rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in settings.items())
    body = [f"<h1>{_e(title)}</h1>"]
    body += [f'<p class="note">{_e(n)}</p>' for n in notes]
    for it in items:
        if len(items) > 1:
            body.append(f"<h2>Item {it.item}</h2>")
        else:
            body.append("<h2>Prompt</h2>")
        body.append(f'<div class="prompt">{_e(it.prompt)}</div>')
        if it.image:
            body.append(_figure(it.image, "generated image", "png", kind="image"))
        for page in it.encoders:
            body.append(_encoder_section(page, fmt))
    body.append(f"<h2>Run</h2><table>{facts}</table><h2>Analysis settings</h2><table>{setting_rows}</table>")
    body.append(
        "<p>Heatmaps show each word's share of the attention that the image pixels give to the prompt's "
        "words (step- and block-averaged); curves show the mean attention of the image pixels on a word per "
        "denoising step, left = first (noisiest) step. See docs/analysis.md.</p>"
    )
    return _page(title, "\n".join(body))


def index_page(title: str, runs: Sequence[dict]) -> str:
    """HTML of the top-level page of several runs: ``runs`` items have folder, prompt, status, link, error."""
    rows = []
    for r in runs:
        name = _e(r["folder"])
        cell = f'<a href="{href(r["link"])}">{name}</a>' if r.get("link") else name
        status = _e(r["status"]) + (f": {_e(r['error'])}" if r.get("error") else "")
        rows.append(f"<tr><td>{cell}</td><td>{_e(' | '.join(r.get('prompt') or []))}</td><td>{status}</td></tr>")
    body = f"<h1>{_e(title)}</h1><table><tr><th>run</th><th>prompt</th><th>status</th></tr>{''.join(rows)}</table>"
    return _page(title, body)


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta name="generator" content="{_e(GENERATOR)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
