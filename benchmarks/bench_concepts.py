#!/usr/bin/env python
"""What ConceptAttention maps cost: stock diffusers, the recorder, and the recorder with concepts,
side by side on a random-weight pipeline (the presets and machinery of bench_capture.py).

  stock      the pipeline alone
  capture    StepAverageRecorder(pipe) (method "auto": the path that passes its check)
  concepts   StepAverageRecorder(pipe, concepts=ConceptOptions(<--concepts words>)) on the same path

Each method runs the same pipeline call (latents out, no VAE decode) with the same seed; warm-up,
then the methods interleaved within each repeat; medians, min-max, the ratio to stock, peak memory
above the starting level (CUDA allocator, or process RSS on Linux), and whether the latents equal
stock's bit for bit.

    python benchmarks/bench_concepts.py --preset cpu-small            # SD3 shapes, 2 CPU cores: ~2 min
    python benchmarks/bench_concepts.py --preset flux-small           # FLUX.1 shapes scaled down
    python benchmarks/bench_concepts.py --preset flux-dev --concepts 16   # on a GPU
    python benchmarks/bench_concepts.py --preset cpu-small --dtype bfloat16   # the float32 concept
                                                       # stream of a half-precision model, on the CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import replace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import torch  # noqa: E402

from attention_map_diffusers import StepAverageRecorder  # noqa: E402
from attention_map_diffusers.capture.concepts import ConceptOptions  # noqa: E402
from attention_map_diffusers.capture.paths import KernelPaths  # noqa: E402
from bench_capture import PRESETS, build, pipeline_call, time_and_peaks  # noqa: E402
from timing import median  # noqa: E402

WORDS = ("cat", "table", "sky", "background", "barn", "bicycle", "tree", "road", "dog", "house", "grass", "water",
         "car", "person", "cloud", "field")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small", help="model size and device")
    p.add_argument("--concepts", type=int, default=8, help=f"number of concepts (1..{len(WORDS)})")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per call (default: the preset's)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per method (default: the preset's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed seconds; cpu: this process's CPU seconds (steadier than the wall clock on a "
                   "shared machine; use with --threads 1, where CPU time is the work done)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="the pipeline's dtype (default: the preset's: float32 on the CPU presets, bfloat16 on the GPU "
                   "ones); the concept stream computes in float32 whatever it is")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON to PATH")
    args = p.parse_args(argv)
    if not 1 <= args.concepts <= len(WORDS):
        p.error(f"--concepts must lie in 1..{len(WORDS)}, got {args.concepts}")
    preset = PRESETS[args.preset]
    preset = replace(preset, steps=args.steps or preset.steps, repeats=args.repeats or preset.repeats,
                     dtype=getattr(torch, args.dtype) if args.dtype else preset.dtype)
    if preset.device == "cuda" and not torch.cuda.is_available():
        p.error(f"--preset {args.preset} needs a CUDA GPU")

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    torch.manual_seed(0)
    pipe = build(preset)
    options = ConceptOptions(WORDS[: args.concepts], max_sequence_length=preset.max_sequence_length)
    paths = KernelPaths()
    info: dict = {}

    def sync():
        if preset.device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn):
        def run():
            gc.collect()
            sync()
            t0 = clock()
            fn()
            sync()
            return clock() - t0
        return run

    def stock():
        info["latents_stock"] = pipeline_call(pipe, preset, preset.steps)

    def recorder(name, concepts):
        def run():
            with StepAverageRecorder(pipe, paths=paths, concepts=concepts) as rec:
                info[f"latents_{name}"] = pipeline_call(pipe, preset, preset.steps)
            res = rec.result()
            info[f"state_bytes_{name}"] = res.state_bytes
            info[f"path_{name}"] = res.capture_path
        return run

    methods = {"stock": timed(stock), "capture": timed(recorder("capture", None)),
               "concepts": timed(recorder("concepts", options))}
    with torch.no_grad():
        times, peaks = time_and_peaks(methods, preset.repeats, preset.device)

    m = {k: median(v) for k, v in times.items()}
    same = {n: bool(torch.equal(info["latents_stock"], info[f"latents_{n}"])) for n in ("capture", "concepts")}
    print(f"preset {args.preset}: {preset.size}px, {preset.steps} steps, {preset.repeats} repeats, "
          f"{args.concepts} concepts, {preset.device} {str(preset.dtype).replace('torch.', '')}, "
          f"{torch.get_num_threads()} thread(s), {args.clock} clock; "
          f"path {info.get('path_capture')}")
    print(f"{'method':<10}{'median s':>10}{'min':>9}{'max':>9}{'vs stock':>10}{'peak MiB':>10}  identical")
    for name, t in times.items():
        peak = "-" if peaks[name] is None else f"{peaks[name] / 2**20:.1f}"
        ident = {True: "yes", False: "NO"}.get(same.get(name), "-")
        print(f"{name:<10}{m[name]:>10.3f}{min(t):>9.3f}{max(t):>9.3f}{m[name] / m['stock']:>10.3f}{peak:>10}  {ident}")
    ratio = m["concepts"] / m["stock"]
    print(f"concepts / stock = {ratio:.3f} (target <= 1.15); concepts / capture = {m['concepts'] / m['capture']:.3f}; "
          f"concept state {(info['state_bytes_concepts'] - info['state_bytes_capture']) / 2**10:.1f} KiB")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"preset": args.preset, "concepts": args.concepts, "clock": args.clock,
                       "dtype": str(preset.dtype).replace("torch.", ""),
                       "threads": torch.get_num_threads(), "steps": preset.steps,
                       "repeats": preset.repeats, "times_s": times, "median_s": m,
                       "ratio_to_stock": {k: v / m["stock"] for k, v in m.items()},
                       "peak_bytes": peaks, "identical_to_stock": same,
                       "state_bytes": {k: info[f"state_bytes_{k}"] for k in ("capture", "concepts")}}, fh, indent=1)
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
