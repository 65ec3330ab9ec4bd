"""FLUX.1: the recorder against an independent float64 reference (RoPE, joint and single blocks)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from attention_map_diffusers import StepAverageRecorder, attn_maps, init_pipeline, restore_pipeline
from attention_map_diffusers.capture.processor import CaptureProcessor
from reference_flux import FluxReferenceTap, flux_probs, flux_reference_aggregate
from test_capture import assert_matches

# 64 x 96 pixels: a 4 x 6 grid of packed 2x2 latents (FLUX.1's H/16 x W/16)
BASE = dict(num_inference_steps=2, height=64, width=96, max_sequence_length=16, output_type="np",
            guidance_scale=3.5)

CASES = {
    "one-prompt": dict(prompt="A furry cat beneath a table"),
    "two-prompts": dict(prompt=["A furry cat beneath a table", "a red bicycle"]),
    "true-cfg-two-prompts": dict(prompt=["a dog on a sofa", "a barn at sunset"], negative_prompt="blurry",
                                 true_cfg_scale=2.0),
}


def generate(pipe, prompt, seed=0, **kw):
    args = dict(BASE)
    args.update(kw)
    n = len(prompt) if isinstance(prompt, list) else 1
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return pipe(prompt, generator=gens, **args).images


def record(pipe, prompt, recorder_kw=None, **kw):
    with FluxReferenceTap(pipe.transformer) as tap:
        with StepAverageRecorder(pipe, **(recorder_kw or {})) as rec:
            images = generate(pipe, prompt, **kw)
    return rec.result(), tap, images


@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(flux_pipe, case):
    kw = dict(CASES[case])
    prompt = kw.pop("prompt")
    plain = generate(flux_pipe, prompt, **kw)
    res, tap, images = record(flux_pipe, prompt, **kw)
    assert np.array_equal(plain, images), "the image changed"
    true_cfg = "negative_prompt" in kw
    assert len(tap.calls) == BASE["num_inference_steps"] * (2 if true_cfg else 1)
    ref = flux_reference_aggregate(tap, true_cfg=true_cfg)
    B = len(prompt) if isinstance(prompt, list) else 1
    T = BASE["max_sequence_length"]
    tr = flux_pipe.transformer.config
    Bk = tr.num_layers + tr.num_single_layers
    assert res.sum_token_map.shape == (B, 4, 6, T)
    assert res.per_block_step_token_mean.shape == (B, Bk, 2, T)
    assert res.blocks == [f"transformer_blocks.{i}.attn" for i in range(tr.num_layers)] + [
        f"single_transformer_blocks.{j}.attn" for j in range(tr.num_single_layers)]
    assert res.text_spans == {"t5": [0, T]} and res.model_family == "flux" and not res.cfg
    assert_matches(res, ref)


@pytest.mark.parametrize("method", ["kernel-lse", "side-lse", "chunked"])
def test_every_path_matches_reference(flux_pipe, method):
    kw = dict(CASES["true-cfg-two-prompts"])
    prompt = kw.pop("prompt")
    res, tap, _ = record(flux_pipe, prompt, recorder_kw=dict(method=method), **kw)
    assert_matches(res, flux_reference_aggregate(tap, true_cfg=True))
    assert all(v["image_rows"] == "last" for v in res.capture_verdicts)


def test_half_precision_matches_reference(flux_dir):
    from conftest import load_flux_pipeline

    pipe = load_flux_pipeline(flux_dir, dtype=torch.bfloat16)
    res, tap, _ = record(pipe, "A rusty bicycle in front of a barn", num_inference_steps=1)
    assert_matches(res, flux_reference_aggregate(tap, true_cfg=False), tol=1e-4)


@pytest.mark.parametrize("case", ["lse-in-log2", "lse-padded-at-front", "every-call-raises"])
def test_self_check_catches_faults(flux_pipe, monkeypatch, caplog, case):
    from test_capture_paths import CASES as FAULTS

    setup, path, reason = FAULTS[case]
    setup(monkeypatch)
    with caplog.at_level(logging.INFO, logger="attention_map_diffusers.capture.paths"):
        res, tap, _ = record(flux_pipe, "a cat", num_inference_steps=1)
    assert res.capture_path == path and reason in res.capture_verdicts[0]["reason"]
    assert_matches(res, flux_reference_aggregate(tap, true_cfg=False))


def test_other_attention_backend_is_refused(flux_pipe):
    before = dict(flux_pipe.transformer.attn_processors)
    for p in before.values():
        p._attention_backend = "flex"  # what set_attention_backend("flex") sets
    try:
        with pytest.raises(RuntimeError, match=r"attention backend 'flex'.*set_attention_backend\('native'\)"):
            record(flux_pipe, "a cat", num_inference_steps=1)
    finally:
        for p in before.values():
            del p._attention_backend
    after = dict(flux_pipe.transformer.attn_processors)
    assert all(after[k] is before[k] for k in before)


def test_processors_restored(flux_pipe):
    before = dict(flux_pipe.transformer.attn_processors)
    with StepAverageRecorder(flux_pipe):
        assert sum(isinstance(p, CaptureProcessor) for p in flux_pipe.transformer.attn_processors.values()) == 4
    after = dict(flux_pipe.transformer.attn_processors)
    assert all(after[k] is before[k] for k in before)


def test_attn_maps(flux_pipe):
    attn_maps.clear()
    init_pipeline(flux_pipe)
    try:
        with FluxReferenceTap(flux_pipe.transformer) as tap:
            generate(flux_pipe, ["a cat", "a red barn"], output_type="latent")
    finally:
        restore_pipeline(flux_pipe)
    heads = flux_pipe.transformer.config.num_attention_heads
    assert len(attn_maps) == 2
    for call, key in zip(tap.calls, attn_maps):
        assert key == pytest.approx(call["timestep"])
        names = list(attn_maps[key])
        assert names[0] == "transformer_blocks.0.attn" and names[-1] == "single_transformer_blocks.1.attn"
        for b, name in enumerate(names):
            m = attn_maps[key][name]
            assert tuple(m.shape) == (2, heads, 4, 6, 16)
            np.testing.assert_allclose(m.numpy(), flux_probs(call, b).reshape(m.shape), rtol=2e-4, atol=1e-6)
    attn_maps.clear()


def test_schnell_like_model_without_guidance_embedding():
    from attention_map_diffusers.models.tiny_flux import TinyFluxConfig, build_tiny_flux_pipeline

    pipe = build_tiny_flux_pipeline(TinyFluxConfig(guidance_embeds=False, num_single_layers=1))
    pipe.set_progress_bar_config(disable=True)
    res, tap, _ = record(pipe, "a red bicycle", num_inference_steps=1, guidance_scale=0.0)
    assert res.blocks[-1] == "single_transformer_blocks.0.attn" and res.num_steps == 1
    assert_matches(res, flux_reference_aggregate(tap, true_cfg=False))


def test_active_backend_from_the_context_manager_is_refused(flux_pipe):
    from diffusers.models.attention_dispatch import attention_backend

    with attention_backend("flex"):
        with pytest.raises(RuntimeError, match=r"attention backend 'flex'"):
            record(flux_pipe, "a cat", num_inference_steps=1)


def test_native_math_backend_is_recorded(flux_pipe):
    """The native variants end in F.scaled_dot_product_attention (under an sdpa_kernel restriction):
    recorded, on the path that restriction leaves (math gives no lse: the side path)."""
    before = dict(flux_pipe.transformer.attn_processors)
    for p in before.values():
        p._attention_backend = "_native_math"
    try:
        plain = generate(flux_pipe, "a cat", num_inference_steps=1)
        res, tap, images = record(flux_pipe, "a cat", num_inference_steps=1)
    finally:
        for p in before.values():
            del p._attention_backend
    assert np.array_equal(plain, images) and res.capture_path == "sdpa+side-lse"
    assert_matches(res, flux_reference_aggregate(tap, true_cfg=False))
