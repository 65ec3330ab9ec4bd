"""The fused attention kernels that return the row log-sum-exp, called through their aten ops.

Nothing here decides whether a kernel can be trusted: :mod:`.paths` checks every answer once per
configuration. This module only knows which op SDPA would call, how to call it on the installed
torch (arguments bound by the op's own schema, so that a renamed or added argument fails loudly or
keeps its default instead of shifting the others) and how to read the lse it returns.

The lse of an op: flash (B, H, L); memory-efficient (B, H, L rounded up to 32), padded rows +inf;
cuDNN (B, H, L, 1) in torch >= 2.9. :func:`lse_rows` brings each to (B, H, L).

Shapes: B batch, H heads, L sequence length, N image rows of a side call, D head dim.
"""

from __future__ import annotations

from typing import Optional

import torch

from .exact import default_scale

# torch.nn.attention.SDPBackend values, as returned by torch._fused_sdp_choice.
ERROR, MATH, FLASH, EFFICIENT, CUDNN, OVERRIDEABLE = -1, 0, 1, 2, 3, 4
BACKEND_NAMES = {ERROR: "error", MATH: "math", FLASH: "flash", EFFICIENT: "efficient", CUDNN: "cudnn",
                 OVERRIDEABLE: "overrideable"}

# The lse-returning aten op behind each backend SDPA may pick, and the path name it gives.
KERNEL_PATHS = {FLASH: "flash-lse", EFFICIENT: "efficient-lse", CUDNN: "cudnn-lse"}
_FLASH_CPU = "_scaled_dot_product_flash_attention_for_cpu"
_FLASH_CUDA = "_scaled_dot_product_flash_attention"
_EFFICIENT_OP = "_scaled_dot_product_efficient_attention"
_CUDNN_OP = "_scaled_dot_product_cudnn_attention"

# Side kernels (path b): the op that computes the lse of the image rows next to SDPA.
SIDE_OPS = {"flash-cpu": _FLASH_CPU, "flash": _FLASH_CUDA, "efficient": _EFFICIENT_OP}


class Unavailable(Exception):
    """No lse-returning kernel applies to these inputs; the message says why."""


def sdpa_backend(query, key, value, scale: Optional[float]) -> int:
    """What ``F.scaled_dot_product_attention(query, key, value, scale=scale)`` would run (an SDPBackend
    value), honouring ``sdpa_kernel`` contexts and flags such as TORCH_CUDNN_SDPA_DEPRIORITIZED;
    ``ERROR`` when torch cannot say."""
    try:
        return int(torch._fused_sdp_choice(query, key, value, None, 0.0, False, scale=scale))
    except (RuntimeError, TypeError, AttributeError, NotImplementedError):
        return ERROR


def backend_name(backend: Optional[int]) -> str:
    return "n/a" if backend is None else BACKEND_NAMES.get(backend, str(backend))


def call_aten(name: str, **values):
    """``torch.ops.aten.<name>`` with ``values`` passed by the names of the installed schema.

    Values the schema does not name are left out (an older torch without, say, ``attn_bias``);
    arguments it names and ``values`` lacks keep their defaults; a required one raises TypeError.
    """
    try:
        arguments = torch._C._get_schema(f"aten::{name}", "").arguments
    except (RuntimeError, AttributeError):
        arguments = getattr(torch.ops.aten, name).default._schema.arguments
    kwargs = {}
    for arg in arguments:
        if arg.name in values:
            kwargs[arg.name] = values[arg.name]
        elif not arg.has_default_value():
            raise TypeError(f"aten::{name} on torch {torch.__version__} requires {arg.name!r}, unknown here")
    return getattr(torch.ops.aten, name)(**kwargs)


def kernel_op(backend: int, query) -> str:
    """The lse-returning aten op behind ``backend`` for these inputs (path a).

    Raises:
        Unavailable: SDPA picks a backend without such an op (math, ...), or would pad the inputs.
    """
    if backend == FLASH and query.device.type == "cpu":
        return _FLASH_CPU
    if backend == FLASH:
        if query.shape[-1] % 8:
            raise Unavailable(f"SDPA pads head dim {query.shape[-1]} to a multiple of 8 before calling flash")
        return _FLASH_CUDA
    if backend == EFFICIENT:
        return _EFFICIENT_OP
    if backend == CUDNN:
        return _CUDNN_OP
    raise Unavailable(f"SDPA picks the {backend_name(backend)} backend, which returns no lse")


def kernel_with_lse(backend: int, query, key, value, scale: Optional[float]):
    """Path (a): the kernel SDPA picks (``backend``), called through its lse-returning op.

    Mirrors the arguments ``F.scaled_dot_product_attention`` passes that op (aten's
    ``_scaled_dot_product_attention``), with the lse switched on where it is optional.

    Args:
        query, key, value: (B, H, L, D).
    Returns:
        (out (B, H, L, D), lse as the op returned it).
    Raises:
        Unavailable: see :func:`kernel_op`; and anything the op raises.
    """
    name = kernel_op(backend, query)
    common = dict(query=query, key=key, value=value, dropout_p=0.0, is_causal=False)
    if name == _FLASH_CPU:
        res = call_aten(name, **common, attn_mask=None, scale=scale)
    elif name == _FLASH_CUDA:
        # SDPA passes the scale it computed from the head dim; so do we
        res = call_aten(name, **common, return_debug_mask=False, scale=default_scale(query.shape[-1], scale))
    elif name == _EFFICIENT_OP:
        res = call_aten(name, **common, attn_bias=None, compute_log_sumexp=True, scale=scale)
    else:
        res = call_aten(name, **common, attn_bias=None, compute_log_sumexp=True, return_debug_mask=False,
                        scale=scale)
    return res[0], res[1]


def side_kernels(query) -> list[str]:
    """Path (b) candidates for these inputs, best first (keys of ``SIDE_OPS``)."""
    device = query.device.type
    if device == "cpu":
        return ["flash-cpu"]
    if device == "cuda":
        half = query.dtype in (torch.float16, torch.bfloat16)
        # flash needs fp16 / bf16 and a head dim that SDPA would not pad
        return (["flash"] if half and query.shape[-1] % 8 == 0 else []) + ["efficient"]
    return []


def side_lse(kernel: str, q_img, key, value, scale: Optional[float]):
    """Path (b): the lse of the image rows from a side call whose output is discarded.

    Args:
        kernel: a key of ``SIDE_OPS``.
        q_img: (R, H, N, D) image queries; key, value: (R, H, L, D) all keys and values.
    Returns:
        the lse as the op returned it.
    """
    name = SIDE_OPS[kernel]
    common = dict(query=q_img, key=key, value=value, dropout_p=0.0, is_causal=False, scale=scale)
    if kernel == "efficient":
        res = call_aten(name, **common, attn_bias=None, compute_log_sumexp=True)
    elif kernel == "flash":
        res = call_aten(name, **common, return_debug_mask=False)
    else:
        res = call_aten(name, **common, attn_mask=None)
    return res[1]


def lse_rows(lse, batch: int, heads: int, rows: int):
    """An op's lse as (batch, heads, rows) float32: a trailing singleton dim squeezed, padding rows
    past ``rows`` cut off. Raises ValueError on any other layout."""
    if lse.dim() == 4 and lse.shape[-1] == 1:
        lse = lse.squeeze(-1)
    if lse.dim() != 3 or tuple(lse.shape[:2]) != (batch, heads) or lse.shape[2] < rows:
        raise ValueError(
            f"lse of shape {tuple(lse.shape)}, expected ({batch}, {heads}, >= {rows}), possibly with a trailing 1"
        )
    lse = lse[..., :rows]
    return lse if lse.dtype == torch.float32 else lse.float()
