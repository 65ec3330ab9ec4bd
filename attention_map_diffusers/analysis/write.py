"""Writing a planned analysis: tables, figures and report pages into a temporary folder, then in place."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..atomic import write_bytes, write_text
from ..contract import UserError, slugify
from . import outdir
from .dumpfile import format_ranges
from .fonts import use_fonts
from .options import ENCODER_TITLES, AnalysisOptions
from .plan import Plan, RunPlan, index_rows, plan_run
from .report import EncoderPage, ItemPage, index_page, run_page
from .stats import EncoderResult, step_average
from .tables import write_tables


@dataclass
class FigureFiles:
    """The figure files of one encoder, relative to its folder: the one list that is both written and counted."""

    words: list[tuple[int, str]] = field(default_factory=list)  # (word position, file)
    phrases: list[tuple[int, str]] = field(default_factory=list)  # (phrase position, file)
    summary: str = ""
    overview: str = ""
    word_curves: list[str] = field(default_factory=list)  # per block
    phrase_curves: list[str] = field(default_factory=list)  # per block, when there are phrases

    def __len__(self) -> int:
        singles = int(bool(self.summary)) + int(bool(self.overview))
        return len(self.words) + len(self.phrases) + singles + len(self.word_curves) + len(self.phrase_curves)


def figure_files(res: EncoderResult, options: AnalysisOptions) -> FigureFiles:
    """The figures :func:`write_encoder` draws for ``res`` (none with --tables-only or without words)."""
    if options.tables_only or not res.words:
        return FigureFiles()
    fmt = options.fmt
    return FigureFiles(
        words=[(j, f"heatmaps/words/{res.words[j].index:03d}-{slugify(res.words[j].text, 60)}.{fmt}") for j in res.top],
        phrases=[(k, f"heatmaps/phrases/{ph.index:03d}-{slugify(ph.phrase, 60)}.{fmt}") for k, ph in enumerate(res.phrases)],
        summary=f"summary.{fmt}",
        overview=f"overview.{fmt}",
        word_curves=[f"curves/words_mean_block{bid}.{fmt}" for bid in res.block_ids],
        phrase_curves=[f"curves/phrases_mean_block{bid}.{fmt}" for bid in res.block_ids] if res.phrases else [],
    )


def count_files(run: RunPlan, options: AnalysisOptions) -> int:
    """Progress-bar units of a run: one per encoder's tables, one per figure."""
    return sum(1 + len(figure_files(res, options)) for per_item in run.results for res in per_item)


def write_encoder(folder: str, rel: str, res: EncoderResult, image, options: AnalysisOptions, tick: Callable[[], None]) -> EncoderPage:
    """Tables and figures of one encoder into ``folder`` (= ``rel`` relative to the run's page)."""
    page = EncoderPage(result=res, tables=[f"{rel}/{t}" for t in write_tables(folder, res, bool(options.phrases))])
    tick()
    files = figure_files(res, options)
    if not len(files):
        return page
    from . import plots

    fmt, dpi = options.fmt, options.dpi
    title = ENCODER_TITLES[res.encoder]
    disp = image[1] if image is not None else None
    over = disp if options.overlay else None
    words = res.words
    for sub in {os.path.dirname(n) for _, n in files.words + files.phrases}:
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for j, name in files.words:
        w = words[j]
        fig = plots.heatmap_figure(res.shares[:, :, j], f"{title}: \u201c{w.text}\u201d (word {w.index}, mass {res.mass[j]:.1%})", over)
        plots.save_figure(fig, os.path.join(folder, name), fmt, dpi)
        page.word_heatmaps.append((f"{w.text} ({res.mass[j]:.1%})", f"{rel}/{name}"))
        tick()
    for k, name in files.phrases:
        ph = res.phrases[k]
        occ = f"{len(ph.occurrences)} occurrence" + ("s" if len(ph.occurrences) > 1 else "")
        fig = plots.heatmap_figure(ph.map, f"{title}: \u201c{ph.phrase}\u201d ({occ}, {options.weights} weights)", over)
        plots.save_figure(fig, os.path.join(folder, name), fmt, dpi)
        page.phrase_heatmaps.append((f"{ph.phrase} ({occ})", f"{rel}/{name}"))
        tick()

    labels = [f"{words[j].text} ({res.mass[j]:.1%})" for j in res.top]
    fig = plots.summary_figure(disp, [res.shares[:, :, j] for j in res.top], labels, overlay=options.overlay,
                               title=f"{title}: top {len(res.top)} words by mass (each map on its own colour scale)")
    plots.save_figure(fig, os.path.join(folder, files.summary), fmt, dpi)
    page.summary = f"{rel}/{files.summary}"
    tick()

    fig = plots.overview_figure(
        step_average(res.curves, axis=1), res.curves.mean(axis=0), [w.text for w in words], res.block_ids,
        res.timesteps, f"{title}: attention per word",
    )
    plots.save_figure(fig, os.path.join(folder, files.overview), fmt, dpi)
    page.overview = f"{rel}/{files.overview}"
    tick()

    os.makedirs(os.path.join(folder, "curves"), exist_ok=True)
    kinds = [(files.word_curves, res.curves[:, :, res.top], [words[j].text for j in res.top], "top words", page.word_curves)]
    if files.phrase_curves:
        curves = np.stack([p.curves for p in res.phrases], axis=-1)
        kinds.append((files.phrase_curves, curves, [p.phrase for p in res.phrases], "phrases", page.phrase_curves))
    for names, curves, labels, what, listing in kinds:
        titles = [f"{title}: {what}, transformer_blocks.{bid}" for bid in res.block_ids]
        plots.save_curves_per_block(
            curves, labels, res.timesteps, titles, [os.path.join(folder, n) for n in names], fmt, dpi, on_saved=tick
        )
        listing.extend((f"block {bid}", f"{rel}/{n}") for bid, n in zip(res.block_ids, names))
    return page


def write_run(dest: str, run: RunPlan, options: AnalysisOptions, tick: Callable[[], None]) -> None:
    """A run's image copy, per-encoder outputs and ``index.html`` into ``dest``."""
    dump = run.dump
    B = dump.batch_size
    items = []
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
        pages = []
        for res in run.results[i]:
            rel = f"{base}/{res.encoder}" if base else res.encoder
            pages.append(write_encoder(os.path.join(dest, rel), rel, res, image, options, tick))
        items.append(ItemPage(i, dump.prompts[i], image_rel, pages))
    settings = {
        "encoders": ",".join(options.encoders),
        "top-k": options.topk,
        "phrases": " | ".join(options.phrases) or "(none)",
        "phrase weights": options.weights,
        "blocks": format_ranges(run.results[0][0].block_ids) if run.results and run.results[0] else "",
        "steps": "denoising order (0 = first)"
        + (", flipped from the original tool's order" if dump.steps_flipped else "")
        + ("; the dump has no timesteps" if dump.timesteps is None else ""),
        "dump": dump.folder,
    }
    title = f"Attention analysis: {run.folder or os.path.basename(dump.folder) or dump.folder}"
    html = run_page(title, items, dump.metadata, [str(n) for n in run.notes], "png" if options.tables_only else options.fmt, settings)
    write_text(os.path.join(dest, "index.html"), html)


def write_plan(plan: Plan) -> int:
    """Write everything into a temporary sibling of the output folder, then put it in place.

    With several runs, a run that fails now (changed on disk since it was planned) gets its entry's
    ``problem`` set and the others are written.

    Returns:
        the number of files written.
    """
    options = plan.options
    outdir.remove(plan.leftovers)
    tmp = outdir.new_folder(plan.out)
    try:
        from tqdm import tqdm

        total = sum(r.n_files for r in plan.runs)
        with use_fonts(plan.fonts), tqdm(total=total, desc="analysing", unit="file", disable=None, file=sys.stderr) as bar:
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
                write_run(dest, run, options, lambda: bar.update(1))
                del run
        if plan.multi:
            write_text(os.path.join(tmp, "index.html"), index_page(f"Attention analysis: {os.path.basename(plan.root)}", index_rows(plan)))
        return outdir.commit(tmp, plan.out)
    except BaseException:
        outdir.remove([tmp])
        raise
