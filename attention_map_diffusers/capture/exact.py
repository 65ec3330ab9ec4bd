"""Exact image->text attention probabilities without building the joint attention matrix.

For a query row i the softmax over ALL keys (image and text) is ``p_ij = exp(s * q_i.k_j - lse_i)``,
with ``lse_i`` the row's log-sum-exp. Fused SDPA kernels compute ``lse_i`` anyway; :mod:`.paths`
takes it from the kernel SDPA picks, or from a side call of a fused kernel on the image rows, each
checked once per configuration, and otherwise ``image_text_probs_from_keys`` computes it exactly in
float32, in chunks with bounded scratch memory.

The image->text block then needs only ``q_img . k_txt``: an (N x T) product per head, done in
float32 (bf16 logits would be off by ~13%). TF32 matmuls, where a user enables them, do not change
that for bf16 / fp16 pipelines: their q and k values are exact in TF32 and the sums are float32.

Shapes: B batch, H heads, N image tokens, T text tokens, L = N + T, D head dim.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def default_scale(head_dim: int, scale: Optional[float]) -> float:
    """SDPA's softmax scale: the given one, else 1/sqrt(D)."""
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)


def sdpa_with_lse(query, key, value, scale: Optional[float] = None):
    """``F.scaled_dot_product_attention(query, key, value, scale=scale)`` and, when available, its lse.

    Runs the flash or memory-efficient kernel SDPA itself would select (``torch._fused_sdp_choice``)
    through the aten op that returns the row log-sum-exp. Unchecked: the recorder goes through
    :class:`~attention_map_diffusers.capture.paths.KernelPaths`, which verifies the output and the lse
    once per configuration, and which alone tries cuDNN. Where neither kernel applies (math backend,
    cuDNN, MPS, padded head dims), runs SDPA itself and returns ``lse=None``.

    Args:
        query, key, value: (B, H, L, D).
    Returns:
        out (B, H, L, D) in the input dtype, and lse (B, H, L) float32 (natural log, scale included)
        or None.
    """
    from .kernels import EFFICIENT, FLASH, Unavailable, kernel_with_lse, lse_rows, sdpa_backend

    if query.device.type in ("cpu", "cuda"):
        backend = sdpa_backend(query, key, value, scale)
        if backend in (FLASH, EFFICIENT):
            try:
                out, lse = kernel_with_lse(backend, query, key, value, scale)
            except Unavailable:
                pass
            else:
                B, H, L, _ = query.shape
                return out, lse_rows(lse, B, H, L)
    return F.scaled_dot_product_attention(query, key, value, scale=scale), None


def _heads_per_chunk(batch: int, heads: int, cols: int, rows: int, budget_bytes: int) -> int:
    per_head = max(1, batch * rows * cols * 4)
    return max(1, min(heads, budget_bytes // per_head))


def image_text_probs_from_keys(
    q_img,
    key,
    scale: float,
    *,
    mean_heads: bool = True,
    budget_bytes: int = 64 << 20,
    text: Optional[slice] = None,
):
    """Like :func:`image_text_probs`, with the log-sum-exp computed here (the fallback path).

    One pass per head and block of rows over the float32 logits against all L keys: subtract the
    row max, exponentiate in place, sum (that is the softmax denominator), and keep the text
    columns divided by it. Exact in float32; scratch is one (rows x L) block.

    Args:
        q_img: (B, H, N, D) image queries.
        key: (B, H, L, D) all keys.
        text: where the T = L - N text keys lie on L; default ``slice(N, L)`` (SD3: image first).
    Returns:
        (B, N, T) or (B, H, N, T) float32.
    """
    B, H, N, D = q_img.shape
    L = key.shape[-2]
    text = slice(N, L) if text is None else text
    T = len(range(L)[text])  # not L - N: the queries may be a subset of the image rows
    rows = max(1, min(N, budget_bytes // max(1, B * L * 4)))
    out_shape = (B, N, T) if mean_heads else (B, H, N, T)
    out = torch.zeros(out_shape, dtype=torch.float32, device=q_img.device)
    for h in range(H):
        k_t = key[:, h].float().transpose(-1, -2)  # (B, D, L)
        q_h = q_img[:, h].float() * scale  # (B, N, D)
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            e = torch.bmm(q_h[:, r0:r1], k_t)  # (B, r, L) scaled logits
            e.sub_(e.amax(dim=-1, keepdim=True)).exp_()
            p = e[..., text].div_(e.sum(dim=-1, keepdim=True))
            if mean_heads:
                out[:, r0:r1] += p
            else:
                out[:, h, r0:r1] = p
    return out.div_(H) if mean_heads else out


def image_text_probs(
    q_img,
    k_txt,
    lse_img,
    scale: float,
    *,
    mean_heads: bool = True,
    budget_bytes: int = 64 << 20,
):
    """Softmax-over-all-keys probabilities of image queries on text keys, in float32.

    Args:
        q_img: (B, H, N, D) image queries.
        k_txt: (B, H, T, D) text keys.
        lse_img: (B, H, N) float32 log-sum-exp of the image rows over all L keys.
        mean_heads: average over heads (B, N, T) instead of returning (B, H, N, T).
        budget_bytes: bound on the scratch of one chunk of heads; with ``mean_heads`` the scratch is
            O(B * N * T) times the chunk size, not O(H * B * N * T).
    Returns:
        (B, N, T) or (B, H, N, T) float32.
    """
    B, H, N, D = q_img.shape
    T = k_txt.shape[-2]
    if not mean_heads:
        hc = H
    else:
        hc = _heads_per_chunk(B, H, T, N, budget_bytes)
    acc = None
    chunks = []
    for h0 in range(0, H, hc):
        h1 = min(H, h0 + hc)
        n = h1 - h0
        q = q_img[:, h0:h1].float().reshape(B * n, N, D)
        k = k_txt[:, h0:h1].float().reshape(B * n, T, D)
        neg_lse = lse_img[:, h0:h1].float().reshape(B * n, N, 1).neg()
        # exp(scale * q.k - lse), fused: baddbmm(-lse, q, k^T, alpha=scale).
        p = torch.baddbmm(neg_lse, q, k.transpose(-1, -2), alpha=scale).exp_().view(B, n, N, T)
        if not mean_heads:
            chunks.append(p)
        elif acc is None:
            acc = p.sum(dim=1)
        else:
            acc += p.sum(dim=1)
    if not mean_heads:
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)
    return acc.div_(H)
