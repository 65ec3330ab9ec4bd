"""One call for notebooks: generate an image and return its ConceptAttention maps.

    from attention_map_diffusers import concept_maps
    res = concept_maps(pipe, "a cat on a table", ["cat", "table", "background"], num_inference_steps=28)
    res.image            # the generated image (PIL), the same as pipe(...) without concepts
    res.image_maps[0]    # (H, W) map of "cat" at the image size
    res.segmentation()   # (H, W) index of the most likely concept per pixel
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .aggregate import CaptureResult
from .concept_names import DEFAULT_RULE, check_concepts
from .concepts import ConceptOptions
from .recorder import StepAverageRecorder


@dataclass
class ConceptResult:
    """The ConceptAttention maps of one generated image.

    Attributes:
        concepts: the C concepts, in the order of the maps.
        maps: (C, h, w) float32 at the latent patch grid: the softmax over concepts per image token,
            averaged over ``concept_blocks`` and ``concept_steps`` (sums to 1 over C at each cell).
        image_maps: (C, H, W) float32: ``maps`` upsampled bilinearly to the image size.
        per_block_step_mean: (Bk, S, C): every recorded block and step, the map averaged over the image
            tokens (NaN for FLUX.1's single blocks).
        blocks: the recorded blocks' module names (the Bk axis).
        concept_blocks / concept_steps: the positions on Bk / the steps averaged into ``maps``.
        rule: the concept attention rule (see ``CONCEPT_RULES``).
        image: the pipeline's first output image (what ``output_type`` made).
        capture: the whole :class:`CaptureResult` (the image->text maps of the same call included).
    """

    concepts: list[str]
    maps: np.ndarray
    image_maps: np.ndarray
    per_block_step_mean: np.ndarray
    blocks: list[str]
    concept_blocks: list[int]
    concept_steps: list[int]
    rule: str
    image: Any
    capture: CaptureResult

    def segmentation(self) -> np.ndarray:
        """(H, W) int64: per pixel the index of the concept with the largest map value."""
        return self.image_maps.argmax(axis=0)


def concept_maps(pipe, prompt: str, concepts: Sequence[str], *, blocks: Optional[Sequence[int]] = None,
                 steps: Optional[Sequence[int]] = None, rule: str = DEFAULT_RULE, **pipe_kwargs) -> ConceptResult:
    """Run ``pipe(prompt, **pipe_kwargs)`` once and return the ConceptAttention maps of ``concepts``.

    Args:
        pipe: a ``StableDiffusion3Pipeline`` or ``FluxPipeline`` with its T5 encoder.
        prompt: one prompt (one image: ``num_images_per_prompt`` must stay 1).
        concepts: the concept words ("cat", "sky", "background", ...), each encoded alone.
        blocks: positions of the joint blocks to average (default: FLUX.1 the last four, SD3 all).
        steps: denoising step indices to average (0 = first; default all).
        rule: "concept" (default), "cross", "self" or "none" (the paper's ablations).
        pipe_kwargs: passed to the pipeline (``num_inference_steps``, ``generator``, ``height``, ...).
    """
    if not isinstance(prompt, str):
        raise TypeError("concept_maps takes one prompt (a string); use StepAverageRecorder for batches")
    if int(pipe_kwargs.get("num_images_per_prompt", 1)) != 1:
        raise ValueError("concept_maps makes one image; use StepAverageRecorder for several")
    names = check_concepts(concepts, flag="concepts")
    options = ConceptOptions(names, tuple(blocks) if blocks is not None else None,
                             tuple(steps) if steps is not None else None, rule,
                             max_sequence_length=pipe_kwargs.get("max_sequence_length"))
    with StepAverageRecorder(pipe, concepts=options) as rec:
        output = pipe(prompt, **pipe_kwargs)
    res = rec.result()
    con = res.concepts
    maps = np.ascontiguousarray(con.mean_map[0].transpose(2, 0, 1))  # (C, h, w)
    image = output.images[0]
    size = _image_size(pipe, image, pipe_kwargs)
    up = F.interpolate(torch.from_numpy(maps)[None], size=size, mode="bilinear", align_corners=False)[0]
    return ConceptResult(
        concepts=list(names), maps=maps, image_maps=up.numpy(), per_block_step_mean=con.per_block_step_mean[0],
        blocks=list(res.blocks), concept_blocks=list(con.blocks), concept_steps=list(con.steps), rule=con.rule,
        image=image, capture=res,
    )


def _image_size(pipe, image, kwargs) -> tuple[int, int]:
    if hasattr(image, "size") and isinstance(getattr(image, "size"), tuple):  # PIL: (W, H)
        return int(image.size[1]), int(image.size[0])
    default = int(pipe.default_sample_size) * int(pipe.vae_scale_factor)
    return int(kwargs.get("height") or default), int(kwargs.get("width") or default)
