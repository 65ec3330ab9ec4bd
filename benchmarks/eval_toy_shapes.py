#!/usr/bin/env python
"""toy-shapes: does the trained model draw what it is told, and do its word maps point at it?

Generates held-out scenes' captions (evaluation seeds, never drawn in training; the held-out
colour-shape pairs are in them) with the committed toy-shapes pipeline under a StepAverageRecorder,
then scores, per object:

- fidelity, strictly (``models/toy_shapes/evaluate.py``): drawn = its colour is one clean blob of
  300-3000 px and foreign colours cover < 1 % of the image; right shape = the blob's fill ratio;
- the pointing game on drawn objects: the hottest cell of each colour word's and shape word's map
  (step- and block-averaged) lies on the object (blob dilated by 4 px), for CLIP and for T5, next
  to the chance rate (share of cells that would hit) and the rate of the map averaged over all the
  prompt's words, in the same run; and per block and per step, drawn as figures in --out.

    python benchmarks/eval_toy_shapes.py --n 200 --out eval_toy     # 200 images: minutes on 2 CPU cores
    python benchmarks/eval_toy_shapes.py --device cuda --batch 100  # 15 s on a GPU
    python benchmarks/eval_toy_shapes.py --n 16 --json -            # quick look, JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT]

import numpy as np  # noqa: E402

from attention_map_diffusers.models.toy_shapes.data import HELD_OUT_PAIRS, SIZE, eval_seeds, render  # noqa: E402
from attention_map_diffusers.models.toy_shapes.evaluate import (  # noqa: E402
    MISSES, PointingRecord, misses, pointing_records, score_image,
)

ENCODERS = ("clip", "t5")
KINDS = ("color", "shape")


@dataclass(frozen=True)
class EvalSettings:
    model: str  # "toy-shapes" or a folder
    n: int  # prompts (one image each)
    steps: int
    guidance_scale: float
    batch: int  # prompts per pipeline call
    threads: int
    out: str  # figures and images; "" for none
    device: str


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy-shapes", help="toy-shapes (the committed folder) or a diffusers folder")
    p.add_argument("--n", type=int, default=200, help="held-out prompts and seeds (default 200)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda; float32 either way")
    p.add_argument("--out", default="", help="folder for the per-block / per-step figures and a sample sheet")
    p.add_argument("--json", default=None, help="also write the numbers as JSON to this file ('-': stdout)")
    return p


def load(model: str, device: str = "cpu"):
    from attention_map_diffusers.dump.loading import Placement, load_pipeline, native_max_sequence_length

    pipe = load_pipeline(model, Placement(device, "float32"))
    pipe.set_progress_bar_config(disable=True)
    msl = native_max_sequence_length(model) or int(pipe.tokenizer_3.model_max_length)
    return pipe, msl


def generate(pipe, msl: int, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float):
    """(images (B, H, W, 3) uint8, CaptureResult) of one pipeline call, each image seeded by its own seed."""
    import torch

    from attention_map_diffusers import StepAverageRecorder

    with StepAverageRecorder(pipe, keep_block_maps=True, keep_step_maps=True) as rec:
        out = pipe(
            prompts, num_inference_steps=steps, height=SIZE, width=SIZE, guidance_scale=guidance_scale,
            max_sequence_length=msl, generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np",
        )
    images = (np.asarray(out.images) * 255).round().astype(np.uint8)
    return images, rec.result()


def records_of(pipe, msl: int, prompts, images, res):
    """Fidelity scores and pointing records of one call's images."""
    from attention_map_diffusers.contract import prompt_tokens

    clip_len = int(pipe.tokenizer_max_length)
    maps = res.sum_token_map / res.N  # (B, Hc, Wc, T)
    scores, records = [], []
    for b, (prompt, image) in enumerate(zip(prompts, images)):
        score = score_image(image, prompt)
        scores.append(score)
        for enc, tok, lo, hi in (("clip", pipe.tokenizer, 0, clip_len), ("t5", pipe.tokenizer_3, clip_len, clip_len + msl)):
            offsets = prompt_tokens(tok, prompt, hi - lo).offsets
            offsets = list(offsets) + [None] * (hi - lo - len(offsets))
            records += pointing_records(
                score, prompt, enc, offsets, maps[b, ..., lo:hi],
                block_maps=res.per_block_token_map[b, ..., lo:hi], step_maps=res.per_step_token_map[b, ..., lo:hi],
                held_out_pairs=HELD_OUT_PAIRS,
            )
    return scores, records


def summarise(prompts, scores, records: list[PointingRecord]) -> dict:
    objs = [(o, (o.color, o.shape) in HELD_OUT_PAIRS, len(s.objects)) for s in scores for o in s.objects]

    def fid(sel):
        n = len(sel)
        return {"objects": n, "drawn": sum(o.drawn for o, *_ in sel) / max(n, 1),
                "right_shape": sum(o.shape_correct for o, *_ in sel) / max(n, 1)}

    fidelity = {
        "all": fid(objs),
        "seen_pairs": fid([x for x in objs if not x[1]]),
        "held_out_pairs": fid([x for x in objs if x[1]]),
        "one_object_scenes": fid([x for x in objs if x[2] == 1]),
        "two_object_scenes": fid([x for x in objs if x[2] == 2]),
        "clean_images": sum(all(o.drawn for o in s.objects) for s in scores) / max(len(scores), 1),
    }
    shape_of_drawn = [o for o, *_ in objs if o.drawn]
    fidelity["right_shape_of_drawn"] = sum(o.shape_correct for o in shape_of_drawn) / max(len(shape_of_drawn), 1)
    missed = [misses(o, s.foreign_share) for s in scores for o in s.objects]
    # share of all objects that miss each criterion (an object can miss several)
    fidelity["missing"] = {m: sum(m in x for x in missed) / max(len(missed), 1) for m in MISSES}
    pointing = {}
    for enc in ENCODERS:
        for kind in KINDS:
            sel = [r for r in records if r.encoder == enc and r.kind == kind]
            n = len(sel)
            pointing[f"{enc}/{kind}"] = {
                "n": n,
                "hit": sum(r.hit for r in sel) / max(n, 1),
                "all_words_average": sum(r.baseline_hit for r in sel) / max(n, 1),
                "chance": float(np.mean([r.chance for r in sel])) if sel else 0.0,
                "hit_held_out_pairs": (sum(r.hit for r in sel if r.held_out_pair) / max(1, sum(r.held_out_pair for r in sel))),
                "per_block": np.mean([r.block_hits for r in sel], axis=0).round(4).tolist() if sel else [],
                "per_step": np.mean([r.step_hits for r in sel], axis=0).round(4).tolist() if sel else [],
            }
    return {"prompts": len(prompts), "fidelity": fidelity, "pointing": pointing}


def print_tables(summary: dict) -> None:
    f = summary["fidelity"]
    print(f"\nFidelity ({summary['prompts']} held-out prompts and seeds; strict: one clean blob, < 1 % foreign colour)")
    print(f"{'objects':<22}{'n':>6}{'drawn':>9}{'right shape':>13}")
    for key in ("all", "seen_pairs", "held_out_pairs", "one_object_scenes", "two_object_scenes"):
        r = f[key]
        print(f"{key:<22}{r['objects']:>6}{100 * r['drawn']:>8.1f}%{100 * r['right_shape']:>12.1f}%")
    print(f"images with every object drawn: {100 * f['clean_images']:.1f}%   right shape among drawn objects: "
          f"{100 * f['right_shape_of_drawn']:.1f}%")
    print("objects missing a criterion (one can miss several): "
          + ", ".join(f"{m} {100 * v:.1f}%" for m, v in f["missing"].items()))
    print("\nPointing game on drawn objects (hottest cell of the word's step- and block-averaged map on the object)")
    print(f"{'encoder/word':<14}{'n':>6}{'word map':>10}{'all-words map':>15}{'chance':>9}{'held-out pairs':>16}")
    for key, r in summary["pointing"].items():
        print(f"{key:<14}{r['n']:>6}{100 * r['hit']:>9.1f}%{100 * r['all_words_average']:>14.1f}%{100 * r['chance']:>8.1f}%"
              f"{100 * r['hit_held_out_pairs']:>15.1f}%")
    print("\nPer block (step-averaged map of each block), hit rate %:")
    for key, r in summary["pointing"].items():
        print(f"  {key:<12}" + " ".join(f"{100 * v:5.1f}" for v in r["per_block"]))
    print("Per step (block-averaged map of each step, first = noisiest), hit rate %:")
    for key, r in summary["pointing"].items():
        print(f"  {key:<12}" + " ".join(f"{100 * v:4.0f}" for v in r["per_step"]))


def curves_figure(summary: dict, axis: str):
    """Hit rate per block or per step, one line per encoder and word kind, chance dashed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    for i, (key, r) in enumerate(summary["pointing"].items()):
        ys = 100 * np.asarray(r["per_block" if axis == "block" else "per_step"])
        ax.plot(np.arange(len(ys)), ys, marker="o", ms=3, color=f"C{i}", label=key)
        ax.axhline(100 * r["chance"], color=f"C{i}", ls=":", lw=0.8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("pointing game hit rate (%)")
    ax.set_xlabel("joint-attention block" if axis == "block" else "denoising step (0 = noisiest)")
    ax.set_title(f"toy-shapes: which {'blocks' if axis == 'block' else 'steps'} localise words (dotted: chance)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def sample_sheet(examples) -> "object":
    """Images with the CLIP maps of their colour and shape words (rows: examples)."""
    from matplotlib.figure import Figure

    rows = len(examples)
    fig = Figure(figsize=(2.0 * 5, 2.0 * rows), dpi=90)
    for r, (prompt, image, maps) in enumerate(examples):
        ax = fig.add_subplot(rows, 5, 5 * r + 1)
        ax.imshow(image)
        ax.set_title(prompt, fontsize=6)
        ax.axis("off")
        for c, (word, m) in enumerate(maps[:4]):
            ax = fig.add_subplot(rows, 5, 5 * r + 2 + c)
            ax.imshow(image, alpha=0.35)
            ax.imshow(m, cmap="inferno", alpha=0.65, extent=(0, SIZE, SIZE, 0), interpolation="nearest")
            ax.set_title(word, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    return fig


def _example_maps(pipe, msl, prompt, maps_b):
    from attention_map_diffusers.contract import prompt_tokens
    from attention_map_diffusers.models.toy_shapes.evaluate import prompt_objects, word_token_indices

    clip_len = int(pipe.tokenizer_max_length)
    offsets = prompt_tokens(pipe.tokenizer, prompt, clip_len).offsets
    out = []
    for color, shape, cs, ss in prompt_objects(prompt):
        for word, span in ((color, cs), (shape, ss)):
            idx = word_token_indices(offsets, span)
            out.append((f"CLIP '{word}'", maps_b[..., :clip_len][..., idx].mean(-1)))
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    s = EvalSettings(args.model, args.n, args.steps, args.guidance_scale, args.batch, args.threads, args.out, args.device)
    import torch

    torch.set_num_threads(s.threads)
    t0 = time.time()
    pipe, msl = load(s.model, s.device)
    seeds = eval_seeds(s.n)
    prompts = [render(sd).caption for sd in seeds]
    scores, records, examples = [], [], []
    for i in range(0, s.n, s.batch):
        ps, ss = prompts[i : i + s.batch], seeds[i : i + s.batch]
        images, res = generate(pipe, msl, ps, ss, s.steps, s.guidance_scale)
        sc, rc = records_of(pipe, msl, ps, images, res)
        scores += sc
        records += rc
        if len(examples) < 8:
            maps = res.sum_token_map / res.N
            examples += [(p, im, _example_maps(pipe, msl, p, maps[b])) for b, (p, im) in enumerate(zip(ps, images))][: 8 - len(examples)]
        print(f"{min(i + s.batch, s.n)}/{s.n} prompts, {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    summary = summarise(prompts, scores, records)
    summary["settings"] = {"model": s.model, "device": s.device, "steps": s.steps, "guidance_scale": s.guidance_scale, "size": SIZE,
                           "max_sequence_length": msl, "seconds": round(time.time() - t0, 1)}
    print_tables(summary)
    if s.out:
        os.makedirs(s.out, exist_ok=True)
        for axis in ("block", "step"):
            curves_figure(summary, axis).savefig(os.path.join(s.out, f"pointing_per_{axis}.png"))
        sample_sheet(examples).savefig(os.path.join(s.out, "samples_clip_maps.png"))
        print(f"\nfigures: {s.out}/pointing_per_block.png, pointing_per_step.png, samples_clip_maps.png")
    if args.json:
        text = json.dumps(summary, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as fh:
                fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
