"""A dump written the way the original tool wrote it (attention-map-diffusers' SD3.5 step-average script).

Not shaped by this project's writer, on purpose: this is what the analysis promises to read. The
npz comes from the very call the original made, ``np.savez_compressed`` with exactly its four
keys (float32 arrays, ``N`` a Python int, no ``timesteps``), steps sorted by ascending timestep;
``metadata.json`` has exactly its keys and types: the prompt as a string, ``negative_prompt``
null, ``block_latent_sizes`` a dict by block name, ``tokens`` one flat list of CLIP token strings
padded to 77, ``special_mask`` booleans, and no ``format_version``.

    arrays = random_arrays(make_layout([prompt]), num_blocks=3, num_steps=5)   # denoising order
    write_original_dump(folder, prompt, arrays)
"""

from __future__ import annotations

import json
import os

import numpy as np
from synthetic_dump import CLIP_BOS, CLIP_EOS, clip_tokens, png_bytes

ORIGINAL_NPZ_KEYS = ("sum_token_map", "N", "per_block_step_token_mean", "per_block_step_token_max")
ORIGINAL_METADATA_KEYS = (
    "prompt", "negative_prompt", "seed", "steps", "guidance_scale", "model_id", "scheduler", "image_size",
    "canonical_size", "batch_size", "num_steps", "num_blocks", "blocks", "block_latent_sizes", "tokens",
    "T_from_model", "special_mask", "timestamp",
)  # fmt: skip


def write_original_dump(
    folder: str | os.PathLike,
    prompt: str,
    arrays: dict,
    *,
    seed: int = 42,
    image_size: tuple[int, int] = (64, 64),
    clip_len: int = 77,
    image: bool = True,
) -> dict:
    """Write ``stepavg_token_maps_v1.npz``, ``metadata.json`` and the image into ``folder``; returns the metadata.

    Args:
        arrays: ``sum_token_map`` (1, Hc, Wc, T), ``N`` and ``per_block_step_token_mean`` /
            ``per_block_step_token_max`` (1, Bk, S, T) with steps in **denoising** order (as
            :func:`synthetic_dump.random_arrays` gives them); other keys are ignored, as the original
            had no others.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    sum_token_map = np.asarray(arrays["sum_token_map"], dtype=np.float32)
    N = int(np.asarray(arrays["N"]))
    # The original kept its per-step statistics in a dict keyed by timestep and stacked them with
    # sorted(keys): ascending timestep, so the first (noisiest) denoising step comes last.
    per_block_step_token_mean = np.ascontiguousarray(np.asarray(arrays["per_block_step_token_mean"], dtype=np.float32)[:, :, ::-1])
    per_block_step_token_max = np.ascontiguousarray(np.asarray(arrays["per_block_step_token_max"], dtype=np.float32)[:, :, ::-1])

    out = os.path.join(folder, "stepavg_token_maps_v1.npz")
    np.savez_compressed(
        out,
        sum_token_map=sum_token_map,
        N=N,
        per_block_step_token_mean=per_block_step_token_mean,
        per_block_step_token_max=per_block_step_token_max,
    )

    B, Hc, Wc, T = sum_token_map.shape
    _, Bk, S, _ = per_block_step_token_mean.shape
    h, w = image_size
    blocks = [f"transformer_blocks.{i}.attn" for i in range(Bk)]
    tokens = clip_tokens(prompt, clip_len).tokens
    tokens = tokens + [CLIP_EOS] * (clip_len - len(tokens))  # padded to max_length, as the pipeline feeds CLIP
    meta = {
        "prompt": prompt,
        "negative_prompt": None,
        "seed": seed,
        "steps": S,
        "guidance_scale": 7.5,
        "model_id": "stabilityai/stable-diffusion-3.5-medium",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
        "image_size": [h, w],
        "canonical_size": [Hc, Wc],
        "batch_size": B,
        "num_steps": S,
        "num_blocks": Bk,
        "blocks": blocks,
        "block_latent_sizes": {name: [Hc, Wc] for name in blocks},
        "tokens": tokens,
        "T_from_model": T,
        "special_mask": [t in (CLIP_BOS, CLIP_EOS) for t in tokens],
        "timestamp": "2024-11-02T10:15:00",
    }
    with open(os.path.join(folder, "metadata.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2)
    if image:
        yy, xx = np.mgrid[0:h, 0:w]
        rgb = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full_like(xx, 60)], -1).astype(np.uint8)
        with open(os.path.join(folder, f"seed{seed}.png"), "wb") as fh:
            fh.write(png_bytes(rgb))
    return meta
