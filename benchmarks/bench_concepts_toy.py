#!/usr/bin/env python
"""Concept maps (ConceptAttention) against cross-attention on toy-shapes, offline: the README's table.

``--n`` scenes rendered from evaluation seeds (never trained on; the held-out colour-shape pairs are
among them), each read through the dump's given-image mode at noise level 0.5 with the concepts
``red green blue yellow circle square triangle background`` (sd_35_stepavg_dump.py, one command for
all scenes, block maps kept), then:

- the pointing game, computed here from the dumps: for each object, does the hottest cell of its
  colour concept's map (and of its shape concept's map) lie on the object named by that word (its
  true mask dilated by 4 px, as models/toy_shapes/evaluate.py defines it; a word that names two
  objects, e.g. two squares, names their union), next to the same for the cross-attention map of
  the object's colour / shape word in the caption (T5, CLIP: the mean over the word's tokens) and
  the chance rate (share of grid cells on the target); over all blocks and per block;
- segmentation with evaluate_segmentation.py (methods concept, concept-argmax, daam, argmax and the
  baselines; one mask per colour word and per shape word, as bench_segmentation_toy.py writes them),
  over all blocks and per block (``--blocks k``), with the colour / shape split;
- a control (``--no-control`` skips it): the same output-space map with the caption's own words in
  place of the concepts, i.e. the dot product of the image tokens' attention outputs and the caption's
  T5 tokens' attention outputs of the very same joint attention (both before the output projection,
  read with forward pre-hooks on ``to_out[0]`` and ``to_add_out``; same image, noise and seed as the
  dump), softmax over the caption's words. It tells whether the output space of this model locates
  the words at all, apart from the concept stream. SD3's last block (``context_pre_only``) has no
  text output: the control has no row for it, and its "all blocks" is the mean over the others.
- the concepts' inputs against the caption's (part of the control): per colour / shape word, the
  cosine between the concept's embedding (its T5 first token encoded alone, after ``context_embedder``:
  what the concept stream starts from) and the same word's T5 token in each caption that names it
  (after ``context_embedder``: what the trained text stream starts from). Near 1 says the concept
  stream starts where the text stream does, so a gap between the two comes from the output space.
- ``--level-sweep L [L ...]`` (optional): the same scenes dumped once more at those noise levels, and
  the pointing game per level, for the concepts and the caption's T5 words, from each level's map
  alone (``concept_per_step_map``, ``per_step_token_map``): whether 0.5 is just a poor level.

    python benchmarks/bench_concepts_toy.py --n 64 --out conc_toy --json assets/toy_shapes/concepts.json
    python benchmarks/bench_concepts_toy.py --n 4 --out /tmp/c      # a quick look
    python benchmarks/bench_concepts_toy.py --n 128 --out /tmp/c --level-sweep 0.9 0.7 0.5 0.3 0.1
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from contextlib import redirect_stderr
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import numpy as np  # noqa: E402

from attention_map_diffusers.models.toy_shapes.data import eval_seeds, render  # noqa: E402
from attention_map_diffusers.models.toy_shapes.evaluate import (  # noqa: E402
    chance_rate, dilate, pointing_hit, prompt_objects, word_token_indices,
)
from bench_segmentation_toy import evaluate, prepare_rendered  # noqa: E402

LEVEL = 0.5
CONCEPTS = ("red", "green", "blue", "yellow", "circle", "square", "triangle", "background")
SOURCES = ("concept", "t5", "clip")  # the concept maps, then the caption words' cross-attention maps
CONTROL = "t5-output-space"  # the control's source name
SEED = 42  # the dump's default seed: the control sees the dump's noise
KINDS = ("color", "shape")
METHODS = "concept,concept-argmax,daam,argmax,whole,centre,random"


def _scene_masks(n: int) -> dict[str, tuple[str, np.ndarray]]:
    """scene key -> (caption, (K, H, W) bool true masks in caption order), as prepare_rendered renders them."""
    out = {}
    for seed in eval_seeds(n):
        s = render(seed, held_out=None)
        out[f"scene{seed}"] = (s.caption, np.asarray(s.masks, dtype=bool))
    return out


def _word_targets(caption: str, masks: np.ndarray) -> list[dict]:
    """Per object and kind: the word, its character span in the caption, and its target (the union of
    the masks of the objects that word names, dilated by 4 px)."""
    objs = prompt_objects(caption)
    out = []
    for k, (color, shape, cspan, sspan) in enumerate(objs):
        for kind, word, span in (("color", color, cspan), ("shape", shape, sspan)):
            union = np.zeros(masks.shape[1:], bool)
            for j, o in enumerate(objs):
                if o[0 if kind == "color" else 1] == word:
                    union |= masks[j]
            out.append({"object": k, "kind": kind, "word": word, "span": span, "target": dilate(union)})
    return out


#: The npz arrays of the word and concept maps kept per block or per step (noise level).
PARTS = {"block": ("per_block_token_map", "concept_per_block_map"),
         "step": ("per_step_token_map", "concept_per_step_map")}


def pointing_of_dump(folder: str, masks: dict, per: str = "block") -> list[dict]:
    """One record per (object, kind, source) of one dump folder: the hit over all blocks and steps, the
    hits per block (``per="block"``) or per step (``"step"``) in ``part_hits``, and the chance rate.
    Maps: the concept map (softmax shares; per part: ``concept_per_block_map`` / ``concept_per_step_map``)
    and the mean over the word's tokens of the cross-attention map (``per_block_token_map`` /
    ``per_step_token_map``)."""
    with open(os.path.join(folder, "metadata.json"), encoding="utf-8") as fh:
        meta = json.load(fh)
    key = os.path.splitext(meta["source_image"]["name"])[0]  # the masks' key, as evaluate_segmentation.py reads it
    caption, obj_masks = masks[key]
    with np.load(os.path.join(folder, "stepavg_token_maps_v1.npz")) as z:
        words_all = z["sum_token_map"][0].astype(np.float64)  # (Hc, Wc, T); argmax needs no division by N
        words_part = z[PARTS[per][0]][0].astype(np.float64)  # (Bk or S, Hc, Wc, T)
        conc_all = z["concept_sum_map"][0].astype(np.float64)  # (Hc, Wc, C)
        conc_part = z[PARTS[per][1]][0].astype(np.float64)  # (Bk or S, Hc, Wc, C)
    names = [c.lower() for c in meta["concepts"]]
    grid = words_all.shape[:2]
    records = []
    for t in _word_targets(caption, obj_masks):
        chance = chance_rate(t["target"], grid)
        for source in SOURCES:
            if source == "concept":
                c = names.index(t["word"])
                full, parts = conc_all[..., c], conc_part[..., c]
            else:
                lo, _ = meta["text_spans"][source]
                idx = [lo + i for i in word_token_indices(meta[f"token_offsets_{source}"][0], t["span"])]
                if not idx:
                    continue
                full, parts = words_all[..., idx].mean(axis=-1), words_part[..., idx].mean(axis=-1)
            records.append({
                "scene": key, "object": t["object"], "kind": t["kind"], "source": source, "chance": chance,
                "hit": pointing_hit(full, t["target"]),
                "part_hits": [pointing_hit(m, t["target"]) for m in parts],
            })
    return records


def output_space_control(masks: dict) -> tuple[list[dict], list[int]]:
    """The control's pointing records (source :data:`CONTROL`) of the scenes of ``masks``, and the block
    positions it has (those whose attention gives text outputs)."""
    import torch
    from PIL import Image

    from attention_map_diffusers.capture.on_image import record_on_image
    from attention_map_diffusers.contract import prompt_tokens
    from eval_toy_shapes import load

    with redirect_stderr(io.StringIO()):  # the loaders' progress bars
        pipe, msl = load("toy-shapes")
    seen: dict = {}

    def tap(k: int, name: str):
        def hook(module, args):
            seen[(k, name)] = args[0].detach()[-1].double()  # the last (conditional) batch item, (tokens, D)
        return hook

    handles = []
    for k, block in enumerate(pipe.transformer.transformer_blocks):
        handles.append(block.attn.to_out[0].register_forward_pre_hook(tap(k, "image")))
        if block.attn.to_add_out is not None:  # None in SD3's context_pre_only last block
            handles.append(block.attn.to_add_out.register_forward_pre_hook(tap(k, "text")))
    records, with_text = [], []
    try:
        for key, (caption, obj_masks) in masks.items():
            seen.clear()
            with torch.no_grad():
                res = record_on_image(pipe, Image.fromarray(render(int(key[len("scene"):])).image), caption, (LEVEL,),
                                      seed=SEED, max_sequence_length=msl)
            lo, _ = res.text_spans["t5"]
            offsets = prompt_tokens(pipe.tokenizer_3, caption, msl).offsets
            words = [i for i, o in enumerate(offsets) if o is not None and o[1] > o[0]]
            grid = res.sum_token_map.shape[1:3]
            with_text = sorted(k for k, name in seen if name == "text")
            maps = []  # per block with text outputs: (Hc, Wc, words) softmax over the caption's words
            for k in with_text:
                image, text = seen[(k, "image")], seen[(k, "text")]
                h = w = int(round(image.shape[0] ** 0.5))  # toy-shapes: square latent grid, as the canonical one
                assert (h, w) == tuple(grid), (h, w, grid)
                scores = image @ text[[lo + i for i in words]].T  # (tokens, words)
                maps.append(torch.softmax(scores, dim=-1).reshape(h, w, -1).numpy())
            for t in _word_targets(caption, obj_masks):
                idx = [words.index(i) for i in word_token_indices(offsets, t["span"])]
                per_block = [m[..., idx].mean(axis=-1) for m in maps]
                records.append({
                    "scene": key, "object": t["object"], "kind": t["kind"], "source": CONTROL,
                    "chance": chance_rate(t["target"], grid), "hit": pointing_hit(np.mean(per_block, axis=0), t["target"]),
                    "part_hits": [pointing_hit(m, t["target"]) for m in per_block],
                })
    finally:
        for hd in handles:
            hd.remove()
    return records, with_text


def concept_input_cosines(masks: dict) -> dict:
    """word -> {"mean", "min", "n"}: cosine of the concept's input embedding and the word's caption
    token's, both after ``context_embedder``, over every caption of ``masks`` that names the word."""
    import torch

    from attention_map_diffusers.capture.concepts import encode_concepts
    from attention_map_diffusers.contract import prompt_tokens
    from eval_toy_shapes import load

    with redirect_stderr(io.StringIO()):
        pipe, msl = load("toy-shapes")
    embed = pipe.transformer.context_embedder
    words = [c for c in CONCEPTS if c != "background"]
    with torch.no_grad():
        alone = embed(encode_concepts(pipe, words, msl).to(embed.weight.dtype)).double()
        cos: dict = {w: [] for w in words}
        for caption, obj_masks in masks.values():
            ctx = embed(pipe._get_t5_prompt_embeds(prompt=[caption], num_images_per_prompt=1, max_sequence_length=msl,
                                                   device=pipe._execution_device))[0].double()
            offsets = prompt_tokens(pipe.tokenizer_3, caption, msl).offsets
            for t in _word_targets(caption, obj_masks):
                for i in word_token_indices(offsets, t["span"])[:1]:  # the word's first token, as the concept's
                    cos[t["word"]].append(float(torch.cosine_similarity(alone[words.index(t["word"])], ctx[i], dim=0)))
    return {w: {"mean": round(float(np.mean(v)), 4), "min": round(float(np.min(v)), 4), "n": len(v)}
            for w, v in cos.items() if v}


def level_sweep(out: str, n: int, levels: Sequence[float], masks: dict) -> dict:
    """level -> source ("concept", "t5") -> kind -> {"rate", "n"}: the pointing game on each level's map
    alone, from dumps of the same scenes at ``levels`` (in ``out``)."""
    dumps, _, _ = prepare_rendered(out, n, levels=tuple(levels), extra=["--concepts", *CONCEPTS, "--store-dtype", "float32"])
    hits: dict = {}
    for folder in _dump_folders(dumps):
        for r in pointing_of_dump(folder, masks, per="step"):  # the steps are the levels, in order
            if r["source"] in ("concept", "t5"):
                for level, hit in zip(levels, r["part_hits"]):
                    hits.setdefault((level, r["source"], r["kind"]), []).append(hit)
    out_: dict = {}
    for (level, source, kind), v in hits.items():
        out_.setdefault(f"{level:g}", {}).setdefault(source, {})[kind] = {"rate": round(float(np.mean(v)), 4), "n": len(v)}
    return out_


def summarise_pointing(records: list[dict], blocks: list, control_blocks: Sequence[int] = ()) -> dict:
    """selection ("all blocks", "block k") -> source -> kind -> {"rate", "n"}; plus "chance" per kind."""
    out: dict = {}
    selections = [("all blocks", None)] + [(f"block {k}", k) for k in range(len(blocks))]
    for name, k in selections:
        out[name] = {}
        for source in SOURCES + (CONTROL,):
            if source == CONTROL and (k is not None and k not in control_blocks or not control_blocks):
                continue
            out[name][source] = {}
            for kind in KINDS:
                sel = [r for r in records if r["source"] == source and r["kind"] == kind]
                at = None if k is None else (list(control_blocks).index(k) if source == CONTROL else k)
                hits = [r["hit"] if at is None else r["part_hits"][at] for r in sel]
                out[name][source][kind] = {"rate": round(float(np.mean(hits)), 4) if hits else None, "n": len(hits)}
    out["chance"] = {kind: round(float(np.mean([r["chance"] for r in records if r["kind"] == kind and r["source"] == "concept"])), 4)
                     for kind in KINDS}
    return out


def _dump_folders(dumps: str) -> list[str]:
    return sorted(os.path.join(dumps, d) for d in os.listdir(dumps) if os.path.isfile(os.path.join(dumps, d, "metadata.json")))


def _row(summary: list, method: str, encoder: str) -> str:
    r = next((r for r in summary if r["method"] == method and r["encoder"] == encoder), None)
    return "" if r is None else f"{100 * float(r['mIoU']):.1f}"


def _kind(by_kind: list, method: str, encoder: str, kind: str) -> str:
    r = next((r for r in by_kind if r["method"] == method and r["encoder"] == encoder and r["words"] == kind), None)
    return "" if r is None else f"{100 * r['mIoU']:.1f}"


def print_tables(res: dict) -> None:
    p = res["pointing"]
    print(f"\npointing game, toy-shapes rendered scenes, noise {res['level']}, n = {res['n']} scenes "
          f"({p['all blocks']['concept']['color']['n']} objects), hit rate in %; chance: colour "
          f"{100 * p['chance']['color']:.1f}, shape {100 * p['chance']['shape']:.1f}")
    print(f"  {'selection':<11} {'colour: concept':>15} {'T5':>6} {'CLIP':>6} {'T5 out':>6}   "
          f"{'shape: concept':>14} {'T5':>6} {'CLIP':>6} {'T5 out':>6}   (T5 out: the control)")
    for sel in [k for k in p if k != "chance"]:
        v = {(s, k): p[sel].get(s, {}).get(k, {}).get("rate") for s in SOURCES + (CONTROL,) for k in KINDS}
        f = lambda x: "" if x is None else f"{100 * x:.1f}"  # noqa: E731
        print(f"  {sel:<11} {f(v['concept', 'color']):>15} {f(v['t5', 'color']):>6} {f(v['clip', 'color']):>6} "
              f"{f(v[CONTROL, 'color']):>6}   {f(v['concept', 'shape']):>14} {f(v['t5', 'shape']):>6} "
              f"{f(v['clip', 'shape']):>6} {f(v[CONTROL, 'shape']):>6}")
    if "level_sweep" in res:
        print("\npointing per noise level, each level's map alone, hit rate in % (concept / caption's T5 word)")
        for level, v in res["level_sweep"].items():
            print(f"  sigma {level:<5} colour {100 * v['concept']['color']['rate']:5.1f} / {100 * v['t5']['color']['rate']:5.1f}"
                  f"   shape {100 * v['concept']['shape']['rate']:5.1f} / {100 * v['t5']['shape']['rate']:5.1f}")
    if "concept_input_cosine" in res:
        print("\ncosine, concept input vs the caption's token (context_embedder), mean (min) over the captions: "
              + ", ".join(f"{w} {v['mean']:.3f} ({v['min']:.3f})" for w, v in res["concept_input_cosine"].items()))
    print("\nsegmentation mIoU in % (colour / shape words split for concept, concept-argmax, daam T5)")
    print(f"  {'selection':<11} {'concept':>16} {'concept-argmax':>16} {'daam T5':>16} {'argmax T5':>9} {'daam CLIP':>9} "
          f"{'whole':>6} {'centre':>6} {'random':>6}")
    for sel, ev in res["segmentation"].items():
        s, bk = ev["summary"], ev["by_word_kind"]
        trio = lambda m, e: f"{_row(s, m, e)} ({_kind(bk, m, e, 'color')}/{_kind(bk, m, e, 'shape')})"  # noqa: E731
        print(f"  {sel:<11} {trio('concept', 'concepts'):>16} {trio('concept-argmax', 'concepts'):>16} {trio('daam', 't5'):>16} "
              f"{_row(s, 'argmax', 't5'):>9} {_row(s, 'daam', 'clip'):>9} {_row(s, 'whole', 't5'):>6} "
              f"{_row(s, 'centre', 't5'):>6} {_row(s, 'random', 't5'):>6}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64, help="rendered scenes (evaluation seeds 0 to n-1; default 64)")
    p.add_argument("--out", required=True, help="folder for the scenes, masks, dumps and evaluations")
    p.add_argument("--json", default=None, help="results file (default: OUT/concepts.json)")
    p.add_argument("--no-control", action="store_true",
                   help="skip the control (the caption's own words in the output space, read with hooks; about 1 s per scene)")
    p.add_argument("--level-sweep", type=float, nargs="+", default=None, metavar="SIGMA",
                   help="also dump the scenes at these noise levels (into OUT/levels) and play the pointing game per level")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1:
        print(f"error: --n must be at least 1, got {args.n}", file=sys.stderr)
        return 2
    bad = [v for v in args.level_sweep or () if not 0.0 < v <= 1.0]
    if bad:
        print(f"error: --level-sweep levels lie in (0, 1], got {bad[0]:g}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    dumps, masks_dir, _ = prepare_rendered(args.out, args.n, levels=(LEVEL,),
                                           extra=["--concepts", *CONCEPTS, "--store-dtype", "float32"])
    folders = _dump_folders(dumps)
    with open(os.path.join(folders[0], "metadata.json"), encoding="utf-8") as fh:
        blocks = json.load(fh)["blocks"]
    masks = _scene_masks(args.n)
    records = [r for f in folders for r in pointing_of_dump(f, masks)]
    res: dict = {"n": args.n, "level": LEVEL, "concepts": list(CONCEPTS), "blocks": blocks,
                 "command": "python benchmarks/bench_concepts_toy.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    control_blocks: list[int] = []
    if not args.no_control:
        control, control_blocks = output_space_control(masks)
        records += control
        res["concept_input_cosine"] = concept_input_cosines(masks)
    res["control_blocks"] = control_blocks
    res["pointing"] = summarise_pointing(records, blocks, control_blocks)
    if args.level_sweep:
        res["level_sweep"] = level_sweep(os.path.join(args.out, "levels"), args.n, args.level_sweep, masks)
    res["segmentation"] = {"all blocks": evaluate(dumps, masks_dir, os.path.join(args.out, "eval", "all"), ["--methods", METHODS])}
    for k in range(len(blocks)):
        res["segmentation"][f"block {k}"] = evaluate(dumps, masks_dir, os.path.join(args.out, "eval", f"block{k}"),
                                                     ["--methods", METHODS, "--blocks", str(k)])
    res["seconds"] = round(time.perf_counter() - t0, 1)
    path = args.json or os.path.join(args.out, "concepts.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(res, fh, indent=1)
    os.replace(tmp, path)
    print_tables(res)
    print(f"\n{res['seconds']} s in all; {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
