"""Writing a planned analysis: tables, figures and report pages into a temporary folder, then in place."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from ..atomic import write_bytes, write_npz, write_text
from ..contract import UserError, slugify
from . import concept_output, framemaps, outdir
from .colours import WordColours
from .aggregate_runs import RunSummary, aggregate, group_runs
from .dumpfile import Dump, format_ranges
from .fonts import FontChoice, use_fonts
from .given import GivenImage, given_image
from .options import ENCODER_TITLES, AnalysisOptions
from .plan import Plan, RunPlan, index_rows, plan_run
from .report import EncoderPage, GroupPage, ItemPage, Slider, group_page, index_page, run_page
from .stats import EncoderResult, step_average
from .tables import write_group_tables, write_tables
from .views import (
    MAX_LINES, FigureFacts, block_groups, common_words, dominant_words, even_note, figure_labels, flat_note, frame_word_maps,
    pick_frames, scale_tops, TEXT_SHARE, WORD_SHARE, scale_note, segmentation_threshold, sensible_dpi, short_label,
    token_group_masks, token_groups, word_maps_arrays,
)


@dataclass
class FigureFiles:
    """The figure files of one encoder, relative to its folder: the one list that is both written and counted."""

    words: list[tuple[int, str]] = field(default_factory=list)  # (word position, file)
    phrases: list[tuple[int, str]] = field(default_factory=list)  # (phrase position, file)
    summary: str = ""
    overview: str = ""
    word_curves: list[str] = field(default_factory=list)  # per block
    phrase_curves: list[str] = field(default_factory=list)  # per block, when there are phrases
    word_grids: str = ""
    segmentation: str = ""
    word_maps: str = ""  # word_maps.npz (not a figure, counted with them)
    token_groups: str = ""
    top_word: str = ""  # the top word's bare map (a PNG), the index's thumbnail beside the image
    strips: dict[str, str] = field(default_factory=dict)  # "step" / "block" -> file
    frames: dict[str, list[list[str]]] = field(default_factory=dict)  # kind -> per frame, per top word: file
    bars: dict[str, list[str]] = field(default_factory=dict)  # kind -> per top word: its slider row's colour bar

    def __len__(self) -> int:
        singles = [self.summary, self.overview, self.word_grids, self.segmentation, self.word_maps, self.token_groups, self.top_word]
        return (len(self.words) + len(self.phrases) + sum(bool(x) for x in singles) + len(self.word_curves)
                + len(self.phrase_curves) + len(self.strips) + len(self.frames))


@dataclass
class Frames:
    """The steps (or blocks) of the optional per-step (per-block) maps that strips and sliders show."""

    kind: str  # "step" or "block"
    indices: list[int]  # positions on the dump's S (or Bk) axis: every step (block), up to SLIDER_FRAMES, for the slider
    labels: list[str]  # "step 0 (t=1000)" / "block 3"

    @property
    def strip(self) -> list[int]:
        """The few frames (positions in :attr:`indices`) that the strip figure shows."""
        return pick_frames(len(self.indices))


SLIDER_FRAMES = 64  # the slider offers every step (block) up to this many, evenly picked beyond


def informative_frame(maps: np.ndarray) -> int:
    """The frame whose maps say the most: the largest mean over words of the map's spatial std.

    Args:
        maps: (m, K, H, W) each word's map per frame (shares: comparable between words).
    """
    if maps.size == 0:
        return 0
    spread = np.asarray(maps, dtype=np.float64).std(axis=(2, 3)).mean(axis=0)  # (K,)
    return int(np.argmax(spread))


def frame_plan(run: RunPlan, options: AnalysisOptions) -> list[Frames]:
    """Which frames the run's dump can give (none with --tables-only or without per-step/per-block maps)."""
    dump = run.dump
    if options.tables_only or not os.path.isdir(dump.folder):
        return []
    have = framemaps.available(dump.folder)
    out = []
    if framemaps.STEP_KEY in have:
        S = dump.step_mean.shape[2]
        idx = pick_frames(S, SLIDER_FRAMES)
        ts = _timesteps(dump.timesteps)
        given = given_image(dump.metadata, S)
        if given is not None and given.levels is not None:
            out.append(Frames("step", idx, [f"\u03c3={given.levels[s]:.2f}" for s in idx]))
        else:
            out.append(Frames("step", idx, [f"step {s}" + (f" (t={ts[s]:.0f})" if ts is not None else "") for s in idx]))
    if framemaps.BLOCK_KEY in have:
        pos = dump.select_blocks(options.block_ranges)
        idx = [pos[k] for k in pick_frames(len(pos), SLIDER_FRAMES)]
        out.append(Frames("block", idx, [f"block {dump.block_ids[p]}" for p in idx]))
    return out


def figure_files(res: EncoderResult, options: AnalysisOptions, frames: Sequence[Frames] = ()) -> FigureFiles:
    """The figures :func:`write_encoder` draws for ``res`` (none with --tables-only or without words)."""
    if options.tables_only or not res.words:
        return FigureFiles()
    fmt = options.fmt
    top = res.top[:MAX_LINES]
    return FigureFiles(
        words=[(j, f"heatmaps/words/{res.words[j].index:03d}-{slugify(res.words[j].text, 60)}.{fmt}") for j in res.top],
        phrases=[(k, f"heatmaps/phrases/{ph.index:03d}-{slugify(ph.phrase, 60)}.{fmt}") for k, ph in enumerate(res.phrases)],
        summary=f"summary.{fmt}",
        overview=f"overview.{fmt}",
        word_curves=[f"curves/words_mean_block{bid}.{fmt}" for bid in res.block_ids],
        phrase_curves=[f"curves/phrases_mean_block{bid}.{fmt}" for bid in res.block_ids] if res.phrases else [],
        word_grids=f"word_grids.{fmt}",
        segmentation=f"segmentation.{fmt}",
        word_maps="word_maps.npz",
        token_groups=f"token_groups.{fmt}",
        top_word="top_word.png",
        strips={f.kind: f"strips/{f.kind}s.{fmt}" for f in frames},
        frames={
            f.kind: [[f"frames/{f.kind}{i:03d}-{res.words[j].index:03d}.png" for j in top] for i in f.indices] for f in frames
        },
        bars={f.kind: [f"frames/bar-{f.kind}-{res.words[j].index:03d}.png" for j in top] for f in frames},
    )


def count_files(run: RunPlan, options: AnalysisOptions) -> int:
    """Progress-bar units of a run: one per encoder's tables, one per figure (and per item, CLIP vs T5)."""
    frames = frame_plan(run, options)
    n = sum(1 + len(figure_files(res, options, frames)) for per_item in run.results for res in per_item)
    n += concept_output.count_files(run.dump, options)
    return n + sum(1 for per_item in run.results if _pair(per_item, options) is not None)


@dataclass
class ItemContext:
    """What one batch item's figures need besides the encoder's result."""

    dump: Dump
    item: int
    image: object  # (path, display array) or None
    facts: FigureFacts
    positions: list[int]  # selected blocks, on the Bk axis
    frames: list[Frames]
    frame_maps: dict[str, np.ndarray]  # kind -> (K, Hc, Wc, T) for this item
    given: Optional[GivenImage] = None  # a given-image run's source and noise levels; None for a generation
    colours: WordColours = field(default_factory=WordColours)  # the words' colours (the same in every run)


def _timesteps(ts) -> Optional[np.ndarray]:
    """The timesteps as an array, or None when the dump has none."""
    if ts is None:
        return None
    ts = np.asarray(ts)
    return ts if ts.ndim == 1 and ts.size else None


def write_encoder(folder: str, rel: str, res: EncoderResult, ctx: ItemContext, options: AnalysisOptions, tick: Callable[[], None]) -> EncoderPage:
    """Tables and figures of one encoder into ``folder`` (= ``rel`` relative to the run's page)."""
    page = EncoderPage(result=res, tables=[f"{rel}/{t}" for t in write_tables(folder, res, bool(options.phrases))])
    tick()
    files = figure_files(res, options, ctx.frames)
    if not len(files):
        return page
    from . import plots
    from .figure import save_figure

    fmt, dpi, facts, pct = options.fmt, options.dpi, ctx.facts, options.vmax_percentile
    title = ENCODER_TITLES[res.encoder]
    image = ctx.image
    disp = image[1] if image is not None else None
    over = disp if options.overlay else None
    words = res.words
    labels = figure_labels(words)
    ts = _timesteps(res.timesteps)
    levels = ctx.given.levels if ctx.given is not None else None  # σ on the x axes instead of steps
    steps_word = "noise levels \u03c3" if levels is not None else "denoising steps"
    scale = scale_note(pct, options.scale)
    page.scale = scale
    page.levels = levels is not None
    shared = options.scale == "shared"
    even = 1.0 / len(words)  # each word's share if the attention were split evenly

    # each figure at the dpi its maps and image need (small grids and line plots: fewer pixels)
    cells = max(res.shares.shape[:2])
    side = max(disp.shape[:2]) if disp is not None else 0
    text_dpi = sensible_dpi(dpi)

    def save(fig, name, at=text_dpi):
        save_figure(fig, os.path.join(folder, name), fmt, at, facts)
        tick()

    # only the folders that get files: an empty one would not be in the output's manifest
    names = [n for _, n in files.words + files.phrases] + files.word_curves + files.phrase_curves
    names += list(files.strips.values()) + [n for per_frame in files.frames.values() for row in per_frame for n in row]
    names += [n for row in files.bars.values() for n in row]
    for sub in {os.path.dirname(n) for n in names} - {""}:
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    heat_maps = [res.shares[:, :, j] for j, _ in files.words] + [res.phrases[k].map for k, _ in files.phrases]
    heat_titles = [f"{title}: \u201c{labels[j]}\u201d (word {words[j].index}, mass {res.mass[j]:.1%}){flat_note(res.shares[:, :, j])}"
                   f"\n{WORD_SHARE}" for j, _ in files.words]
    for k, name in files.phrases:
        ph = res.phrases[k]
        occ = f"{len(ph.occurrences)} occurrence" + ("s" if len(ph.occurrences) > 1 else "")
        heat_titles.append(f"{title}: \u201c{short_label(ph.phrase)}\u201d ({occ}, {options.weights} weights){flat_note(ph.map)}\n{WORD_SHARE}")
        page.phrase_heatmaps.append((f"{ph.phrase} ({occ})", f"{rel}/{name}"))
    page.word_heatmaps.extend((f"{labels[j]} (mass {res.mass[j]:.1%})", f"{rel}/{name}") for j, name in files.words)
    heats = [res.shares[:, :, j] for j in res.top]
    tops = scale_tops(heats, pct, shared)  # shared: one top for the top words' maps, used for the phrases too
    plots.save_heatmap_figures(
        heat_maps, heat_titles, [os.path.join(folder, n) for _, n in files.words + files.phrases], over,
        vmaxes=scale_tops(heat_maps, pct) if not shared else [tops[0]] * len(heat_maps), scale=scale, fmt=fmt,
        dpi=sensible_dpi(dpi, plots.HEATMAP_SIDE, image=side if over is not None else 0, cells=cells),
        on_saved=tick, facts=facts, even=even,
    )

    plots.write_heat_png(os.path.join(folder, files.top_word), heats[0], tops[0], even=even)
    page.top_word = (f"{labels[res.top[0]]} ({res.mass[res.top[0]]:.1%})", f"{rel}/{files.top_word}")
    tick()
    save(plots.summary_figure(disp, heats, [f"{labels[j]} ({res.mass[j]:.1%}){flat_note(res.shares[:, :, j], short=True)}"
                                            for j in res.top], overlay=options.overlay,
                              title=f"{title}: top {len(res.top)} words by mass, {WORD_SHARE}\n{scale}; {even_note(even)}",
                              vmaxes=tops, facts=facts, even=even), files.summary,
         sensible_dpi(dpi, plots.SUMMARY_SIDE, image=side, cells=cells))
    page.summary = f"{rel}/{files.summary}"

    save(plots.overview_figure(step_average(res.curves, axis=1), res.curves.mean(axis=0), labels, res.block_ids, ts,
                               f"{title}: attention per word, {TEXT_SHARE}", facts=facts, levels=levels), files.overview)
    page.overview = f"{rel}/{files.overview}"

    top8 = res.top[:MAX_LINES]
    colour_of = ctx.colours.colours(labels)  # per word
    grids = np.moveaxis(res.curves[:, :, res.top], -1, 0)  # (m, Bk, S)
    save(plots.word_grid_figure(grids, [labels[j] for j in res.top], res.block_ids, ts,
                                f"{title}: each top word over blocks (y) and {steps_word} (x), {TEXT_SHARE}", facts=facts, levels=levels),
         files.word_grids)
    page.word_grids = f"{rel}/{files.word_grids}"

    dom, top_share = dominant_words(res.shares)
    thr = segmentation_threshold(len(words))
    save(plots.segmentation_figure(disp if options.overlay else None, dom, top_share, thr, labels, colour_of,
                                   f"{title}: the word each pixel attends to most (largest {WORD_SHARE})", facts=facts),
         files.segmentation, sensible_dpi(dpi, plots.SEGMENTATION_SIDE, image=side if options.overlay else 0, cells=cells))
    page.segmentation = f"{rel}/{files.segmentation}"
    page.segmentation_threshold = thr
    size = ctx.dump.metadata.get("image_size")
    write_npz(os.path.join(folder, files.word_maps), word_maps_arrays(res.shares, words, size if isinstance(size, list) else None))
    page.word_maps = f"{rel}/{files.word_maps}"
    tick()

    enc = ctx.dump.encoders[res.encoder]
    i = ctx.item
    T = ctx.dump.step_mean.shape[-1]
    masks = token_group_masks(T, enc.span, len(enc.tokens[i]), enc.special[i], res.wordmap.weights)
    # prompt tokens outside every word are punctuation: a prompt without any has none, and no row for them
    masks = {k: v for k, v in masks.items() if k != "other prompt tokens" or v.any()}
    groups = token_groups(ctx.dump.step_mean[i][ctx.positions], masks)
    bgroups = block_groups(res.block_ids)
    shares = np.stack([groups.shares[:, pos].mean(axis=1) for _, pos in bgroups])  # (Gb, G, S)
    save(plots.token_groups_figure(shares, groups.names, [g for g, _ in bgroups], ts,
                                   f"{title}: where the pixels' text attention goes, {TEXT_SHARE}\n({title} positions; the rest: the other encoder)",
                                   facts=facts, levels=levels), files.token_groups)
    page.token_groups = f"{rel}/{files.token_groups}"

    for fr in ctx.frames:
        maps = ctx.frame_maps.get(fr.kind)
        if maps is None:
            continue
        a, b = enc.span
        fw = frame_word_maps(maps[..., a:b], res.wordmap.weights)  # (K, H, W, n)
        sel = np.moveaxis(fw[..., top8], -1, 0)  # (m, K, H, W)
        vmaxes = scale_tops(list(sel), pct, shared)
        name = files.strips[fr.kind]
        picks = fr.strip
        rows = "every row on one" if shared else "each row on its"
        save(plots.strip_figure(sel[:, picks], [labels[j] for j in top8], [fr.labels[k] for k in picks],
                                f"{title}: top words per {fr.kind}, {WORD_SHARE}\n({rows} {scale.replace(' of each map', ' of its maps')}; {even_note(even)})",
                                vmaxes=vmaxes, facts=facts, even=even), name, sensible_dpi(dpi, plots.STRIP_SIDE, cells=cells))
        for k, per_word in enumerate(files.frames[fr.kind]):
            for r, fname in enumerate(per_word):
                plots.write_grid_png(os.path.join(folder, fname), sel[r, k], vmaxes[r])
        for r, bname in enumerate(files.bars[fr.kind]):
            gh, gw = sel.shape[2:]  # as tall as the frame is shown: 256 px for a square grid
            plots.write_bar_png(os.path.join(folder, bname), vmaxes[r], height=max(64, round(256 * gh / max(gh, gw))), even=even)
        tick()
        page.strips.append((fr.kind, f"{rel}/{name}"))
        page.sliders.append(Slider(
            kind=fr.kind, title="noise level" if fr.kind == "step" and levels is not None else "", labels=list(fr.labels), words=[f"{labels[j]} (0 to {vmaxes[r]:.3g})" for r, j in enumerate(top8)],
            frames=[[f"{rel}/{f}" for f in per_word] for per_word in files.frames[fr.kind]], start=informative_frame(sel),
            bars=[f"{rel}/{b}" for b in files.bars[fr.kind]],
        ))

    kinds = [(files.word_curves, res.curves[:, :, res.top], [labels[j] for j in res.top], "top words", page.word_curves)]
    if files.phrase_curves:
        curves = np.stack([p.curves for p in res.phrases], axis=-1)
        kinds.append((files.phrase_curves, curves, [short_label(p.phrase) for p in res.phrases], "phrases", page.phrase_curves))
    for names, curves, lbls, what, listing in kinds:
        titles = [f"{title}: {what}, transformer_blocks.{bid}, {TEXT_SHARE}" for bid in res.block_ids]
        plots.save_curves_per_block(
            curves, lbls, ts, titles, [os.path.join(folder, n) for n in names], fmt, text_dpi, on_saved=tick, facts=facts,
            colours=ctx.colours.colours(lbls), levels=levels,
        )
        listing.extend((f"block {bid}", f"{rel}/{n}") for bid, n in zip(res.block_ids, names))
    return page


def _pair(per_item: Sequence[EncoderResult], options: AnalysisOptions):
    """The (CLIP, T5) results of an item when both have words and figures are drawn."""
    if options.tables_only or options.words == "original":  # the original's CLIP and T5 words differ: no pairs
        return None
    by = {r.encoder: r for r in per_item}
    c, t = by.get("clip"), by.get("t5")
    if c is None or t is None or not c.words or not t.words or not common_words(c.words, t.words):
        return None
    return c, t


def write_clip_vs_t5(dest: str, rel: str, pair, facts, options: AnalysisOptions, colours: WordColours = WordColours()) -> str:
    """``clip_vs_t5.{fmt}`` of one item; returns its path relative to the page."""
    from . import plots
    from .figure import save_figure

    c, t = pair
    common = common_words(c.words, t.words)
    labels = figure_labels(c.words)
    where = dict(common)
    top = [j for j in c.top if j in where][:6]
    pairs = [(c.shares[:, :, j], t.shares[:, :, where[j]]) for j in top]
    name = f"clip_vs_t5.{options.fmt}"
    fig = plots.clip_vs_t5_figure(
        pairs, [labels[j] for j in top], np.array([c.mass[i] for i, _ in common]), np.array([t.mass[k] for _, k in common]),
        [labels[i] for i, _ in common], f"CLIP vs T5: heatmaps of the top CLIP words (one scale, {WORD_SHARE}) and every word's mass", facts=facts,
        colours=colours.colours([labels[i] for i, _ in common]),
        even=1.0 / len(c.words) if len(c.words) == len(t.words) else None,
    )
    at = sensible_dpi(options.dpi, plots.PAIR_SIDE, cells=max(c.shares.shape[:2]))
    save_figure(fig, os.path.join(dest, name), options.fmt, at, facts)
    return f"{rel}/{name}" if rel else name


def run_facts(dump: Dump, item: int) -> FigureFacts:
    """The facts a run's figures carry: prompt, seed, model and whether the weights were random."""
    meta = dump.metadata
    seeds = meta.get("seeds")
    seed = seeds[item] if isinstance(seeds, list) and item < len(seeds) else meta.get("seed")
    return FigureFacts(prompt=dump.prompts[item], seed=seed, model=str(meta.get("model_id") or ""),
                       random_weights=bool(meta.get("random_weights")) or meta.get("model_id") == "tiny-random")


@dataclass
class RunOutcome:
    """What the index and the aggregation need of a written run."""

    summaries: list[RunSummary]
    thumbnail: Optional[str]  # relative to the run's page
    model: str
    seeds: list
    random_weights: bool
    given: Optional[GivenImage] = None
    top_map: Optional[tuple[str, str, str]] = None  # (encoder, caption, path relative to the run's page)


def write_run(dest: str, run: RunPlan, options: AnalysisOptions, tick: Callable[[], None], back: Optional[str] = None,
              parallel: bool = False, colours: Optional[WordColours] = None) -> RunOutcome:
    """A run's image copy, per-encoder outputs and ``index.html`` into ``dest``.

    ``back``: a link from the run's page to the page listing it (several runs). ``parallel``: write
    the second encoder in a forked process while this one writes the first (a single run on a
    machine with two or more cores; see :func:`_fork_encoder`). ``colours``: the words' colours of
    the whole analysis (default: from this run's words).
    """
    dump = run.dump
    B = dump.batch_size
    if colours is None:
        colours = WordColours.build([[w.text for res in per_item for w in res.words] + list(options.phrases)
                                     for per_item in run.results])
    items = []
    frames = frame_plan(run, options)
    positions = dump.select_blocks(options.block_ranges)
    flip = dump.steps_flipped
    given = given_image(dump.metadata, dump.step_mean.shape[2])
    summaries: list[RunSummary] = []
    thumbnail = None
    top_map = None  # (encoder, caption, path) of item 0's top word heatmap, shown beside the index's thumbnail
    for i in range(B):
        base = f"item{i}" if B > 1 else ""
        image_rel = None
        image = run.images[i]
        if image is not None and not options.tables_only:
            ext = os.path.splitext(image[0])[1].lower() or ".png"
            image_rel = f"{base}/image{ext}" if base else f"image{ext}"
            os.makedirs(os.path.join(dest, base), exist_ok=True)
            with open(image[0], "rb") as fh:
                write_bytes(os.path.join(dest, image_rel), fh.read())
        frame_maps = {}
        for fr in frames:
            m = framemaps.read_frames(dump.folder, framemaps.STEP_KEY if fr.kind == "step" else framemaps.BLOCK_KEY, i,
                                      fr.indices, flip=flip and fr.kind == "step")
            if m is not None:
                frame_maps[fr.kind] = m
        facts = run_facts(dump, i)
        ctx = ItemContext(dump, i, image, facts, positions, frames, frame_maps, given, colours)
        pages = []
        results = run.results[i]
        forked = _fork_encoder(dest, base, results[1], ctx, options) if parallel and len(results) == 2 else None
        pair = _pair(results, options)
        compare = None
        if pair is not None:  # drawn first: with a forked child, while it writes its encoder
            compare = write_clip_vs_t5(os.path.join(dest, base) if base else dest, base, pair, facts, options, colours)
            tick()
        for res in results:
            rel = f"{base}/{res.encoder}" if base else res.encoder
            if forked is not None and res is results[1]:
                pages.append(forked.join(res))
                for _ in range(forked.files):
                    tick()
            else:
                pages.append(write_encoder(os.path.join(dest, rel), rel, res, ctx, options, tick))
            summaries.append(RunSummary(run.folder or "", i, facts.seed, res.encoder, dump.prompts[i], tuple(res.words),
                                        tuple(res.block_ids), res.mass, res.curves, res.shares.astype(np.float32),
                                        _timesteps(res.timesteps), facts.model, facts.random_weights,
                                        levels=None if given is None or given.levels is None else tuple(float(v) for v in given.levels)))
        del frame_maps
        concepts = None
        if dump.concepts is not None:
            rel = f"{base}/concepts" if base else "concepts"
            concepts = concept_output.write_concepts(os.path.join(dest, rel), rel, dump, i, image, facts, options, positions, tick)
        if thumbnail is None:
            thumbnail = image_rel or next((p.summary for p in pages if p.summary), None)
            top_map = next(((p.result.encoder, *p.top_word) for p in pages if p.top_word), None)
        items.append(ItemPage(i, dump.prompts[i], image_rel, pages, compare=compare, facts=facts, given=given,
                              concepts=concepts))
    settings = {
        "encoders": ",".join(options.encoders),
        "top-k": options.topk,
        "phrases": " | ".join(options.phrases) or "(none)",
        "phrase weights": options.weights,
        "blocks": format_ranges(run.results[0][0].block_ids) if run.results and run.results[0] else "",
        "step order": ("independent noise levels \u03c3 of the given image, noisiest first" if given is not None and given.levels is not None
                  else "denoising order (0 = first)"
                  + (", flipped from the original tool's order" if dump.steps_flipped else "")
                  + ("; the dump has no timesteps" if dump.timesteps is None else "")),
        "heatmap colour scale": scale_note(options.vmax_percentile, options.scale) + " (--scale, --vmax-percentile)",
        "dump": dump.folder,
    }
    title = f"Attention analysis: {run.folder or os.path.basename(dump.folder) or dump.folder}"
    random = any(it.facts.random_weights for it in items)
    html = run_page(title, items, dump.metadata, [str(n) for n in run.notes], "png" if options.tables_only else options.fmt, settings,
                    back=back, random_weights=random)
    write_text(os.path.join(dest, "index.html"), html)
    seeds = [it.facts.seed for it in items]
    return RunOutcome(summaries, thumbnail, str(dump.metadata.get("model_id") or ""), seeds, random, given, top_map)


def write_cross_prompt(tmp: str, groups: Sequence[GroupPage], summaries: Sequence[RunSummary],
                       options: AnalysisOptions) -> list[str]:
    """Per encoder, a figure of the words that two or more prompts' groups share (their mass in each
    prompt), ``aggregate/words_across_prompts_{enc}``; returns the paths relative to ``tmp``."""
    from . import group_plots
    from .aggregate_runs import words_across_prompts
    from .figure import save_figure

    written = []
    for enc in ("clip", "t5"):
        gs = [gp.result for gp in groups if gp.result.encoder == enc]
        shared = words_across_prompts(gs)
        if not shared:
            continue
        def label(prompt: str) -> str:
            return prompt if len(prompt) <= 60 else prompt[:59] + "\u2026"

        rows = [(word, [(label(gs[g].prompt), f"{short_label(gs[g].words[j].text)} #{gs[g].words[j].index}", m, sd)
                        for g, j, m, sd in hits]) for word, hits in shared.items()]
        members = [m for m in summaries if m.encoder == enc and m.prompt in {g.prompt for g in gs}]
        facts = FigureFacts(prompt=" | ".join(dict.fromkeys(g.prompt for g in gs)), seed="several (see the groups)",
                            model=", ".join(sorted({m.model for m in members} - {""})),
                            random_weights=any(m.random_weights for m in members))
        fig = group_plots.cross_prompt_figure(rows, f"{ENCODER_TITLES[enc]}: words in several prompts", facts=facts)
        rel = f"aggregate/words_across_prompts_{enc}.{options.fmt}"
        os.makedirs(os.path.join(tmp, "aggregate"), exist_ok=True)
        save_figure(fig, os.path.join(tmp, rel), options.fmt, sensible_dpi(options.dpi), facts)
        written.append(rel)
    return written


def write_groups(tmp: str, summaries: Sequence[RunSummary], options: AnalysisOptions, pool=None,
                 fonts: Optional[FontChoice] = None, colours: WordColours = WordColours()) -> tuple[list[GroupPage], list]:
    """Aggregate runs that share a prompt (two or more) into ``aggregate/<NNN-slug>/{enc}/``.

    The numbers and tables are computed here; each group's figures are drawn in ``pool`` (a process
    pool, with ``fonts``) when one is given, else here.

    Returns:
        the groups' pages, and the pool's futures of their figures (none without a pool): the
        caller waits on them, and can do other work while the figures are being drawn.
    """
    pending = []
    groups = group_runs(summaries)
    prompts = list(dict.fromkeys(g[0].prompt for g in groups))
    pages: list[GroupPage] = []
    for members in groups:
        res = aggregate(members)
        k = prompts.index(res.prompt)
        rel = f"aggregate/{k:03d}-{slugify(res.prompt, 40)}"
        folder = os.path.join(tmp, rel, res.encoder)
        os.makedirs(folder, exist_ok=True)
        tables = [f"{rel}/{res.encoder}/{t}" for t in write_group_tables(folder, res, bare=options.words == "original")]
        page = GroupPage(res, rel, tables)
        if not options.tables_only and res.words:
            facts = FigureFacts(prompt=res.prompt, seed=", ".join(str(s) for s in res.seeds) + f" ({res.n_runs} runs)",
                                model=members[0].model, random_weights=any(m.random_weights for m in members))
            names = [f"{kind}.{options.fmt}" for kind in GROUP_FIGURES[:2]]
            pieces = spread_pieces(min(len(res.words), options.topk, MAX_LINES), options.dpi)
            names += [f"heatmaps_mean_{k + 1:02d}.{options.fmt}" for k in range(len(pieces))]
            page.curves, page.blocks = (f"{rel}/{res.encoder}/{n}" for n in names[:2])
            page.heatmaps = [f"{rel}/{res.encoder}/{n}" for n in names[2:]]
            paths = [os.path.join(folder, n) for n in names]
            if pool is None:
                _group_figures(paths, res, facts, options, colours)
            else:
                pending.append(pool.submit(_group_figures_with_fonts, fonts, paths, res, facts, options, colours))
        pages.append(page)
    return pages, pending


def _group_figures_with_fonts(fonts: Optional[FontChoice], *args) -> None:
    with use_fonts(fonts):
        _group_figures(*args)


GROUP_FIGURES = ("curves_mean", "curves_blocks", "heatmaps_mean")  # a group's figures, in the order _group_figures draws them
PIECE_MAX_PX = 1600  # the mean / spread heatmaps are split into figures at most this tall
SPREAD_ROW_IN, SPREAD_EDGES_IN = 2.6, 1.3  # inches per word row of plots.spread_figure (map and gap); title, footer


def spread_pieces(m: int, dpi: int) -> list[range]:
    """The top ``m`` words in pieces of rows, each piece's figure at most :data:`PIECE_MAX_PX` tall at ``dpi``."""
    per = max(1, int((PIECE_MAX_PX / dpi - SPREAD_EDGES_IN) // SPREAD_ROW_IN))
    return [range(a, min(m, a + per)) for a in range(0, m, per)]


SPREAD_NOTE = "one colour scale for all words (a single run: one per word)"  # the scale rule differs from a run's: said on the figure


def _group_figures(paths: Sequence[str], res, facts: FigureFacts, options: AnalysisOptions,
                   colours: WordColours = WordColours()) -> None:
    """A group's figures (:data:`GROUP_FIGURES`) into ``paths``: block-averaged curves with bands,
    curves per block with bands, and the mean heatmaps with their spread."""
    from . import group_plots, plots
    from .figure import save_figure

    labels = figure_labels(res.words)
    order = [int(j) for j in np.argsort(-res.mass_mean, kind="stable")[: options.topk]]
    title = ENCODER_TITLES[res.encoder]
    ts = res.timesteps
    fmt = options.fmt
    top8 = order[:MAX_LINES]
    curves_path, blocks_path, heatmap_paths = paths[0], paths[1], paths[2:]
    colour_of = colours.colours([labels[j] for j in top8])
    fig = plots.curves_figure(res.curves_mean.mean(axis=0)[:, top8], [labels[j] for j in top8], ts,
                              f"{title}: top words, averaged over blocks, mean \u00b1 std over {res.n_runs} runs, {TEXT_SHARE}",
                              spread=res.blockavg_std[:, top8], facts=facts, colours=colour_of, levels=res.levels)
    save_figure(fig, curves_path, fmt, sensible_dpi(options.dpi), facts)
    fig = group_plots.blocks_bands_figure(
        res.curves_mean[:, :, top8], res.curves_std[:, :, top8], [labels[j] for j in top8], res.block_ids, ts,
        f"{title}: top words per block, mean over {res.n_runs} runs, {TEXT_SHARE}", facts=facts, colours=colour_of,
        levels=res.levels)
    save_figure(fig, blocks_path, fmt, sensible_dpi(options.dpi), facts)
    mean, std = np.moveaxis(res.map_mean[..., top8], -1, 0), np.moveaxis(res.map_std[..., top8], -1, 0)
    vmaxes = (float(mean.max(initial=0)) or 1.0, float(std.max(initial=0)) or 1.0)  # one scale over the pieces
    pieces = spread_pieces(len(top8), options.dpi)  # sized at --dpi: at a lower dpi the pieces are only smaller
    for k, (rows, path) in enumerate(zip(pieces, heatmap_paths)):
        part = f" ({k + 1}/{len(pieces)})" if len(pieces) > 1 else ""
        fig = plots.spread_figure(mean[rows.start:rows.stop], std[rows.start:rows.stop],
                                  [f"{labels[top8[r]]} ({res.mass_mean[top8[r]]:.1%} \u00b1 {res.mass_std[top8[r]]:.1%})" for r in rows],
                                  f"{title}: mean heatmap and its spread over {res.n_runs} runs{part}, {WORD_SHARE}\n{SPREAD_NOTE}",
                                  facts=facts, vmaxes=vmaxes, even=1.0 / len(res.words))
        save_figure(fig, path, fmt, sensible_dpi(options.dpi, plots.SPREAD_SIDE, cells=max(res.map_mean.shape[:2])), facts)


def write_plan(plan: Plan, pool=None) -> int:
    """Write everything into a temporary sibling of the output folder, then put it in place.

    With several runs, a run that fails now (changed on disk since it was planned) gets its entry's
    ``problem`` set and the others are written. ``pool``: worker processes already started (by
    :func:`early_pool`; the caller shuts them down), used when the plan calls for several.

    Returns:
        the number of files written.
    """
    outdir.remove(plan.leftovers)
    tmp = outdir.new_folder(plan.out)
    try:
        jobs = _jobs(plan)
        with contextlib.ExitStack() as stack:
            if jobs < 2:
                pool = None
            elif pool is None:
                pool = stack.enter_context(_pool(jobs))
            stack.enter_context(use_fonts(plan.fonts))
            outcomes = _write_runs(plan, tmp, pool)
            if plan.multi:
                _write_index(plan, tmp, outcomes, pool)
        return outdir.commit(tmp, plan.out, plan.options.overwrite)
    except BaseException:
        outdir.discard(tmp)
        raise


def _pool(jobs: int):
    """``jobs`` worker processes (spawned: no state of this one is shared) for the runs and the groups."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))


def early_pool(options: AnalysisOptions):
    """Worker processes for an analysis of several runs, started before the runs are planned: each
    imports matplotlib and loads its fonts (~1 s) while this process reads and checks the runs.
    None when the runs will be written here (one run, --tables-only, --t5-tokenizer, one CPU)."""
    if options.tables_only:  # no matplotlib to warm up
        return None
    from .discover import discover
    from .plan import folders

    root, out = folders(options)
    try:
        entries, _ = discover(root, out) if os.path.isdir(root) else (None, [])
    except (UserError, OSError):
        return None  # make_plan reports it
    jobs = _job_count(sum(1 for e in entries or [] if e.to_analyse), t5_tokenizer=bool(options.t5_tokenizer))
    if jobs < 2:
        return None
    pool = _pool(jobs)
    for _ in range(jobs):
        pool.submit(_warm_up)
    return pool


def _warm_up() -> None:
    """A worker's imports and font cache, before its first run."""
    from . import plots  # matplotlib, Pillow, numpy

    plots.text_width(["warm"], 8)  # the font cache


def _write_runs(plan: Plan, tmp: str, pool) -> dict[str, RunOutcome]:
    """Every run's folder (in ``pool`` when given); returns folder -> outcome."""
    from tqdm import tqdm

    options = plan.options
    total = sum(r.n_files for r in plan.runs)
    with tqdm(total=total, desc="analysing", unit="file", disable=None, file=sys.stderr) as bar:
        if pool is not None:
            return _write_runs_parallel(plan, tmp, pool, bar)
        outcomes: dict[str, RunOutcome] = {}
        for spec in plan.runs:
            try:
                run = spec.plan or plan_run(spec.folder, spec.run_dir, options, plan.t5_loader)
            except UserError as exc:
                if spec.entry is None:
                    raise
                spec.entry.problem = str(exc)
                continue
            dest = os.path.join(tmp, run.folder) if run.folder else tmp
            os.makedirs(dest, exist_ok=True)
            outcomes[run.folder] = write_run(dest, run, options, lambda: bar.update(1), back=_back(plan, run.folder),
                                             parallel=len(plan.runs) == 1 and _cpus() > 1 and not options.tables_only,
                                             colours=plan.colours)
            del run
        return outcomes


def _write_index(plan: Plan, tmp: str, outcomes: dict[str, RunOutcome], pool) -> None:
    """Several runs: the groups of runs that share a prompt (figures in ``pool`` when given), the
    cross-prompt figures and the index page."""
    options = plan.options
    summaries: list[RunSummary] = []
    for spec in plan.runs:  # in the order of the runs, so that groups are numbered by first appearance
        outcome = outcomes.get(spec.folder)
        if outcome is not None:
            summaries.extend(outcome.summaries)
            outcome.summaries = []
    groups, drawing = write_groups(tmp, summaries, options, pool, plan.fonts, plan.colours or WordColours())
    # the cross-prompt figures drawn here while the pool draws the groups'
    cross = [] if options.tables_only else write_cross_prompt(tmp, groups, summaries, options)
    for fut in drawing:
        fut.result()  # a worker's error is raised here
    by_rel: dict[str, list] = {}
    for g in groups:
        by_rel.setdefault(g.rel, []).append(g)
    for rel, pages in by_rel.items():
        up = "../" * (rel.count("/") + 1)
        links = [(r, f"{up}{r}/index.html") for r in dict.fromkeys(pages[0].result.runs)]
        images = [(r, f"{up}{r}/{outcomes[r].thumbnail}") for r, _ in links if r in outcomes and outcomes[r].thumbnail]
        html = group_page(f"Runs of one prompt: {rel.rsplit('/', 1)[-1]}", pages, f"{up}index.html", links,
                          "png" if options.tables_only else options.fmt, images)
        write_text(os.path.join(tmp, rel, "index.html"), html)
    member_of: dict[str, list[str]] = {}
    for g in groups:
        for r in g.result.runs:
            member_of.setdefault(r, [])
            if g.rel not in member_of[r]:
                member_of[r].append(g.rel)
    rows = index_rows(plan)
    for row in rows:
        o = outcomes.get(row["folder"])
        row.update(
            seed=o.seeds[0] if o is not None and o.seeds else None,
            model=o.model if o is not None else "",
            random_weights=bool(o is not None and o.random_weights),
            thumbnail=f"{row['folder']}/{o.thumbnail}" if o is not None and o.thumbnail else None,
            groups=member_of.get(row["folder"], []),
            given=o.given if o is not None else None,
            top_map=(o.top_map[0], o.top_map[1], f"{row['folder']}/{o.top_map[2]}") if o is not None and o.top_map else None,
        )
    first = {}  # runs of one prompt together, prompts in order of first appearance
    for row in rows:
        first.setdefault(" | ".join(row.get("prompt") or []), len(first))
    rows.sort(key=lambda row: first[" | ".join(row.get("prompt") or [])])
    write_text(os.path.join(tmp, "index.html"), index_page(
        f"Attention analysis: {os.path.basename(plan.root)}", rows, groups, cross, options.fmt))


class _ForkedEncoder:
    """One encoder's tables and figures being written by a forked child process."""

    def __init__(self, process, conn, files: int):
        self.process, self.conn, self.files = process, conn, files

    def join(self, res: EncoderResult) -> EncoderPage:
        """Wait for the child; its page (with ``res`` put back), or the child's error raised here."""
        try:
            kind, value = self.conn.recv()
        except EOFError:
            kind, value = "crash", None
        finally:
            self.conn.close()
            self.process.join()
        if kind == "page":
            value.result = res
            return value
        if kind == "error":
            raise value
        raise RuntimeError(f"the process writing the {res.encoder} figures stopped (exit code {self.process.exitcode})")


def _fork_encoder(dest: str, base: str, res: EncoderResult, ctx: ItemContext, options: AnalysisOptions):
    """Start writing ``res``'s folder in a forked child (it shares this process's memory, so nothing
    large is copied or pickled); None where fork is not available (then the caller writes it)."""
    import multiprocessing

    if sys.platform != "linux" or "fork" not in multiprocessing.get_all_start_methods():
        return None
    rel = f"{base}/{res.encoder}" if base else res.encoder
    frames = ctx.frames
    files = 1 + len(figure_files(res, options, frames))
    parent, child = multiprocessing.Pipe(duplex=False)

    def work():
        parent.close()
        try:
            page = write_encoder(os.path.join(dest, rel), rel, res, ctx, options, lambda: None)
            page.result = None  # the parent has it
            child.send(("page", page))
        except BaseException as exc:  # reported to the parent, which raises it
            try:
                child.send(("error", exc))
            except Exception:
                child.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
        finally:
            child.close()

    process = multiprocessing.get_context("fork").Process(target=work, daemon=True)
    process.start()
    child.close()
    return _ForkedEncoder(process, parent, files)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


MAX_JOBS = 4  # processes writing runs at once (several runs only)


def _jobs(plan: Plan) -> int:
    """Processes for writing the plan's runs (:func:`_job_count`)."""
    return _job_count(len(plan.runs) if plan.multi else 1, t5_tokenizer=plan.t5_loader is not None)


def _job_count(runs: int, t5_tokenizer: bool) -> int:
    """Processes for writing ``runs`` runs: one per CPU (at most :data:`MAX_JOBS`) when there are
    several, each re-planned from its folder anyway; one for a single run or a --t5-tokenizer (not
    sent to other processes)."""
    if runs < 2 or t5_tokenizer:
        return 1
    return max(1, min(MAX_JOBS, _cpus(), runs))


def _back(plan: Plan, folder: Optional[str]) -> Optional[str]:
    """The link from a run's page back to the index of several runs."""
    if not plan.multi or not folder:
        return None
    return "../" * (folder.replace("\\", "/").count("/") + 1) + "index.html"


def _write_one(folder: str, run_dir: str, dest: str, options: AnalysisOptions, back: Optional[str],
               fonts: Optional[FontChoice], colours: Optional[WordColours] = None) -> "RunOutcome":
    """One run of several, in a worker process: planned again from its folder and written into ``dest``."""
    with use_fonts(fonts):
        run = plan_run(folder, run_dir, options, None)
        os.makedirs(dest, exist_ok=True)
        return write_run(dest, run, options, lambda: None, back=back, colours=colours)


def _write_runs_parallel(plan: Plan, tmp: str, pool, bar) -> dict:
    """Write the runs in ``pool``'s processes; returns folder -> outcome. A run that fails (changed on
    disk since it was planned) gets its entry's ``problem``."""
    from concurrent.futures import as_completed

    outcomes = {}
    futures = {
        pool.submit(_write_one, spec.folder, spec.run_dir, os.path.join(tmp, spec.folder), plan.options,
                    _back(plan, spec.folder), plan.fonts, plan.colours): spec
        for spec in plan.runs
    }
    for fut in as_completed(futures):
        spec = futures[fut]
        try:
            outcomes[spec.folder] = fut.result()  # a worker's UserError / OSError is raised here
        except UserError as exc:
            if spec.entry is None:
                raise
            spec.entry.problem = str(exc)
        bar.update(spec.n_files)
    return outcomes
