"""Independent float64 reference for FLUX.1 (test code, shares nothing with the package).

Forward hooks collect, per transformer call, the q and k each attention module computed (the
projections after RMS qk-norm, from ``norm_q`` / ``norm_k`` / ``norm_added_q`` / ``norm_added_k``)
and the rotary embedding the transformer built (``pos_embed``'s output). The reference joins the
text and image streams text first, applies the rotation in float64 (the formula of diffusers'
``apply_rotary_emb`` with ``use_real_unbind_dim=-1``, written out here), takes the full softmax over
all keys in float64, and keeps image rows -> text columns.
"""

from __future__ import annotations

import numpy as np
import torch

from reference import aggregate_probs


class FluxReferenceTap:
    """Collects q / k of every ``transformer_blocks.{i}.attn`` and ``single_transformer_blocks.{j}.attn``."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.calls: list[dict] = []
        self.handles = []

    def __enter__(self):
        tr = self.transformer
        self.handles.append(tr.register_forward_pre_hook(self._call, with_kwargs=True))
        self.handles.append(tr.pos_embed.register_forward_hook(self._rope))
        blocks = [("joint", i, b.attn) for i, b in enumerate(tr.transformer_blocks)]
        blocks += [("single", j, b.attn) for j, b in enumerate(tr.single_transformer_blocks)]
        for pos, (kind, _, attn) in enumerate(blocks):
            chains = {"q": attn.norm_q, "k": attn.norm_k}
            if kind == "joint":
                chains.update(q_txt=attn.norm_added_q, k_txt=attn.norm_added_k)
            for what, mod in chains.items():
                self.handles.append(mod.register_forward_hook(self._grab(pos, what)))
        self.kinds = [k for k, _, _ in blocks]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _call(self, module, args, kwargs):
        ids = kwargs["img_ids"].reshape(-1, 3)
        self.calls.append({
            "timestep": float(kwargs["timestep"].reshape(-1)[0]) * 1000,
            "grid": (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1),
            "T": kwargs["encoder_hidden_states"].shape[1],
            "blocks": {},
        })

    def _rope(self, module, inputs, output):
        cos, sin = output
        self.calls[-1]["rope"] = (cos.detach().double().cpu(), sin.detach().double().cpu())

    def _grab(self, block, what):
        def hook(module, inputs, output):  # (B, L, H, D) after the RMS norm
            self.calls[-1]["blocks"].setdefault(block, {})[what] = output.detach().double().cpu()
            self.calls[-1]["dtype"] = output.dtype

        return hook


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """RoPE on (B, L, H, D): pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), in float64.

    For a half-precision model the kernel sees the rotation computed in float32 and rounded to the
    model's dtype (diffusers rotates in float32 and casts back); that rounding is reproduced, since
    the capture is specified against the q and k the kernel sees.
    """
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    if dtype in (torch.float32, torch.float64):
        return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    c, s = cos.float()[None, :, None, :], sin.float()[None, :, None, :]
    return (x.float() * c + rotated.float() * s).to(dtype).double()


def flux_probs(call: dict, block: int, scale=None) -> np.ndarray:
    """(B, H, N, T) float64: softmax over all keys of the image rows, text columns."""
    b = call["blocks"][block]
    q, k = b["q"], b["k"]
    if "q_txt" in b:  # joint block: text stream first
        q, k = torch.cat([b["q_txt"], q], dim=1), torch.cat([b["k_txt"], k], dim=1)
    cos, sin = call["rope"]
    q, k = rotate(q, cos, sin, call["dtype"]).transpose(1, 2), rotate(k, cos, sin, call["dtype"]).transpose(1, 2)
    T = call["T"]
    s = scale if scale is not None else 1.0 / np.sqrt(q.shape[-1])
    p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * s, dim=-1)
    return p[:, :, T:, :T].numpy()


def flux_reference_aggregate(tap: FluxReferenceTap, true_cfg: bool, canonical_size=None) -> dict:
    """The recorder's outputs from their definitions. With true CFG the pipeline calls the
    transformer twice per step, the positive pass first: every second call is dropped."""
    steps = tap.calls[::2] if true_cfg else tap.calls
    n_blocks = len(tap.kinds)
    probs = [[flux_probs(st, b) for b in range(n_blocks)] for st in steps]
    return aggregate_probs(probs, [st["timestep"] for st in steps], steps[0]["grid"], False, canonical_size)
