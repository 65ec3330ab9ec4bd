#!/usr/bin/env python
"""Capture cost side by side: stock diffusers, our streaming recorder (kernel and fallback paths), and
the full-matrix approach of attention-map-diffusers, on a random-weight SD3-family pipeline.

Each method runs the same pipeline call (text encoders, then a denoising loop of --steps steps with
classifier-free guidance, i.e. transformer calls with batch 2; latents out, no VAE decode), with the
same seed. Warm-up first, then the methods interleaved within each repeat; medians and min-max.

  (a) stock      diffusers' JointAttnProcessor2_0, nothing recorded
  (b) capture    StepAverageRecorder (row log-sum-exp from the fused SDPA kernel)
  (b') fallback  StepAverageRecorder(method="chunked") (log-sum-exp computed on the side)
  (c) fullmatrix explicit softmax over the whole joint sequence in the pipeline dtype, and every
                 step x block x head image->text map copied to the host, as attention-map-diffusers
                 does (reproduced here, in the benchmark, as the baseline)

    python benchmarks/bench_capture.py --preset cpu-small            # ~1 min on 2 CPU cores
    python benchmarks/bench_capture.py --preset cpu-small-4096       # 4096 image tokens
    python benchmarks/bench_capture.py --preset sd35-medium --json m.json   # on a GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, replace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import torch  # noqa: E402

from attention_map_diffusers import StepAverageRecorder  # noqa: E402
from attention_map_diffusers.capture.blocks import joint_attention_blocks  # noqa: E402
from attention_map_diffusers.models.tiny import TinySD3Config, build_tiny_sd3_pipeline  # noqa: E402
from timing import interleaved, median, table  # noqa: E402

PROMPT = "A rusty bicycle in front of a barn, golden hour, detailed photograph"


@dataclass(frozen=True)
class Preset:
    model: TinySD3Config
    size: int  # image height = width in pixels
    steps: int
    repeats: int
    device: str
    dtype: torch.dtype
    max_sequence_length: int = 256  # T = 77 + 256 = 333, the pipeline default


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

PRESETS = {
    "cpu-small": Preset(_CPU_MODEL, size=512, steps=3, repeats=5, device="cpu", dtype=torch.float32),
    "cpu-small-4096": Preset(_CPU_MODEL, size=1024, steps=2, repeats=3, device="cpu", dtype=torch.float32),
    "sd35-medium": Preset(_SD35_MEDIUM, size=1024, steps=8, repeats=3, device="cuda", dtype=torch.bfloat16),
    "sd35-large": Preset(_SD35_LARGE, size=1024, steps=8, repeats=3, device="cuda", dtype=torch.bfloat16),
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


def build(preset: Preset):
    # random init straight on the device: an SD3.5-large-sized transformer takes minutes on a CPU
    with torch.device(preset.device):
        pipe = build_tiny_sd3_pipeline(preset.model)
    pipe = pipe.to(preset.device, preset.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_methods(pipe, preset: Preset, info: dict):
    device = preset.device

    def call():
        g = torch.Generator(device=device).manual_seed(0)
        return pipe(PROMPT, num_inference_steps=preset.steps, height=preset.size, width=preset.size,
                    guidance_scale=5.0, max_sequence_length=preset.max_sequence_length, generator=g,
                    output_type="latent").images

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
        info["latents_stock"] = call()

    def recorder(method):
        def run():
            with StepAverageRecorder(pipe, method=method) as rec:
                info[f"latents_{method}"] = call()
            res = rec.result()  # includes the one host copy at the end
            info[f"state_bytes_{method}"] = res.state_bytes
        return run

    def fullmatrix():
        store: list = []
        saved = dict(pipe.transformer.attn_processors)
        new = dict(saved)
        for _, name in joint_attention_blocks(pipe.transformer):
            new[name + ".processor"] = FullMatrixJointProcessor(store)
        pipe.transformer.set_attn_processor(new)
        try:
            info["latents_fullmatrix"] = call()
        finally:
            pipe.transformer.set_attn_processor(dict(saved))
        info["fullmatrix_host_bytes"] = sum(t.numel() * t.element_size() for t in store)
        store.clear()

    return {
        "stock": timed(stock),
        "capture": timed(recorder("auto")),
        "fallback": timed(recorder("chunked")),
        "fullmatrix": timed(fullmatrix),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small", help="model size and device")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per call (default: the preset's)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per method (default: the preset's)")
    p.add_argument("--size", type=int, default=None, help="image height = width in pixels (default: the preset's)")
    p.add_argument("--skip-fullmatrix", action="store_true", help="do not run baseline (c) (memory-bound at full size)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON to PATH")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    preset = replace(preset, steps=args.steps or preset.steps, repeats=args.repeats or preset.repeats,
                     size=args.size or preset.size)
    if preset.device == "cuda" and not torch.cuda.is_available():
        p.error(f"--preset {args.preset} needs a CUDA GPU")

    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    torch.manual_seed(0)
    pipe = build(preset)
    info: dict = {}
    methods = make_methods(pipe, preset, info)
    if args.skip_fullmatrix:
        methods.pop("fullmatrix")
    with torch.no_grad():
        times = interleaved(methods, preset.repeats, warmup=1)
        peaks = {}
        for name, fn in methods.items():
            with PeakMemory(preset.device) as pm:
                fn()
            peaks[name] = pm.peak

    cfg = pipe.transformer.config
    grid = preset.size // (pipe.vae_scale_factor * cfg.patch_size)
    N, T = grid * grid, pipe.tokenizer_max_length + preset.max_sequence_length
    same = torch.equal(info["latents_stock"], info["latents_auto"]) and torch.equal(
        info["latents_stock"], info["latents_chunked"])
    m = {k: median(v) for k, v in times.items()}
    result = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if preset.device == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": str(preset.dtype).replace("torch.", ""),
        "layers": cfg.num_layers, "heads": cfg.num_attention_heads, "head_dim": cfg.attention_head_dim,
        "dual_attention_layers": len(cfg.dual_attention_layers), "qk_norm": cfg.qk_norm,
        "image_size": preset.size, "image_tokens": N, "text_tokens": T, "steps": preset.steps,
        "repeats": preset.repeats,
        "seconds": times,
        "ratio_capture_vs_stock": m["capture"] / m["stock"],
        "ratio_fallback_vs_stock": m["fallback"] / m["stock"],
        "capture_output_identical_to_stock": bool(same),
        "capture_state_bytes": info["state_bytes_auto"],
        "peak_memory_bytes": peaks,
        "peak_memory_kind": "cuda max_memory_allocated" if preset.device == "cuda" else "process RSS high-water mark",
    }
    if "fullmatrix" in m:
        result["ratio_fullmatrix_vs_capture"] = m["fullmatrix"] / m["capture"]
        result["ratio_fullmatrix_vs_stock"] = m["fullmatrix"] / m["stock"]
        result["fullmatrix_host_bytes"] = info["fullmatrix_host_bytes"]
    result.update(projections())

    print(f"{args.preset}: {cfg.num_layers} layers, {cfg.num_attention_heads} heads x {cfg.attention_head_dim}, "
          f"{preset.size}x{preset.size} ({N} image tokens), T={T}, {preset.steps} steps with CFG, "
          f"{result['dtype']} on {result['device']} ({result['threads']} threads)")
    print(table(times))
    print(f"capture / stock    {result['ratio_capture_vs_stock']:.3f}")
    print(f"fallback / stock   {result['ratio_fallback_vs_stock']:.3f}")
    if "fullmatrix" in m:
        print(f"fullmatrix / capture {result['ratio_fullmatrix_vs_capture']:.2f}   "
              f"(fullmatrix / stock {result['ratio_fullmatrix_vs_stock']:.2f})")
    print(f"capture output identical to stock: {same}")
    mib = 1 << 20
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
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
