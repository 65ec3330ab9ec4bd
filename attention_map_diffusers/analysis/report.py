"""The analysis report: one self-contained ``index.html`` per run (inline CSS, a small inline script, relative links).

The page is built from what was written (paths relative to the page), so it never links a file
that does not exist.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from typing import Optional, Sequence
from urllib.parse import quote

import numpy as np

from .stats import EncoderResult, word_summary

GENERATOR = "analyse_stepavg.py (attention_map_diffusers)"

_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1em auto;max-width:1400px;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em;overflow-wrap:anywhere} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em} h3{margin-top:1.4em} h4{margin:1.2em 0 .4em}
a{color:#0645ad} .back{font-size:.9em}
.prompt{font-size:1.1em;background:#f5f5f5;padding:.6em .8em;border-left:4px solid #888;white-space:pre-wrap;overflow-wrap:anywhere}
.note{background:#fff6d6;border-left:4px solid #e0b000;padding:.4em .8em;margin:.3em 0;overflow-wrap:anywhere}
.warn{background:#ffe3e3;border-left:6px solid #c00000;padding:.6em .9em;margin:.6em 0;font-weight:600;color:#800}
nav.toc{background:#fafafa;border:1px solid #ddd;padding:.5em 1em;margin:1em 0}
nav.toc ul{margin:.2em 0;padding-left:1.2em} nav.toc li{margin:.1em 0}
figure{margin:.6em 0;max-width:100%} figure img{display:block;width:100%;height:auto;border:1px solid #ddd;background:#fff}
figure.image img{width:auto;max-width:min(100%,640px)}
figcaption{font-size:.85em;color:#555;overflow-wrap:anywhere}
.grid{display:grid;gap:12px;grid-template-columns:repeat(auto-fill,minmax(min(100%,600px),1fr))} .grid figure{margin:0}
.scroll{max-width:100%;overflow-x:auto}
table{border-collapse:collapse;font-size:.9em} td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;vertical-align:top;overflow-wrap:break-word}
th{white-space:nowrap} td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap} td.text{min-width:14em}
td img.thumb{width:160px;max-width:22vw;height:auto;border:1px solid #ddd} td .pair{display:flex;gap:4px} td .pair img.thumb{width:120px} td.nowrap{white-space:nowrap;overflow-wrap:normal}
details{margin:.5em 0} code{background:#f0f0f0;padding:0 3px}
.slider{border:1px solid #ddd;padding:.5em;margin:.6em 0} .slider input[type=range]{width:100%;max-width:600px}
.slider .frames{display:grid;gap:8px;grid-template-columns:repeat(auto-fill,minmax(min(45%,250px),1fr))}
.slider .frames figure{margin:0} .slider output{font-weight:600;margin-left:.5em}
.slider.wide .frames{grid-template-columns:1fr}
.slider .fb{display:flex;align-items:flex-start;gap:4px} .slider .fb>a{flex:0 1 80%;max-width:256px}
.slider img.grid{width:100%;height:auto;image-rendering:pixelated} .slider .fb>a.bar{flex:0 1 18%;max-width:58px}
.slider img.bar{width:100%;height:auto}
.links{font-size:.8em;columns:2 14em}
.narrow-only{display:none}
@media (max-width:700px){.narrow-only{display:block} .wide-only{display:none} body{padding:0 .5em}}
.thumbs{display:flex;flex-wrap:wrap;gap:8px;margin:.4em 0} .thumbs figure{margin:0;width:160px;max-width:30vw}
"""

# Swaps the images of each .slider as its range input moves (frames and labels in data attributes).
_JS = """
document.querySelectorAll('.slider').forEach(function(box){
  var frames = JSON.parse(box.dataset.frames), labels = JSON.parse(box.dataset.labels);
  var input = box.querySelector('input[type=range]'), out = box.querySelector('output');
  var imgs = box.querySelectorAll('img.frame');
  function show(k){
    imgs.forEach(function(im, i){ im.src = frames[k][i]; im.parentNode.href = frames[k][i]; });
    out.textContent = labels[k];
  }
  input.addEventListener('input', function(){ show(Number(input.value)); });
});
"""


@dataclass
class Slider:
    """Images that a range input swaps: per frame (a step or a block), one image per word."""

    kind: str  # "step" or "block", or "block curves"
    labels: list[str]  # per frame
    words: list[str]  # per image of a frame ("" for a single image)
    frames: list[list[str]]  # per frame, per word: path relative to the page
    title: str = ""  # what the reader sees instead of ``kind`` ("noise level" for a given image's levels)
    start: int = 0  # the frame shown first (the most informative one)
    bars: list[str] = field(default_factory=list)  # per word: its colour bar, beside its frame (maps at grid size)


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
    word_grids: Optional[str] = None
    segmentation: Optional[str] = None
    segmentation_threshold: float = 0.0
    word_maps: Optional[str] = None
    token_groups: Optional[str] = None
    strips: list[tuple[str, str]] = field(default_factory=list)  # (kind, path)
    sliders: list[Slider] = field(default_factory=list)
    scale: str = ""
    levels: bool = False  # the steps are a given image's noise levels σ, not denoising steps
    top_word: Optional[tuple[str, str]] = None  # (caption, path) of the top word's bare map


@dataclass
class ItemPage:
    """One batch item: its prompt, image (relative path) and encoders."""

    item: int
    prompt: str
    image: Optional[str]
    encoders: list[EncoderPage]
    compare: Optional[str] = None  # clip_vs_t5 figure
    facts: Optional[object] = None  # plots.FigureFacts
    concepts: Optional[object] = None  # concept_output.ConceptPage (dumps with concept maps)
    given: Optional[object] = None  # given.GivenImage: a given-image run


@dataclass
class GroupPage:
    """One encoder of an aggregated group of runs (same prompt); paths relative to the top-level index."""

    result: object  # aggregate_runs.GroupResult
    rel: str  # the group's folder, aggregate/NNN-slug
    tables: list[str]
    curves: Optional[str] = None
    blocks: Optional[str] = None  # per-block curves with bands
    heatmaps: list[str] = field(default_factory=list)  # the mean / spread heatmaps, in pieces of a few words each


def href(path: str) -> str:
    """A relative path as an attribute value (percent-encoded, ``/`` kept)."""
    return html.escape(quote(path.replace("\\", "/")), quote=True)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _anchor(*parts: object) -> str:
    return "-".join(str(p) for p in parts if p != "")


def _figure(path: str, caption: str, fmt: str, wide: bool = False, kind: str = "") -> str:
    if fmt == "pdf":
        return f'<figure><a href="{href(path)}">{_e(caption)} ({_e(path)})</a></figure>'
    fig_cls = f' class="{kind}"' if kind else ""
    return (
        f'<figure{fig_cls}><a href="{href(path)}" title="open at full size"><img src="{href(path)}" alt="{_e(caption)}" loading="lazy"></a>'
        f"<figcaption>{_e(caption)} (click: full size)</figcaption></figure>"
    )


def _grid(items: Sequence[tuple[str, str]], fmt: str) -> str:
    return '<div class="grid">' + "".join(_figure(p, c, fmt) for c, p in items) + "</div>"


def _slider(sl: Slider, anchor: str, caption: str) -> str:
    """A range input over the frames, opened on frame ``sl.start``; without scripts that frame shows and every frame is linked below."""
    frames = [[quote(p.replace("\\", "/")) for p in fr] for fr in sl.frames]
    k0 = sl.start if 0 <= sl.start < len(sl.frames) else 0
    bars = sl.bars or [""] * len(sl.frames[k0])
    def frame(w, p, b):
        img = f'<a href="{href(p)}"><img class="frame{" grid" if b else ""}" src="{href(p)}" alt="{_e(w or sl.labels[k0])}"></a>'
        if b:  # a map at grid size, enlarged by the browser cell by cell, and its row's colour bar beside it
            img = f'<div class="fb">{img}<a class="bar" href="{href(b)}"><img class="bar" src="{href(b)}" alt="colour bar of {_e(w)}"></a></div>'
        return f"<figure>{img}" + (f"<figcaption>{_e(w)}</figcaption>" if w else "") + "</figure>"

    imgs = "".join(frame(w, p, b) for w, p, b in zip(sl.words or [""], sl.frames[k0], bars))
    links = "".join(
        f'<li>{_e(lab)}: ' + ", ".join(f'<a href="{href(p)}">{_e(w or "image")}</a>' for w, p in zip(sl.words or [""], fr)) + "</li>"
        for lab, fr in zip(sl.labels, sl.frames)
    )
    wide = " wide" if len(sl.words or [""]) == 1 else ""  # one image per frame (curves): at full width like every figure
    return (
        f'<div class="slider{wide}" id="{_e(anchor)}" data-frames="{_e(json.dumps(frames))}" data-labels="{_e(json.dumps(sl.labels))}">'
        f'<label>{_e(sl.title or sl.kind)}: <input type="range" min="0" max="{len(sl.frames) - 1}" step="1" value="{k0}" '
        f'aria-label="{_e(sl.title or sl.kind)}"><output>{_e(sl.labels[k0])}</output></label>'
        f'<p class="note">{_e(caption)}</p><div class="frames">{imgs}</div>'
        f'<details><summary>every frame</summary><ul class="links">{links}</ul></details></div>'
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], num: Sequence[int] = (), nowrap: Sequence[int] = (0,),
           text: Sequence[int] = ()) -> str:
    """A table in a horizontally scrolling box (on a narrow screen the table scrolls, not the page);
    cells are HTML already; columns in ``num`` right-aligned, in ``nowrap`` (names) on one line, in
    ``text`` (prompts) wrapped at a readable width."""
    def attr(k):
        name = "num" if k in num else "nowrap" if k in nowrap else "text" if k in text else ""
        return f' class="{name}"' if name else ""

    def cells(tag, values):
        return "".join(f"<{tag}{attr(k)}>{v}</{tag}>" for k, v in enumerate(values))

    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    return f'<div class="scroll"><table><tr>{cells("th", header)}</tr>{body}</table></div>'


SINK_SHARE = 0.4  # a word taking more than this share of the words' attention is flagged as a sink


def _sinks(res: EncoderResult) -> list[int]:
    """Positions of the words that take more than :data:`SINK_SHARE` of the words' attention."""
    return [j for j in range(len(res.words)) if float(res.mass[j]) > SINK_SHARE]


def _sink_note(res: EncoderResult) -> str:
    from .views import word_labels

    labels = word_labels(res.words)
    return " ".join(
        f"Sink: “{labels[j]}” takes {100 * float(res.mass[j]):.0f}% of the words' attention (more than "
        f"{100 * SINK_SHARE:.0f}%): the pixels park attention on it, as on a special token, whatever it names; the other "
        "words' shares are small beside it." for j in _sinks(res))


def _word_table(res: EncoderResult) -> str:
    from .views import word_labels

    rows = []
    top = set(res.top)
    labels = word_labels(res.words)
    ts = res.timesteps if res.timesteps is not None and np.ndim(res.timesteps) == 1 and np.size(res.timesteps) else None
    for i, (w, mass, pb, ps) in enumerate(word_summary(res)):
        t = f" (t={ts[ps]:.0f})" if ts is not None else ""
        mark = " *" if i in top else ""
        sink = ' <b class="sink">sink</b>' if mass > SINK_SHARE else ""
        rows.append([_e(labels[i]) + mark + sink, str(res.words[i].index), f"{100 * mass:.2f}%", str(pb), f"{ps}{t}"])
    return (
        "<details><summary>all words (mass, peak; * = shown as a heatmap; sink = more than "
        f"{100 * SINK_SHARE:.0f}% of the words' attention)</summary>"
        + _table(["word", "#", "mass", "peak block", "peak step"], rows, num=(1, 2, 3, 4))
        + "</details>"
    )


_SECTION_TITLES = {
    "summary": "Top words", "grids": "Where in depth and when in time", "segmentation": "Segmentation",
    "heatmaps": "Word heatmaps", "phrases": "Phrase heatmaps", "strips": "Per step / per block", "groups": "Where the attention goes",
    "overview": "Overview", "curves": "Curves per block", "tables": "Tables",
}


def _encoder_sections(page: EncoderPage, fmt: str, prefix: str) -> tuple[str, list[tuple[str, str]]]:
    """HTML of one encoder and its table-of-contents entries (anchor, title)."""
    res = page.result
    name = {"clip": "CLIP", "t5": "T5"}.get(res.encoder, res.encoder)
    base = _anchor(prefix, res.encoder)
    toc: list[tuple[str, str]] = []
    out = [f'<h2 id="{base}">{_e(name)}</h2>']

    def section(key: str, body: str, title: Optional[str] = None) -> None:
        aid = _anchor(base, key)
        toc.append((aid, title or _SECTION_TITLES[key]))
        out.append(f'<h3 id="{aid}">{_e(title or _SECTION_TITLES[key])}</h3>' + body)

    src = {"offsets": "token offsets stored in the dump", "aligned": "tokens aligned to the prompt", "markers": "sub-word markers (prompt alignment failed)",
           "original": "the original tool's rule on the tokens (--words original)"}
    out.append(f"<p>{len(res.words)} words, from {_e(src.get(res.wordmap.source, res.wordmap.source))}.</p>")
    if res.wordmap.dropped:
        first = res.wordmap.dropped[0]
        out.append(
            f'<p class="note">The {_e(name)} encoder truncated the prompt: {len(res.wordmap.dropped)} words from '
            f"&ldquo;{_e(first.text)}&rdquo; (word {first.index}) on are absent from its analysis.</p>"
        )
    scale = f" Each map on its own {page.scale}." if page.scale else ""
    sink = _sink_note(res) if res.words else ""
    if page.summary or res.words:
        body = _figure(page.summary, f"top words by mass, over the image.{scale}" + (f" {sink}" if sink else ""), fmt) if page.summary else ""
        if body and page.word_heatmaps and fmt != "pdf":  # a narrow screen: the top words' own figures, one under another
            body = (f'<div class="wide-only">{body}</div><div class="narrow-only">'
                    + "".join(_figure(p, c, fmt) for c, p in page.word_heatmaps) + "</div>")
        alone = (f'<p>The top word\'s map alone (the index\'s thumbnail): <a href="{href(page.top_word[1])}">'
                 f"{_e(page.top_word[0])}</a>.</p>" if page.top_word else "")
        section("summary", (f'<p class="warn">{_e(sink)}</p>' if sink else "") + body + alone + (_word_table(res) if res.words else ""))
    if page.word_grids:
        section("grids", _figure(page.word_grids, "per top word: blocks (y) x " + ("noise levels σ" if page.levels else "denoising steps") + " (x), one colour scale for all panels", fmt))
    if page.segmentation:
        thr = page.segmentation_threshold
        body = _figure(page.segmentation, f"each pixel coloured by the word with the largest share; grey: top share below {thr:.2f}", fmt)
        if page.word_maps:
            body += (f'<p>The maps as arrays: <a href="{href(page.word_maps)}">word_maps.npz</a> (maps: words x H x W float32, '
                     "renormalised per pixel; words; word_index; image_size).</p>")
        section("segmentation", body)
    if page.word_heatmaps:
        section("heatmaps", f"<p>{_e(scale.strip())}</p>" + _grid(page.word_heatmaps, fmt))
    if page.phrase_heatmaps:
        section("phrases", _grid(page.phrase_heatmaps, fmt))
    if page.strips or page.sliders:
        body = "".join(_figure(p, f"top words at a few {k}s (each row on one colour scale)", fmt) for k, p in page.strips)
        body += "".join(
            _slider(sl, _anchor(base, "slider", sl.kind), f"Move the slider to swap each word's heatmap for its map at that {sl.title or sl.kind} "
                    "(each word on one colour scale for all frames, inferno from 0 to the value in its caption). Every "
                    f"{sl.title or sl.kind} is offered; it opens on the one whose maps vary most across the image "
                    "(largest mean spatial std over the words).")
            for sl in page.sliders
        )
        section("strips", body)
    if page.token_groups:
        section("groups", _figure(page.token_groups, "share of the text attention on words, other prompt tokens (punctuation "
                                  "outside every word; only when the prompt has some), special tokens, padding and the other "
                                  "encoder, per step and block group: heatmaps are shares over the words only, curves shares of "
                                  "all text positions", fmt))
    if page.overview:
        section("overview", _figure(page.overview, "words x blocks (averaged over steps) and words x steps (averaged over blocks)", fmt))
    if page.word_curves:
        sl = Slider("block", [c for c, _ in page.word_curves], [""], [[p] for _, p in page.word_curves])
        body = _slider(sl, _anchor(base, "curves", "words"), "Top words' curves; the slider picks the block. Same y scale for every block.")
        if page.phrase_curves:
            sl = Slider("block", [c for c, _ in page.phrase_curves], [""], [[p] for _, p in page.phrase_curves])
            body += _slider(sl, _anchor(base, "curves", "phrases"), "Phrases' curves; the slider picks the block.")
        section("curves", body)
    if page.tables:
        links = " &middot; ".join(f'<a href="{href(t)}">{_e(t.rsplit("/", 1)[-1])}</a>' for t in page.tables)
        section("tables", f"<p>{links}</p>")
    return "\n".join(out), toc


def _given_line(given) -> str:
    """A given-image run's mode, source, crop and noise levels (one paragraph)."""
    if given is None:
        return ""
    parts = ["mode <b>image</b> (attention on a given image, not a generation)", f"source <b>{_e(given.name)}</b>"]
    if given.crop_text:
        parts.append(_e(given.crop_text))
    if given.levels is not None:
        parts.append(f"noise levels &sigma; <b>{_e(given.levels_text)}</b> (each an independent pass over the same image)")
    elif given.strength is not None:
        parts.append(f"img2img strength <b>{given.strength:g}</b>")
    return f'<p class="given">{" &middot; ".join(parts)}</p>'


def _facts_line(facts) -> str:
    if facts is None:
        return ""
    parts = []
    if facts.seed is not None:
        parts.append(f"seed <b>{_e(facts.seed)}</b>")
    if facts.model:
        parts.append(f"model <b>{_e(facts.model)}</b>")
    return f"<p>{' &middot; '.join(parts)}</p>" if parts else ""


_WARNING = ("Random weights (--model tiny-random / tiny-random-flux): the image is noise and these maps say nothing "
            "about SD3.5 or FLUX.1; they show the layout of the analysis only.")


def _toc(entries: Sequence[tuple[str, str, int]]) -> str:
    """entries: (anchor, title, level 0/1) -> a nested list."""
    out, open_sub = ['<nav class="toc"><b>Contents</b><ul>'], False
    for aid, title, level in entries:
        if level == 1 and not open_sub:
            out.append("<ul>")
            open_sub = True
        elif level == 0 and open_sub:
            out.append("</ul></li>")
            open_sub = False
        elif level == 0 and len(out) > 1:
            out.append("</li>")
        out.append(f'<li><a href="#{_e(aid)}">{_e(title)}</a>' + ("</li>" if level == 1 else ""))
    out.append("</ul></li>" if open_sub else "</li>")
    out.append("</ul></nav>")
    return "".join(out)


def run_page(
    title: str, items: Sequence[ItemPage], metadata: dict, notes: Sequence[str], fmt: str, settings: dict,
    back: Optional[str] = None, random_weights: bool = False,
) -> str:
    """HTML of one run's report: a table of contents, then per item and encoder the figures, at full width."""
    keys = ("mode", "noise_levels", "strength", "model_family", "model_id", "scheduler", "steps", "num_steps", "guidance_scale", "seed",
            "seeds", "image_size", "canonical_size", "num_blocks", "store_dtype", "random_weights", "timestamp")
    facts = [[_e(k), _e(json.dumps(metadata[k]))] for k in keys
             if k in metadata and not (k == "num_steps" and metadata.get("steps") == metadata[k])]  # the same number once
    src = metadata.get("source_image")
    if isinstance(src, dict):
        facts.insert(1, ["source_image", _e(json.dumps({k: src[k] for k in ("name", "size", "crop_box") if k in src}))])
    setting_rows = [[_e(k), _e(v)] for k, v in settings.items()]
    head = [f"<h1>{_e(title)}</h1>"]
    if back:
        head.append(f'<p class="back"><a href="{href(back)}">&larr; all runs</a></p>')
    if random_weights:
        head.append(f'<p class="warn">{_e(_WARNING)}</p>')
    head += [f'<p class="note">{_e(n)}</p>' for n in notes if not (random_weights and "random weights" in n)]
    toc: list[tuple[str, str, int]] = []
    body = []
    for it in items:
        prefix = f"item{it.item}" if len(items) > 1 else ""
        aid = _anchor(prefix, "prompt") if prefix else "prompt"
        toc.append((aid, f"Item {it.item}" if prefix else "Prompt and image", 0))
        body.append(f'<h2 id="{aid}">{"Item " + str(it.item) if prefix else "Prompt"}</h2>')
        body.append(f'<div class="prompt">{_e(it.prompt)}</div>')
        body.append(_facts_line(it.facts))
        body.append(_given_line(it.given))
        if it.image:
            body.append(_figure(it.image, it.given.describe if it.given is not None else "generated image", "png", kind="image"))
        if it.compare:
            cid = _anchor(prefix, "clip-vs-t5")
            toc.append((cid, "CLIP vs T5", 1))
            body.append(f'<h3 id="{cid}">CLIP vs T5</h3>' + _figure(it.compare, "per top word, CLIP and T5 heatmaps on one scale; "
                                                                     "every word's CLIP mass against its T5 mass", fmt))
        for page in it.encoders:
            html_, sub = _encoder_sections(page, fmt, prefix)
            name = {"clip": "CLIP", "t5": "T5"}.get(page.result.encoder, page.result.encoder)
            toc.append((_anchor(prefix, page.result.encoder), f"{name}" + (f" (item {it.item})" if prefix else ""), 0))
            toc += [(a, t, 1) for a, t in sub]
            body.append(html_)
        if it.concepts is not None:
            from .concept_output import concept_section

            html_, (aid_c, title_c) = concept_section(it.concepts, fmt, prefix)
            toc.append((aid_c, title_c + (f" (item {it.item})" if prefix else ""), 0))
            body.append(html_)
    toc.append(("run", "Run and settings", 0))
    body.append(f'<h2 id="run">Run</h2>{_table(["key", "value"], facts)}<h2 id="settings">Analysis settings</h2>{_table(["setting", "value"], setting_rows)}')
    levels = any(it.given is not None and it.given.levels is not None for it in items)
    per = ("noise level σ of the given image, left = noisiest; the levels are independent passes, so the "
           "curves are markers without joining lines" if levels else "denoising step, left = first (noisiest) step")
    body.append(
        "<p>Heatmaps show each word's share of the attention that the image pixels give to the prompt's "
        f"words ({'level' if levels else 'step'}- and block-averaged); curves show the mean attention of the image pixels on a word per "
        f"{per}. See docs/analysis.md.</p>"
    )
    return _page(title, "\n".join(head + [_toc(toc)] + body), script=True)


def _mass(mean: float, std: float) -> str:
    return f"{100 * mean:.1f}% &plusmn; {100 * std:.1f}"


_MEAN_NOTE = (
    "What the mean maps mean: each pixel's share averaged over the runs at the same pixel position. The "
    "seeds draw different images, so an object sits in different places in different runs: the mean map "
    "mixes where the objects happened to be (layout) with where the attention went, and a large spread "
    "(std) is mostly objects that moved, not attention that changed. Read the mean as 'where this word's "
    "attention tends to land in this frame', compare it with the runs' images above, and look at each "
    "run's own page for maps aligned with its image. No object-aligned view (maps registered to the "
    "objects across seeds) is drawn."
)


def group_page(title: str, pages: Sequence[GroupPage], back: str, run_links: Sequence[tuple[str, str]], fmt: str,
               run_images: Sequence[tuple[str, str]] = ()) -> str:
    """HTML of one aggregated group (paths relative to the group's folder); ``run_images``: (run, image) per run."""
    from .views import word_labels

    res0 = pages[0].result
    thumbs = "".join(
        f'<figure><a href="{href(p)}"><img src="{href(p)}" alt="{_e(n)}" loading="lazy"></a><figcaption>{_e(n)}</figcaption></figure>'
        for n, p in run_images)
    body = [f"<h1>{_e(title)}</h1>", f'<p class="back"><a href="{href(back)}">&larr; all runs</a></p>',
            f'<div class="prompt">{_e(res0.prompt)}</div>',
            "<p>Runs: " + ", ".join(f'<a href="{href(p)}">{_e(n)}</a>' for n, p in run_links) + "</p>"
            + (f'<div class="thumbs">{thumbs}</div>' if thumbs else "")
            + "<p>Means over the runs; spreads are sample standard deviations (ddof=1) over the runs.</p>"
            + f'<p class="note">{_e(_MEAN_NOTE)}</p>']
    toc = []
    for gp in pages:
        r = gp.result
        name = {"clip": "CLIP", "t5": "T5"}.get(r.encoder, r.encoder)
        toc.append((r.encoder, name, 0))
        body.append(f'<h2 id="{r.encoder}">{_e(name)}</h2>')
        strip = gp.rel + "/"
        if gp.curves:
            body.append(_figure(gp.curves[len(strip):], "curves averaged over blocks: mean \u00b1 std over runs (bands)", fmt))
        if gp.blocks:
            body.append(_figure(gp.blocks[len(strip):], "the same per block, on one y scale: mean \u00b1 std over runs", fmt))
        for k, path in enumerate(gp.heatmaps):
            part = f" (part {k + 1} of {len(gp.heatmaps)})" if len(gp.heatmaps) > 1 else ""
            body.append(_figure(path[len(strip):], f"mean heatmap over runs and its per-pixel std{part}; one colour scale for "
                                "all words (0 to the largest mean), not each word on its own scale as in a single run", fmt))
        labels = word_labels(r.words)
        order = np.argsort(-r.mass_mean, kind="stable")
        rows = [[_e(labels[j]), str(r.words[j].index), _mass(r.mass_mean[j], r.mass_std[j]), str(r.n_runs)] for j in order]
        body.append(_table(["word", "#", "mass (mean &plusmn; std, %)", "runs"], rows, num=(1, 2, 3)))
        body.append("<p>Tables: " + " &middot; ".join(f'<a href="{href(t[len(strip):])}">{_e(t.rsplit("/", 1)[-1])}</a>' for t in gp.tables) + "</p>")
    return _page(title, "\n".join(body[:4] + [_toc(toc)] + body[4:]))


def index_page(title: str, runs: Sequence[dict], groups: Sequence[GroupPage] = (),
               cross_figures: Sequence[str] = (), fmt: str = "png") -> str:
    """HTML of the top-level page of several runs.

    ``runs`` items have folder, prompt, status, link, error and optionally seed, model, random_weights,
    thumbnail, groups (folders of the aggregated groups the run is in). ``cross_figures``: figures of
    the words several prompts share (paths relative to the index).
    """
    body = [f"<h1>{_e(title)}</h1>"]
    if any(r.get("random_weights") for r in runs):
        body.append(f'<p class="warn">{_e(_WARNING)}</p>')
    toc = [("runs", "Runs", 0)]
    rows = []
    for r in runs:
        name = _e(r["folder"])
        cell = f'<a href="{href(r["link"])}">{name}</a>' if r.get("link") else name
        thumb = (f'<a href="{href(r["link"])}"><img class="thumb" src="{href(r["thumbnail"])}" alt="{name}" loading="lazy"></a>'
                 if r.get("thumbnail") and r.get("link") else "")
        if r.get("top_map") and r.get("link"):
            enc, caption, path = r["top_map"]
            what = f"{enc.upper()} top word: {caption}"
            thumb = (f'<div class="pair">{thumb}<a href="{href(path)}"><img class="thumb" src="{href(path)}" alt="{_e(what)}" '
                     f'title="{_e(what)}" loading="lazy"></a></div><small>{_e(what)}</small>')
        status = _e(r["status"]) + (f": {_e(r['error'])}" if r.get("error") else "")
        grp = ", ".join(f'<a href="{href(g + "/index.html")}">{_e(g.rsplit("/", 1)[-1])}</a>' for g in r.get("groups") or [])
        seed = "" if r.get("seed") is None else _e(r["seed"])
        model = _e(r.get("model") or "") + (' <b style="color:#c00">random weights</b>' if r.get("random_weights") else "")
        given = r.get("given")
        prompt = _e(" | ".join(r.get("prompt") or []))
        if given is not None:
            prompt += (f'<br><span class="given">mode: image &middot; {_e(given.describe)}'
                       + (f" &middot; &sigma; {_e(given.levels_text)}" if given.levels is not None else "") + "</span>")
        rows.append([thumb, cell, prompt, seed, model, status, grp])
    body.append('<h2 id="runs">Runs</h2>' + _table(["", "run", "prompt", "seed", "model", "status", "group"], rows, num=(3,), nowrap=(1, 6), text=(2,)))
    by_group: dict[str, list[GroupPage]] = {}
    for g in groups:
        by_group.setdefault(g.rel, []).append(g)
    if by_group:
        toc.append(("groups", "Groups of runs with the same prompt", 0))
        grows = []
        for rel, pages in by_group.items():
            r0 = pages[0].result
            tops = []
            for gp in pages:
                from .views import word_labels

                labels = word_labels(gp.result.words)
                order = np.argsort(-gp.result.mass_mean, kind="stable")[:5]
                tops.append(f"<b>{_e(gp.result.encoder.upper())}</b>: " + ", ".join(
                    f"{_e(labels[j])} {_mass(gp.result.mass_mean[j], gp.result.mass_std[j])}" for j in order))
            grows.append([f'<a href="{href(rel + "/index.html")}">{_e(rel.rsplit("/", 1)[-1])}</a>', _e(r0.prompt), str(r0.n_runs),
                          _e(", ".join(str(s) for s in r0.seeds)), "<br>".join(tops)])
        body.append('<h2 id="groups">Groups of runs with the same prompt</h2>'
                    "<p>Word masses: mean &plusmn; sample std over the group's runs (%). Each group's page has curves with "
                    "bands, the mean heatmaps and their spread.</p>"
                    + _table(["group", "prompt", "runs", "seeds", "top words by mean mass"], grows, num=(2,), text=(1, 4)))
        from .aggregate_runs import words_across_prompts

        cross = []
        for enc in ("clip", "t5"):
            gs = [gp.result for gp in groups if gp.result.encoder == enc]
            for word, hits in words_across_prompts(gs).items():
                cross.append([_e(enc.upper()), _e(word), "<br>".join(
                    f"{_e(gs[g].prompt)} (#{gs[g].words[j].index}): {_mass(m, s)}" for g, j, m, s in hits)])
        if cross:
            toc.append(("cross", "Words in several prompts", 0))
            body.append('<h2 id="cross">Words in several prompts</h2><p>Mass of the same word (any case) in each prompt\'s group.</p>'
                        + "".join(_figure(f, "the same word's mass in each prompt: mean \u00b1 std over the group's runs", fmt)
                                  for f in cross_figures)
                        + _table(["encoder", "word", "prompt (word #): mass mean &plusmn; std (%)"], cross, nowrap=(0, 1), text=(2,)))
    return _page(title, "\n".join(body[:2 if len(body) > 1 and 'class="warn"' in body[1] else 1] + [_toc(toc)]
                                  + body[2 if len(body) > 1 and 'class="warn"' in body[1] else 1:]))


def _page(title: str, body: str, script: bool = False) -> str:
    js = f"<script>{_JS}</script>" if script else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta name="generator" content="{_e(GENERATOR)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n{js}</body></html>\n"
    )
