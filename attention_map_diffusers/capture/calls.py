"""Following the transformer's forward calls: which are denoising steps, with what grid and timestep."""

from __future__ import annotations

from typing import Callable, Optional

import torch


class TransformerCalls:
    """Forward hooks on the transformer that tell denoising steps from other calls.

    A call is a denoising step unless it receives ``skip_layers`` (the extra call that skip-layer
    guidance makes). Before each step ``on_begin(timestep, grid, cfg)`` is called, and ``recording``
    stays True until the call returns (or raises). Nothing here synchronises with the device.

    Args:
        transformer: an ``SD3Transformer2DModel`` (possibly wrapped by accelerate's offload hooks).
        cfg: whether the batch holds an unconditional half first. A callable is asked at every call
            (e.g. ``lambda: pipe.do_classifier_free_guidance``).
        on_begin: ``(timestep (0-d tensor), grid (h, w), cfg) -> None``.
    """

    def __init__(
        self,
        transformer,
        cfg: Callable[[], bool],
        on_begin: Callable[[torch.Tensor, tuple[int, int], bool], None],
    ):
        self.transformer = transformer
        self.patch_size = int(transformer.config.patch_size)
        self._cfg = cfg
        self._on_begin = on_begin
        self._handles: list = []
        self.recording = False
        self.cfg = False

    def attach(self) -> None:
        self._handles = [
            self.transformer.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.transformer.register_forward_hook(self._post, with_kwargs=True, always_call=True),
        ]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.recording = False

    def _pre(self, module, args, kwargs):
        if kwargs.get("skip_layers") is not None:
            return None
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        timestep: Optional[torch.Tensor] = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        if timestep is None:
            raise RuntimeError("the transformer was called without a timestep; cannot record a step")
        grid = (hidden.shape[-2] // self.patch_size, hidden.shape[-1] // self.patch_size)
        self.cfg = bool(self._cfg())
        self.recording = True
        self._on_begin(timestep.reshape(-1)[0].detach(), grid, self.cfg)
        return None

    def _post(self, module, args, kwargs, output):
        self.recording = False
        return None
