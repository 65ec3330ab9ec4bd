"""CUDA-only checks (skipped without a GPU; run by benchmarks/gpu_check.sh on a GPU machine).

Whatever backend SDPA picks (or is restricted to) and whatever the dtype, every capture path must
return exactly SDPA's output, and the probabilities from the lse it gives must match a float64
softmax; a forced path that fails its self-check on this GPU is skipped with its reason (shown by
``pytest -rs``). The recorder must leave images unchanged on the GPU, with model CPU offload too.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from attention_map_diffusers import StepAverageRecorder  # noqa: E402
from attention_map_diffusers.capture.exact import image_text_probs, image_text_probs_from_keys  # noqa: E402
from attention_map_diffusers.capture.paths import METHODS, KernelPaths  # noqa: E402
from reference import ReferenceTap, reference_aggregate  # noqa: E402

B, H, N, T, D = 2, 24, 1024, 333, 64


def _backends():
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("backend", ["default", "flash", "efficient", "cudnn", "math"])
def test_every_path_is_sdpa_and_probs_are_exact(backend, dtype, method):
    from torch.nn.attention import sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    q = (torch.randn(B, H, N + T, D, device="cuda", generator=g) * 1.8).to(dtype)
    k = (torch.randn(B, H, N + T, D, device="cuda", generator=g) * 1.8).to(dtype)
    v = torch.randn(B, H, N + T, D, device="cuda", generator=g).to(dtype)
    ctx = sdpa_kernel(_backends()[backend]) if backend != "default" else contextlib.nullcontext()
    paths = KernelPaths()
    with ctx:
        try:
            expected = F.scaled_dot_product_attention(q, k, v)
        except RuntimeError as exc:  # SDPA itself has no kernel for this restriction / dtype / GPU
            pytest.skip(f"SDPA under {backend} / {dtype}: {exc}".splitlines()[0])
        outs = []
        for _ in range(2):  # the first call checks, the second runs the chosen path as is
            try:
                att = paths.attend(method, q, k, v, None, N, 1, lambda: F.scaled_dot_product_attention(q, k, v))
            except RuntimeError as exc:  # a forced path that fails its check on this GPU
                pytest.skip(f"{method} under {backend} / {dtype}: {exc}")
            outs.append(att)
    for att in outs:
        assert torch.equal(att.output, expected), f"{att.path}: output differs from SDPA's"
    rows = 256  # reference on a subset of image rows of the recorded item (float64 on the GPU)
    s = torch.matmul(q[1:, :, :rows].double(), k[1:].double().transpose(-1, -2)) / D**0.5
    ref = torch.softmax(s, dim=-1)[..., N:]
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    for att in outs:
        if att.image_lse is None:
            assert att.path == "chunked"
            p = image_text_probs_from_keys(q[1:, :, :rows], k[1:], D**-0.5, mean_heads=False, text=slice(N, N + T))
        else:
            assert att.image_lse.shape == (1, H, N)
            p = image_text_probs(q[1:, :, :rows], k[1:, :, N:], att.image_lse[..., :rows], D**-0.5, mean_heads=False)
        assert (p.double() - ref).abs().max() <= tol, f"{att.path}: probabilities off"
    verdicts = paths.verdicts(outs[0].configuration, method)
    assert verdicts[-1]["ok"] and verdicts[-1]["path"] == outs[0].path


@pytest.fixture(scope="module")
def cuda_pipe():
    from attention_map_diffusers.models.tiny import TinySD3Config, build_tiny_sd3_pipeline

    cfg = TinySD3Config(num_layers=3, num_attention_heads=4, attention_head_dim=64, dual_attention_layers=(0,),
                        qk_norm="rms_norm")
    pipe = build_tiny_sd3_pipeline(cfg).to("cuda", torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, **kw):
    return pipe("A rusty bicycle in front of a barn", num_inference_steps=3, height=128, width=128,
                max_sequence_length=32, guidance_scale=4.0, generator=torch.Generator("cuda").manual_seed(0),
                output_type="latent", **kw).images


@pytest.mark.parametrize("method", METHODS)
def test_cuda_image_unchanged_and_maps_exact(cuda_pipe, method):
    plain = _generate(cuda_pipe)
    try:
        with ReferenceTap(cuda_pipe.transformer) as tap:
            with StepAverageRecorder(cuda_pipe, method=method) as rec:
                captured = _generate(cuda_pipe)
    except RuntimeError as exc:
        if "cannot be used" not in str(exc):
            raise
        pytest.skip(str(exc))  # a forced path that fails its check on this GPU
    assert torch.equal(plain, captured)
    res, ref = rec.result(), reference_aggregate(tap, cfg=True)
    assert res.capture_path and res.capture_verdicts[-1]["ok"]
    assert abs(res.sum_token_map / res.N - ref["sum_token_map"] / ref["N"]).max() <= 1e-4
    assert abs(res.per_block_step_token_max - ref["per_block_step_token_max"]).max() <= 1e-4


def test_cuda_model_cpu_offload():
    from attention_map_diffusers.models.tiny import TinySD3Config, build_tiny_sd3_pipeline

    pipe = build_tiny_sd3_pipeline(TinySD3Config()).to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_model_cpu_offload()
    plain = _generate(pipe)
    with StepAverageRecorder(pipe) as rec:
        captured = _generate(pipe)
    assert torch.equal(plain, captured)
    res = rec.result()
    assert res.num_steps == 3 and res.N == 3 * 2
