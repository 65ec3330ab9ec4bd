"""Upstream-compatible names: ``init_pipeline(pipe)`` and ``attn_maps``.

For code written against attention-map-diffusers::

    from attention_map_diffusers import attn_maps, init_pipeline
    pipe = init_pipeline(pipe)
    pipe(prompt)
    attn_maps[timestep]["transformer_blocks.0.attn"]  # (B_total, heads, h, w, T), float32, CPU
    # FLUX.1 also has "single_transformer_blocks.{j}.attn"; B_total is the positive pass only

Built on the same capture machinery as :class:`StepAverageRecorder` (exact probabilities, the
original processors wrapped, never patched), but, like upstream, it keeps every raw per-head map of
every step and block on the host: B_total * heads * h * w * T * 4 bytes per block and step (all of
the CFG batch, unconditional half included). For SD3.5 large at 1024x1024, 50 steps and CFG that is
2 * 38 * 4096 * 333 * 4 bytes = 207 MB per block and step, about 394 GB in all; use
``StepAverageRecorder`` (a few MiB) unless you need the raw maps of a small run.
"""

from __future__ import annotations

import torch

from .blocks import attention_blocks, install_capture, restore_processors
from .calls import TransformerCalls
from .family import family_of
from .paths import KernelPaths
from .processor import JointAttention
from .recorder import recorded_probs, resolve_transformer

#: ``attn_maps[timestep][module_name]`` -> (B_total, heads, h, w, T) float32 CPU tensor. The one piece of
#: module-level state of this package, kept for upstream compatibility. Clear it between runs.
attn_maps: dict = {}

_SINK_ATTR = "_attention_map_diffusers_sink"


class _RawMapSink:
    """Writes each joint-attention call's per-head image->text map into :data:`attn_maps`."""

    def __init__(self, pipe, scratch_bytes: int = 64 << 20):
        self.transformer = resolve_transformer(pipe)
        self.family = family_of(self.transformer)
        self.names = {b.position: b.name for b in attention_blocks(self.transformer, self.family)}
        self.scratch_bytes = scratch_bytes
        self.paths = KernelPaths()  # checks each configuration once while init_pipeline is in effect
        self.method = "auto"
        # The whole batch is kept, as upstream did: no CFG split.
        self.calls = TransformerCalls(self.transformer, lambda: False, self._begin, self.family)
        self.saved: dict = {}
        self.key = None
        self.grid = (0, 0)

    def _begin(self, timestep: torch.Tensor, grid, cfg) -> None:
        # Upstream keys maps by the Python value of the timestep; this one read per step is the only
        # host synchronisation, on top of the per-call copies to the CPU that this mode implies.
        self.key = timestep.item()
        self.grid = grid

    def wants_capture(self) -> bool:
        return self.calls.recording

    def first_recorded_item(self, batch_size: int) -> int:
        return 0

    def text_tokens(self) -> int:
        return self.calls.text_tokens

    def on_attention(self, block_index: int, att: JointAttention) -> None:
        probs = recorded_probs(att, mean_heads=False, budget_bytes=self.scratch_bytes)
        B, H, _, T = probs.shape
        h, w = self.grid
        attn_maps.setdefault(self.key, {})[self.names[block_index]] = probs.reshape(B, H, h, w, T).cpu()


def init_pipeline(pipe):
    """Start keeping raw image->text maps of every joint-attention call in :data:`attn_maps`.

    Stays in effect until :func:`restore_pipeline`. Returns ``pipe`` (as upstream did).
    """
    transformer = resolve_transformer(pipe)
    if getattr(transformer, _SINK_ATTR, None) is not None:
        return pipe
    sink = _RawMapSink(pipe)
    sink.saved = install_capture(transformer, lambda i: sink, sink.family)
    sink.calls.attach()
    setattr(transformer, _SINK_ATTR, sink)
    return pipe


def restore_pipeline(pipe):
    """Undo :func:`init_pipeline`: original processors back, hooks removed. Returns ``pipe``."""
    transformer = resolve_transformer(pipe)
    sink = getattr(transformer, _SINK_ATTR, None)
    if sink is not None:
        sink.calls.detach()
        restore_processors(transformer, sink.saved)
        setattr(transformer, _SINK_ATTR, None)
    return pipe
