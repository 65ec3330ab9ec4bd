"""The settings of one dump command, as a type: what every run of it does (and records in metadata.json)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


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
    skip_guidance_layers: Optional[tuple[int, ...]]  # skip-layer guidance blocks, or None
    num_images_per_prompt: int
    canonical_size: Optional[tuple[int, int]]  # grid of the stored maps; None: the latent patch grid
    store_dtype: str  # "float16" or "float32": the stored maps and per-(block, step) statistics
    save_block_maps: bool  # also store per_block_token_map
    save_step_maps: bool  # also store per_step_token_map
    save_image: bool  # decode and save the images
    image_format: str  # "png" or "jpg"
    embed_metadata: bool  # metadata in the images' text chunks / JPEG comment
    random_weights: bool  # the model has random weights (tiny-random): said in every output

    @property
    def image_size(self) -> list[int]:
        return [self.height, self.width]
