"""The capturing processor: diffusers' own joint-attention processor, with its SDPA call tapped.

``CaptureProcessor`` wraps whatever processor a ``transformer_blocks.{i}.attn`` module had (normally
``JointAttnProcessor2_0``) and runs it unchanged. While it runs, a scoped ``TorchFunctionMode``
intercepts the single ``F.scaled_dot_product_attention`` call on the joint (image + text) sequence:
that call is answered by :func:`~attention_map_diffusers.exact.sdpa_with_lse` (the same kernel, so the
same output) and its query, key and row log-sum-exp are handed to a sink. No forward method is
copied from diffusers and nothing is patched outside the processor call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .exact import default_scale, sdpa_with_lse

logger = logging.getLogger(__name__)

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


@dataclass
class JointAttention:
    """What one joint-attention call exposes to a sink.

    Attributes:
        query: (B, H, N + T, D) joint queries, image tokens first (SD3's order).
        key: (B, H, N + T, D) joint keys.
        lse: (B, H, N + T) float32 row log-sum-exp over all keys, or None when the kernel gave none.
        scale: the softmax scale SDPA used.
        num_image_tokens: N.
    """

    query: torch.Tensor
    key: torch.Tensor
    lse: Optional[torch.Tensor]
    scale: float
    num_image_tokens: int


class AttentionSink(Protocol):
    """Receives the joint attention of the blocks it was installed on."""

    def wants_capture(self) -> bool:
        """Whether the current transformer call is to be recorded (False: plain pass-through)."""

    def use_kernel_lse(self) -> bool:
        """False forces the exact chunked fallback (``sdpa_with_lse`` is not used)."""

    def on_attention(self, block_index: int, attention: JointAttention) -> None:
        """Consume one block's joint attention."""


class _SdpaTap(TorchFunctionMode):
    """Answers the joint SDPA call of one processor call and remembers its q, k and lse."""

    def __init__(self, seq_len: int, use_kernel_lse: bool):
        super().__init__()
        self.seq_len = seq_len
        self.use_kernel_lse = use_kernel_lse
        self.captured: Optional[tuple] = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.captured is None:
            bound = dict(_SDPA_DEFAULTS)
            bound.update(zip(_SDPA_PARAMS, args))
            bound.update(kwargs)
            q, k, v = bound["query"], bound["key"], bound["value"]
            plain = (
                bound["attn_mask"] is None
                and not bound["dropout_p"]
                and not bound["is_causal"]
                and not bound["enable_gqa"]
            )
            if plain and q.dim() == 4 and q.shape[-2] == self.seq_len and k.shape[-2] == self.seq_len:
                if self.use_kernel_lse:
                    out, lse = sdpa_with_lse(q, k, v, bound["scale"])
                else:
                    out, lse = func(*args, **kwargs), None
                self.captured = (q, k, lse, default_scale(q.shape[-1], bound["scale"]))
                return out
        return func(*args, **kwargs)


class CaptureProcessor:
    """A joint-attention processor that runs ``inner`` and reports its attention to ``sink``.

    Args:
        inner: the processor the module had (its output is returned unchanged).
        sink: an :class:`AttentionSink`.
        block_index: i of ``transformer_blocks.{i}.attn``.
    """

    def __init__(self, inner: Any, sink: AttentionSink, block_index: int):
        self.inner = inner
        self.sink = sink
        self.block_index = block_index
        # diffusers' Attention.forward passes a processor only the keyword arguments that
        # inspect.signature(processor.__call__) names. This instance attribute (seen by that lookup,
        # not by the call itself, which uses the class's __call__) advertises the wrapped processor's
        # parameters, so arguments such as IP-adapter inputs still reach it.
        self.__call__ = inner.__call__

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        kwargs.update(encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask)
        if encoder_hidden_states is None or not self.sink.wants_capture():
            return self.inner(attn, hidden_states, **kwargs)
        n_img = hidden_states.shape[1]
        tap = _SdpaTap(n_img + encoder_hidden_states.shape[1], self.sink.use_kernel_lse())
        with tap:
            out = self.inner(attn, hidden_states, **kwargs)
        if tap.captured is None:
            raise RuntimeError(
                f"transformer_blocks.{self.block_index}.attn: its processor "
                f"{type(self.inner).__name__} did not call F.scaled_dot_product_attention on the joint "
                "image+text sequence, so its attention cannot be captured. Use diffusers' "
                "JointAttnProcessor2_0 (pipe.transformer.set_attn_processor(JointAttnProcessor2_0()))."
            )
        q, k, lse, scale = tap.captured
        self.sink.on_attention(self.block_index, JointAttention(q, k, lse, scale, n_img))
        return out

    def __repr__(self) -> str:
        return f"CaptureProcessor(block={self.block_index}, inner={type(self.inner).__name__})"
