"""What differs between the MMDiT families the capture supports: SD3 / SD3.5 and FLUX.1.

A :class:`Family` says which modules are attention blocks, how their joint sequence is laid out,
how to read a transformer call (a denoising step to record or not, its timestep, latent grid and
text length), whether the batch holds a classifier-free-guidance half, and where each text
encoder's positions lie. Everything else (the processor, the lse paths, the accumulator) is shared.

================  ======================================  =============================================
                  SD3 / SD3.5                             FLUX.1 (dev, schnell)
================  ======================================  =============================================
blocks            ``transformer_blocks.{i}.attn``         ``transformer_blocks.{i}.attn`` then
                                                          ``single_transformer_blocks.{j}.attn``
sequence          ``[image, text]``                       ``[text, image]`` (both kinds of block)
not recorded      the skip-layer-guidance call            the negative pass of true CFG (the second
                                                          call on the same latents)
CFG               batched: unconditional half first       none in the batch (guidance embedding)
grid              latent (H/8, W/8) / patch size          packed latents: from ``img_ids`` (H/16, W/16)
text              CLIP (77) then T5                       T5 only (CLIP gives a pooled vector)
================  ======================================  =============================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from ..contract import JOINT_BLOCK, SINGLE_BLOCK

_SUFFIX = ".processor"


class Block(NamedTuple):
    """One recorded attention module."""

    position: int  # index on the Bk axis of the recording
    name: str  # module path, e.g. "single_transformer_blocks.3.attn"
    single: bool  # FLUX.1 single-stream block (no encoder_hidden_states reaches its processor)


class Call(NamedTuple):
    """A transformer call that is a denoising step to record."""

    timestep: torch.Tensor  # 0-d, on the pipeline's scale (0..1000)
    grid: tuple[int, int]  # (h, w) latent patch grid
    text_tokens: Optional[int]  # T, where the call says it


def _arg(args, kwargs, name: str, position: int):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


@dataclass(frozen=True)
class Family:
    """One model family. Use :data:`SD3` or :data:`FLUX`, or :func:`family_of`."""

    name: str  # "sd3" or "flux": the dump's metadata ``model_family``
    text_first: bool  # joint sequence is [text, image]

    # -- blocks ------------------------------------------------------------------------------------
    def blocks(self, transformer) -> list[Block]:
        """The attention blocks to record, in recording order, from ``transformer.attn_processors``."""
        joint, single = [], []
        for key in transformer.attn_processors:
            if not key.endswith(_SUFFIX):
                continue
            path = key[: -len(_SUFFIX)]
            m = JOINT_BLOCK.fullmatch(path)
            if m:
                joint.append((int(m.group(1)), path))
            elif self.name == "flux":
                m = SINGLE_BLOCK.fullmatch(path)
                if m:
                    single.append((int(m.group(1)), path))
        if not joint and not single:
            expected = "SD3Transformer2DModel" if self.name == "sd3" else "FluxTransformer2DModel"
            raise ValueError(
                f"{type(transformer).__name__} has no transformer_blocks.{{i}}.attn modules: "
                f"expected a {self.name.upper()}-family transformer ({expected})"
            )
        names = [(p, False) for _, p in sorted(joint)] + [(p, True) for _, p in sorted(single)]
        return [Block(pos, name, s) for pos, (name, s) in enumerate(names)]

    # -- calls -------------------------------------------------------------------------------------
    def read_call(self, transformer, args, kwargs, state: dict) -> Optional[Call]:
        """The step a transformer call is, or None for a call not to record.

        ``state``: a dict owned by the caller, kept between the calls of one recording. FLUX.1 keeps
        there the previous call's ``hidden_states`` (true CFG runs its negative pass second, on the very
        same latents tensor; the positive pass comes first) and the last ``img_ids`` with its grid.
        """
        hidden = _arg(args, kwargs, "hidden_states", 0)
        timestep = _arg(args, kwargs, "timestep", 3)
        if self.name == "sd3":
            if kwargs.get("skip_layers") is not None:
                return None
            if timestep is None:
                raise RuntimeError("the transformer was called without a timestep; cannot record a step")
            p = int(transformer.config.patch_size)
            text = _arg(args, kwargs, "encoder_hidden_states", 1)
            return Call(timestep.reshape(-1)[0].detach(), (hidden.shape[-2] // p, hidden.shape[-1] // p),
                        None if text is None else int(text.shape[1]))
        previous, state["hidden"] = state.get("hidden"), hidden
        if previous is not None and hidden is previous:
            return None  # the negative pass of true CFG
        if timestep is None:
            raise RuntimeError("the transformer was called without a timestep; cannot record a step")
        text = _arg(args, kwargs, "encoder_hidden_states", 1)
        img_ids = _arg(args, kwargs, "img_ids", 4)
        if text is None or img_ids is None:
            raise RuntimeError("FluxTransformer2DModel was called without encoder_hidden_states / img_ids; "
                               "cannot record a step")
        # FluxPipeline passes timestep / 1000; the transformer multiplies it back. Record the
        # pipeline's scale, as for SD3.
        if state.get("img_ids") is not img_ids:
            state["img_ids"], state["grid"] = img_ids, flux_grid(img_ids, hidden.shape[1])
        return Call(timestep.reshape(-1)[0].detach() * 1000, state["grid"], int(text.shape[1]))

    # -- guidance and text -------------------------------------------------------------------------
    def cfg_source(self, pipe, cfg) -> Callable[[], bool]:
        """A callable telling whether the current transformer batch has an unconditional half first."""
        if cfg != "auto":
            value = bool(cfg)
            return lambda: value
        if self.name == "flux":
            return lambda: False  # true CFG runs a separate call, never a batched half
        if not hasattr(type(pipe), "do_classifier_free_guidance"):
            raise ValueError(
                "cannot tell whether classifier-free guidance is on: pass the pipeline, or cfg=True/False "
                "when recording a bare transformer"
            )
        return lambda: pipe.do_classifier_free_guidance

    def text_spans(self, pipe, num_tokens: int) -> Optional[dict[str, list[int]]]:
        """Where each text encoder's positions lie on the T axis; None for a bare transformer.

        SD3 concatenates the CLIP sequence (``pipe.tokenizer_max_length`` positions, 77) and the T5
        sequence after it; FLUX.1 feeds T5 only (CLIP gives the pooled vector).
        """
        if getattr(pipe, "tokenizer_max_length", None) is None:
            return None
        if self.name == "flux":
            return {"t5": [0, int(num_tokens)]}
        clip = min(int(pipe.tokenizer_max_length), num_tokens)
        spans = {"clip": [0, clip]}
        if num_tokens > clip:
            spans["t5"] = [clip, num_tokens]
        return spans


SD3 = Family("sd3", text_first=False)
FLUX = Family("flux", text_first=True)


def family_of(model) -> Family:
    """The family of a pipeline or transformer: FLUX.1 when the transformer has single-stream blocks."""
    transformer = getattr(model, "transformer", model)
    return FLUX if hasattr(transformer, "single_transformer_blocks") else SD3


def flux_grid(img_ids: torch.Tensor, num_image_tokens: int) -> tuple[int, int]:
    """(h, w) of FLUX.1's packed latents from the position ids the pipeline gives the transformer.

    ``img_ids``: (N, 3) (or (1, N, 3)), column 1 the row and column 2 the column of each 2x2 patch.
    Reads two numbers to the host: done once per ids tensor (the pipeline passes the same one at every
    step, and the caller keeps the answer).
    """
    ids = img_ids.reshape(-1, img_ids.shape[-1])
    h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if h * w != num_image_tokens:
        raise RuntimeError(
            f"img_ids span a {h}x{w} grid but the transformer got {num_image_tokens} image tokens; only "
            "text-to-image FluxPipeline calls (one image, no reference latents) can be recorded"
        )
    return h, w
