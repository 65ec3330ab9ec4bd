"""The analysis command (``analyse_stepavg.py``, ``sd35-analyse-stepavg``): flags -> AnalysisOptions -> files.

Analyse step-averaged attention dumps without loading any model: per text encoder, word and phrase
heatmaps (alone and over the generated image), a summary grid, per-block attention curves over the
denoising steps, a word x block x step overview, CSV tables and an ``index.html`` report. Only
numpy, matplotlib, Pillow and the standard library are used (transformers only to load
``--t5-tokenizer``). See docs/analysis.md.

    python analyse_stepavg.py --root out_sd35_stepavg --phrases "in front of|a barn"
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Optional

from ..cli import OneLineParser, fail, parse
from ..contract import UserError
from .options import FORMATS, SCALES, WORD_RULES, AnalysisOptions, parse_encoders
from .stats import WEIGHT_MODES, parse_blocks
from .words import find_words, parse_phrases

PROG = "analyse_stepavg.py"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        allow_abbrev=False,
        description=(
            "Analyse step-averaged SD3.5 attention dumps (no model needed): per word and phrase, heatmaps, "
            "curves over blocks and denoising steps, CSV tables and an HTML report."
        ),
        epilog="Outputs and how to read them: docs/analysis.md.",
    )
    p.add_argument(
        "--root",
        required=True,
        help="a run folder (stepavg_token_maps_v1.npz + metadata.json), or a folder of runs: then every run "
        "that runs.jsonl lists as done or skipped, and every complete run folder it does not list, is analysed",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default: ROOT/analysis); replaced as a whole when it holds only an earlier analysis, "
        "refused when it holds anything else",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the earlier analysis in --out even when some of its files were changed since it wrote them "
        "(an edited table); without it such an --out is refused, naming the file. Files it did not write are "
        "never replaced",
    )
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
    p.add_argument(
        "--words",
        choices=WORD_RULES,
        default="prompt",
        help="what a word is. 'prompt': the prompt's words, the same for CLIP and T5, punctuation left out, a repeated "
        "word numbered in tables ('a #6'); 'original': the original tool's words, built from each encoder's tokens "
        "(CLIP: lower-case pieces, punctuation and contraction parts as words of their own: 'don', \"'t\", ','; T5: "
        "punctuation glued on: 'barn,'), repeated words left bare, phrases matched word by word anywhere in the "
        "prompt, for tables that reproduce its columns (default: prompt; see docs/analysis.md)",
    )
    p.add_argument("--encoders", default="clip,t5", help="text encoders to analyse, comma-separated, from clip,t5 (default: clip,t5)")
    p.add_argument("--format", choices=FORMATS, default="png", help="figure file format (default: png)")
    p.add_argument(
        "--dpi",
        type=int,
        default=200,
        help="the highest figure resolution in dots per inch (default: 200). Each figure is drawn at the least "
        "resolution that shows its image at its display size and every map cell with 8 pixels, and at no less than "
        "0.6 x DPI for its texts: curves and small maps (a 16x16 grid) get 120 at the default, a 64x64 map over a "
        "1024x1024 image 160 to 200",
    )
    p.add_argument(
        "--vmax-percentile",
        type=float,
        default=99.0,
        metavar="P",
        help="heatmap colour scales run from 0 to the P-th percentile of each map, so that one hot pixel does not "
        "darken the rest (100: the maximum; default: 99)",
    )
    p.add_argument(
        "--scale",
        choices=SCALES,
        default="own",
        help="colour scale of the word maps: 'own' scales each map from 0 to its own P-th percentile (shapes are "
        "easy to see, but a near-uniform map looks as structured as a sharp one); 'shared' uses one scale for all "
        "the words of an encoder, the P-th percentile of all their maps (compare words by colour). Default: own",
    )
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


def unique_phrases(phrases: list[str]) -> tuple[list[str], list[str]]:
    """``phrases`` with each phrase once (the first spelling; phrases that have the same words, in any
    case, are the same phrase), and those that were given again."""
    kept: dict[tuple[str, ...], str] = {}
    again = []
    for p in phrases:
        key = tuple(w.text.casefold() for w in find_words(p))
        if key in kept:
            again.append(p)
        else:
            kept[key] = p
    return list(kept.values()), again


def options_from_args(args: argparse.Namespace) -> AnalysisOptions:
    """The parsed flags as :class:`AnalysisOptions` (raises :class:`UserError`)."""
    return AnalysisOptions(
        root=args.root,
        out=args.out,
        topk=args.topk,
        phrases=tuple(unique_phrases(parse_phrases(args.phrases))[0]),
        weights=args.weights,
        encoders=parse_encoders(args.encoders),
        fmt=args.format,
        dpi=args.dpi,
        block_ranges=parse_blocks(args.blocks),
        overlay=not args.no_overlay,
        tables_only=args.tables_only,
        t5_tokenizer=args.t5_tokenizer,
        vmax_percentile=args.vmax_percentile,
        overwrite=args.overwrite,
        words=args.words,
        scale=args.scale,
    )


def main(argv: Optional[list[str]] = None) -> int:
    args, code = parse(build_parser(), argv)
    if args is None:
        return code
    try:
        options = options_from_args(args)
        again = unique_phrases(parse_phrases(args.phrases))[1]
        if again:
            print(f"warning: --phrases gives {', '.join(repr(p) for p in dict.fromkeys(again))} more than once; "
                  "each phrase is analysed once", file=sys.stderr)
        from . import outdir
        from .plan import folders

        outdir.check_out(folders(options)[1], options.overwrite)  # before any work (again when planning)
    except UserError as exc:
        return fail(PROG, str(exc))
    from .write import early_pool

    pool = early_pool(options)  # several runs: the workers start while the runs are planned
    with pool if pool is not None else contextlib.nullcontext():
        return _analyse(options, pool)


def _analyse(options, pool) -> int:
    from .plan import make_plan
    from .write import write_plan

    try:
        plan = make_plan(options)
    except UserError as exc:
        return fail(PROG, str(exc))
    for note in plan.notes:
        print(note, file=sys.stderr)
    said: dict[tuple[str, str], list[str]] = {}  # a note that several runs share is printed once, naming them
    for run in plan.runs:
        for note in run.notes:
            said.setdefault((note.level, note.text), []).append(run.folder or "")
    for (level, text), where in said.items():
        where = [w for w in where if w]
        prefix = "" if not where else f"{where[0]}: " if len(where) == 1 else (
            f"{len(where)} runs ({', '.join(where[:3])}{', ...' if len(where) > 3 else ''}): ")
        print(f"{level}: {prefix}{text}", file=sys.stderr)
    reported = {id(e) for e in plan.failed}
    for entry in plan.failed:
        fail(PROG, entry.problem)
    try:
        n = write_plan(plan, pool)
    except UserError as exc:  # a single run changed on disk after it was validated
        return fail(PROG, str(exc))
    except OSError as exc:
        return fail(PROG, f"could not write the analysis to {plan.out}: {exc}", code=1)
    for entry in plan.failed:
        if id(entry) not in reported:  # changed on disk after it was validated
            fail(PROG, entry.problem)
    print(f"wrote {n} files to {plan.out} (open {os.path.join(plan.out, 'index.html')})")
    if plan.failed:
        return fail(
            PROG,
            f"{len(plan.failed)} of {len(plan.entries)} runs could not be analysed (see above; "
            f"{os.path.join(plan.out, 'index.html')} lists them with the reason)",
            code=1,
        )
    return 0
