"""The capturing processor: diffusers' own joint-attention processor, with its SDPA call tapped.

``CaptureProcessor`` wraps whatever processor an attention block had (SD3's ``JointAttnProcessor2_0``
on ``transformer_blocks.{i}.attn``; FLUX.1's ``FluxAttnProcessor`` on ``transformer_blocks.{i}.attn``
and ``single_transformer_blocks.{j}.attn``) and runs it unchanged. While it runs, a scoped ``TorchFunctionMode``
intercepts the single ``F.scaled_dot_product_attention`` call on the joint (image + text) sequence:
that call is answered by the sink's :class:`~attention_map_diffusers.capture.paths.KernelPaths`
(SDPA's own output, bit for bit, on every path) and its query, key and image-row log-sum-exp are
handed to the sink. No forward method is copied from diffusers and nothing is patched outside the
processor call.

Processors that go through diffusers' ``dispatch_attention_fn`` (FLUX.1's) reach
``F.scaled_dot_product_attention`` only on the native backends; on any other backend (flash, sage,
flex, ...) the call is refused before it runs, with the line that switches the backend back, so a
capture never records nothing silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .exact import default_scale
from .layout import Layout
from .paths import Attended, Configuration, KernelPaths

logger = logging.getLogger(__name__)

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}

# diffusers' attention backends that end in F.scaled_dot_product_attention (models/attention_dispatch.py).
_SDPA_BACKENDS = ("native", "_native_cudnn", "_native_efficient", "_native_flash", "_native_math")


@dataclass
class JointAttention:
    """What one joint-attention call exposes to a sink, for the batch items it records.

    Attributes:
        query: (R, H, N + T, D) joint queries of the R recorded items, in the model's order
            (``layout``: image first for SD3, text first for FLUX.1).
        key: (R, H, N + T, D) joint keys.
        image_lse: (R, H, N) float32 log-sum-exp of the image rows over all keys, or None on the
            "chunked" path (computed later, exactly).
        scale: the softmax scale SDPA used.
        num_image_tokens: N.
        path: the path that answered the call ("flash-lse", "sdpa+side-lse", "chunked", ...).
        configuration: the key of that path's verdicts in the sink's ``KernelPaths``.
        text_first: the sequence is ``[text, image]`` (FLUX.1).
        value: (R, H, N + T, D) joint values (read by the concept stream).
        output: (R, H, N + T, D) SDPA's output, before the output projection (the concept stream's
            image attention outputs); the processor returns it unchanged.
    """

    query: torch.Tensor
    key: torch.Tensor
    image_lse: Optional[torch.Tensor]
    scale: float
    num_image_tokens: int
    path: str = "chunked"
    configuration: Optional[Configuration] = None
    text_first: bool = False
    value: Optional[torch.Tensor] = None
    output: Optional[torch.Tensor] = None

    @property
    def layout(self) -> Layout:
        return Layout(self.num_image_tokens, self.query.shape[-2] - self.num_image_tokens, self.text_first)


class AttentionSink(Protocol):
    """Receives the joint attention of the blocks it was installed on."""

    paths: KernelPaths  # answers the joint SDPA call; holds the verdicts
    method: str  # "auto", "kernel-lse", "side-lse" or "chunked" (see KernelPaths.attend)

    def wants_capture(self) -> bool:
        """Whether the current transformer call is to be recorded (False: plain pass-through)."""

    def first_recorded_item(self, batch_size: int) -> int:
        """The first batch item recorded: ``batch_size // 2`` when the unconditional half of
        classifier-free guidance is dropped, else 0."""

    def text_tokens(self) -> int:
        """T of the current transformer call (the single blocks of FLUX.1 get no text stream)."""

    def on_attention(self, block_index: int, attention: JointAttention) -> None:
        """Consume one block's joint attention."""


class _SdpaTap(TorchFunctionMode):
    """Answers the joint SDPA call of one processor call and remembers what the sink needs."""

    def __init__(self, layout: Layout, sink: AttentionSink):
        super().__init__()
        self.seq_len = layout.length
        self.num_image_tokens = layout.num_image
        self.text_first = layout.text_first
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
                    lambda: func(*args, **kwargs), text_first=self.text_first,
                )
                self.captured = (q[first:], k[first:], att, default_scale(q.shape[-1], bound["scale"]), v[first:])
                return att.output
        return func(*args, **kwargs)


class CaptureProcessor:
    """An attention processor that runs ``inner`` and reports its image->text attention to ``sink``.

    Args:
        inner: the processor the module had (its output is returned unchanged).
        sink: an :class:`AttentionSink`.
        block_index: the block's position in the recorder's block list (SD3: i of
            ``transformer_blocks.{i}.attn``; FLUX.1: the joint blocks, then the single blocks).
        name: the module path, for messages.
        single: a FLUX.1 single block: one stream already holding ``[text, image]``, no
            ``encoder_hidden_states``; T comes from the transformer call (``sink.text_tokens()``).
        text_first: the joint sequence is ``[text, image]`` (FLUX.1) rather than ``[image, text]``.
    """

    def __init__(self, inner: Any, sink: AttentionSink, block_index: int, name: Optional[str] = None,
                 *, single: bool = False, text_first: bool = False):
        self.inner = inner
        self.sink = sink
        self.block_index = block_index
        self.name = name or f"transformer_blocks.{block_index}.attn"
        self.single = single
        self.text_first = text_first
        # diffusers' Attention.forward passes a processor only the keyword arguments that
        # inspect.signature(processor.__call__) names. This instance attribute (seen by that lookup,
        # not by the call itself, which uses the class's __call__) advertises the wrapped processor's
        # parameters, so arguments such as IP-adapter inputs still reach it.
        self.__call__ = inner.__call__

    def _layout(self, hidden_states, encoder_hidden_states) -> Optional[Layout]:
        if self.single:
            T = int(self.sink.text_tokens())
            return Layout(hidden_states.shape[1] - T, T, True)
        if encoder_hidden_states is None:
            return None
        return Layout(hidden_states.shape[1], encoder_hidden_states.shape[1], self.text_first)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        # FluxAttention.forward passes image_rotary_emb positionally, after attention_mask.
        args = (encoder_hidden_states, attention_mask) + args
        if not self.sink.wants_capture():
            return self.inner(attn, hidden_states, *args, **kwargs)
        layout = self._layout(hidden_states, encoder_hidden_states)
        if layout is None:
            return self.inner(attn, hidden_states, *args, **kwargs)
        _check_backend(self.inner, self.name)
        tap = _SdpaTap(layout, self.sink)
        with tap:
            out = self.inner(attn, hidden_states, *args, **kwargs)
        if tap.captured is None:
            fix = ("pipe.transformer.set_attention_backend('native')" if hasattr(self.inner, "_attention_backend")
                   else "pipe.transformer.set_attn_processor(JointAttnProcessor2_0())")
            raise RuntimeError(
                f"{self.name}: its processor {type(self.inner).__name__} did not call "
                "F.scaled_dot_product_attention on the joint image+text sequence, so its attention cannot be "
                f"captured. Use diffusers' own processor on the native attention backend ({fix})."
            )
        q, k, att, scale, v = tap.captured
        joint = JointAttention(q, k, att.image_lse, scale, layout.num_image, att.path, att.configuration,
                               layout.text_first, v, att.output[att.output.shape[0] - q.shape[0]:])
        self.sink.on_attention(self.block_index, joint)
        return out

    def __repr__(self) -> str:
        return f"CaptureProcessor(block={self.block_index}, inner={type(self.inner).__name__})"


def _check_backend(inner, name: str) -> None:
    """Refuse a processor whose ``dispatch_attention_fn`` would not reach F.scaled_dot_product_attention."""
    if not hasattr(type(inner), "_attention_backend"):
        return  # calls F.scaled_dot_product_attention itself (SD3's JointAttnProcessor2_0)
    backend = inner._attention_backend
    if backend is None:
        try:
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry
        except ImportError:  # pragma: no cover - an older diffusers without dispatch
            return
        backend = _AttentionBackendRegistry._active_backend
    value = getattr(backend, "value", backend)
    if str(value) not in _SDPA_BACKENDS or getattr(inner, "_parallel_config", None) is not None:
        what = f"attention backend {value!r}" if str(value) not in _SDPA_BACKENDS else "context parallelism"
        raise RuntimeError(
            f"{name}: the transformer runs {what}, which never calls F.scaled_dot_product_attention, so "
            "attention capture would record nothing. Record on the native backend: "
            "pipe.transformer.set_attention_backend('native') (and leave any "
            "`with attention_backend(...)` block) before recording."
        )
