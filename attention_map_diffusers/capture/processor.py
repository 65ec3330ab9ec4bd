"""The capturing processor: diffusers' own joint-attention processor, with its SDPA call tapped.

``CaptureProcessor`` wraps whatever processor a ``transformer_blocks.{i}.attn`` module had (normally
``JointAttnProcessor2_0``) and runs it unchanged. While it runs, a scoped ``TorchFunctionMode``
intercepts the single ``F.scaled_dot_product_attention`` call on the joint (image + text) sequence:
that call is answered by the sink's :class:`~attention_map_diffusers.capture.paths.KernelPaths`
(SDPA's own output, bit for bit, on every path) and its query, key and image-row log-sum-exp are
handed to the sink. No forward method is copied from diffusers and nothing is patched outside the
processor call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .exact import default_scale
from .paths import Attended, Configuration, KernelPaths

logger = logging.getLogger(__name__)

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


@dataclass
class JointAttention:
    """What one joint-attention call exposes to a sink, for the batch items it records.

    Attributes:
        query: (R, H, N + T, D) joint queries of the R recorded items, image tokens first (SD3's order).
        key: (R, H, N + T, D) joint keys.
        image_lse: (R, H, N) float32 log-sum-exp of the image rows over all keys, or None on the
            "chunked" path (computed later, exactly).
        scale: the softmax scale SDPA used.
        num_image_tokens: N.
        path: the path that answered the call ("flash-lse", "sdpa+side-lse", "chunked", ...).
        configuration: the key of that path's verdicts in the sink's ``KernelPaths``.
    """

    query: torch.Tensor
    key: torch.Tensor
    image_lse: Optional[torch.Tensor]
    scale: float
    num_image_tokens: int
    path: str = "chunked"
    configuration: Optional[Configuration] = None


class AttentionSink(Protocol):
    """Receives the joint attention of the blocks it was installed on."""

    paths: KernelPaths  # answers the joint SDPA call; holds the verdicts
    method: str  # "auto", "kernel-lse", "side-lse" or "chunked" (see KernelPaths.attend)

    def wants_capture(self) -> bool:
        """Whether the current transformer call is to be recorded (False: plain pass-through)."""

    def first_recorded_item(self, batch_size: int) -> int:
        """The first batch item recorded: ``batch_size // 2`` when the unconditional half of
        classifier-free guidance is dropped, else 0."""

    def on_attention(self, block_index: int, attention: JointAttention) -> None:
        """Consume one block's joint attention."""


class _SdpaTap(TorchFunctionMode):
    """Answers the joint SDPA call of one processor call and remembers what the sink needs."""

    def __init__(self, seq_len: int, num_image_tokens: int, sink: AttentionSink):
        super().__init__()
        self.seq_len = seq_len
        self.num_image_tokens = num_image_tokens
        self.sink = sink
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
                first = self.sink.first_recorded_item(q.shape[0])
                att: Attended = self.sink.paths.attend(
                    self.sink.method, q, k, v, bound["scale"], self.num_image_tokens, first,
                    lambda: func(*args, **kwargs),
                )
                self.captured = (q[first:], k[first:], att, default_scale(q.shape[-1], bound["scale"]))
                return att.output
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
        tap = _SdpaTap(n_img + encoder_hidden_states.shape[1], n_img, self.sink)
        with tap:
            out = self.inner(attn, hidden_states, **kwargs)
        if tap.captured is None:
            raise RuntimeError(
                f"transformer_blocks.{self.block_index}.attn: its processor "
                f"{type(self.inner).__name__} did not call F.scaled_dot_product_attention on the joint "
                "image+text sequence, so its attention cannot be captured. Use diffusers' "
                "JointAttnProcessor2_0 (pipe.transformer.set_attn_processor(JointAttnProcessor2_0()))."
            )
        q, k, att, scale = tap.captured
        joint = JointAttention(q, k, att.image_lse, scale, n_img, att.path, att.configuration)
        self.sink.on_attention(self.block_index, joint)
        return out

    def __repr__(self) -> str:
        return f"CaptureProcessor(block={self.block_index}, inner={type(self.inner).__name__})"
