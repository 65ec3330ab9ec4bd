"""The evaluation command (``evaluate_segmentation.py``, ``sd35-evaluate-segmentation``): flags ->
SegmentationOptions -> scores -> files.

Zero-shot segmentation with the word maps of dumps, scored against ground-truth masks: DAAM-style
thresholded maps, ConceptAttention-style argmax over the image's concept words, and three
baselines (the whole image, a centred Gaussian, a random map). No model is loaded.

    python evaluate_segmentation.py --dumps out_dumps --masks masks --out seg
    python evaluate_segmentation.py --dumps voc_dumps --masks VOCdevkit/VOC2012/SegmentationClass --voc --out seg
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..cli import OneLineParser, fail, parse
from ..contract import UserError
from .maps import METHODS
from .options import ENCODER_CHOICES, KEY_SOURCES, SegmentationOptions, parse_list, parse_ranges

PROG = "evaluate_segmentation.py"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        allow_abbrev=False,
        description=(
            "Zero-shot segmentation with attention dumps (no model needed): per image and word, IoU and AP of "
            "thresholded word maps (daam), of the argmax over the image's concept words (argmax), of the dump's "
            "concept maps (concept, concept-argmax) and of three baselines (whole, centre, random); over the set, "
            "mIoU, class-averaged mIoU, pixel accuracy and mAP."
        ),
        epilog="Outputs: OUT/index.html (the report: tables and figures), OUT/summary.csv, OUT/per_image/<key>.csv, OUT/images.csv (argmax's accuracy per image), "
        "OUT/skipped.csv, OUT/summary.png, OUT/cases.png; CSV files hold fractions (0-1), the screen percent. "
        "Exit codes: 0 everything found was scored (skipped.csv lists what the ground truth holds that was not); "
        "1 the files are written but some runs could not be scored, or nothing could be (stderr says which); "
        "2 bad input, nothing written. See the README section 'Zero-shot segmentation'.",
    )
    p.add_argument(
        "--dumps",
        required=True,
        help="a run folder (stepavg_token_maps_v1.npz + metadata.json), or a folder of runs (runs.jsonl and/or run "
        "sub-folders, found as analyse_stepavg.py finds them)",
    )
    p.add_argument(
        "--masks",
        required=True,
        help="ground-truth folder: MASKS/<key>/<word>.png per word (nonzero = inside; <word> a word or phrase of the "
        "prompt, case-insensitive), or with --voc MASKS/<key>.png. The key of a run is the stem of its source image "
        "for a dump of a given image (mode \"image\"), else the run folder's name (+ -idx<i> when a run holds several "
        "images). Masks of given images are in the upright source image's pixels (cropped with the dump's crop_box and resized); masks with an EXIF orientation tag are turned upright first; "
        "masks of generated images have the image's size",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder, written at the end as a whole; an earlier evaluation there is replaced when every file "
        "in it is one it wrote (listed in its .segmentation-manifest.json), any other non-empty folder is refused "
        "(see --overwrite). Folders .OUT.tmp-* / .OUT.old-* that a killed evaluation left next to it are removed "
        "when they hold only files of their manifest, else left alone with a warning",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out that holds files this tool did not write: they are kept (a file of the "
        "same name as one it writes is replaced), the files of an earlier evaluation there are replaced or removed",
    )
    p.add_argument(
        "--voc",
        action="store_true",
        help="VOC-style masks: MASKS/<key>.png holds one class index per pixel (palette or greyscale PNG; 255 = void, "
        "left out of every score). A class present in the mask is scored when its name or one of its phrases "
        "occurs in the prompt, else listed as skipped",
    )
    p.add_argument(
        "--classes",
        default=None,
        metavar="FILE",
        help="with --voc: class names, line i = index i, each 'name' or 'name: phrase | other phrase' (e.g. "
        "'pottedplant: potted plant'); default: the 21 PascalVOC classes, with airplane/plane, dining table/table, "
        "motorcycle, potted plant/plant and tv monitor/monitor/television/tv accepted for theirs. "
        "The class 'background' is never a concept",
    )
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="methods to score, comma-separated, from " + ",".join(METHODS) + " (default: all). daam: each word's map "
        "upsampled bilinearly, min-max normalised, >= --tau; argmax: each pixel to the concept word with the "
        "highest normalised map, background below --bg-threshold; whole: every pixel; centre: a centred Gaussian "
        "(sigma = a quarter of each side) scored like daam; random: a uniform random map on the dump's grid "
        "(fixed --seed) scored like daam. concept and concept-argmax score the dump's concept maps (dumps made with "
        "--concepts; other runs are listed as skipped), with ConceptAttention's protocols: concept: the map of the "
        "concept named like the class (case-insensitive words of its name or phrases), upsampled bilinearly, inside "
        "where greater than its mean; concept-argmax: each pixel to its concept with the largest share, background "
        "where that concept is named like no class (e.g. 'background', 'sky'). Their encoder column is 'concepts'",
    )
    p.add_argument(
        "--encoder",
        default=None,
        help="text encoders whose word maps are scored, comma-separated, from " + ",".join(ENCODER_CHOICES) + " (both = "
        "the mean of the two encoders' renormalised word maps); default: every encoder of the dump, and both when "
        "it has two (FLUX.1 dumps have t5 only)",
    )
    p.add_argument("--tau", type=float, default=0.4, help="threshold of the normalised maps for daam, centre and random (default: 0.4)")
    p.add_argument(
        "--bg-threshold",
        type=float,
        default=None,
        help="argmax: a pixel whose highest normalised map is below this is background (default: --tau)",
    )
    p.add_argument(
        "--blocks",
        default=None,
        help="score the maps of these blocks only: indices and ranges, e.g. 0-5,8 (needs dumps made with "
        "--save-block-maps)",
    )
    p.add_argument(
        "--steps",
        default=None,
        help="score the maps of these denoising steps only (0 = first, noisiest): indices and ranges, e.g. 0-9 "
        "(needs dumps made with --save-step-maps; not with --blocks)",
    )
    p.add_argument(
        "--key-from",
        choices=KEY_SOURCES,
        default="auto",
        help="what names a run's masks: 'folder' (the run folder's name), 'image' (the stem of the source image "
        "of a dump of a given image) or 'auto': image for such dumps, folder otherwise (default: auto)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline (default: 0)")
    p.add_argument("--cases", type=int, default=3, help="best and worst (image, word) pairs of the best method drawn in cases.png (default: 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def options_from_args(args: argparse.Namespace) -> SegmentationOptions:
    """The parsed flags as :class:`SegmentationOptions` (raises :class:`UserError`)."""
    return SegmentationOptions(
        dumps=args.dumps,
        masks=args.masks,
        out=args.out,
        voc=args.voc,
        classes=args.classes,
        methods=parse_list(args.methods, METHODS, "--methods"),
        encoders=None if args.encoder is None else parse_list(args.encoder, ENCODER_CHOICES, "--encoder"),
        tau=args.tau,
        bg_threshold=args.bg_threshold,
        block_ranges=parse_ranges(args.blocks, "--blocks"),
        step_ranges=parse_ranges(args.steps, "--steps"),
        key_from=args.key_from,
        seed=args.seed,
        cases=args.cases,
        overwrite=args.overwrite,
    )


def main(argv: Optional[list[str]] = None) -> int:
    from .report import build_outputs
    from .write import check_out, clean_leftovers, commit, new_folder, remove

    args, code = parse(build_parser(), argv)
    if args is None:
        return code
    tmp = None
    try:
        options = options_from_args(args)
        check_out(options.out, options.overwrite)
        from .evaluate import evaluate, problems

        def progress(items):
            from tqdm import tqdm

            return tqdm(items, desc="runs", unit="run", disable=args.no_progress or len(items) < 2, file=sys.stderr)

        ev = evaluate(options, progress)
        for note in ev.notes:
            print(note, file=sys.stderr)
        tmp = new_folder(options.out)
        table = build_outputs(ev, tmp)
        n = commit(tmp, options.out, options.overwrite)
        tmp = None
    except UserError as exc:
        return fail(PROG, str(exc))
    except OSError as exc:
        return fail(PROG, f"could not write {args.out}: {exc}", code=1)
    finally:
        remove(tmp)
    print(table)
    print(f"wrote {n} files to {options.out}")
    for line in clean_leftovers(options.out):
        print(f"{PROG}: warning: {line}", file=sys.stderr)
    incomplete = problems(ev)
    for level, line in incomplete:
        print(f"{PROG}: {level}: {line}", file=sys.stderr)
    return 1 if incomplete else 0
