#!/usr/bin/env python
"""Time ``analyse_stepavg.py`` on a synthetic full-size dump, with and without figures.

The dump: B=1, a 64x64 canonical grid, T=333 (77 CLIP + 256 T5 positions), 24 blocks, 50 steps,
float16 like the dump command's default, with a 1024x1024 image; both encoders, default top-k.
Each repeat runs both modes (order alternating between repeats) in-process via ``main([...])``
into a temporary folder, after one warm-up of each. Prints medians and min-max.

    python benchmarks/bench_analysis.py --repeats 5 --json bench.json
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), HERE]

import analyse_stepavg  # noqa: E402
from synthetic_dump import make_layout, random_arrays, write_dump  # noqa: E402
from timing import interleaved, median, table  # noqa: E402

PROMPT = (
    "A rusty bicycle in front of a barn, leaning against a weathered wooden fence at golden hour, "
    "wildflowers in the foreground, soft clouds over distant hills, cinematic lighting, highly detailed photograph"
)


SIZES = {
    # the full-size dump: SD3.5 medium at 1024x1024, 50 steps, max_sequence_length 256
    "full": dict(num_blocks=24, num_steps=50, grid=(64, 64), image_size=(1024, 1024)),
    # seconds-long, for the smoke test that keeps this script from rotting
    "small": dict(num_blocks=3, num_steps=4, grid=(16, 16), image_size=(128, 128)),
}


def build_dump(folder: str, size: str = "full") -> None:
    s = SIZES[size]
    layout = make_layout([PROMPT], clip_len=77, t5_len=256)
    arrays = random_arrays(layout, num_blocks=s["num_blocks"], num_steps=s["num_steps"], grid=s["grid"], seed=0)
    write_dump(folder, layout, arrays, image_size=s["image_size"])


def run(dump: str, out: str, extra: list[str]) -> float:
    sink = io.StringIO()
    t0 = time.perf_counter()
    with redirect_stdout(sink), redirect_stderr(sink):
        rc = analyse_stepavg.main(["--root", dump, "--out", out, *extra])
    elapsed = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"analyse_stepavg.main returned {rc}:\n{sink.getvalue()}")
    return elapsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each mode (default: 3)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--size", choices=sorted(SIZES), default="full", help="dump size (default: full)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    modes = {"with_plots": [], "tables_only": ["--tables-only"]}
    with tempfile.TemporaryDirectory() as tmp:
        dump = os.path.join(tmp, "run")
        build_dump(dump, args.size)
        counter = itertools.count()

        def method(extra):
            return lambda: run(dump, os.path.join(tmp, f"out-{next(counter)}"), extra)

        # warm-up: imports, font cache, page cache
        times = interleaved({m: method(extra) for m, extra in modes.items()}, args.repeats, warmup=1)
    sz = SIZES[args.size]
    print(f"B=1, {sz['grid'][0]}x{sz['grid'][1]}, T=333, {sz['num_blocks']} blocks, {sz['num_steps']} steps, "
          "both encoders, top-k 12")
    print(table(times))
    if args.json:
        result = {
            "seconds_with_plots": median(times["with_plots"]),
            "seconds_tables_only": median(times["tables_only"]),
            "runs": times,
            "repeats": args.repeats,
            "size": args.size,
            "cpu_count": os.cpu_count(),
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
