"""Independent float64 reference for the captured attention (test code, shares nothing with the package).

Forward hooks on each joint-attention module's projection / norm submodules collect the exact q and
k tensors the model computed; the reference then takes the full softmax over all N + T keys in
float64 and builds the aggregates from their definitions.
"""

from __future__ import annotations

import numpy as np
import torch


class ReferenceTap:
    """Collects, per transformer call, the q and k of every ``transformer_blocks.{i}.attn``."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.calls: list[dict] = []
        self.handles = []

    def __enter__(self):
        tr = self.transformer
        self.handles.append(tr.register_forward_pre_hook(self._call, with_kwargs=True))
        for i, block in enumerate(tr.transformer_blocks):
            attn = block.attn
            chains = {
                "q_img": [attn.to_q, attn.norm_q],
                "k_img": [attn.to_k, attn.norm_k],
                "q_txt": [attn.add_q_proj, attn.norm_added_q],
                "k_txt": [attn.add_k_proj, attn.norm_added_k],
            }
            for what, chain in chains.items():
                mods = [m for m in chain if m is not None]
                # the last module of the chain gives the tensor the attention used
                self.handles.append(mods[-1].register_forward_hook(self._grab(i, what, attn.heads)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _call(self, module, args, kwargs):
        hs = kwargs["hidden_states"]
        self.calls.append(
            {
                "skip_layers": kwargs.get("skip_layers"),
                "timestep": float(kwargs["timestep"].reshape(-1)[0]),
                "grid": (hs.shape[-2] // module.config.patch_size, hs.shape[-1] // module.config.patch_size),
                "blocks": {},
            }
        )

    def _grab(self, block, what, heads):
        def hook(module, inputs, output):
            x = output.detach().to(torch.float64)
            if x.dim() == 3:  # (B, L, H*D) straight from a projection
                B, L, HD = x.shape
                x = x.view(B, L, heads, HD // heads).transpose(1, 2)
            self.calls[-1]["blocks"].setdefault(block, {})[what] = x.cpu()

        return hook

    def steps(self):
        """The denoising-step calls (not the skip-layer-guidance ones), in call order."""
        return [c for c in self.calls if c["skip_layers"] is None]


def reference_probs(block: dict, scale=None) -> np.ndarray:
    """(B, H, N, T) float64: softmax over all keys, image-query rows, text-key columns."""
    q = torch.cat([block["q_img"], block["q_txt"]], dim=2)
    k = torch.cat([block["k_img"], block["k_txt"]], dim=2)
    n = block["q_img"].shape[2]
    d = q.shape[-1]
    s = scale if scale is not None else 1.0 / np.sqrt(d)
    p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * s, dim=-1)
    return p[:, :, :n, n:].numpy()


def bilinear_resize(x: np.ndarray, size) -> np.ndarray:
    """(B, h, w, T) -> (B, H, W, T), bilinear, align_corners=False (half-pixel centres, edge clamp)."""
    B, h, w, T = x.shape
    H, W = size

    def axis(n_in, n_out):
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        src = np.maximum(src, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, fy = axis(h, H)
    x0, x1, fx = axis(w, W)
    top = x[:, y0][:, :, x0] * (1 - fx)[None, None, :, None] + x[:, y0][:, :, x1] * fx[None, None, :, None]
    bot = x[:, y1][:, :, x0] * (1 - fx)[None, None, :, None] + x[:, y1][:, :, x1] * fx[None, None, :, None]
    return top * (1 - fy)[None, :, None, None] + bot * fy[None, :, None, None]


def reference_aggregate(tap: ReferenceTap, cfg: bool, canonical_size=None) -> dict:
    """The recorder's outputs, computed from their definitions in float64."""
    steps = tap.steps()
    n_blocks = len(tap.transformer.transformer_blocks)
    probs = [[reference_probs(st["blocks"][b]) for b in range(n_blocks)] for st in steps]
    return aggregate_probs(probs, [st["timestep"] for st in steps], steps[0]["grid"], cfg, canonical_size)


def aggregate_probs(probs: list, timesteps: list, grid, cfg: bool, canonical_size=None) -> dict:
    """The recorder's outputs from per-step, per-block (B, H, N, T) float64 probabilities
    (image rows in row-major grid order), by their definitions."""
    n_blocks = len(probs[0])
    Hc, Wc = canonical_size or grid
    sums = None
    per_block = None
    per_step = []
    means = []
    maxes = []
    n = 0
    for step_probs in probs:
        m_step, x_step, s_step = [], [], 0.0
        for b in range(n_blocks):
            p = step_probs[b]
            if cfg:
                p = p[p.shape[0] // 2 :]
            p = p.mean(axis=1)  # heads
            B, N, T = p.shape
            p = p.reshape(B, grid[0], grid[1], T)
            r = p / (p.sum(-1, keepdims=True) + 1e-8)
            m_step.append(r.mean(axis=(1, 2)))
            x_step.append(r.max(axis=(1, 2)))
            rs = p if (Hc, Wc) == tuple(grid) else bilinear_resize(p, (Hc, Wc))
            sums = rs if sums is None else sums + rs
            if per_block is None:
                per_block = np.zeros((B, n_blocks, Hc, Wc, T))
            per_block[:, b] += rs
            s_step = s_step + rs
            n += 1
        means.append(np.stack(m_step, axis=1))  # (B, Bk, T)
        maxes.append(np.stack(x_step, axis=1))
        per_step.append(s_step)
    return {
        "sum_token_map": sums,
        "N": n,
        "per_block_step_token_mean": np.stack(means, axis=2),  # (B, Bk, S, T)
        "per_block_step_token_max": np.stack(maxes, axis=2),
        "timesteps": np.array(timesteps),
        "per_block_token_map": per_block,
        "per_step_token_map": np.stack(per_step, axis=1),
        "grid": grid,
    }
