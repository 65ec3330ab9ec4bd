#!/usr/bin/env python
"""Bytes an analysis writes, per figure kind: where the megabytes of a run go.

Builds a full-size dump of the shapes of ``bench_analysis.py`` (64x64 grid, T = 333, 24 blocks,
50 steps, a 1024x1024 image, per-step and per-block maps kept: every view is drawn) whose numbers
look like real ones to a compressor: maps smooth over the grid with 20 % noise, curves smooth over
the steps (uniform noise, the test dumps' numbers, makes every map and every line a worst case
that no real dump is), and a photograph as its image (matplotlib's sample ``grace_hopper.jpg``,
resized: the synthetic gradient compresses far better than a generated image). It analyses it
with the default options (200 dpi) and prints the files' bytes grouped by kind (word heatmaps,
per-block curves, slider frames, ...), largest first, with the total per run.

    python benchmarks/png_bytes.py                 # full size
    python benchmarks/png_bytes.py --size toy      # a toy-shapes run: 16x16 grid, 4 blocks, 20 steps
    python benchmarks/png_bytes.py --size small    # seconds (the smoke test)
    python benchmarks/png_bytes.py --keep OUT      # keep the analysis to look at the figures
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests"), HERE]

import analyse_stepavg  # noqa: E402
import numpy as np  # noqa: E402
from bench_analysis import PROMPT, SIZES  # noqa: E402

DUMPS = {  # size -> (the dump's shapes, text lengths, prompt)
    "full": (SIZES["full"], (77, 256), PROMPT),
    # the size of a toy-shapes run (python sd_35_stepavg_dump.py --model toy-shapes ... --steps 20 --save-step-maps
    # --save-block-maps): 4 blocks, a 16x16 grid, a 256x256 image, 16 + 16 text positions
    "toy": (dict(num_blocks=4, num_steps=20, grid=(16, 16), image_size=(256, 256)), (16, 16), "a red circle next to a blue square"),
    "small": (SIZES["small"], (77, 256), PROMPT),
}
from synthetic_dump import make_layout, random_arrays, write_dump  # noqa: E402

KINDS = [  # (kind, pattern of the path relative to the analysis folder), first match wins
    ("tables", r"\.csv$"), ("pages", r"\.html$"), ("word heatmaps", r"heatmaps/words/"), ("phrase heatmaps", r"heatmaps/phrases/"), ("curves per block", r"curves/"),
    ("slider frames", r"frames/"), ("strips", r"strips/"), ("summary", r"summary\."), ("overview", r"overview\."),
    ("word grids", r"word_grids\."), ("segmentation", r"segmentation\."), ("token groups", r"token_groups\."),
    ("clip vs t5", r"clip_vs_t5\."), ("word_maps.npz", r"word_maps\.npz$"), ("image copy", r"(^|/)image\.\w+$"),
]
FIGURES = "figures"  # every kind but the copy of the run's image, the tables, the pages and word_maps.npz
NOT_FIGURES = ("image copy", "tables", "pages", "word_maps.npz")


def smooth(rng, shape_low: tuple, out: tuple[int, int], noise: float = 0.2) -> np.ndarray:
    """(..., out_h, out_w, T) positive fields: a (..., h, w, T) random grid upsampled linearly, times 1 +- ``noise``."""
    *lead, h, w, T = shape_low
    low = rng.uniform(0.05, 1.0, shape_low).astype(np.float32) ** 3  # a few hot places per token

    def interp(n_out, n_in):  # (n_out, n_in) linear interpolation weights, pixel centres aligned
        x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.minimum(np.floor(x).astype(int), n_in - 2)
        m = np.zeros((n_out, n_in), np.float32)
        m[np.arange(n_out), i0] = 1 - (x - i0)
        m[np.arange(n_out), i0 + 1] = x - i0
        return m

    field = np.einsum("ij,...jkt,lk->...ilt", interp(out[0], h), low, interp(out[1], w), optimize=True)
    return field * rng.uniform(1 - noise, 1 + noise, field.shape).astype(np.float32)


def build_realistic(folder: str, size: str = "full", seed: int = 0) -> None:
    """The dump described above, into ``folder``."""
    s, (clip_len, t5_len), prompt = DUMPS[size]
    layout = make_layout([prompt], clip_len=clip_len, t5_len=t5_len)
    rng = np.random.default_rng(seed)
    Bk, S, grid = s["num_blocks"], s["num_steps"], tuple(s["grid"])
    arrays = random_arrays(layout, num_blocks=Bk, num_steps=S, grid=grid, seed=seed)
    T = layout.T
    maps = smooth(rng, (1, 6, 6, T), grid)
    arrays["sum_token_map"] = (maps / maps.sum(axis=-1, keepdims=True) * 0.8 * Bk * S).astype(np.float32)
    steps = np.linspace(0, 1, S)[None, None, :, None]
    phase, freq, base = (rng.uniform(0, 2 * np.pi, (1, Bk, 1, T)), rng.uniform(0.3, 1.5, (1, Bk, 1, T)),
                         rng.uniform(0.05, 1.0, (1, Bk, 1, T)) ** 3)
    mean = (base * (1.2 + np.sin(2 * np.pi * freq * steps + phase))).astype(np.float32)
    arrays["per_block_step_token_mean"] = mean / mean.sum(axis=-1, keepdims=True)
    arrays["per_block_step_token_max"] = np.minimum(arrays["per_block_step_token_mean"] * 3, 1).astype(np.float32)
    arrays["per_step_token_map"] = smooth(rng, (1, S, 6, 6, T), grid).astype(np.float16)
    arrays["per_block_token_map"] = smooth(rng, (1, Bk, 6, 6, T), grid).astype(np.float16)
    write_dump(folder, layout, arrays, image_size=s["image_size"], seed=seed)


def use_photo(run: str) -> None:
    """Replace the run's image by a photograph of the same size (matplotlib's sample data)."""
    from matplotlib import cbook
    from PIL import Image

    folder = os.path.join(run, "images")
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        with Image.open(path) as im:
            size = im.size
        with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as photo:
            photo.convert("RGB").resize(size, Image.BICUBIC).save(path)


def bytes_by_kind(folder: str) -> dict[str, tuple[int, int]]:
    """kind -> (files, bytes) of everything under ``folder``."""
    out: dict[str, list[int]] = {}
    for base, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(base, name), folder).replace(os.sep, "/")
            kind = next((k for k, pat in KINDS if re.search(pat, rel)), "other")
            entry = out.setdefault(kind, [0, 0])
            entry[0] += 1
            entry[1] += os.path.getsize(os.path.join(base, name))
    return {k: (n, b) for k, (n, b) in sorted(out.items(), key=lambda kv: -kv[1][1])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=tuple(DUMPS), default="full",
                   help="the dump's size: full (SD3.5 at 1024x1024), toy (a toy-shapes run) or small (seconds); default: full")
    p.add_argument("--keep", default=None, help="analyse into this folder and keep it (default: a temporary folder)")
    p.add_argument("--gradient", action="store_true", help="keep the synthetic dump's gradient image instead of the photograph")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("flags", nargs="*", help="further flags for analyse_stepavg.py (after --), e.g. -- --dpi 100")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        build_realistic(run, args.size)
        if not args.gradient:
            use_photo(run)
        out = args.keep or os.path.join(tmp, "analysis")
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            code = analyse_stepavg.main(["--root", run, "--out", out, *args.flags])
        if code:
            print(f"analyse_stepavg.py failed with exit code {code}", file=sys.stderr)
            return code
        kinds = bytes_by_kind(out)
    total = sum(b for _, b in kinds.values())
    figures = sum(b for k, (_, b) in kinds.items() if k not in NOT_FIGURES)
    print(f"{'kind':<18} {'files':>6} {'bytes':>12} {'share':>6}")
    for kind, (n, b) in kinds.items():
        print(f"{kind:<18} {n:>6} {b:>12,} {b / total:>6.1%}")
    print(f"{'figures':<18} {sum(n for k, (n, _) in kinds.items() if k not in NOT_FIGURES):>6} {figures:>12,}")
    print(f"{'total (one run)':<18} {sum(n for n, _ in kinds.values()):>6} {total:>12,}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"total": total, "figures": figures, "kinds": {k: {"files": n, "bytes": b} for k, (n, b) in kinds.items()}},
                      fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
