#!/usr/bin/env python
"""Regenerate the README's example pictures and table from one dump run.

    python assets/make_assets.py                                    # --model toy-shapes (trained here, CPU)
    python assets/make_assets.py --model tiny-random --size 512 --steps 10 --prompt "A rusty bicycle in front of a barn" --word bicycle --phrases "in front of|a barn"

Runs the dump (with per-step and per-block maps, so that every view is drawn) and the analysis into
a temporary folder and copies a few outputs here. The default model is toy-shapes, the small SD3
trained in this repository on flat coloured shapes (attention_map_diffusers/models/toy_shapes): its
T5 colour words find their objects, so the pictures mean something about *that* model, not about
SD3.5. With ``--model tiny-random`` the weights are random: the pictures only show the layout (every
figure says so in its footer).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import analyse_stepavg  # noqa: E402
import sd_35_stepavg_dump  # noqa: E402

PROMPT = "a red circle next to a blue square"


def picks(encoder: str, word: str) -> dict[str, str]:
    """analysis output (relative to the analysis folder; glob patterns allowed) -> file in assets/"""
    return {
        f"{encoder}/summary.png": "example_summary.png",
        f"{encoder}/heatmaps/words/[0-9][0-9][0-9]-{word}.png": "example_heatmap_word.png",
        f"{encoder}/curves/words_mean_block2.png": "example_curves_block2.png",
        f"{encoder}/overview.png": "example_overview.png",
        f"{encoder}/word_grids.png": "example_word_grids.png",
        f"{encoder}/segmentation.png": "example_segmentation.png",
        f"{encoder}/token_groups.png": "example_token_groups.png",
        f"{encoder}/strips/steps.png": "example_strip_steps.png",
        "clip_vs_t5.png": "example_clip_vs_t5.png",
        f"{encoder}/tables/words_summary.csv": "example_words_summary.csv",
        f"{encoder}/tables/words_auc.csv": "example_words_auc.csv",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy-shapes", help="the dump's --model (default: toy-shapes)")
    p.add_argument("--prompt", default=PROMPT, help=f"the prompt (default: {PROMPT!r})")
    p.add_argument("--seed", default="42", help="the dump's --seed (default: 42)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20, toy-shapes' own)")
    p.add_argument("--guidance-scale", type=float, default=4.0, help="CFG scale (default: 4, toy-shapes' own)")
    p.add_argument("--size", type=int, default=None, help="image height and width (default: the model's native size)")
    p.add_argument("--encoder", default="t5", help="encoder whose pictures are copied (default: t5)")
    p.add_argument("--word", default="red", help="the word whose heatmap is copied (default: red)")
    p.add_argument("--phrases", default="red circle|blue square", help="the analysis' --phrases")
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep", default=None, metavar="DIR", help="also keep the whole run and its analysis in DIR")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        size = ["--height", str(args.size), "--width", str(args.size)] if args.size else []
        code = sd_35_stepavg_dump.main(["--model", args.model, "--device", args.device, "--prompt", args.prompt,
                                        "--seed", args.seed, "--steps", str(args.steps), "--guidance-scale",
                                        str(args.guidance_scale), *size, "--save-step-maps", "--save-block-maps",
                                        "--out", run])
        if code:
            return code
        code = analyse_stepavg.main(["--root", run, "--phrases", args.phrases, "--topk", "8"])
        if code:
            return code
        for src, dst in picks(args.encoder, args.word).items():
            found = sorted(glob.glob(os.path.join(run, "analysis", src)))
            if found:
                shutil.copyfile(found[0], os.path.join(HERE, dst))
                print(f"assets/{dst}")
            else:
                print(f"warning: {src} was not written; assets/{dst} left as it was", file=sys.stderr)
        if args.keep:
            shutil.copytree(run, args.keep, dirs_exist_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
