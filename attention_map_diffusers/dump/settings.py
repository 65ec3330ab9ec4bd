"""The settings of one dump command, as a type: what every run of it does (and records in metadata.json)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

from ..contract import FORMAT_VERSION, settings_fingerprint


@dataclass(frozen=True)
class RunSettings:
    """Built by the command line from its flags; read by the run loop and the metadata writer."""

    model_id: str  # hub id, local folder or "tiny-random"
    negative_prompt: str
    steps: int  # denoising steps
    guidance_scale: float  # <= 1 disables classifier-free guidance
    height: int  # image size in pixels
    width: int
    max_sequence_length: int  # T5 tokens
    skip_guidance_layers: Optional[tuple[int, ...]]  # skip-layer guidance blocks, or None (SD3 only)
    num_images_per_prompt: int
    canonical_size: Optional[tuple[int, int]]  # grid of the stored maps; None: the latent patch grid
    store_dtype: str  # "float16" or "float32": the stored maps and per-(block, step) statistics
    save_block_maps: bool  # also store per_block_token_map
    save_step_maps: bool  # also store per_step_token_map
    save_image: bool  # decode and save the images
    image_format: str  # "png" or "jpg"
    embed_metadata: bool  # metadata in the images' text chunks / JPEG comment
    random_weights: bool  # the model has random weights (tiny-random): said in every output
    true_cfg_scale: float = 1.0  # FLUX.1's true CFG (> 1 with a negative prompt: a second, unrecorded call)
    noise_levels: Optional[tuple[float, ...]] = None  # image mode: the flow-matching levels, noisiest first
    strength: Optional[float] = None  # image mode: img2img from this level instead of noise levels
    concepts: Optional[tuple[str, ...]] = None  # ConceptAttention concepts, or None (no concept maps)
    concept_blocks: Optional[tuple[int, ...]] = None  # joint blocks averaged; None: the family's default
    concept_steps: Optional[tuple[int, ...]] = None  # steps averaged; None: all
    concept_rule: str = "concept"  # capture.concept_names.CONCEPT_RULES

    @property
    def image_mode(self) -> bool:
        """Attention on given images (--image) rather than on generated ones."""
        return self.noise_levels is not None or self.strength is not None

    @property
    def image_size(self) -> list[int]:
        return [self.height, self.width]

    def recorded(self, prompts: Sequence[str], seed: int, image_sha256: Optional[str] = None) -> dict:
        """What a run of ``prompts`` (its batch) and base ``seed`` stores in metadata.json under
        ``settings``: everything that decides its files. Placement (device, dtype, CPU offload) is
        left out, so that a job resumed on another machine keeps its finished runs; each run's
        metadata records its own device and dtype. ``image_sha256``: image mode, the given image's
        hash (another file under the same name is another run)."""
        model = self.model_id
        if os.path.isdir(os.path.expanduser(model)):  # the same folder however it is spelled
            model = os.path.realpath(os.path.expanduser(model))
        return {
            "format_version": FORMAT_VERSION,
            "prompt": list(prompts),
            "seed": int(seed),
            "model": model,
            "negative_prompt": self.negative_prompt,
            "steps": self.steps,
            "guidance_scale": float(self.guidance_scale),
            "height": self.height,
            "width": self.width,
            "max_sequence_length": self.max_sequence_length,
            "skip_guidance_layers": list(self.skip_guidance_layers) if self.skip_guidance_layers else None,
            "num_images_per_prompt": self.num_images_per_prompt,
            "canonical_size": list(self.canonical_size) if self.canonical_size else None,
            "store_dtype": self.store_dtype,
            "save_block_maps": self.save_block_maps,
            "save_step_maps": self.save_step_maps,
            "save_image": self.save_image,
            "image_format": self.image_format,
            "embed_metadata": self.embed_metadata,
        } | ({"true_cfg_scale": float(self.true_cfg_scale)} if self.true_cfg_scale != 1.0 else {}) | (
            {"mode": "image", "image_sha256": image_sha256,
             "noise_levels": list(self.noise_levels) if self.noise_levels is not None else None,
             "strength": self.strength} if self.image_mode else {}) | (
            {"concepts": list(self.concepts),
             "concept_blocks": list(self.concept_blocks) if self.concept_blocks is not None else None,
             "concept_steps": list(self.concept_steps) if self.concept_steps is not None else None,
             "concept_rule": self.concept_rule} if self.concepts else {})
        # (only when set, so that the fingerprints of earlier dumps stay what they were)

    def fingerprint(self, prompts: Sequence[str], seed: int, image_sha256: Optional[str] = None) -> str:
        """The settings fingerprint of a run (see :func:`~attention_map_diffusers.contract.settings_fingerprint`)."""
        return settings_fingerprint(self.recorded(prompts, seed, image_sha256))
