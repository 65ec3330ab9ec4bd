#!/usr/bin/env python
"""Zero-shot segmentation with toy-shapes, offline: the tables the README quotes.

Two sets, each through the project's own commands (sd_35_stepavg_dump.py, then
evaluate_segmentation.py), with the committed toy-shapes model:

- rendered: ``--n`` scenes rendered from evaluation seeds (never trained on; the held-out
  colour-shape pairs are among them) with their true masks, read through ``--image`` at the noise
  levels 0.7, 0.5 and 0.3; scored per level and over all levels;
- generated: ``--n`` images the model generates (``--n // 5`` held-out captions x 5 seeds, 20
  steps, guidance 4), masks detected from colour: each object's mask is the largest connected
  region of its hue (models/toy_shapes/evaluate.py), none when the model did not draw that hue.

Each object's colour word and shape word both name its mask (a word repeated in the caption names
the union of its objects). Methods: DAAM's threshold, ConceptAttention-style argmax, and the
whole-image, centred and random baselines, for CLIP, T5 and both.

    python benchmarks/bench_segmentation_toy.py --n 200 --out seg_toy      # a few minutes on 2 cores
    python benchmarks/bench_segmentation_toy.py --n 10 --out /tmp/s       # a quick look
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from contextlib import redirect_stderr, redirect_stdout

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT]

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from attention_map_diffusers.models.toy_shapes.data import eval_seeds, render  # noqa: E402
from attention_map_diffusers.models.toy_shapes.evaluate import HUES, hue_labels, largest_component, prompt_objects  # noqa: E402

LEVELS = (0.7, 0.5, 0.3)  # noisiest first: step i of the image-mode dumps is LEVELS[i]
SEEDS_PER_PROMPT = 5


def _quiet(fn, *args):
    """Call a command's main(argv) with its output kept; raise with that output when it fails."""
    sink = io.StringIO()
    with redirect_stdout(sink), redirect_stderr(sink):
        code = fn(*args)
    if code not in (0, None):
        raise SystemExit(f"{getattr(fn, '__module__', fn)} returned {code}:\n{sink.getvalue()[-3000:]}")
    return sink.getvalue()


def _save_word_masks(folder: str, caption: str, masks: list) -> int:
    """One PNG per word of each object (colour and shape) into ``folder``; a repeated word gets the
    union of its objects' masks. ``masks[k]`` is object k's (H, W) bool mask or None (not drawn)."""
    words: dict[str, np.ndarray] = {}
    for (color, shape, _, _), mask in zip(prompt_objects(caption), masks):
        if mask is None or not mask.any():
            continue
        for w in (color, shape):
            words[w] = mask if w not in words else (words[w] | mask)
    os.makedirs(folder, exist_ok=True)
    for w, m in words.items():
        Image.fromarray(m.astype(np.uint8) * 255).save(os.path.join(folder, f"{w}.png"))
    return len(words)


def prepare_rendered(root: str, n: int, levels=LEVELS, extra=()) -> tuple[str, str, str]:
    """Rendered scenes + true masks + the image-mode dumps at ``levels``, with the dump flags ``extra``.
    Returns (dumps, masks, images folder)."""
    import sd_35_stepavg_dump

    images, masks, dumps = (os.path.join(root, "rendered", d) for d in ("images", "masks", "dumps"))
    os.makedirs(images, exist_ok=True)
    rows = []
    for seed in eval_seeds(n):
        s = render(seed, held_out=None)
        key = f"scene{seed}"
        Image.fromarray(s.image).save(os.path.join(images, key + ".png"))
        _save_word_masks(os.path.join(masks, key), s.caption, list(s.masks))
        rows.append((key + ".png", s.caption))
    table = os.path.join(images, "images.csv")
    with open(table, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "prompt"])
        w.writerows(rows)
    _quiet(sd_35_stepavg_dump.main, ["--model", "toy-shapes", "--images-csv", table, "--guidance-scale", "1",
                                     "--noise-levels", *map(str, levels), "--save-block-maps", "--device", "cpu",
                                     *extra, "--out", dumps])
    return dumps, masks, images


def prepare_generated(root: str, n: int) -> tuple[str, str, dict]:
    """Generated images + colour-detected masks. Returns (dumps, masks, drawn counts)."""
    import sd_35_stepavg_dump

    dumps, masks = (os.path.join(root, "generated", d) for d in ("dumps", "masks"))
    per_prompt = min(SEEDS_PER_PROMPT, n)
    prompts = []
    for seed in eval_seeds(10 * n):  # distinct held-out captions, in a fixed order
        c = render(seed, held_out=None).caption
        if c not in prompts:
            prompts.append(c)
        if len(prompts) == max(1, n // per_prompt):
            break
    pfile = os.path.join(root, "generated", "prompts.txt")
    os.makedirs(os.path.dirname(pfile), exist_ok=True)
    with open(pfile, "w", encoding="utf-8") as fh:
        fh.write("\n".join(prompts) + "\n")
    seeds = [str(s) for s in range(per_prompt)]
    _quiet(sd_35_stepavg_dump.main, ["--model", "toy-shapes", "--prompts-file", pfile, "--seed", *seeds,
                                     "--steps", "20", "--guidance-scale", "4", "--device", "cpu", "--out", dumps])
    counts = {"objects": 0, "with_mask": 0}
    for folder in sorted(os.listdir(dumps)):
        meta_path = os.path.join(dumps, folder, "metadata.json")
        if not os.path.isfile(meta_path):
            continue
        meta = json.load(open(meta_path, encoding="utf-8"))
        image = np.asarray(Image.open(os.path.join(dumps, folder, meta["images"][0])).convert("RGB"))
        labels = hue_labels(image)
        caption = meta["prompt"][0]
        found = []
        for color, _, _, _ in prompt_objects(caption):
            blob = largest_component(labels == HUES.index(color))
            found.append(blob if blob.sum() >= 50 else None)  # a few stray pixels are not an object
        counts["objects"] += len(found)
        counts["with_mask"] += sum(m is not None for m in found)
        _save_word_masks(os.path.join(masks, folder), caption, found)
    return dumps, masks, counts


def by_word_kind(out: str) -> list[dict]:
    """mIoU and mAP of colour words and of shape words, per method and encoder, from the
    evaluation's per-image CSVs."""
    from attention_map_diffusers.models.toy_shapes.data import COLORS, SHAPES

    acc: dict = {}
    folder = os.path.join(out, "per_image")
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), encoding="utf-8") as fh:
            for r in csv.DictReader(fh):
                kind = "color" if r["word"] in COLORS else "shape" if r["word"] in SHAPES else None
                if kind is not None:
                    acc.setdefault((r["method"], r["encoder"], kind), []).append((float(r["iou"]), float(r["ap"])))
    return [{"method": m, "encoder": e, "words": k, "n": len(v), "mIoU": round(float(np.mean([x[0] for x in v])), 6),
             "mAP": round(float(np.mean([x[1] for x in v])), 6)} for (m, e, k), v in sorted(acc.items())]


def evaluate(dumps: str, masks: str, out: str, extra: list[str]) -> dict:
    """evaluate_segmentation.py on one set: its summary.csv rows, and the colour / shape split."""
    import evaluate_segmentation

    _quiet(evaluate_segmentation.main, ["--dumps", dumps, "--masks", masks, "--out", out, "--no-progress", *extra])
    with open(os.path.join(out, "summary.csv"), encoding="utf-8") as fh:
        return {"summary": list(csv.DictReader(fh)), "by_word_kind": by_word_kind(out)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="images per set (default 200)")
    p.add_argument("--out", required=True, help="folder for the data, dumps, evaluations and results.json")
    p.add_argument("--json", default=None, help="results file (default: OUT/results.json)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    results: dict = {"n": args.n, "levels": list(LEVELS)}
    dumps, masks, _ = prepare_rendered(args.out, args.n)
    results["rendered"] = {"all levels": evaluate(dumps, masks, os.path.join(args.out, "eval", "rendered-all"), [])}
    for i, level in enumerate(LEVELS):
        results["rendered"][f"level {level}"] = evaluate(
            dumps, masks, os.path.join(args.out, "eval", f"rendered-{level}"), ["--steps", str(i)])
    num_blocks = json.load(open(os.path.join(dumps, sorted(d for d in os.listdir(dumps) if d[:1].isdigit())[0],
                                             "metadata.json"), encoding="utf-8"))["num_blocks"]
    for b in range(num_blocks):
        results["rendered"][f"block {b}"] = evaluate(
            dumps, masks, os.path.join(args.out, "eval", f"rendered-block{b}"), ["--blocks", str(b)])
    gdumps, gmasks, counts = prepare_generated(args.out, args.n)
    results["generated_masks"] = counts
    results["generated"] = {"all steps": evaluate(gdumps, gmasks, os.path.join(args.out, "eval", "generated"), [])}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    path = args.json or os.path.join(args.out, "results.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1)
    for name, sets in (("rendered", results["rendered"]), ("generated", results["generated"])):
        for selection, res in sets.items():
            print(f"\n{name}, {selection}: mIoU / mAP (%)")
            for r in res["summary"]:
                if r["encoder"] in ("t5", "clip") or r["method"] not in ("whole", "centre", "random"):
                    print(f"  {r['method']:>7} {r['encoder']:>5}  {100 * float(r['mIoU']):5.1f}  {100 * float(r['mAP']):5.1f}")
            for r in res["by_word_kind"]:
                if r["method"] == "daam":
                    print(f"  daam {r['encoder']:>5} {r['words']:>5} words (n={r['n']}): {100 * r['mIoU']:5.1f}  {100 * r['mAP']:5.1f}")
    print(f"\ngenerated: {counts['with_mask']} of {counts['objects']} objects have a colour mask; "
          f"{results['seconds']} s in all; {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
