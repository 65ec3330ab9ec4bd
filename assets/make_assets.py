#!/usr/bin/env python
"""Regenerate the README's example pictures and table from a ``--model tiny-random`` run.

    python assets/make_assets.py

Runs the dump (random weights, CPU, ~10 s) and the analysis into a temporary folder and copies a few
outputs here. The pictures show the layout of what the tools write, NOT SD3.5 results: the weights
are random, so the image is noise and the maps mean nothing.
"""

from __future__ import annotations

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
    "clip/tables/words_summary.csv": "example_words_summary.csv",
    "clip/tables/words_auc.csv": "example_words_auc.csv",
}


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        code = sd_35_stepavg_dump.main(["--model", "tiny-random", "--device", "cpu", "--prompt", PROMPT,
                                        "--seed", "42", "--steps", "10", "--height", "512", "--width", "512",
                                        "--out", run])
        if code:
            return code
        code = analyse_stepavg.main(["--root", run, "--phrases", "in front of|a barn", "--topk", "8"])
        if code:
            return code
        for src, dst in PICKS.items():
            shutil.copyfile(os.path.join(run, "analysis", src), os.path.join(HERE, dst))
            print(f"assets/{dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
