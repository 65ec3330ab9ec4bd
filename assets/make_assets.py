#!/usr/bin/env python
"""Regenerate the README's example pictures and table from one dump run.

    python assets/make_assets.py                                   # --model tiny-random (random weights, CPU)
    python assets/make_assets.py --model path/to/trained-toy-model --steps 20

Runs the dump (with per-step and per-block maps, so that every view is drawn) and the analysis into
a temporary folder and copies a few outputs here. With ``--model tiny-random`` (the default) the
pictures show the layout of what the tools write, NOT SD3.5 results: the weights are random, so the
image is noise and the maps mean nothing (every figure says so in its footer).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import analyse_stepavg  # noqa: E402
import sd_35_stepavg_dump  # noqa: E402

PROMPT = "A rusty bicycle in front of a barn"
# analysis output (relative to the analysis folder) -> file in assets/
PICKS = {
    "clip/summary.png": "example_summary.png",
    "clip/heatmaps/words/002-bicycle.png": "example_heatmap_bicycle.png",
    "clip/curves/words_mean_block2.png": "example_curves_block2.png",
    "clip/overview.png": "example_overview.png",
    "clip/word_grids.png": "example_word_grids.png",
    "clip/segmentation.png": "example_segmentation.png",
    "clip/token_groups.png": "example_token_groups.png",
    "clip/strips/steps.png": "example_strip_steps.png",
    "clip_vs_t5.png": "example_clip_vs_t5.png",
    "clip/tables/words_summary.csv": "example_words_summary.csv",
    "clip/tables/words_auc.csv": "example_words_auc.csv",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-random", help="the dump's --model (default: tiny-random)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=512, help="image height and width (default: 512)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep", default=None, metavar="DIR", help="also keep the whole run and its analysis in DIR")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        code = sd_35_stepavg_dump.main(["--model", args.model, "--device", args.device, "--prompt", args.prompt,
                                        "--seed", "42", "--steps", str(args.steps), "--height", str(args.size),
                                        "--width", str(args.size), "--save-step-maps", "--save-block-maps", "--out", run])
        if code:
            return code
        code = analyse_stepavg.main(["--root", run, "--phrases", "in front of|a barn", "--topk", "8"])
        if code:
            return code
        for src, dst in PICKS.items():
            path = os.path.join(run, "analysis", src)
            if os.path.exists(path):
                shutil.copyfile(path, os.path.join(HERE, dst))
                print(f"assets/{dst}")
        if args.keep:
            shutil.copytree(run, args.keep, dirs_exist_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
