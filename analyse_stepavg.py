#!/usr/bin/env python
"""Analyse step-averaged attention dumps without loading any model.

Reads a run folder written by ``sd_35_stepavg_dump.py`` (or by the original tool) and writes, per
text encoder: word and phrase heatmaps (alone and over the generated image), a summary grid,
per-block attention curves over the denoising steps, a word x block x step overview, CSV tables and
an ``index.html`` report. Only numpy, matplotlib, Pillow and the standard library are used
(transformers only to load ``--t5-tokenizer``). See docs/analysis.md.

    python analyse_stepavg.py --root out_sd35_stepavg --phrases "in front of|a barn"
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import unicodedata
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from attention_map_diffusers.analysis.dumpfile import Dump, format_ranges, load_dump, load_t5_tokenizer, read_runs
from attention_map_diffusers.analysis.report import GENERATOR, EncoderPage, ItemPage, index_page, run_page
from attention_map_diffusers.analysis.stats import WEIGHT_MODES, EncoderResult, analyse_encoder, parse_blocks, step_average
from attention_map_diffusers.analysis.tables import write_tables
from attention_map_diffusers.analysis.words import map_words, parse_phrases
from attention_map_diffusers.atomic import current_umask, write_bytes, write_text
from attention_map_diffusers.cli import OneLineParser, fail, parse
from attention_map_diffusers.contract import (
    METADATA_NAME,
    NPZ_NAME,
    RUNS_NAME,
    RunRecord,
    UserError,
    run_is_complete,
)

PROG = "analyse_stepavg.py"
ENCODERS = ("clip", "t5")
FORMATS = ("png", "svg", "pdf")
ENCODER_TITLES = {"clip": "CLIP", "t5": "T5"}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description=(
            "Analyse step-averaged SD3.5 attention dumps (no model needed): per word and phrase, heatmaps, "
            "curves over blocks and denoising steps, CSV tables and an HTML report."
        ),
        epilog="Outputs and how to read them: docs/analysis.md.",
    )
    p.add_argument(
        "--root",
        required=True,
        help="a run folder (stepavg_token_maps_v1.npz + metadata.json), or a folder with runs.jsonl: then "
        "every run listed as done or skipped is analysed",
    )
    p.add_argument("--out", default=None, help="output folder (default: ROOT/analysis); replaced as a whole when it holds an earlier analysis")
    p.add_argument("--topk", type=int, default=12, help="number of words (by heatmap mass) that get heatmaps and curves (default: 12)")
    p.add_argument(
        "--phrases",
        default=None,
        help='phrases to analyse, separated by |, e.g. "in front of|on top of": contiguous word sequences of '
        "the prompt, matched case-insensitively; every occurrence counts",
    )
    p.add_argument(
        "--weights",
        choices=WEIGHT_MODES,
        default="attention",
        help="how a phrase combines its words: 'attention' weights each word by its heatmap mass, "
        "'uniform' equally (default: attention)",
    )
    p.add_argument("--encoders", default="clip,t5", help="text encoders to analyse, comma-separated, from clip,t5 (default: clip,t5)")
    p.add_argument("--format", choices=FORMATS, default="png", help="figure file format (default: png)")
    p.add_argument("--dpi", type=int, default=100, help="figure resolution in dots per inch (default: 100)")
    p.add_argument(
        "--blocks",
        default=None,
        help="blocks to analyse, by index: comma-separated indices and ranges, e.g. 0-5,12 (default: all). "
        "Curves and tables cover these blocks; heatmaps too when the dump kept per-block maps",
    )
    p.add_argument("--no-overlay", action="store_true", help="do not draw heatmaps over the generated image")
    p.add_argument("--tables-only", action="store_true", help="write only the CSV tables and the index.html listing them (no figures)")
    p.add_argument(
        "--t5-tokenizer",
        default=None,
        metavar="PATH_OR_ID",
        help="for dumps of the original tool (no T5 tokens): the T5 tokenizer to re-tokenise the prompt with "
        "(a folder or a hub id available offline, e.g. the pipeline's tokenizer_3); loads transformers",
    )
    return p


# ---------------------------------------------------------------------------------------------
# Planning: everything is read and checked here, before anything is written.


@dataclass
class RunPlan:
    """One run to analyse; ``folder`` is its sub-folder of the output (None for a single run)."""

    folder: Optional[str]
    dump: Dump
    images: list  # per item: (path, display array) or None
    results: list[list[EncoderResult]]  # per item, per encoder
    notes: list[str] = field(default_factory=list)


@dataclass
class RunSpec:
    """A run that passed validation. Its arrays are kept only when it is the only run; with several
    runs each is loaded again when written, so memory does not grow with the number of runs."""

    folder: Optional[str]
    run_dir: str
    notes: list[str]
    n_files: int  # files it will write (for the progress bar)
    plan: Optional[RunPlan]


@dataclass
class Plan:
    root: str
    out: str
    runs: list[RunSpec]
    entries: list[RunRecord]  # runs.jsonl lines (empty for a single run)
    multi: bool
    options: tuple  # (encoders, phrases, block_ids, t5 loader) to plan a run again


def safe_filename(text: str, limit: int = 60) -> str:
    """A file-name part safe on every OS: letters, digits, ``_`` and ``-`` only (Unicode letters kept)."""
    text = unicodedata.normalize("NFC", text)
    out = re.sub(r"[^\w\-]+", "-", text)
    out = re.sub(r"-{2,}", "-", out).strip("-_")
    return out[:limit].rstrip("-_") or "x"


def _parse_encoders(spec: str) -> list[str]:
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in ENCODERS]
    if bad or not names:
        raise UserError(f"--encoders: {bad[0] if bad else spec!r} is not an encoder; use a comma-separated subset of clip,t5")
    return list(dict.fromkeys(names))


def _is_our_output(out: str) -> bool:
    try:
        with open(os.path.join(out, "index.html"), encoding="utf-8") as fh:
            return f'content="{GENERATOR}"' in fh.read(4096)
    except (OSError, UnicodeDecodeError):
        return False


def _check_out(out: str) -> None:
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UserError(f"--out {out} exists and is not a folder; choose another --out")
        if os.listdir(out) and not _is_our_output(out):
            raise UserError(
                f"--out {out} exists and does not hold an earlier analysis (no index.html written by this tool); "
                "choose another --out or empty it"
            )


def _load_image(path: Optional[str], where: str):
    if path is None:
        return None
    from PIL import Image, UnidentifiedImageError

    from attention_map_diffusers.analysis.plots import display_image

    try:
        with Image.open(path) as img:
            img.load()
            return path, display_image(img)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise UserError(
            f"{where}: the image {path} listed by the dump is missing or unreadable ({type(exc).__name__}); "
            "restore it, or pass --no-overlay to analyse without it"
        ) from None


def plan_run(folder: Optional[str], run_dir: str, args, encoders, phrases, block_ids, t5_loader) -> RunPlan:
    dump = load_dump(run_dir, t5_tokenizer=t5_loader if "t5" in encoders else None, block_ids=block_ids)
    positions = dump.block_positions(block_ids)
    sel_ids = [dump.block_ids[p] for p in positions]
    images = []
    notes = list(dump.notes)
    for path in dump.images:
        if args.tables_only or path is None:
            images.append(None)
            continue
        try:
            images.append(_load_image(path, run_dir))
        except UserError as exc:
            if not args.no_overlay:
                raise
            images.append(None)  # --no-overlay: a lost image only costs the summary its first panel
            notes.append(str(exc))
    avg = dump.avg_map
    results: list[list[EncoderResult]] = []
    for i in range(dump.batch_size):
        per_item = []
        for name in encoders:
            enc = dump.encoders.get(name)
            if enc is None:
                if i == 0 and not any(ENCODER_TITLES[name] + " not analysed" in n for n in notes):
                    notes.append(f"{ENCODER_TITLES[name]} not analysed: the dump has no text positions for it")
                continue
            offs = enc.offsets[i] if enc.offsets is not None else None
            wm = map_words(enc.tokens[i], enc.special[i], dump.prompts[i], enc.length, offsets=offs)
            a, b = enc.span
            res = analyse_encoder(
                avg[i, :, :, a:b],
                dump.step_mean[i][positions][:, :, a:b],
                wm,
                encoder=name,
                item=i,
                block_ids=sel_ids,
                timesteps=dump.timesteps,
                topk=args.topk,
                phrases=phrases,
                weights=args.weights,
            )
            where = f"{ENCODER_TITLES[name]}" + (f", item {i}" if dump.batch_size > 1 else "")
            for ph in res.missing_phrases:
                notes.append(f"warning: phrase {ph!r} does not occur in the {where} words; no file for it")
            if wm.dropped:
                notes.append(
                    f"{where}: the encoder truncated the prompt; {len(wm.dropped)} words from "
                    f"{wm.dropped[0].text!r} (word {wm.dropped[0].index}) on are absent from its analysis"
                )
            if not wm.words:
                notes.append(f"{where}: the prompt has no words for this encoder; only empty tables are written")
            per_item.append(res)
        results.append(per_item)
    return RunPlan(folder, dump, images, results, notes)


def make_plan(args) -> Plan:
    """Validate the arguments and every input; nothing is written."""
    if args.topk < 1:
        raise UserError(f"--topk must be at least 1, got {args.topk}")
    if not 10 <= args.dpi <= 1200:
        raise UserError(f"--dpi must be between 10 and 1200, got {args.dpi}")
    encoders = _parse_encoders(args.encoders)
    try:
        phrases = parse_phrases(args.phrases)
        block_ids = parse_blocks(args.blocks)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    root = os.path.abspath(args.root)
    if not os.path.isdir(root):
        raise UserError(f"--root {args.root} is not a folder; give a run folder or a folder with {RUNS_NAME}")
    out = os.path.abspath(args.out) if args.out else os.path.join(root, "analysis")
    _check_out(out)

    tokenizer = {}

    def t5_loader():
        if args.t5_tokenizer is None:
            return None
        if "tok" not in tokenizer:
            tokenizer["tok"] = load_t5_tokenizer(args.t5_tokenizer)
        return tokenizer["tok"]

    loader = t5_loader if args.t5_tokenizer else None
    multi = os.path.isfile(os.path.join(root, RUNS_NAME))
    if multi:
        entries = read_runs(root)
        todo = [(e.folder, os.path.join(root, e.folder)) for e in entries if e.status != "failed"]
    elif run_is_complete(root) or any(os.path.exists(os.path.join(root, n)) for n in (NPZ_NAME, METADATA_NAME)):
        entries = []  # a half-present run is reported by load_dump, naming the missing file
        todo = [(None, root)]
    else:
        raise UserError(
            f"--root {args.root} holds neither a run (stepavg_token_maps_v1.npz + metadata.json) nor {RUNS_NAME}; "
            "point it at the --out folder of sd_35_stepavg_dump.py"
        )
    options = (encoders, phrases, block_ids, loader)
    runs = []
    for folder, run_dir in todo:
        rp = plan_run(folder, run_dir, args, *options)
        keep = rp if len(todo) == 1 else None
        runs.append(RunSpec(folder, run_dir, rp.notes, _count_files(rp, args), keep))
    return Plan(root, out, runs, entries, multi, options)


# ---------------------------------------------------------------------------------------------
# Writing


def _count_files(run: RunPlan, args) -> int:
    """Progress-bar units of a run: one per encoder's tables, one per figure."""
    n = 0
    for per_item in run.results:
        for res in per_item:
            n += 1
            if not args.tables_only and res.words:
                n += len(res.top) + len(res.phrases) + 2 + len(res.block_ids) * (1 + bool(res.phrases))
    return n


def write_encoder(folder: str, rel: str, res: EncoderResult, image, args, has_phrases: bool, tick) -> EncoderPage:
    """Tables and figures of one encoder into ``folder`` (= ``rel`` relative to the run's page)."""
    page = EncoderPage(result=res, tables=[f"{rel}/{t}" for t in write_tables(folder, res, has_phrases)])
    tick()
    if args.tables_only or not res.words:
        return page
    from attention_map_diffusers.analysis import plots

    fmt, dpi = args.format, args.dpi
    title = ENCODER_TITLES[res.encoder]
    disp = image[1] if image is not None else None
    over = None if args.no_overlay else disp
    words = res.words
    os.makedirs(os.path.join(folder, "heatmaps", "words"), exist_ok=True)
    for j in res.top:
        w = words[j]
        name = f"heatmaps/words/{w.index:03d}-{safe_filename(w.text)}.{fmt}"
        fig = plots.heatmap_figure(res.shares[:, :, j], f"{title}: \u201c{w.text}\u201d (word {w.index}, mass {res.mass[j]:.1%})", over)
        plots.save_figure(fig, os.path.join(folder, name), fmt, dpi)
        page.word_heatmaps.append((f"{w.text} ({res.mass[j]:.1%})", f"{rel}/{name}"))
        tick()
    if res.phrases:
        os.makedirs(os.path.join(folder, "heatmaps", "phrases"), exist_ok=True)
    for ph in res.phrases:
        name = f"heatmaps/phrases/{ph.index:03d}-{safe_filename(ph.phrase)}.{fmt}"
        occ = f"{len(ph.occurrences)} occurrence" + ("s" if len(ph.occurrences) > 1 else "")
        fig = plots.heatmap_figure(ph.map, f"{title}: \u201c{ph.phrase}\u201d ({occ}, {args.weights} weights)", over)
        plots.save_figure(fig, os.path.join(folder, name), fmt, dpi)
        page.phrase_heatmaps.append((f"{ph.phrase} ({occ})", f"{rel}/{name}"))
        tick()

    labels = [f"{words[j].text} ({res.mass[j]:.1%})" for j in res.top]
    fig = plots.summary_figure(disp, [res.shares[:, :, j] for j in res.top], labels, overlay=not args.no_overlay, title=f"{title}: top {len(res.top)} words by mass (each map on its own colour scale)")
    plots.save_figure(fig, os.path.join(folder, f"summary.{fmt}"), fmt, dpi)
    page.summary = f"{rel}/summary.{fmt}"
    tick()

    all_labels = [w.text for w in words]
    fig = plots.overview_figure(
        step_average(res.curves, axis=1), res.curves.mean(axis=0), all_labels, res.block_ids, res.timesteps, f"{title}: attention per word"
    )
    plots.save_figure(fig, os.path.join(folder, f"overview.{fmt}"), fmt, dpi)
    page.overview = f"{rel}/overview.{fmt}"
    tick()

    os.makedirs(os.path.join(folder, "curves"), exist_ok=True)
    kinds = [("words", res.curves[:, :, res.top], [words[j].text for j in res.top], "top words", page.word_curves)]
    if res.phrases:
        curves = np.stack([p.curves for p in res.phrases], axis=-1)
        kinds.append(("phrases", curves, [p.phrase for p in res.phrases], "phrases", page.phrase_curves))
    for kind, curves, labels, what, listing in kinds:
        names = [f"curves/{kind}_mean_block{bid}.{fmt}" for bid in res.block_ids]
        titles = [f"{title}: {what}, transformer_blocks.{bid}" for bid in res.block_ids]
        plots.save_curves_per_block(
            curves, labels, res.timesteps, titles, [os.path.join(folder, n) for n in names], fmt, dpi, on_saved=tick
        )
        listing.extend((f"block {bid}", f"{rel}/{n}") for bid, n in zip(res.block_ids, names))
    return page


def write_run(dest: str, run: RunPlan, args, options: tuple, tick) -> None:
    """A run's image copy, per-encoder outputs and ``index.html`` into ``dest``."""
    encoders, phrases = options[0], options[1]
    dump = run.dump
    B = dump.batch_size
    items = []
    for i in range(B):
        base = f"item{i}" if B > 1 else ""
        image_rel = None
        image = run.images[i]
        if image is not None and not args.tables_only:
            ext = os.path.splitext(image[0])[1].lower() or ".png"
            image_rel = f"{base}/image{ext}" if base else f"image{ext}"
            os.makedirs(os.path.join(dest, base), exist_ok=True)
            with open(image[0], "rb") as fh:
                write_bytes(os.path.join(dest, image_rel), fh.read())
        pages = []
        for res in run.results[i]:
            rel = f"{base}/{res.encoder}" if base else res.encoder
            pages.append(write_encoder(os.path.join(dest, rel), rel, res, image, args, bool(phrases), tick))
        items.append(ItemPage(i, dump.prompts[i], image_rel, pages))
    settings = {
        "encoders": ",".join(encoders),
        "top-k": args.topk,
        "phrases": " | ".join(phrases) or "(none)",
        "phrase weights": args.weights,
        "blocks": format_ranges(run.results[0][0].block_ids) if run.results and run.results[0] else "",
        "steps": "denoising order (0 = first)" + (", flipped from the original tool's order" if dump.format_version < 2 else ""),
        "dump": dump.folder,
    }
    title = f"Attention analysis: {run.folder or os.path.basename(dump.folder) or dump.folder}"
    html = run_page(title, items, dump.metadata, run.notes, "png" if args.tables_only else args.format, settings)
    write_text(os.path.join(dest, "index.html"), html)


def write_plan(plan: Plan, args) -> int:
    """Write everything into a temporary sibling of the output folder, then put it in place."""
    parent = os.path.dirname(plan.out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(plan.out)}.tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the output folder should not be
    try:
        from tqdm import tqdm

        total = sum(r.n_files for r in plan.runs)
        with tqdm(total=total, desc="analysing", unit="file", disable=None, file=sys.stderr) as bar:
            for spec in plan.runs:
                run = spec.plan or plan_run(spec.folder, spec.run_dir, args, *plan.options)
                dest = os.path.join(tmp, run.folder) if run.folder else tmp
                os.makedirs(dest, exist_ok=True)
                write_run(dest, run, args, plan.options, lambda: bar.update(1))
                del run
        if plan.multi:
            done = {r.folder for r in plan.runs}
            rows = [
                {
                    "folder": e.folder,
                    "prompt": e.prompt,
                    "status": e.status,
                    "error": e.error,
                    "link": f"{e.folder}/index.html" if e.folder in done else None,
                }
                for e in plan.entries
            ]
            write_text(os.path.join(tmp, "index.html"), index_page(f"Attention analysis: {os.path.basename(plan.root)}", rows))
        n_files = sum(len(files) for _, _, files in os.walk(tmp))
        _replace_folder(tmp, plan.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return n_files


def _replace_folder(tmp: str, out: str) -> None:
    """Move ``tmp`` to ``out``; an earlier analysis there is removed only once the new one is in place."""
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
        os.rmdir(old)
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> int:
    args, code = parse(build_parser(), argv)
    if args is None:
        return code
    try:
        plan = make_plan(args)
    except UserError as exc:
        return fail(PROG, str(exc))
    for run in plan.runs:
        prefix = f"{run.folder}: " if run.folder else ""
        for note in run.notes:
            kind = "" if note.startswith(("warning: ", "note: ")) else "note: "
            print(f"{kind}{prefix}{note}", file=sys.stderr)
    try:
        n = write_plan(plan, args)
    except UserError as exc:  # a run changed on disk after it was validated
        return fail(PROG, str(exc))
    except OSError as exc:
        return fail(PROG, f"could not write the analysis to {plan.out}: {exc}", code=1)
    print(f"wrote {n} files to {plan.out} (open {os.path.join(plan.out, 'index.html')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
