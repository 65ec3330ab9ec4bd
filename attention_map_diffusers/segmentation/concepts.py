"""Scoring a dump's concept maps (ConceptAttention, issue #23) with the paper's two protocols.

numpy only. The maps are the dump's average per-pixel softmax over its C concepts
(:mod:`~attention_map_diffusers.analysis.concepts`), upsampled bilinearly (``align_corners=False``)
to the masks' size (H, W). A ground-truth class (a VOC class, or the word of a per-word mask) is
scored by the first concept **named like it**: the concept's words equal, case-insensitively, those
of the class's name or of one of its phrases (in that order). Concepts named like no class
("background", "sky", a thing that has no mask) are background concepts.

- ``concept`` (binary): the class's concept map, thresholded at that map's mean: a pixel is inside
  when its value is **greater than** the mean of the map over all its pixels. AP ranks the pixels
  by the map.
- ``concept-argmax`` (multi-class): each pixel goes to its concept with the largest share (the
  first on ties); a pixel whose winner is a background concept is background. IoU per class of the
  pixels given to its concept; the image's multi-class accuracy on each of its rows (as ``argmax``).

Their rows carry the encoder column :data:`ENCODER` (the concept maps belong to no text encoder).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..analysis import concepts as cm
from ..analysis.words import find_words, normalise_word
from .metrics import average_precision, iou, minmax, multiclass_accuracy, pixel_accuracy

#: The concept methods, as ``--methods`` names them.
METHODS = ("concept", "concept-argmax")
#: The encoder column of the concept methods' rows.
ENCODER = "concepts"
#: Why a run's images have no concept scores when it has no concept maps.
NO_CONCEPTS = "concept, concept-argmax not scored: the dump has no concept maps (dump with --concepts)"


def name_key(text: str) -> tuple[str, ...]:
    """The words of a name, normalised as prompt words are compared (case-insensitive)."""
    return tuple(normalise_word(w.text) for w in find_words(text))


def match(names: Sequence[str], classes: Sequence) -> list[Optional[int]]:
    """Per ground-truth class (``.name`` and ``.phrases``), the position in ``names`` of the first
    concept named like its name or, failing that, like one of its phrases in order; None when none is."""
    keys = [name_key(n) for n in names]
    out: list[Optional[int]] = []
    for c in classes:
        hit = None
        for phrase in (c.name, *c.phrases):
            k = name_key(phrase)
            if k and k in keys:
                hit = keys.index(k)
                break
        out.append(hit)
    return out


def argmax_classes(maps: np.ndarray, matches: Sequence[Optional[int]]) -> np.ndarray:
    """(C, H, W) concept maps -> (H, W) int64: per pixel the class whose concept wins it, -1 where the
    winner is a background concept (named like no class). ``matches``: per class, its concept or None."""
    win = cm.winners(maps)
    labels = np.full(win.shape, -1, dtype=np.int64)
    for k in reversed(range(len(matches))):  # a concept named like two classes labels the first
        if matches[k] is not None:
            labels[win == matches[k]] = k
    return labels


def score(key: str, names: Sequence[str], maps: np.ndarray, classes: Sequence, gts: np.ndarray, valid: Optional[np.ndarray],
          methods: Sequence[str], keep: Optional[dict] = None) -> tuple[list, list]:
    """The concept methods' scores of one image, and the classes they could not score.

    Args:
        names: the C concepts; maps: (C, H, W) their maps at the masks' size.
        classes: the image's ground-truth classes (``.name``, ``.phrases``); gts: (n, H, W) their masks.
        methods: the methods asked for (those not in :data:`METHODS` are ignored).
        keep: filled with (ENCODER, method, class) -> ((H, W) predicted mask, (H, W) min-max map) when given.
    Returns:
        (Score list, Skip list, concept-argmax's multi-class pixel accuracy of the image or None).
    """
    from .evaluate import Score, Skip

    matches = match(names, classes)
    skips = [Skip(key, c.name, f"no concept named like it (concepts: {', '.join(names)})")
             for c, m in zip(classes, matches) if m is None]
    ok = [k for k, m in enumerate(matches) if m is not None]
    wanted = [m for m in methods if m in METHODS]
    image_acc = None
    if not ok or not wanted:
        return [], skips, image_acc
    v = np.ones(gts.shape[1:], dtype=bool) if valid is None else valid
    out = []
    for method in wanted:
        if method == "concept-argmax":
            labels = argmax_classes(maps, matches)
            image_acc = multiclass_accuracy(labels, gts, valid)
        for k in ok:
            heat = maps[matches[k]]
            pred = heat > heat.mean() if method == "concept" else labels == k
            acc = pixel_accuracy(pred, gts[k], valid)  # the word's own mask (word_pixel_acc)
            name = classes[k].name
            out.append(Score(key, ENCODER, method, name, iou(pred, gts[k], valid), average_precision(heat, gts[k], valid), acc,
                             int(np.count_nonzero(pred & v)), int(np.count_nonzero(gts[k] & v))))
            if keep is not None:
                keep[(ENCODER, method, name)] = (pred & v, minmax(heat))
    return out, skips, image_acc


def image_scores(dump, key: str, item: int, truth, options, keep: Optional[dict] = None,
                 steps: Optional[list[int]] = None) -> tuple[list, list, Optional[float]]:
    """The concept methods' scores of one batch item of ``dump`` against ``truth`` (a GroundTruth);
    ``steps``: the step indices ``--steps`` chose (denoising order), as ``check_selection`` gives them.

    A dump without concept maps gives one skip (:data:`NO_CONCEPTS`); ``--steps`` without
    ``concept_per_step_map`` and ``--blocks`` without ``concept_per_block_map`` skip the image too.
    """
    from .evaluate import Skip

    data = dump.concepts
    if data is None:
        return [], [Skip(key, "", NO_CONCEPTS)], None
    positions = None
    if steps is not None and data.step_maps is None:
        return [], [Skip(key, "", "concept, concept-argmax not scored: the dump kept no per-step concept maps "
                                  "(concept_per_step_map; dump with --save-step-maps) for --steps")], None
    if options.block_ranges is not None:
        if data.block_maps is None:
            return [], [Skip(key, "", "concept, concept-argmax not scored: the dump kept no per-block concept maps "
                                      "(concept_per_block_map) for --blocks")], None
        positions = dump.select_blocks(options.block_ranges)
    if not truth.concepts:
        return [], [], None
    H, W = truth.concepts[0].gt.shape
    maps = cm.upsample(cm.item_maps(data, item, positions, steps), H, W)
    gts = np.stack([c.gt for c in truth.concepts])
    return score(key, data.names, maps, truth.concepts, gts, truth.valid, options.methods, keep)


def columns(dump, options) -> list[str]:
    """The encoder columns the concept methods add for ``dump``: [ENCODER] when it has concept maps and
    a concept method is asked for."""
    return [ENCODER] if dump.concepts is not None and any(m in METHODS for m in options.methods) else []


def tidy_skips(skips: list, encoders: Sequence[str], options) -> tuple[list, Optional[str]]:
    """When no run had concept maps, the per-image :data:`NO_CONCEPTS` skips become one note (None otherwise,
    and None with the default ``--methods``, which names every method)."""
    if ENCODER in encoders or not any(m in METHODS for m in options.methods):
        return skips, None
    from .maps import METHODS as ALL_METHODS

    kept = [s for s in skips if s.reason != NO_CONCEPTS]
    if tuple(options.methods) == ALL_METHODS:  # the default, "all": say nothing of methods the dumps cannot have
        return kept, None
    return kept, "note: concept, concept-argmax not scored: no run has concept maps (dump with --concepts)"
