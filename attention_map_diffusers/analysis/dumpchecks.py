"""The checks of a dump's arrays and metadata against each other (``docs/FORMAT.md``), for
:func:`~.dumpfile.load_dump`: numpy and the standard library only. Each raises
:class:`~attention_map_diffusers.contract.UserError` with one line that names the bad value and says
what to do, or returns the checked value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..contract import FORMAT_VERSION, UserError, block_index

# Token strings that count as special when a dump (original tool) stores no special mask.
SPECIAL_STRINGS = frozenset({"<|startoftext|>", "<|endoftext|>", "</s>", "<pad>", "<s>"})


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def json_type(v: Any) -> str:
    """What a JSON value is, in the words of JSON (for messages about hand-edited metadata)."""
    if isinstance(v, bool):
        return "true/false"
    if v is None:
        return "null"
    return {str: "a string", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def check_meta_int(meta: dict, key: str, actual: int, what: str, where: str) -> None:
    if key in meta and not is_int(meta[key]):
        raise UserError(
            f"{where}: metadata {key} must be a whole number (the arrays have {what}={actual}), got {meta[key]!r} "
            f"({json_type(meta[key])}); fix it or re-run the dump"
        )
    if key in meta and meta[key] != actual:
        raise UserError(f"{where}: metadata {key}={meta[key]!r} but the arrays have {what}={actual}; re-run the dump")


def per_item(value: Any, B: int, key: str, where: str, prompts_equal: bool) -> list:
    """A per-item list from a per-item list or (original tool) one flat list shared by all items."""
    if not isinstance(value, list):
        raise UserError(f"{where}: metadata {key} must be a list, got {type(value).__name__}; re-run the dump")
    if all(isinstance(v, list) for v in value) and value:
        if len(value) != B:
            raise UserError(f"{where}: metadata {key} has {len(value)} lists but the arrays have B={B} items; re-run the dump")
        return value
    if B > 1 and not prompts_equal:
        raise UserError(
            f"{where}: metadata {key} is one flat list but the dump has B={B} items with different prompts; "
            "it cannot say which tokens belong to which item"
        )
    return [value] * B


def check_tokens(tokens: list, special: Optional[list], B: int, length: int, key: str, where: str):
    out_t, out_s = [], []
    for i in range(B):
        toks = tokens[i]
        if not all(isinstance(t, str) for t in toks):
            raise UserError(f"{where}: metadata {key}[{i}] must be a list of strings; re-run the dump")
        if len(toks) > length:
            raise UserError(
                f"{where}: metadata {key}[{i}] has {len(toks)} tokens but the encoder has {length} text "
                "positions; re-run the dump"
            )
        if special is None:
            sp = [t in SPECIAL_STRINGS for t in toks]
        else:
            sp = special[i]
            if len(sp) != len(toks) or not all(v in (0, 1, True, False) for v in sp):
                raise UserError(
                    f"{where}: the special mask for {key}[{i}] must be {len(toks)} values 0/1 aligned with the "
                    "tokens; re-run the dump"
                )
            sp = [bool(v) for v in sp]
        out_t.append(list(toks))
        out_s.append(sp)
    return out_t, out_s


def check_offsets(value: Any, tokens: list[list[str]], prompts: list[str], key: str, where: str):
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != len(tokens):
        raise UserError(f"{where}: metadata {key} must be null or one list per item ({len(tokens)}); re-run the dump")
    out = []
    for i, (offs, toks) in enumerate(zip(value, tokens)):
        if offs is None:
            out.append(None)
            continue
        if not isinstance(offs, list) or len(offs) != len(toks):
            raise UserError(f"{where}: metadata {key}[{i}] must have one entry per token ({len(toks)}); re-run the dump")
        row: list[Optional[tuple[int, int]]] = []
        for j, o in enumerate(offs):
            if o is None:
                row.append(None)
                continue
            ok = isinstance(o, list) and len(o) == 2 and all(is_int(x) for x in o)
            if not ok or not 0 <= o[0] <= o[1] <= len(prompts[i]):
                raise UserError(
                    f"{where}: metadata {key}[{i}][{j}] = {o!r} is not a [start, end] span within the "
                    f"{len(prompts[i])}-character prompt; re-run the dump"
                )
            row.append((o[0], o[1]))
        out.append(row)
    return out


def check_span(value: Any, T: int, name: str, where: str) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2 and all(is_int(v) for v in value) and 0 <= value[0] <= value[1] <= T):
        raise UserError(f"{where}: metadata text_spans.{name} = {value!r} is not a [start, end] range within T={T}; re-run the dump")
    return value[0], value[1]


@dataclass(frozen=True)
class Shape:
    """The dimensions of a dump's arrays, and its number of updates N."""

    B: int
    Hc: int
    Wc: int
    T: int
    Bk: int
    S: int
    n_updates: int


def format_version(meta: dict, where: str) -> int:
    version = meta.get("format_version")
    if version is None:
        return 1
    if version != FORMAT_VERSION:
        raise UserError(
            f"{where}: format_version {version!r} is not supported; this analysis reads format "
            f"{FORMAT_VERSION} and the original tool's dumps (update attention_map_diffusers)"
        )
    return version


def check_arrays(arrays: dict[str, np.ndarray], where: str) -> Shape:
    """Shapes, dtypes and finiteness of the arrays; returns the dimensions."""
    smap, mean, ts, N = arrays["sum_token_map"], arrays["per_block_step_token_mean"], arrays.get("timesteps"), arrays["N"]
    if smap.ndim != 4:
        raise UserError(f"{where}: sum_token_map has shape {smap.shape}, expected (B, Hc, Wc, T); re-run the dump")
    B, Hc, Wc, T = smap.shape
    if mean.ndim != 4 or mean.shape[0] != B or mean.shape[3] != T:
        raise UserError(
            f"{where}: per_block_step_token_mean has shape {mean.shape}, expected (B={B}, Bk, S, T={T}) to match "
            f"sum_token_map {smap.shape}; re-run the dump"
        )
    _, Bk, S, _ = mean.shape
    if ts is not None and ts.shape != (S,):
        raise UserError(f"{where}: timesteps has shape {ts.shape}, expected (S={S},) like per_block_step_token_mean; re-run the dump")
    mx = arrays.get("per_block_step_token_max")
    if mx is not None and mx.shape != mean.shape:
        raise UserError(f"{where}: per_block_step_token_max has shape {mx.shape}, expected {mean.shape}; re-run the dump")
    if B < 1 or Bk < 1 or S < 1 or T < 1 or Hc < 1 or Wc < 1:
        raise UserError(f"{where}: empty arrays (B={B}, Bk={Bk}, S={S}, T={T}, grid {Hc}x{Wc}); re-run the dump")
    first = N.reshape(-1)[0] if N.size else None
    if N.size != 1 or not np.issubdtype(N.dtype, np.number) or not float(first).is_integer() or float(first) < 1:
        raise UserError(f"{where}: N must be one positive integer (the number of updates), got {N.reshape(-1)[:3].tolist()}; re-run the dump")
    for key, arr in arrays.items():
        if key == "N":
            continue
        if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
            raise UserError(f"{where}: {key} has dtype {arr.dtype}, expected a float array; re-run the dump")
        if not np.isfinite(arr).all():
            bad = int(np.size(arr) - np.isfinite(arr).sum())
            raise UserError(f"{where}: {key} holds {bad} NaN or inf values; the capture overflowed, re-run the dump (e.g. --store-dtype float32)")
        if key != "timesteps" and arr.size and arr.min() < 0:
            raise UserError(
                f"{where}: {key} holds negative values (min {float(arr.min()):.3g}); attention probabilities are "
                "never negative, the file is damaged: re-run the dump"
            )
    for key, arr in (("sum_token_map", smap), ("per_block_step_token_mean", mean)):
        empty = np.flatnonzero(arr.reshape(B, -1).max(axis=1) <= 0)
        if empty.size:
            raise UserError(
                f"{where}: {key} of item {int(empty[0])} is all zero, so there is no attention to share out; "
                "the capture recorded nothing, re-run the dump"
            )
    return Shape(B, Hc, Wc, T, Bk, S, int(first))


def check_metadata(meta: dict, shape: Shape, version: int, where: str) -> None:
    """The metadata's counts and lists against the arrays, and the types of the flags it states."""
    if "random_weights" in meta and not isinstance(meta["random_weights"], bool):
        value = meta["random_weights"]
        raise UserError(
            f"{where}: metadata random_weights must be true or false, got {value!r} ({json_type(value)}); "
            "fix it or re-run the dump"
        )
    check_meta_int(meta, "batch_size", shape.B, "B", where)
    check_meta_int(meta, "num_blocks", shape.Bk, "Bk", where)
    check_meta_int(meta, "num_steps", shape.S, "S", where)
    check_meta_int(meta, "T_from_model", shape.T, "T", where)
    size = meta.get("canonical_size")
    if size is not None and size != [shape.Hc, shape.Wc]:
        raise UserError(
            f"{where}: metadata canonical_size={size!r} but sum_token_map has a {shape.Hc}x{shape.Wc} grid "
            f"(expected [{shape.Hc}, {shape.Wc}]); re-run the dump"
        )
    blocks = meta.get("blocks")
    if blocks is not None and (not isinstance(blocks, list) or len(blocks) != shape.Bk):
        raise UserError(f"{where}: metadata blocks has {len(blocks) if isinstance(blocks, list) else blocks!r} entries but the arrays have Bk={shape.Bk}; re-run the dump")
    sizes = meta.get("block_latent_sizes")  # a list (format 2) or {block name: [h, w]} (original tool)
    if sizes is not None and not (isinstance(sizes, (list, dict)) and len(sizes) == shape.Bk):
        got = f"{len(sizes)} entries" if isinstance(sizes, (list, dict)) else repr(sizes)
        raise UserError(
            f"{where}: metadata block_latent_sizes is {got}, expected a list of Bk={shape.Bk} [h, w] sizes; re-run the dump"
        )
    if version >= 2 and "timesteps" in meta:
        mts = meta["timesteps"]
        if not isinstance(mts, list) or len(mts) != shape.S:
            raise UserError(f"{where}: metadata timesteps has {len(mts) if isinstance(mts, list) else mts!r} entries, expected S={shape.S}; re-run the dump")
    if version >= 2 and meta.get("step_order", "denoising") != "denoising":
        raise UserError(f"{where}: metadata step_order={meta['step_order']!r}; format 2 stores steps in denoising order, re-run the dump")


def read_prompts(meta: dict, B: int, where: str) -> list[str]:
    prompt = meta.get("prompt")
    if isinstance(prompt, str):
        return [prompt] * B
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt) and len(prompt) in (B, 1):
        return prompt * B if len(prompt) == 1 else list(prompt)
    n = len(prompt) if isinstance(prompt, list) else type(prompt).__name__
    raise UserError(f"{where}: metadata prompt must be a string or a list of B={B} strings, got {n}; re-run the dump")


def read_block_ids(blocks: Optional[list], Bk: int) -> list[int]:
    """Block indices from ``transformer_blocks.{i}.attn`` names (positions when absent or ambiguous)."""
    if not blocks:
        return list(range(Bk))
    ids = [block_index(name) for name in blocks]
    if any(i is None for i in ids) or len(set(ids)) != len(ids):
        return list(range(Bk))
    return ids
