"""From an :class:`~.evaluate.Evaluation` to the files of the output folder and the terminal table."""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Optional

import numpy as np
from PIL import Image

from ..atomic import write_text
from ..imagefile import open_upright
from . import masks as gtmod
from .maps import MULTICLASS
from .evaluate import Evaluation, evaluate_run, image_geometry, is_image_mode, problems
from .page import report_page
from .plots import Case, cases_figure, summary_figure
from .tables import best_method, images_csv, per_image_csv, shown_rows, skipped_csv, summarise, summary_csv, text_table
from .write import claim, safe_name, write_all


def build_outputs(ev: Evaluation, tmp: str) -> str:
    """Write every output file into ``tmp``; returns the table (and skip counts) to print."""
    from ..analysis.fonts import use_fonts
    from ..analysis.figure import save_figure

    o = ev.options
    rows = summarise(ev.scores, o.methods, ev.encoders, o.selection, ev.images)
    shown = shown_rows(ev.scores, rows)
    files = {f"per_image/{safe_name(im.key)}.csv": per_image_csv(im.scores) for im in ev.images}
    files["summary.csv"] = summary_csv(rows)
    if any(m in MULTICLASS for m in o.methods):
        files["images.csv"] = images_csv(ev.images)
    files["skipped.csv"] = skipped_csv(ev.skipped)
    write_all(tmp, files)
    title = f"zero-shot segmentation: {len(ev.images)} images, tau {o.tau:g}, maps of {'all blocks and steps' if o.selection == 'all' else o.selection}"
    best = best_method(rows)
    cases = pick_cases(ev, best.method, best.encoder, o.cases) if best is not None and o.cases else []
    what = f"{best.method} ({best.encoder})" if best is not None else "no method"
    claim(tmp, ["summary.png", "cases.png", "index.html"])
    with use_fonts(None):  # words and captions drawn literally ("$" is no mathtext)
        save_figure(summary_figure(shown, title), os.path.join(tmp, "summary.png"), dpi=150)
        name = "bg threshold" if best is not None and best.method == "argmax" else "tau"
        save_figure(cases_figure(cases, f"best and worst pairs of the best method: {what}, tau {o.tau:g}", name),
                    os.path.join(tmp, "cases.png"), dpi=110)
    facts = [
        ("dumps", o.dumps), ("masks", o.masks + (" (VOC class indices)" if o.voc else " (a mask per word)")),
        ("images scored", f"{len(ev.images)} of {ev.runs} runs' images"),
        ("methods", ", ".join(o.methods)), ("encoders", ", ".join(ev.encoders) or "none"),
        ("threshold", f"tau {o.tau:g} (daam, centre, random); argmax background below {o.background_threshold:g}"),
        ("maps", "all blocks and steps" if o.selection == "all" else o.selection), ("random baseline seed", str(o.seed)),
    ]
    csvs = ["summary.csv"] + (["images.csv"] if "images.csv" in files else []) + ["skipped.csv"]
    figures = [("summary.png", "mIoU and mAP per method and encoder, in %, with 95 % error bars; baselines grey, once"),
               ("cases.png", f"best and worst pairs of the best method, {what}")]
    write_text(os.path.join(tmp, "index.html"), report_page(
        title=title, facts=facts, rows=shown, figures=figures, images=ev.images, best=best, skipped=ev.skipped,
        problems=problems(ev), csv_files=csvs))
    lines = [text_table(shown)]
    if ev.skipped:
        counts = Counter(s.reason for s in ev.skipped)
        lines.append("skipped: " + "; ".join(f"{n} x {r}" for r, n in counts.most_common()) + " (see skipped.csv)")
        names = Counter(s.name for s in ev.skipped if s.name)
        if names:
            lines.append("  most often: " + ", ".join(f"{k} ({n})" for k, n in names.most_common(8)))
    return "\n".join(lines)


def pick_cases(ev: Evaluation, method: str, encoder: str, k: int) -> list[Case]:
    """The k best and k worst (image, word) pairs of ``method`` and ``encoder`` by IoU, with their pictures."""
    pool = [s for s in ev.scores if s.method == method and s.encoder == encoder and not math.isnan(s.iou)]
    order = sorted(pool, key=lambda s: (-s.iou, s.key, s.word))
    best = order[:k]
    worst = [s for s in order[::-1] if s not in best][:k]
    folders = {im.key: im.folder for im in ev.images}
    classes = None
    if ev.options.voc:
        classes = gtmod.read_classes(ev.options.classes) if ev.options.classes else gtmod.builtin_classes()
    o = ev.options
    # no contour where the mask is no level of the shown (min-max) map: the concept methods threshold each
    # map at its own mean (concept) or take the argmax (concept-argmax)
    threshold = {"argmax": o.background_threshold, "whole": None, "concept": None, "concept-argmax": None}.get(method, o.tau)
    out = []
    for label, picked in (("best", best), ("worst", worst)):
        for rank, s in enumerate(picked, 1):
            im = evaluate_run(folders[s.key], ev.options, classes, keys={s.key}, keep=True).images[0]
            pred, heat = im.maps[(encoder, method, s.word)]
            gt = next(c.gt for c in im.truth.concepts if c.name == s.word)
            out.append(Case(f"{label} {rank}", s.key, s.word, s.iou, s.ap, _picture(im, gt.shape), gt, pred, heat,
                            im.truth.valid, threshold))
    return out


def _picture(im, shape) -> Optional[np.ndarray]:
    """(H, W, 3) uint8 of the image the model saw or made, at the masks' size; None when there is none."""
    H, W = shape
    path, box = im.image, None
    if path is None:
        import json

        try:
            with open(os.path.join(im.folder, "metadata.json"), encoding="utf-8") as fh:
                meta = json.load(fh)
            if is_image_mode(meta):
                src = meta["source_image"].get("path")
                if isinstance(src, str) and os.path.isfile(src):
                    path, box = src, image_geometry(meta, im.folder)[1]
        except (OSError, ValueError, KeyError):
            return None
    if path is None:
        return None
    try:
        img = open_upright(path).image.convert("RGB")  # the dump's crop box is in upright pixels
    except (OSError, SyntaxError, ValueError):  # unreadable, or past the pixel limit: no picture
        return None
    if box is not None:
        img = img.crop(tuple(box))
    return np.asarray(img.resize((W, H), Image.BILINEAR) if img.size != (W, H) else img)
