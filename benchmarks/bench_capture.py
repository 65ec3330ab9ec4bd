#!/usr/bin/env python
"""Capture cost side by side: stock diffusers, our streaming recorder on each lse path, and the
full-matrix approach of attention-map-diffusers, on a random-weight SD3-family pipeline.

Each method runs the same pipeline call (text encoders, then a denoising loop of --steps steps with
classifier-free guidance, i.e. transformer calls with batch 2; latents out, no VAE decode), with the
same seed. Each recorder path is first probed (one 1-step call: its self-check runs there, once, on a
KernelPaths shared by all timed calls; a forced path that fails its check is reported, not timed).
Warm-up, then the methods interleaved within each repeat; medians, min-max and the ratio to stock.

  stock       diffusers' JointAttnProcessor2_0, nothing recorded
  kernel      StepAverageRecorder(method="kernel-lse"): lse from the kernel SDPA picks (path a)
  side        StepAverageRecorder(method="side-lse"): SDPA, plus a side call for the lse of the
              image rows (path b)
  chunked     StepAverageRecorder(method="chunked"): lse computed exactly on the side (path c)
  fullmatrix  explicit softmax over the whole joint sequence in the pipeline dtype, and every
              step x block x head image->text map copied to the host, as attention-map-diffusers
              does (reproduced here, in the benchmark, as the baseline)

method="auto" runs whichever of those passes its check first; "capture" in the figures is that path.
--kernel-report first prints, for the preset's attention shape, what SDPA picks under each backend
restriction and dtype, and the path and self-check verdicts the capture gets there.

    python benchmarks/bench_capture.py --preset cpu-small            # ~1-2 min on 2 CPU cores
    python benchmarks/bench_capture.py --preset cpu-small-4096       # 4096 image tokens
    python benchmarks/bench_capture.py --preset sd35-medium --kernel-report --json m.json   # on a GPU
    python benchmarks/bench_capture.py --preset flux-small           # FLUX.1 shapes scaled down, CPU
    python benchmarks/bench_capture.py --preset flux-dev --skip-fullmatrix   # FLUX.1-dev shapes, GPU

FLUX.1 presets: no CFG batch (the guidance embedding, batch 1), joint then single blocks, text first;
the full-matrix baseline is SD3's joint processor and is not run for them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, replace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attention_map_diffusers import StepAverageRecorder  # noqa: E402
from attention_map_diffusers.capture.blocks import joint_attention_blocks  # noqa: E402
from attention_map_diffusers.capture.kernels import backend_name, sdpa_backend  # noqa: E402
from attention_map_diffusers.capture.paths import KernelPaths  # noqa: E402
from attention_map_diffusers.models.tiny import TinySD3Config, build_tiny_sd3_pipeline  # noqa: E402
from attention_map_diffusers.models.tiny_flux import TinyFluxConfig, build_tiny_flux_pipeline  # noqa: E402
from timing import interleaved, median  # noqa: E402

PROMPT = "A rusty bicycle in front of a barn, golden hour, detailed photograph"


@dataclass(frozen=True)
class Preset:
    model: "TinySD3Config | TinyFluxConfig"
    size: int  # image height = width in pixels
    steps: int
    repeats: int
    device: str
    dtype: torch.dtype
    max_sequence_length: int = 256  # T = 77 + 256 = 333, the pipeline default
    guidance_scale: float = 5.0  # SD3: CFG (batch 2); FLUX.1-dev: the guidance embedding (batch 1)

    @property
    def flux(self) -> bool:
        return isinstance(self.model, TinyFluxConfig)


_CPU_MODEL = TinySD3Config(
    num_layers=4, num_attention_heads=8, attention_head_dim=64, latent_channels=16,
    vae_block_out_channels=(8, 8, 16, 16), t5_d_model=64, qk_gain=1.0,
)
# The real transformers' shapes (layers, heads x head dim, MMDiT-X dual-attention blocks, qk-norm,
# 16 latent channels, 4096-wide text embeddings); tiny text encoders and VAE (not timed apart: they
# are the same for every method).
_SD35_MEDIUM = TinySD3Config(
    num_layers=24, num_attention_heads=24, attention_head_dim=64, dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm", latent_channels=16, vae_block_out_channels=(8, 8, 16, 16), t5_d_model=4096,
    t5_layers=1, clip_hidden_size=64, pos_embed_max_size=384, qk_gain=1.0,
)
_SD35_LARGE = replace(_SD35_MEDIUM, num_layers=38, num_attention_heads=38, dual_attention_layers=(), pos_embed_max_size=192)

# FLUX.1-dev's transformer: 19 joint + 38 single blocks, 24 heads x 128, RoPE axes (16, 56, 56),
# 4096-wide T5 embeddings, 768-wide pooled CLIP, 16 latent channels; tiny text encoders and VAE.
_FLUX_DEV = TinyFluxConfig(
    num_layers=19, num_single_layers=38, num_attention_heads=24, attention_head_dim=128,
    axes_dims_rope=(16, 56, 56), t5_d_model=4096, t5_layers=1, clip_hidden_size=768, clip_layers=1, qk_gain=1.0,
)
# scaled down for a CPU: the shapes of cpu-small (8 heads x 64), 2 joint + 4 single blocks
_FLUX_SMALL = TinyFluxConfig(
    num_layers=2, num_single_layers=4, num_attention_heads=8, attention_head_dim=64, axes_dims_rope=(8, 28, 28),
    t5_d_model=64, qk_gain=1.0,
)

PRESETS = {
    "cpu-small": Preset(_CPU_MODEL, size=512, steps=3, repeats=5, device="cpu", dtype=torch.float32),
    "cpu-small-4096": Preset(_CPU_MODEL, size=1024, steps=2, repeats=3, device="cpu", dtype=torch.float32),
    "sd35-medium": Preset(_SD35_MEDIUM, size=1024, steps=8, repeats=3, device="cuda", dtype=torch.bfloat16),
    "sd35-large": Preset(_SD35_LARGE, size=1024, steps=8, repeats=3, device="cuda", dtype=torch.bfloat16),
    "flux-small": Preset(_FLUX_SMALL, size=512, steps=3, repeats=5, device="cpu", dtype=torch.float32,
                         guidance_scale=3.5),
    "flux-dev": Preset(_FLUX_DEV, size=1024, steps=8, repeats=3, device="cuda", dtype=torch.bfloat16,
                       max_sequence_length=512, guidance_scale=3.5),
    "flux-toy": Preset(TinyFluxConfig(), size=64, steps=2, repeats=1, device="cpu", dtype=torch.float32,
                       max_sequence_length=16, guidance_scale=3.5),
    # a seconds-long size for the smoke test that keeps this script from rotting
    "toy": Preset(TinySD3Config(), size=64, steps=2, repeats=1, device="cpu", dtype=torch.float32,
                  max_sequence_length=16),
}


class FullMatrixJointProcessor:
    """Baseline (c): the joint attention with an explicit softmax over all L = N + T keys in the
    pipeline dtype, keeping every image->text map per head on the host (attention-map-diffusers)."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        B, N, _ = hidden_states.shape
        heads = attn.heads

        def split(x):
            return x.view(B, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        cq = split(attn.add_q_proj(encoder_hidden_states))
        ck = split(attn.add_k_proj(encoder_hidden_states))
        cv = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
        # (B, heads, N, T) in the pipeline dtype; a copy, so that the full matrix itself is freed
        self.store.append(probs[:, :, :N, N:].to("cpu", copy=True))
        out = torch.matmul(probs, v).transpose(1, 2).reshape(B, -1, heads * q.shape[-1]).to(q.dtype)
        hidden, context = out[:, :N], out[:, N:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        hidden = attn.to_out[1](attn.to_out[0](hidden))
        return hidden, context


# -- memory -------------------------------------------------------------------------------------------


def capture_state_bytes(B, Hc, Wc, T, blocks, steps, stats_bytes) -> int:
    """The recorder's persistent state: float32 sum map, per-(block, step) mean and max, timesteps."""
    return B * Hc * Wc * T * 4 + 2 * B * blocks * steps * T * stats_bytes + steps * 4


def fullmatrix_host_bytes(steps, blocks, batch_total, heads, N, T, dtype_bytes) -> int:
    """Every step x block x head image->text map of the whole CFG batch, in the pipeline dtype."""
    return steps * blocks * batch_total * heads * N * T * dtype_bytes


def projections() -> dict:
    """Computed (not allocated) sizes for the real models at 1024x1024, 50 steps, T = 333, CFG."""
    grid, T, S = 64, 333, 50
    out = {}
    for name, blocks, heads in (("sd35_large", 38, 38), ("sd35_medium", 24, 24)):
        out[f"capture_state_bytes_{name}_1024_50"] = capture_state_bytes(1, grid, grid, T, blocks, S, 2)
        out[f"capture_state_bytes_{name}_1024_50_float32_stats"] = capture_state_bytes(1, grid, grid, T, blocks, S, 4)
        out[f"fullmatrix_host_bytes_{name}_1024_50"] = fullmatrix_host_bytes(S, blocks, 2, heads, grid * grid, T, 2)
    # FLUX.1-dev at 1024x1024, 28 steps: 19 + 38 blocks, T = 512 (T5 only), no CFG batch (batch 1)
    blocks, T, S = 19 + 38, 512, 28
    out["capture_state_bytes_flux_dev_1024_28"] = capture_state_bytes(1, grid, grid, T, blocks, S, 2)
    out["capture_state_bytes_flux_dev_1024_28_float32_stats"] = capture_state_bytes(1, grid, grid, T, blocks, S, 4)
    out["fullmatrix_host_bytes_flux_dev_1024_28"] = fullmatrix_host_bytes(S, blocks, 1, 24, grid * grid, T, 2)
    return out


class PeakMemory:
    """Peak memory above the starting level over a block: CUDA allocator on a GPU, else process RSS
    (Linux: VmHWM, reset through /proc/self/clear_refs; elsewhere None)."""

    def __init__(self, device: str):
        self.device = device
        self.peak = None

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self._rss("VmRSS")
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        elif self.start is not None:
            hwm = self._rss("VmHWM")
            self.peak = None if hwm is None else max(0, hwm - self.start)

    @staticmethod
    def _rss(field):
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None


# -- the benchmark ------------------------------------------------------------------------------------


def time_and_peaks(methods: dict, repeats: int, device: str) -> tuple[dict[str, list[float]], dict]:
    """The methods timed side by side (:func:`timing.interleaved`, one warm-up), then each run once
    more under :class:`PeakMemory`: (seconds per method, peak bytes above the start per method)."""
    times = interleaved(methods, repeats, warmup=1)
    peaks = {}
    for name, fn in methods.items():
        with PeakMemory(device) as pm:
            fn()
        peaks[name] = pm.peak
    return times, peaks


def build(preset: Preset):
    # random init straight on the device: an SD3.5-large-sized transformer takes minutes on a CPU
    with torch.device(preset.device):
        pipe = (build_tiny_flux_pipeline if preset.flux else build_tiny_sd3_pipeline)(preset.model)
    pipe = pipe.to(preset.device, preset.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# recorder method per timed path; "capture" is method="auto", timed as the path it takes
PATHS = {"kernel": "kernel-lse", "side": "side-lse", "chunked": "chunked"}


def pipeline_call(pipe, preset: Preset, steps: int):
    g = torch.Generator(device=preset.device).manual_seed(0)
    return pipe(PROMPT, num_inference_steps=steps, height=preset.size, width=preset.size,
                guidance_scale=preset.guidance_scale,
                max_sequence_length=preset.max_sequence_length, generator=g, output_type="latent").images


def probe_paths(pipe, preset: Preset, paths: KernelPaths, names) -> dict:
    """One 1-step recording per method (its self-check runs here, once): the path it took, or why not."""
    probes = {}
    for name in ["capture", *names]:
        method = "auto" if name == "capture" else PATHS[name]
        try:
            with StepAverageRecorder(pipe, method=method, paths=paths) as rec:
                pipeline_call(pipe, preset, 1)
        except RuntimeError as exc:  # a forced path that fails its check here
            probes[name] = {"method": method, "path": None, "available": False, "reason": str(exc)}
            continue
        res = rec.result()
        probes[name] = {"method": method, "path": res.capture_path, "available": True,
                        "reason": res.capture_verdicts[-1]["reason"]}
    return probes


def make_methods(pipe, preset: Preset, info: dict, paths: KernelPaths, names):
    device = preset.device

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn):
        def run():
            gc.collect()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            return time.perf_counter() - t0
        return run

    def stock():
        info["latents_stock"] = pipeline_call(pipe, preset, preset.steps)

    def recorder(name):
        def run():
            with StepAverageRecorder(pipe, method=PATHS[name], paths=paths) as rec:
                info[f"latents_{name}"] = pipeline_call(pipe, preset, preset.steps)
            res = rec.result()  # includes the one host copy at the end
            info[f"state_bytes_{name}"] = res.state_bytes
        return run

    def fullmatrix():
        store: list = []
        saved = dict(pipe.transformer.attn_processors)
        new = dict(saved)
        for _, name in joint_attention_blocks(pipe.transformer):
            new[name + ".processor"] = FullMatrixJointProcessor(store)
        pipe.transformer.set_attn_processor(new)
        try:
            info["latents_fullmatrix"] = pipeline_call(pipe, preset, preset.steps)
        finally:
            pipe.transformer.set_attn_processor(dict(saved))
        info["fullmatrix_host_bytes"] = sum(t.numel() * t.element_size() for t in store)
        store.clear()

    methods = {"stock": timed(stock)}
    methods.update({name: timed(recorder(name)) for name in names})
    methods["fullmatrix"] = timed(fullmatrix)
    return methods


# -- what SDPA picks and which path the capture takes, per backend restriction and dtype --------------------


def attention_shape(pipe, preset: Preset) -> tuple[int, int, int, int, int]:
    """(B, H, N, T, D) of the joint attention calls of this preset (SD3 with CFG: B = 2; FLUX.1: 1)."""
    cfg = pipe.transformer.config
    if preset.flux:  # packed 2x2 latents, T5 only
        grid = preset.size // (pipe.vae_scale_factor * 2)
        return 1, cfg.num_attention_heads, grid * grid, preset.max_sequence_length, cfg.attention_head_dim
    grid = preset.size // (pipe.vae_scale_factor * cfg.patch_size)
    T = pipe.tokenizer_max_length + preset.max_sequence_length
    return 2, cfg.num_attention_heads, grid * grid, T, cfg.attention_head_dim


def kernel_report(device: str, shape, text_first: bool = False) -> list[dict]:
    """For each dtype and SDPA backend restriction: SDPA's pick, and the path "auto" takes with its
    verdicts, on random q / k / v of ``shape`` (B, H, N, T, D); the lse of the second half is used."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, N, T, D = shape
    restrictions = {"default": None, "flash": SDPBackend.FLASH_ATTENTION,
                    "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                    "math": SDPBackend.MATH}
    cuda = device.startswith("cuda")
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if cuda else [torch.float32, torch.bfloat16]
    g = torch.Generator(device=device).manual_seed(0)

    def auto_path(q, k, v) -> dict:
        paths = KernelPaths()
        try:
            att = paths.attend("auto", q, k, v, None, N, B // 2, lambda: F.scaled_dot_product_attention(q, k, v),
                               text_first=text_first)
        except RuntimeError as exc:  # SDPA itself cannot run under this restriction
            return {"path": None, "note": str(exc).strip().splitlines()[0][:160], "verdicts": []}
        return {"path": att.path, "verdicts": paths.report()}

    rows = []
    for dtype in dtypes:
        q, k, v = (torch.randn(B, H, N + T, D, device=device, generator=g).to(dtype) for _ in range(3))
        for name, backend in restrictions.items():
            row = {"dtype": str(dtype).replace("torch.", ""), "restricted_to": name}
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                row["sdpa_picks"] = backend_name(sdpa_backend(q, k, v, None))
                row.update(auto_path(q, k, v))
            rows.append(row)
    return rows


def print_kernel_report(device: str, shape, rows: list[dict]) -> None:
    B, H, N, T, D = shape
    env = os.environ.get("TORCH_CUDNN_SDPA_DEPRIORITIZED")
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}, "
          f"TORCH_CUDNN_SDPA_DEPRIORITIZED={env if env is not None else '(unset)'}")
    print(f"kernel report: q/k/v ({B}, {H}, {N + T}, {D}), N={N} image tokens, on {device}")
    print(f"{'dtype':<10}{'restricted to':<15}{'SDPA picks':<12}path taken by method='auto'")
    for r in rows:
        print(f"{r['dtype']:<10}{r['restricted_to']:<15}{r['sdpa_picks']:<12}{r['path'] or '-'}"
              + (f"   ({r['note']})" if r.get("note") else ""))
        for v in r["verdicts"]:
            kernel = (v["kernel"] or "").replace("aten._scaled_dot_product_", "")
            bits = "" if v["output_bitwise_equal"] is None else f"bitwise={v['output_bitwise_equal']} "
            err = "" if v["lse_max_rel_err"] is None else f"lse_err={v['lse_max_rel_err']:.2g} "
            print(f"{'':<12}{'ok  ' if v['ok'] else 'FAIL'} {v['path']:<15}{kernel:<28}{bits}{err}| {v['reason']}")


# -- main ---------------------------------------------------------------------------------------------------


def results_table(times: dict, paths_of: dict, same: dict) -> str:
    """Side by side: median, min-max, ratio to stock, path taken, output identical to stock."""
    base = median(times["stock"])
    width = max(len(n) for n in times) + 2
    lines = [f"{'method':<{width}}{'path':<16}{'median s':>10}{'min':>9}{'max':>9}{'n':>4}{'vs stock':>10}"
             f"  identical"]
    for name, t in times.items():
        m = median(t)
        ident = {True: "yes", False: "NO", None: "-"}[same.get(name)]
        lines.append(f"{name:<{width}}{paths_of.get(name, '-'):<16}{m:>10.3f}{min(t):>9.3f}{max(t):>9.3f}"
                     f"{len(t):>4}{m / base:>10.3f}  {ident}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small", help="model size and device")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per call (default: the preset's)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per method (default: the preset's)")
    p.add_argument("--size", type=int, default=None, help="image height = width in pixels (default: the preset's)")
    p.add_argument("--paths", default=",".join(PATHS), metavar="LIST",
                   help=f"recorder paths to time, comma-separated from {','.join(PATHS)} (default: all)")
    p.add_argument("--skip-fullmatrix", action="store_true",
                   help="do not run the full-matrix baseline (memory-bound at full size)")
    p.add_argument("--kernel-report", action="store_true",
                   help="first print SDPA's pick and the capture's path and verdicts per backend and dtype")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON to PATH")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.paths.split(",") if n.strip()]
    bad = [n for n in names if n not in PATHS]
    if bad or not names:
        p.error(f"--paths takes names from {', '.join(PATHS)}, got {args.paths!r}")
    preset = PRESETS[args.preset]
    preset = replace(preset, steps=args.steps or preset.steps, repeats=args.repeats or preset.repeats,
                     size=args.size or preset.size)
    if preset.device == "cuda" and not torch.cuda.is_available():
        p.error(f"--preset {args.preset} needs a CUDA GPU")

    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    torch.manual_seed(0)
    pipe = build(preset)
    shape = attention_shape(pipe, preset)
    report = None
    if args.kernel_report:
        quiet = logging.getLogger("attention_map_diffusers.capture.paths")
        level, quiet.level = quiet.level, logging.ERROR  # the report prints every verdict itself
        try:
            with torch.no_grad():
                report = kernel_report(preset.device, shape, text_first=preset.flux)
        finally:
            quiet.setLevel(level)
        print_kernel_report(preset.device, shape, report)
        print()

    paths = KernelPaths()  # shared: each path's self-check runs once, in its probe
    info: dict = {}
    with torch.no_grad():
        probes = probe_paths(pipe, preset, paths, names)
        timed_names = [n for n in names if probes[n]["available"]]
        methods = make_methods(pipe, preset, info, paths, timed_names)
        if args.skip_fullmatrix or preset.flux:  # the baseline is SD3's joint processor
            methods.pop("fullmatrix")
        times, peaks = time_and_peaks(methods, preset.repeats, preset.device)

    cfg = pipe.transformer.config
    B, H, N, T, D = shape
    m = {k: median(v) for k, v in times.items()}
    same = {n: bool(torch.equal(info["latents_stock"], info[f"latents_{n}"])) for n in timed_names}
    paths_of = {n: probes[n]["path"] for n in timed_names}
    # method="auto" is timed as the path it takes (the same code, once its check has run)
    auto_path = probes["capture"]["path"]
    capture = next((n for n in timed_names if paths_of[n] == auto_path), None)

    def ratio(name):
        return m[name] / m["stock"] if name in m else None

    result = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if preset.device == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "TORCH_CUDNN_SDPA_DEPRIORITIZED": os.environ.get("TORCH_CUDNN_SDPA_DEPRIORITIZED"),
        "dtype": str(preset.dtype).replace("torch.", ""),
        "layers": cfg.num_layers, "heads": cfg.num_attention_heads, "head_dim": cfg.attention_head_dim,
        "model_family": "flux" if preset.flux else "sd3",
        "single_layers": getattr(cfg, "num_single_layers", 0),
        "dual_attention_layers": len(getattr(cfg, "dual_attention_layers", ())),
        "qk_norm": getattr(cfg, "qk_norm", "rms_norm"),
        "image_size": preset.size, "image_tokens": N, "text_tokens": T, "steps": preset.steps,
        "repeats": preset.repeats,
        "seconds": times,
        "paths": probes,
        "auto_path": auto_path,
        "capture_verdicts": paths.report(),
        "ratio_kernel_vs_stock": ratio("kernel"),
        "ratio_side_vs_stock": ratio("side"),
        "ratio_chunked_vs_stock": ratio("chunked"),
        "ratio_capture_vs_stock": ratio(capture) if capture else None,
        "ratio_fallback_vs_stock": ratio("chunked"),
        "output_identical_to_stock": same,
        "capture_output_identical_to_stock": bool(same) and all(same.values()),
        "capture_state_bytes": info[f"state_bytes_{timed_names[0]}"] if timed_names else None,
        "peak_memory_bytes": peaks,
        "peak_memory_kind": "cuda max_memory_allocated" if preset.device == "cuda" else "process RSS high-water mark",
    }
    if report is not None:
        result["kernel_report"] = report
    if "fullmatrix" in m:
        if capture:
            result["ratio_fullmatrix_vs_capture"] = m["fullmatrix"] / m[capture]
        result["ratio_fullmatrix_vs_stock"] = m["fullmatrix"] / m["stock"]
        result["fullmatrix_host_bytes"] = info["fullmatrix_host_bytes"]
    result.update(projections())

    layers = f"{cfg.num_layers} + {cfg.num_single_layers} single" if preset.flux else f"{cfg.num_layers}"
    guidance = "guidance embedding, batch 1" if preset.flux else "with CFG"
    print(f"{args.preset}: {layers} layers, {cfg.num_attention_heads} heads x {cfg.attention_head_dim}, "
          f"{preset.size}x{preset.size} ({N} image tokens), T={T}, {preset.steps} steps {guidance}, "
          f"{result['dtype']} on {result['device']} ({result['threads']} threads), torch {torch.__version__}, "
          f"TORCH_CUDNN_SDPA_DEPRIORITIZED={result['TORCH_CUDNN_SDPA_DEPRIORITIZED'] or '(unset)'}")
    print(results_table(times, paths_of, same))
    for n in names:
        if not probes[n]["available"]:
            print(f"{n:<12}not timed: {probes[n]['reason']}")
    print(f"method='auto' takes {auto_path}" + (f" (= {capture} above)" if capture else " (not timed)"))
    for n in ["capture", *names]:
        key = "capture" if n == "capture" else n
        r = result[f"ratio_{key}_vs_stock"]
        if r is not None:
            print(f"{key} / stock".ljust(18) + f"{r:.3f}")
    if "fullmatrix" in m and capture:
        print(f"fullmatrix / capture {result['ratio_fullmatrix_vs_capture']:.2f}   "
              f"(fullmatrix / stock {result['ratio_fullmatrix_vs_stock']:.2f})")
    print("self-check verdicts: " + "; ".join(
        f"{v['path']} {'ok' if v['ok'] else 'FAIL'} ({v['reason']})" for v in result["capture_verdicts"]))
    print(f"capture output identical to stock: {result['capture_output_identical_to_stock']}")
    mib = 1 << 20
    if result["capture_state_bytes"] is not None:
        print(f"capture state here: {result['capture_state_bytes'] / mib:.2f} MiB"
              + (f"; full-matrix maps kept on the host here: {result['fullmatrix_host_bytes'] / mib:.1f} MiB"
                 if "fullmatrix" in m else ""))
    print("peak memory above start (" + result["peak_memory_kind"] + "): "
          + ", ".join(f"{k} {v / mib:.0f} MiB" if v is not None else f"{k} n/a" for k, v in peaks.items()))
    pr = projections()
    print("computed for SD3.5 large, 1024x1024, 50 steps, T=333: capture state "
          f"{pr['capture_state_bytes_sd35_large_1024_50'] / mib:.2f} MiB (float16 stats, the dump's default; "
          f"{pr['capture_state_bytes_sd35_large_1024_50_float32_stats'] / mib:.2f} MiB with float32 stats), "
          f"full-matrix host maps {pr['fullmatrix_host_bytes_sd35_large_1024_50'] / 1e9:.0f} GB")
    print("computed for FLUX.1-dev, 1024x1024, 28 steps, T=512, 57 blocks: capture state "
          f"{pr['capture_state_bytes_flux_dev_1024_28'] / mib:.2f} MiB (float16 stats; "
          f"{pr['capture_state_bytes_flux_dev_1024_28_float32_stats'] / mib:.2f} MiB with float32 stats), "
          f"full-matrix host maps {pr['fullmatrix_host_bytes_flux_dev_1024_28'] / 1e9:.0f} GB")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
