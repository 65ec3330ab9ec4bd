"""Synthetic dumps following docs/FORMAT.md, built with numpy and the standard library only.

Reusable by every test and benchmark that needs a dump without running a pipeline:

    layout = make_layout(["A rusty bicycle in front of a barn"])          # tokens + offsets per encoder
    arrays = random_arrays(layout, num_blocks=4, num_steps=6, grid=(8, 8))  # the npz arrays (denoising order)
    arrays["sum_token_map"][0, :4, :4, layout.positions("clip", 0, "barn")] += 5.0  # plant a known answer
    write_dump(run_folder, layout, arrays)                                 # format 2 (or original=True)

With concept maps (``--concepts``): ``extra, keys = concept_arrays(1, ["cat", "sky"], 4, 6, (8, 8))``,
then ``arrays.update(extra)`` and ``write_dump(..., meta=keys)``.

Tokens come from a simple built-in tokenizer (CLIP-like ``word</w>`` pieces, T5-like ``▁word``
pieces, both with exact character offsets), or from a real Hugging Face tokenizer passed in
(``make_layout(..., clip_tokenizer=tok)``), which is only called, never imported here.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

CLIP_BOS, CLIP_EOS, T5_EOS = "<|startoftext|>", "<|endoftext|>", "</s>"


@dataclass
class TokenList:
    """One encoder's tokens for one prompt, as FORMAT.md stores them (unpadded, specials included)."""

    tokens: list[str]
    special: list[int]
    offsets: list[Optional[list[int]]]  # [start, end) in the prompt, None for specials
    truncated: bool


def clip_tokens(prompt: str, length: int = 77) -> TokenList:
    """CLIP-like tokens: lower-cased letter runs, single digits and punctuation runs, each ending in ``</w>``."""
    pieces = [(m.group().lower() + "</w>", m.start(), m.end()) for m in re.finditer(r"[^\W\d_]+|\d|[^\w\s]+|_", prompt)]
    keep = pieces[: length - 2]
    tokens = [CLIP_BOS] + [p for p, _, _ in keep] + [CLIP_EOS]
    offsets = [None] + [[a, b] for _, a, b in keep] + [None]
    special = [1] + [0] * len(keep) + [1]
    return TokenList(tokens, special, offsets, len(pieces) > len(keep))


def t5_tokens(prompt: str, length: int = 32) -> TokenList:
    """T5-like tokens: per whitespace-separated chunk, letter/digit runs and punctuation, the first with ``▁``."""
    pieces = []
    for chunk in re.finditer(r"\S+", prompt):
        for k, m in enumerate(re.finditer(r"[^\W_]+|[^\w\s]|_", chunk.group())):
            text = ("▁" if k == 0 else "") + m.group()
            pieces.append((text, chunk.start() + m.start(), chunk.start() + m.end()))
    keep = pieces[: length - 1]
    tokens = [p for p, _, _ in keep] + [T5_EOS]
    offsets = [[a, b] for _, a, b in keep] + [None]
    special = [0] * len(keep) + [1]
    return TokenList(tokens, special, offsets, len(pieces) > len(keep))


def from_tokenizer(tokenizer: Any, prompt: str, length: int) -> TokenList:
    """Tokens of a Hugging Face fast tokenizer, through the package's one tokenizer call (as SD3 calls it)."""
    from attention_map_diffusers.contract import prompt_tokens

    t = prompt_tokens(tokenizer, prompt, length)
    return TokenList(t.tokens, t.special, t.offsets, t.truncated)


@dataclass
class Layout:
    """The prompts of a dump and each encoder's tokens; T = clip_len + t5_len (CLIP positions first)."""

    prompts: list[str]
    clip: list[TokenList]
    t5: list[TokenList]
    clip_len: int
    t5_len: int

    @property
    def T(self) -> int:
        return self.clip_len + self.t5_len

    @property
    def B(self) -> int:
        return len(self.prompts)

    def span(self, encoder: str) -> tuple[int, int]:
        return (0, self.clip_len) if encoder == "clip" else (self.clip_len, self.T)

    def positions(self, encoder: str, item: int, word: str, occurrence: Optional[int] = None) -> list[int]:
        """Text positions (on the T axis) of the tokens inside the prompt word ``word`` (every occurrence,
        or only the given one), found from the stored offsets."""
        prompt = self.prompts[item]
        spans = [m.span() for m in re.finditer(rf"(?<![\w'’-]){re.escape(word)}(?![\w'’-])", prompt)]
        if occurrence is not None:
            spans = [spans[occurrence]]
        tl = getattr(self, encoder)[item]
        start = self.span(encoder)[0]
        out = []
        for j, off in enumerate(tl.offsets):
            if off is not None and any(a <= off[0] and off[1] <= b for a, b in spans):
                out.append(start + j)
        return out


def make_layout(
    prompts: Sequence[str], clip_len: int = 77, t5_len: int = 32, clip_tokenizer: Any = None, t5_tokenizer: Any = None
) -> Layout:
    """Tokenise ``prompts`` for both encoders (built-in tokenizers unless real ones are given)."""
    clip = [from_tokenizer(clip_tokenizer, p, clip_len) if clip_tokenizer else clip_tokens(p, clip_len) for p in prompts]
    t5 = [from_tokenizer(t5_tokenizer, p, t5_len) if t5_tokenizer else t5_tokens(p, t5_len) for p in prompts]
    return Layout(list(prompts), clip, t5, clip_len, t5_len)


def default_timesteps(num_steps: int) -> np.ndarray:
    """Decreasing timesteps (denoising order), like a flow-matching schedule on [0, 1000]."""
    return np.linspace(1000.0, 1000.0 / num_steps, num_steps).astype(np.float32)


def random_arrays(layout: Layout, num_blocks: int = 4, num_steps: int = 6, grid: tuple[int, int] = (8, 8), seed: int = 0) -> dict:
    """Positive random arrays of the right shapes, steps in denoising order (float32).

    ``per_block_step_token_mean`` sums to 1 over T (a renormalised map averaged over pixels), and
    ``per_block_step_token_max`` is at least the mean.
    """
    rng = np.random.default_rng(seed)
    B, T = layout.B, layout.T
    N = num_blocks * num_steps
    probs = rng.uniform(0.05, 1.0, size=(B, grid[0], grid[1], T)).astype(np.float32)
    probs /= probs.sum(axis=-1, keepdims=True) * 1.25  # image->text is a part of the softmax over all keys
    mean = rng.uniform(0.1, 1.0, size=(B, num_blocks, num_steps, T)).astype(np.float32)
    mean /= mean.sum(axis=-1, keepdims=True)
    return {
        "sum_token_map": probs * N,
        "N": np.asarray(N, dtype=np.int64),
        "per_block_step_token_mean": mean,
        "per_block_step_token_max": np.minimum(mean * 3.0, 1.0).astype(np.float32),
        "timesteps": default_timesteps(num_steps),
    }


def concept_arrays(
    B: int, concepts: Sequence[str], num_blocks: int = 4, num_steps: int = 6, grid: tuple[int, int] = (8, 8), seed: int = 0,
    *, nan_blocks: Sequence[int] = (), block_maps: bool = False, step_maps: bool = False,
    logits: Optional[np.ndarray] = None,
) -> tuple[dict, dict]:
    """The optional concept arrays and metadata of a dump made with ``--concepts`` (issue #23), as
    (npz arrays, metadata keys): add them to :func:`random_arrays`' and pass the keys as ``meta``.

    Every (step, block) update is a softmax over the concepts at each grid cell (random logits, or
    ``logits`` (B, Hc, Wc, C) plus noise to plant an answer); ``nan_blocks`` have no concept stream
    (their curves and maps are NaN and they are not in ``concept_blocks``). ``step_maps``: also
    ``concept_per_step_map``, with a step's own planted logits ``logits[..., s]`` when ``logits`` has a
    step axis (B, Hc, Wc, C, S).
    """
    rng = np.random.default_rng(seed)
    C = len(concepts)
    stream = [k for k in range(num_blocks) if k not in set(nan_blocks)]
    base = np.zeros((B, grid[0], grid[1], C)) if logits is None else np.asarray(logits, dtype=np.float64)
    per_block = np.full((B, num_blocks, grid[0], grid[1], C), np.nan)
    per_step = np.zeros((B, num_steps, grid[0], grid[1], C))
    step_mean = np.full((B, num_blocks, num_steps, C), np.nan)
    for k in stream:
        per_block[:, k] = 0.0
        for s in range(num_steps):
            z = (base[..., s] if base.ndim == 5 else base) + rng.normal(size=(B, grid[0], grid[1], C))
            p = np.exp(z - z.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            per_block[:, k] += p
            per_step[:, s] += p
            step_mean[:, k, s] = p.mean(axis=(1, 2))
    arrays = {
        "concept_sum_map": per_block[:, stream].sum(axis=1).astype(np.float32),
        "concept_N": np.asarray(len(stream) * num_steps, dtype=np.int64),
        "concept_per_block_step_mean": step_mean.astype(np.float32),
    }
    if block_maps:
        arrays["concept_per_block_map"] = per_block.astype(np.float32)
    if step_maps:
        arrays["concept_per_step_map"] = per_step.astype(np.float32)
    meta = {"concepts": list(concepts), "concept_blocks": stream, "concept_steps": list(range(num_steps)),
            "concept_rule": "flux-default"}
    return arrays, meta


def png_bytes(rgb: np.ndarray) -> bytes:
    """A PNG file of an (h, w, 3) uint8 image (standard library only)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(np.uint8).tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def write_dump(
    folder: str | os.PathLike,
    layout: Layout,
    arrays: dict,
    *,
    original: bool = False,
    image: bool = True,
    image_size: tuple[int, int] = (64, 64),
    store_dtype: str = "float16",
    seed: int = 42,
    offsets: bool = True,
    pad_original_tokens: bool = True,
    meta: Optional[dict] = None,
) -> dict:
    """Write ``stepavg_token_maps_v1.npz``, ``metadata.json`` and images into ``folder``; returns the metadata.

    Args:
        arrays: the npz arrays, steps in denoising order (as :func:`random_arrays` returns them).
        original: write a dump of the original tool: no format 2 keys, CLIP tokens only (one flat list
            when B = 1, padded to ``clip_len`` with ``<|endoftext|>`` when ``pad_original_tokens``),
            the prompt as a string when B = 1, steps by ascending timestep.
        offsets: store token offsets (format 2); False stores null, as for a tokenizer without offsets.
        meta: keys to override in the metadata (None values delete the key).
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    B, T = layout.B, layout.T
    smap = arrays.get("sum_token_map")
    mean = arrays.get("per_block_step_token_mean")
    Bk, S = (mean.shape[1], mean.shape[2]) if mean is not None and mean.ndim == 4 else (0, 0)
    grid = list(smap.shape[1:3]) if smap is not None and smap.ndim == 4 else [0, 0]
    timesteps = arrays.get("timesteps", default_timesteps(max(S, 1)))
    w, h = image_size

    images = []
    if image:
        os.makedirs(os.path.join(folder, "images"), exist_ok=True)
        for i in range(B):
            rel = f"images/seed{seed}-{w}x{h}-idx{i}.png"
            yy, xx = np.mgrid[0:h, 0:w]
            rgb = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full_like(xx, 60 * i % 256)], -1)
            with open(os.path.join(folder, rel), "wb") as fh:
                fh.write(png_bytes(rgb.astype(np.uint8)))
            images.append(rel)
    else:
        images = [None] * B

    out = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        if k != "N" and k != "timesteps" and np.issubdtype(v.dtype, np.floating):
            v = v.astype(store_dtype)
        if original and k in ("per_block_step_token_mean", "per_block_step_token_max") and v.ndim == 4:
            v = v[:, :, ::-1]
        if original and k == "timesteps" and v.ndim == 1:
            v = v[::-1]
        if original and k == "per_step_token_map" and v.ndim == 5:
            v = v[:, ::-1]
        out[k] = np.ascontiguousarray(v)
    np.savez(os.path.join(folder, "stepavg_token_maps_v1.npz"), **out)

    blocks = [f"transformer_blocks.{i}.attn" for i in range(Bk)]
    md: dict = {
        "prompt": list(layout.prompts),
        "negative_prompt": "",
        "seed": seed,
        "steps": S,
        "guidance_scale": 4.5,
        "model_id": "synthetic",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
        "image_size": [h, w],
        "canonical_size": grid,
        "batch_size": B,
        "num_steps": S,
        "num_blocks": Bk,
        "blocks": blocks,
        "block_latent_sizes": [grid] * Bk,
        "tokens": [t.tokens for t in layout.clip],
        "T_from_model": T,
        "special_mask": [t.special for t in layout.clip],
        "timestamp": "2025-01-01T00:00:00Z",
    }
    if original:
        if pad_original_tokens:
            md["tokens"] = [t + [CLIP_EOS] * (layout.clip_len - len(t)) for t in md["tokens"]]
            md["special_mask"] = [m + [1] * (layout.clip_len - len(m)) for m in md["special_mask"]]
        if B == 1:
            md["prompt"] = layout.prompts[0]
            md["tokens"] = md["tokens"][0]
            md["special_mask"] = md["special_mask"][0]
    else:
        md.update(
            {
                "format_version": 2,
                "step_order": "denoising",
                "timesteps": [float(t) for t in np.asarray(timesteps).reshape(-1)],
                "text_spans": {"clip": [0, layout.clip_len], "t5": [layout.clip_len, T]},
                "tokens_t5": [t.tokens for t in layout.t5],
                "special_mask_t5": [t.special for t in layout.t5],
                "token_offsets_clip": [t.offsets for t in layout.clip] if offsets else None,
                "token_offsets_t5": [t.offsets for t in layout.t5] if offsets else None,
                "truncated": [{"clip": c.truncated, "t5": t.truncated} for c, t in zip(layout.clip, layout.t5)],
                "max_sequence_length": layout.t5_len,
                "skip_guidance_layers": None,
                "cfg": True,
                "device": "cpu",
                "dtype": "float32",
                "versions": {"torch": "n/a", "diffusers": "n/a", "transformers": "n/a", "attention_map_diffusers": "0.1.0"},
                "elapsed_s": 0.0,
                "seeds": [seed + i for i in range(B)],
                "num_images_per_prompt": 1,
                "images": images,
                "store_dtype": store_dtype,
                "random_weights": False,
                "num_tokens_clip": layout.clip_len,
                "num_tokens_t5": layout.t5_len,
            }
        )
    for k, v in (meta or {}).items():
        if v is None:
            md.pop(k, None)
        else:
            md[k] = v
    with open(os.path.join(folder, "metadata.json"), "w", encoding="utf-8") as fh:
        json.dump(md, fh, indent=2, ensure_ascii=False)
    return md


def write_runs(root: str | os.PathLike, runs: Sequence[dict]) -> None:
    """``root/runs.jsonl``, one JSON object per line (keys: run, folder, prompt, seed, status[, error])."""
    with open(os.path.join(os.fspath(root), "runs.jsonl"), "w", encoding="utf-8") as fh:
        for r in runs:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_csv(path: str | os.PathLike) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a CSV table the analysis wrote."""
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def run_analysis(*argv) -> int:
    """``analyse_stepavg.main`` in-process, every argument as a string."""
    import analyse_stepavg

    return analyse_stepavg.main([str(a) for a in argv])
