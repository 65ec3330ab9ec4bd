"""Scoring every image of some dumps against its ground truth: the loop behind ``evaluate_segmentation.py``.

Nothing is written here; :func:`evaluate` returns an :class:`Evaluation` that :mod:`.write` puts on
disk. Bad input that concerns the whole evaluation raises :class:`UserError` before a file is
written; a run that cannot be scored (a damaged dump, a bad mask of its images) is listed in
``Evaluation.failed`` and the others are scored, unless no run could be: then the first run's
reason is raised.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np

from ..analysis.discover import discover
from ..analysis.dumpfile import Dump, load_dump
from ..analysis.framemaps import BLOCK_KEY, STEP_KEY, available, read_frames
from ..analysis.words import find_phrase, find_words
from ..contract import UserError
from . import concepts as concept_scores
from . import masks as gtmod
from .maps import centre_prior, encoder_word_maps, phrase_map, random_grids, upsample
from .metrics import argmax_labels, average_precision, iou, minmax, multiclass_accuracy, pixel_accuracy
from .options import SegmentationOptions



@dataclass(frozen=True)
class Score:
    """One row of ``per_image/<key>.csv``: a method's result for one word of one image and encoder."""

    key: str
    encoder: str
    method: str
    word: str
    iou: float
    ap: float
    pixel_acc: float  # share of the (valid) pixels where the word's predicted mask and its mask agree
    pred_px: int
    gt_px: int


@dataclass(frozen=True)
class Skip:
    """Something of the ground truth that was not scored, and why."""

    key: str
    name: str  # a class or word; "" for a whole image
    reason: str


@dataclass
class Concept:
    """A word (or class) of an image that has a ground-truth mask."""

    name: str  # the file's word, or the class name
    phrases: tuple[str, ...]  # what stands for it in the prompt (the first that occurs is used)
    gt: np.ndarray  # (H, W) bool


@dataclass
class GroundTruth:
    concepts: list[Concept]
    valid: Optional[np.ndarray]  # (H, W) bool, False on void pixels; None: every pixel counts
    skipped: list[Skip]


@dataclass
class ImageEval:
    """The scores of one image (one batch item of one run)."""

    key: str
    folder: str  # the run folder
    item: int
    image: Optional[str]  # the image the model saw (or made), when it is on disk
    scores: list[Score]
    skipped: list[Skip]
    # kept only when asked (for the figures): (encoder, method, word) -> (predicted mask, heat map)
    maps: Optional[dict] = None
    truth: Optional[GroundTruth] = None
    # argmax's multi-class pixel accuracy of the image (background included), per encoder
    argmax_acc: dict = field(default_factory=dict)


@dataclass
class RunResult:
    """What :func:`evaluate_run` found in one run folder."""

    images: list[ImageEval]  # images with at least one concept to score
    skipped: list[Skip]  # images without ground truth or with nothing to score, and the parts of the others left out
    encoders: list[str]
    with_truth: int  # images whose ground truth was found (usable or not)


#: What a damaged run can raise past the checks of :func:`~attention_map_diffusers.analysis.dumpfile.load_dump`.
RUN_ERRORS = (UserError, OSError, EOFError, ValueError, KeyError, IndexError, TypeError, MemoryError, RecursionError)


@dataclass
class Evaluation:
    options: SegmentationOptions
    images: list[ImageEval] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)  # images without masks, classes not in the prompt, ...
    notes: list[str] = field(default_factory=list)
    encoders: list[str] = field(default_factory=list)  # in the order first met
    failed: list[Skip] = field(default_factory=list)  # runs that could not be scored (also in ``skipped``)
    runs: int = 0  # run folders looked at

    @property
    def scores(self) -> list[Score]:
        return [s for im in self.images for s in im.scores]


# ---------------------------------------------------------------------------------------------
# Runs and keys


def find_runs(root: str, out: str) -> tuple[list[str], list[str], list[Skip], list[Skip]]:
    """Run folders under ``root`` (found as the analysis finds them), notes about the others, and
    those others as skips: (folders, notes, runs the dump marked failed, runs that are damaged or
    incomplete)."""
    entries, notes = discover(root, out)
    if entries is None:
        return [os.path.abspath(root)], [], [], []
    texts = [str(n) for n in notes]
    folders, dump_failed, broken = [], [], []
    for e in entries:
        if e.status == "failed":
            reason = f"run failed in the dump ({e.error or 'no reason given'})"
            texts.append(f"warning: run {e.folder!r} {reason}; not scored")
            dump_failed.append(Skip(e.folder, "", reason))
        elif e.problem:  # reported with the runs that fail while scored (evaluate.problems)
            broken.append(Skip(e.folder, "", f"not scored: {e.problem}"))
        else:
            folders.append(os.path.join(os.path.abspath(root), e.folder))
    if not folders:
        first = broken[0].reason if broken else dump_failed[0].reason if dump_failed else "no run found"
        raise UserError(f"--dumps {root} holds no run that can be scored ({len(entries)} listed; the first: {first})")
    return folders, texts, dump_failed, broken


def is_image_mode(meta: dict) -> bool:
    return meta.get("mode") == "image"


def source_image(meta: dict, where: str) -> dict:
    """The ``source_image`` record of an image-mode dump, checked."""
    src = meta.get("source_image")
    if not isinstance(src, dict) or not isinstance(src.get("name"), str) or not src["name"]:
        raise UserError(f"{where}: metadata says mode \"image\" but has no source_image with a name; re-run the dump")
    return src


def run_key(dump: Dump, folder: str, item: int, key_from: str) -> str:
    """The key of an image: the source image's stem (image-mode dumps) or the run folder's name, with
    ``-idx{i}`` added when the run has several batch items."""
    meta = dump.metadata
    use_image = key_from == "image" or (key_from == "auto" and is_image_mode(meta))
    if use_image:
        if not is_image_mode(meta):
            raise UserError(f"--key-from image: {folder} is not a dump of a given image (no mode \"image\" in its metadata)")
        key = os.path.splitext(os.path.basename(source_image(meta, folder)["name"]))[0]
    else:
        key = os.path.basename(os.path.normpath(folder))
    return key if dump.batch_size == 1 else f"{key}-idx{item}"


def image_geometry(meta: dict, where: str):
    """((H, W) of the image the model saw, crop box or None, source (H, W) or None)."""
    size = meta.get("image_size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise UserError(f"{where}: metadata image_size must be [H, W], got {size!r}; re-run the dump")
    if not is_image_mode(meta):
        return (size[0], size[1]), None, None
    src = source_image(meta, where)
    box, ssize = src.get("crop_box"), src.get("size")
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        raise UserError(f"{where}: source_image.crop_box must be [left, top, right, bottom], got {box!r}; re-run the dump")
    source_hw = None
    if isinstance(ssize, list) and len(ssize) == 2 and all(isinstance(v, int) for v in ssize):
        source_hw = (ssize[1], ssize[0])  # stored as [W, H]
    return (size[0], size[1]), [int(round(v)) for v in box], source_hw


# ---------------------------------------------------------------------------------------------
# Ground truth


def load_truth(options: SegmentationOptions, key: str, prompt: str, size_hw, crop_box, source_hw,
               classes) -> Optional[GroundTruth]:
    """The concepts of one image with their masks at ``size_hw``; None when it has no masks. Mask files
    that cannot be used (not a PNG, a folder, a broken link, two masks of one word, a mask without
    any pixel to score) are in ``skipped`` with the reason."""
    words = find_words(prompt)
    if options.voc:
        path = os.path.join(options.masks, key + ".png")
        if not os.path.lexists(path):
            other = next((key + e for e in _JPEG_NAMES if os.path.lexists(os.path.join(options.masks, key + e))), None)
            if other is None:
                return None
            return GroundTruth([], None, [Skip(key, "", f"{other} is not a .png file (--voc masks are class-index PNGs)")])
        problem = gtmod.entry_problem(path)
        if problem:
            return GroundTruth([], None, [Skip(key, "", f"{key}.png: {problem}")])
        labels = gtmod.fit_mask(gtmod.read_label_mask(path), size_hw, crop_box, path, source_hw)
        valid = labels != gtmod.VOID
        if not valid.any():
            return GroundTruth([], None, [Skip(key, "", f"every pixel of the mask is void ({gtmod.VOID}): nothing to score")])
        concepts, skipped = [], []
        for label in np.unique(labels[valid]).tolist():
            if label >= len(classes):
                raise UserError(
                    f"the mask {path} has label {label} but there are only {len(classes)} classes "
                    f"(0-{len(classes) - 1}); give --classes FILE with one class name per label"
                )
            cls = classes[label]
            if not cls.name or cls.name.lower() == gtmod.BACKGROUND:
                continue
            if any(find_phrase(words, p) for p in cls.phrases):
                concepts.append(Concept(cls.name, cls.phrases, labels == label))
            else:
                skipped.append(Skip(key, cls.name, "in the mask, not in the prompt"))
        if not concepts and not skipped:
            skipped.append(Skip(key, "", "the mask holds no class but background: nothing to score"))
        return GroundTruth(concepts, None if valid.all() else valid, skipped)
    folder = os.path.join(options.masks, key)
    if not os.path.lexists(folder):
        return None
    if not os.path.isdir(folder):
        problem = gtmod.entry_problem(folder) or "a file"
        return GroundTruth([], None, [Skip(key, "", f"{key}: {problem}, not a folder of masks (MASKS/<key>/<word>.png)")])
    files, others = gtmod.word_mask_files(folder)
    skipped = [Skip(key, name, reason) for name, reason in others]
    by_occurrence: dict[tuple, list[tuple[str, str]]] = {}
    for word, path in files:
        occ = find_phrase(words, word)
        if not occ:
            raise UserError(
                f"the mask {path} is for {word!r}, which is not a word of the prompt {prompt!r}; name each "
                "mask after a word of its image's prompt"
            )
        by_occurrence.setdefault(tuple(map(tuple, occ)), []).append((word, path))
    concepts = []
    for occ, same in by_occurrence.items():
        if len(same) > 1:  # red.png and Red.png: one word, two masks; which is right is not ours to guess
            names = ", ".join(os.path.basename(p) for _, p in same)
            for word, path in same:
                skipped.append(Skip(key, os.path.basename(path), f"{len(same)} masks for one word of the prompt "
                                                                  f"({names}; names match case-insensitively): keep one"))
            continue
        word, path = same[0]
        gt = gtmod.fit_mask(gtmod.read_binary_mask(path), size_hw, crop_box, path, source_hw)
        if not gt.any():
            skipped.append(Skip(key, word, "empty mask (no nonzero pixel)"))
            continue
        name = " ".join(words[i].text for i in occ[0])  # as the prompt spells it
        concepts.append(Concept(name, (word,), gt))
    if not files and not others:
        skipped.append(Skip(key, "", f"no mask in {folder}"))
    return GroundTruth(concepts, None, skipped)


#: What a --voc mask saved as JPEG by mistake may be called.
_JPEG_NAMES = tuple(e for x in gtmod.JPEG for e in (x, x.upper()))


# ---------------------------------------------------------------------------------------------
# Maps


def check_selection(dump: Dump, folder: str, options: SegmentationOptions) -> Optional[list[int]]:
    """Raise when the dump cannot give the maps of ``--blocks`` / ``--steps``; returns the chosen step indices."""
    if options.block_ranges is not None:
        if dump.block_maps is None:
            raise UserError(
                f"--blocks needs per-block maps ({BLOCK_KEY}), which {folder} does not have; dump with "
                "--save-block-maps, or leave out --blocks"
            )
        dump.select_blocks(options.block_ranges)
    if options.step_ranges is None:
        return None
    if STEP_KEY not in available(folder):
        raise UserError(
            f"--steps needs per-step maps ({STEP_KEY}), which {folder} does not have; dump with "
            "--save-step-maps, or leave out --steps"
        )
    S = dump.step_mean.shape[2]
    bad = [b for _, b in options.step_ranges if b >= S]
    if bad:
        raise UserError(f"--steps: step {bad[0]} is not in {folder}, which has steps 0-{S - 1} (denoising order)")
    return [i for a, b in options.step_ranges for i in range(a, b + 1)]


def token_map(dump: Dump, folder: str, item: int, options: SegmentationOptions, steps: Optional[list[int]]) -> np.ndarray:
    """(Hc, Wc, T) the maps to score: all steps and blocks, or the chosen ones (up to a scale, which the
    renormalisation over words removes)."""
    if options.block_ranges is not None:
        pos = dump.select_blocks(options.block_ranges)
        return dump.block_maps[item, pos].sum(axis=0)
    if steps is not None:
        frames = read_frames(folder, STEP_KEY, item, steps, flip=dump.steps_flipped)
        if frames is None:
            raise UserError(f"{folder}: {STEP_KEY} cannot be read (damaged, or not finite); re-run the dump")
        return frames.sum(axis=0)
    return dump.avg_map[item]


def encoders_of(dump: Dump, folder: str, options: SegmentationOptions) -> list[str]:
    have = [e for e in ("clip", "t5") if e in dump.encoders]
    if options.encoders is None:
        return have + (["both"] if len(have) == 2 else [])
    for e in options.encoders:
        need = ["clip", "t5"] if e == "both" else [e]
        missing = [n for n in need if n not in dump.encoders]
        if missing:
            raise UserError(
                f"--encoder {e}: {folder} has no {missing[0]} tokens (it has {', '.join(have) or 'none'}; FLUX.1 "
                "dumps have t5 only)"
            )
    return list(options.encoders)


def concept_grids(dump: Dump, item: int, tmap: np.ndarray, encoder: str, concepts: list[Concept]) -> list[Optional[np.ndarray]]:
    """Per concept, its (Hc, Wc) map for ``encoder`` (None when no word of it reached the encoder)."""
    if encoder == "both":
        per = [concept_grids(dump, item, tmap, e, concepts) for e in ("clip", "t5")]
        out = []
        for pair in zip(*per):
            got = [m for m in pair if m is not None]
            out.append(sum(got) / len(got) if got else None)
        return out
    words, maps = encoder_word_maps(dump, item, encoder, tmap)
    return [phrase_map(words, maps, c.phrases) for c in concepts]


# ---------------------------------------------------------------------------------------------
# Scoring


def score_concepts(key: str, encoder: str, names: list[str], grids: np.ndarray, gts: np.ndarray,
                   valid: Optional[np.ndarray], options: SegmentationOptions,
                   keep: Optional[dict] = None) -> tuple[list[Score], Optional[float]]:
    """Every method's scores for the n concepts of one image and encoder, and argmax's multi-class
    pixel accuracy of the image (None without argmax).

    Args:
        grids: (n, Hc, Wc) the concepts' word maps; gts: (n, H, W) bool masks; valid: (H, W) or None.
        keep: filled with (encoder, method, word) -> ((H, W) predicted mask, (H, W) heat map) when given.
    """
    n, (H, W) = len(names), gts.shape[1:]
    v = np.ones((H, W), dtype=bool) if valid is None else valid
    norm = np.stack([minmax(upsample(g, H, W)) for g in grids]) if n else np.zeros((0, H, W))
    out: list[Score] = []
    image_acc = None
    for method in options.methods:
        if method in concept_scores.METHODS:  # scored on the concept maps (image_scores)
            continue
        if method in ("daam", "argmax"):
            heats = norm
        elif method == "whole":
            heats = np.ones((n, H, W))
        elif method == "centre":
            heats = np.broadcast_to(minmax(centre_prior(H, W)), (n, H, W))
        else:  # random: the same map for a word under every encoder
            seeds = [[options.seed, zlib.crc32(key.encode()), zlib.crc32(name.encode())] for name in names]
            heats = np.stack([minmax(upsample(random_grids(s, 1, grids.shape[1:])[0], H, W)) for s in seeds]) if n else norm
        if method == "argmax":
            labels = argmax_labels(norm, options.background_threshold)
            preds = np.stack([labels == k for k in range(n)]) if n else np.zeros((0, H, W), bool)
            image_acc = multiclass_accuracy(labels, gts, valid)
        else:
            preds = heats >= (0.0 if method == "whole" else options.tau)
        for k, name in enumerate(names):
            out.append(Score(
                key, encoder, method, name,
                iou(preds[k], gts[k], valid), average_precision(heats[k], gts[k], valid),
                pixel_accuracy(preds[k], gts[k], valid),
                int(np.count_nonzero(preds[k] & v)), int(np.count_nonzero(gts[k] & v)),
            ))
            if keep is not None:
                keep[(encoder, method, name)] = (preds[k] & v, np.asarray(heats[k]))
    return out, image_acc


def evaluate_run(folder: str, options: SegmentationOptions, classes, *, keys: Optional[set] = None,
                 keep: bool = False) -> RunResult:
    """The images of one run folder (raises :class:`UserError` and :data:`RUN_ERRORS` for a run that
    cannot be scored)."""
    dump = load_dump(folder, block_maps=options.block_ranges is not None, step_maps=options.step_ranges is not None)
    steps = check_selection(dump, folder, options)
    encoders = encoders_of(dump, folder, options)
    size_hw, crop_box, source_hw = image_geometry(dump.metadata, folder)
    images, skipped, with_truth = [], [], 0
    for item in range(dump.batch_size):
        key = run_key(dump, folder, item, options.key_from)
        if keys is not None and key not in keys:
            continue
        truth = load_truth(options, key, dump.prompts[item], size_hw, crop_box, source_hw, classes)
        if truth is None:
            where = os.path.join(options.masks, key + (".png" if options.voc else os.sep))
            skipped.append(Skip(key, "", f"no ground truth ({where} does not exist)"))
            continue
        with_truth += 1
        if not truth.concepts:
            skipped += truth.skipped
            continue
        tmap = token_map(dump, folder, item, options, steps)
        scores: list[Score] = []
        skips = list(truth.skipped)
        kept: Optional[dict] = {} if keep else None
        argmax_acc = {}
        for encoder in encoders if method_count(options) else []:
            grids = concept_grids(dump, item, tmap, encoder, truth.concepts)
            ok = [k for k, g in enumerate(grids) if g is not None]
            for k, g in enumerate(grids):
                if g is None:
                    skips.append(Skip(key, truth.concepts[k].name, f"no {encoder} token reaches it (truncated prompt)"))
            if not ok:
                continue
            names = [truth.concepts[k].name for k in ok]
            gts = np.stack([truth.concepts[k].gt for k in ok])
            got, acc = score_concepts(key, encoder, names, np.stack([grids[k] for k in ok]), gts, truth.valid, options, kept)
            scores += got
            if acc is not None:
                argmax_acc[encoder] = acc
        if any(m in concept_scores.METHODS for m in options.methods):  # the dump's concept maps
            got, why, acc = concept_scores.image_scores(dump, key, item, truth, options, kept, steps)
            scores += got
            skips += why
            if acc is not None:
                argmax_acc[concept_scores.ENCODER] = acc
        images.append(ImageEval(key, folder, item, _image_path(dump, item), scores, skips, kept, truth if keep else None,
                                argmax_acc))
    return RunResult(images, skipped, encoders + concept_scores.columns(dump, options), with_truth)


def method_count(options: SegmentationOptions) -> int:
    """How many of the methods asked for score word maps (the concept methods score the concept maps)."""
    return sum(m not in concept_scores.METHODS for m in options.methods)


def _image_path(dump: Dump, item: int) -> Optional[str]:
    p = dump.images[item]
    if p is not None and os.path.isfile(p):
        return p
    return None


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"


def evaluate(options: SegmentationOptions, progress: Callable[[Iterable], Iterable] = lambda x: x) -> Evaluation:
    """Score every run under ``options.dumps`` (see :class:`Evaluation`)."""
    if not os.path.isdir(options.masks):
        raise UserError(f"--masks {options.masks} is not a folder; give the folder of ground-truth masks")
    if not os.path.exists(options.dumps):
        raise UserError(f"--dumps {options.dumps} does not exist; give a run folder or the --out folder of the dump command")
    classes = (gtmod.read_classes(options.classes) if options.classes else gtmod.builtin_classes()) if options.voc else None
    folders, notes, dump_failed, broken = find_runs(options.dumps, options.out)
    ev = Evaluation(options, notes=notes, skipped=dump_failed + broken, failed=list(broken))
    ev.runs = len(folders) + len(dump_failed) + len(broken)
    seen: dict[str, str] = {}
    with_truth, errors = 0, []
    for folder in progress(folders):
        try:
            run = evaluate_run(folder, options, classes)
        except RUN_ERRORS as exc:  # one bad run: listed, the others scored
            name = os.path.basename(os.path.normpath(folder))
            errors.append(_reason(exc))
            skip = Skip(name, "", f"not scored: {_reason(exc)}")
            ev.failed.append(skip)
            ev.skipped.append(skip)
            continue
        for e in run.encoders:
            if e not in ev.encoders:
                ev.encoders.append(e)
        for im in run.images:
            if im.key in seen:
                raise UserError(
                    f"two images have the key {im.key!r} ({seen[im.key]} and {folder}); their masks would be the "
                    "same file: use --key-from folder, or keep one of the dumps"
                )
            seen[im.key] = folder
        with_truth += run.with_truth
        ev.images += run.images
        ev.skipped += run.skipped
        for im in run.images:
            ev.skipped += im.skipped
    ev.skipped, note = concept_scores.tidy_skips(ev.skipped, ev.encoders, options)
    if note:
        ev.notes.append(note)
    if errors and len(errors) == len(folders):  # not one run could be read: nothing to write
        raise UserError(errors[0] if len(folders) == 1 else
                        f"none of the {len(folders)} runs could be scored; the first: {errors[0]}")
    if not with_truth and not errors:
        looked = ", ".join(sorted({s.key for s in ev.skipped})[:3])
        layout = "MASKS/<key>.png (--voc)" if options.voc else "MASKS/<key>/<word>.png"
        raise UserError(
            f"no ground truth found in --masks {options.masks} for any of the {len(folders)} runs (layout {layout}; "
            f"keys looked for: {looked})"
        )
    return ev


def problems(ev: Evaluation) -> list[tuple[str, str]]:
    """What makes an evaluation incomplete, as (level, line) for the terminal (the command then exits
    with 1): each run that could not be scored and their count, and a set of which nothing could be
    scored."""
    lines = [("error", f"{s.key}: {s.reason}") for s in ev.failed]
    if ev.failed:
        lines.append(("error", f"{len(ev.failed)} of {ev.runs} runs could not be scored (listed in skipped.csv); "
                               "the others are"))
    if not ev.scores:
        lines.append(("warning", f"nothing could be scored: no (image, word) pair has a usable mask "
                                 f"({len(ev.skipped)} skipped, see skipped.csv); the summary is empty"))
    return lines
