"""Following the transformer's forward calls: which are denoising steps, with what grid and timestep."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .family import Family, family_of


class TransformerCalls:
    """Forward hooks on the transformer that tell denoising steps from other calls.

    Which calls are steps is the family's business (:meth:`~.family.Family.read_call`): for SD3 every
    call but the one that receives ``skip_layers`` (skip-layer guidance); for FLUX.1 every call but
    the negative pass of true CFG. Before each step ``on_begin(timestep, grid, cfg)`` is called, and
    ``recording`` stays True until the call returns (or raises). Nothing here synchronises with the
    device (FLUX.1: but for one read of the image position ids per recording).

    Args:
        transformer: an ``SD3Transformer2DModel`` or ``FluxTransformer2DModel`` (possibly wrapped by
            accelerate's offload hooks).
        cfg: whether the batch holds an unconditional half first. A callable is asked at every call
            (e.g. ``lambda: pipe.do_classifier_free_guidance``).
        on_begin: ``(timestep (0-d tensor), grid (h, w), cfg) -> None``.
        family: default: :func:`~.family.family_of` the transformer.
    """

    def __init__(
        self,
        transformer,
        cfg: Callable[[], bool],
        on_begin: Callable[[torch.Tensor, tuple[int, int], bool], None],
        family: Optional[Family] = None,
    ):
        self.transformer = transformer
        self.family = family or family_of(transformer)
        self._cfg = cfg
        self._on_begin = on_begin
        self._handles: list = []
        self._state: dict = {}
        self.recording = False
        self.cfg = False
        self.text_tokens: Optional[int] = None  # T of the step being recorded

    def attach(self) -> None:
        self._state = {}
        self._handles = [
            self.transformer.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.transformer.register_forward_hook(self._post, with_kwargs=True, always_call=True),
        ]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._state = {}  # drops the reference to the last latents
        self.recording = False

    def _pre(self, module, args, kwargs):
        call = self.family.read_call(self.transformer, args, kwargs, self._state)
        if call is None:
            return None
        self.cfg = bool(self._cfg())
        self.text_tokens = call.text_tokens
        self.recording = True
        self._on_begin(call.timestep, call.grid, self.cfg)
        return None

    def _post(self, module, args, kwargs, output):
        self.recording = False
        return None
