#!/usr/bin/env python
"""Time ``analyse_stepavg.py`` on a synthetic full-size dump: every view, tables only, and 8 runs with aggregation.

The dump: B=1, a 64x64 canonical grid, T=333 (77 CLIP + 256 T5 positions), 24 blocks, 50 steps,
float16 like the dump command's default, with a 1024x1024 image; both encoders, default top-k.
It also keeps per-step and per-block maps (--save-step-maps --save-block-maps), so that every view
is drawn (strips and slider frames included). The "8 runs" mode analyses a runs.jsonl of 8 such
runs (without per-step / per-block maps): 2 prompts x 4 seeds, aggregated per prompt.
Each repeat runs every mode (order alternating between repeats) in-process via ``main([...])``
into a temporary folder, after one warm-up of each. Prints medians and min-max.

With ``--baseline DIR`` (another checkout of this repository, e.g. ``git worktree add /tmp/base
<commit>``), each mode is run by both checkouts' ``analyse_stepavg.py`` as subprocesses, interleaved
round by round, and the ratio this / baseline is printed per mode (the median of the rounds'
ratios): on a machine whose speed drifts, a ratio of neighbouring runs is the number to trust.

    python benchmarks/bench_analysis.py --repeats 5 --json bench.json
    python benchmarks/bench_analysis.py --modes runs8_aggregated --baseline /tmp/base --repeats 3
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), HERE]

import analyse_stepavg  # noqa: E402
import numpy as np  # noqa: E402
from synthetic_dump import make_layout, random_arrays, write_dump, write_runs  # noqa: E402
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


SECOND_PROMPT = "A red fox asleep in the snow under a pine tree, soft morning light, photograph"


def build_dump(folder: str, size: str = "full", *, frames: bool = True, prompt: str = PROMPT, seed: int = 0) -> None:
    s = SIZES[size]
    layout = make_layout([prompt], clip_len=77, t5_len=256)
    arrays = random_arrays(layout, num_blocks=s["num_blocks"], num_steps=s["num_steps"], grid=s["grid"], seed=seed)
    if frames:
        rng = np.random.default_rng(seed)
        grid = tuple(s["grid"])
        arrays["per_step_token_map"] = rng.uniform(0.0, 1.0, (1, s["num_steps"], *grid, layout.T)).astype(np.float16)
        arrays["per_block_token_map"] = rng.uniform(0.0, 1.0, (1, s["num_blocks"], *grid, layout.T)).astype(np.float16)
    write_dump(folder, layout, arrays, image_size=s["image_size"], seed=seed)


def build_runs(root: str, size: str = "full", n: int = 8) -> None:
    """``n`` runs of two prompts (n / 2 seeds each) and their runs.jsonl."""
    records = []
    for k in range(n):
        prompt = PROMPT if k % 2 == 0 else SECOND_PROMPT
        folder = f"{k:04d}-s{k // 2}"
        build_dump(os.path.join(root, folder), size, frames=False, prompt=prompt, seed=k // 2)
        records.append({"run": k, "folder": folder, "prompt": [prompt], "seed": k // 2, "status": "done"})
    write_runs(root, records)


def run(dump: str, out: str, extra: list[str]) -> float:
    sink = io.StringIO()
    t0 = time.perf_counter()
    with redirect_stdout(sink), redirect_stderr(sink):
        rc = analyse_stepavg.main(["--root", dump, "--out", out, *extra])
    elapsed = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"analyse_stepavg.main returned {rc}:\n{sink.getvalue()}")
    return elapsed


def run_script(script: str, root: str, out: str, extra: list[str]) -> float:
    """Wall seconds of ``python script --root root --out out extra`` (interpreter start included)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, script, "--root", root, "--out", out, *extra], capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{script} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return elapsed


def ratios(times: dict[str, list[float]], modes, suffix: str) -> dict[str, float]:
    """Per mode, the median over rounds of (this checkout's time / the baseline's time in the same round)."""
    return {m: median([a / b for a, b in zip(times[m], times[m + suffix])]) for m in modes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each mode (default: 3)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--size", choices=sorted(SIZES), default="full", help="dump size (default: full)")
    p.add_argument("--modes", default="with_plots,tables_only,runs8_aggregated",
                   help="comma-separated modes to time (default: all three)")
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="another checkout of this repository: time both, as subprocesses, and print this / baseline")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    p_modes = ["with_plots", "tables_only", "runs8_aggregated"]
    unknown = [m for m in args.modes if m not in p_modes]
    if unknown or not args.modes:
        p.error(f"--modes: unknown mode(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(p_modes)}")
    base_script = None
    if args.baseline is not None:
        base_script = os.path.join(os.path.abspath(args.baseline), "analyse_stepavg.py")
        if not os.path.isfile(base_script):
            p.error(f"--baseline: no analyse_stepavg.py in {args.baseline}; give a checkout of this repository")
    suffix = " @baseline"
    with tempfile.TemporaryDirectory() as tmp:
        dump = os.path.join(tmp, "run")
        build_dump(dump, args.size)
        runs = os.path.join(tmp, "runs")
        build_runs(runs, args.size)
        counter = itertools.count()
        modes = {"with_plots": (dump, []), "tables_only": (dump, ["--tables-only"]), "runs8_aggregated": (runs, [])}
        modes = {m: modes[m] for m in p_modes if m in args.modes}

        def method(root, extra):
            return lambda: run(root, os.path.join(tmp, f"out-{next(counter)}"), extra)

        if base_script is not None:
            this_script = os.path.join(ROOT, "analyse_stepavg.py")
            pairs = {}
            for m, (root, extra) in modes.items():
                pairs[m] = (lambda r=root, e=extra: run_script(this_script, r, os.path.join(tmp, f"out-{next(counter)}"), e))
                pairs[m + suffix] = (lambda r=root, e=extra: run_script(base_script, r, os.path.join(tmp, f"out-{next(counter)}"), e))
            times = interleaved(pairs, args.repeats, warmup=1)
            modes = {}  # nothing more to time
        else:
            times = {}
        # warm-up: imports, font cache, page cache (the single-run modes warm up the 8 runs too: same code)
        single = {m: method(*v) for m, v in modes.items() if m != "runs8_aggregated"}
        if single:
            times.update(interleaved(single, args.repeats, warmup=1))
        if "runs8_aggregated" in modes:
            times.update(interleaved({"runs8_aggregated": method(*modes["runs8_aggregated"])}, args.repeats,
                                     warmup=0 if single else 1))
    sz = SIZES[args.size]
    print(f"B=1, {sz['grid'][0]}x{sz['grid'][1]}, T=333, {sz['num_blocks']} blocks, {sz['num_steps']} steps, "
          "both encoders, top-k 12, every view (per-step and per-block maps kept); 8 runs: 2 prompts x 4 seeds")
    print(table(times))
    ratio = ratios(times, [m for m in args.modes if m + suffix in times], suffix) if base_script else {}
    for m, r in ratio.items():
        print(f"{m}: this checkout / baseline ({args.baseline}) = {r:.3f} (median of {args.repeats} rounds' ratios)")
    if args.json:
        result = {
            **{f"seconds_{m}": median(t) for m, t in times.items()},
            **{f"ratio_{m}": r for m, r in ratio.items()},
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
