"""The probability kernels against a float64 full softmax, on random q / k / v."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attention_map_diffusers.capture.exact import image_text_probs, image_text_probs_from_keys, sdpa_with_lse

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
B, H, N, T, D = 2, 4, 96, 21, 32


def qkv(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a spread of logits like a trained model's (std ~ 3), so that probabilities range widely
    q = (torch.randn(B, H, N + T, D, generator=g) * 1.8).to(dtype)
    k = (torch.randn(B, H, N + T, D, generator=g) * 1.8).to(dtype)
    v = torch.randn(B, H, N + T, D, generator=g).to(dtype)
    return q, k, v


def reference(q, k):
    """(B, H, N, T) float64: full softmax over all N + T keys, image rows, text columns."""
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) / D**0.5
    return torch.softmax(s, dim=-1)[:, :, :N, N:]


@pytest.mark.parametrize("dtype", list(TOL))
def test_kernel_output_is_sdpa_output_and_lse_is_exact(dtype):
    q, k, v = qkv(dtype)
    out, lse = sdpa_with_lse(q, k, v)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v)), "must be bit-identical to SDPA"
    assert lse is not None and lse.dtype == torch.float32 and lse.shape == (B, H, N + T)
    ref_lse = torch.logsumexp(torch.matmul(q.double(), k.double().transpose(-1, -2)) / D**0.5, dim=-1)
    assert (lse.double() - ref_lse).abs().max() < 50 * TOL[dtype]


@pytest.mark.parametrize("dtype", list(TOL))
def test_probs_from_kernel_lse_match_float64(dtype):
    q, k, v = qkv(dtype, seed=1)
    _, lse = sdpa_with_lse(q, k, v)
    p = image_text_probs(q[:, :, :N], k[:, :, N:], lse[..., :N], D**-0.5, mean_heads=False)
    ref = reference(q, k)
    assert p.dtype == torch.float32 and p.shape == (B, H, N, T)
    assert ref.max() > 0.5, "test data too flat to be informative"
    assert (p.double() - ref).abs().max() <= TOL[dtype]
    mean = image_text_probs(q[:, :, :N], k[:, :, N:], lse[..., :N], D**-0.5)
    assert (mean.double() - ref.mean(1)).abs().max() <= TOL[dtype]


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("budget", [64 << 20, 3000])
def test_fallback_matches_float64(dtype, budget):
    q, k, _ = qkv(dtype, seed=2)
    ref = reference(q, k)
    p = image_text_probs_from_keys(q[:, :, :N], k, D**-0.5, mean_heads=False, budget_bytes=budget)
    assert (p.double() - ref).abs().max() <= TOL[dtype]
    mean = image_text_probs_from_keys(q[:, :, :N], k, D**-0.5, budget_bytes=budget)
    assert (mean.double() - ref.mean(1)).abs().max() <= TOL[dtype]


@pytest.mark.parametrize("dtype", list(TOL))
def test_fallback_on_a_subset_of_image_rows(dtype):
    """Queries for some image rows only, the text keys named: T comes from ``text``, not from L - rows
    (the CUDA test checks a sample of rows this way)."""
    q, k, _ = qkv(dtype, seed=4)
    rows = N // 3
    ref = reference(q, k)[:, :, :rows]
    p = image_text_probs_from_keys(q[:, :, :rows], k, D**-0.5, mean_heads=False, text=slice(N, k.shape[-2]))
    assert p.shape == ref.shape
    assert (p.double() - ref).abs().max() <= TOL[dtype]


def test_head_chunking_does_not_change_the_mean():
    q, k, v = qkv(torch.float32, seed=3)
    _, lse = sdpa_with_lse(q, k, v)
    args = (q[:, :, :N], k[:, :, N:], lse[..., :N], D**-0.5)
    whole = image_text_probs(*args, budget_bytes=1 << 30)
    one_head_at_a_time = image_text_probs(*args, budget_bytes=1)
    assert torch.allclose(whole, one_head_at_a_time, rtol=1e-6, atol=1e-8)


def test_bf16_logits_would_be_wrong():
    """Why q_img . k_txt is upcast: the same product in bf16 is far off (documented claim)."""
    q, k, v = qkv(torch.bfloat16, seed=4)
    _, lse = sdpa_with_lse(q, k, v)
    s16 = torch.matmul(q[:, :, :N], k[:, :, N:].transpose(-1, -2)).float() * D**-0.5
    p16 = torch.exp(s16 - lse[..., :N, None])
    ref = reference(q, k)
    big = ref > 1e-3
    rel = ((p16.double() - ref).abs() / ref)[big].max()
    assert rel > 1e-2
