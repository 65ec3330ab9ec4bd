"""Attention on a given image: encode it, noise it at chosen flow-matching levels, run the
transformer once per level under the recorder. The maps say where the model, reading the prompt,
finds each word in *that* image (the way DAAM-style and ConceptAttention-style segmentation use
real images).

    from PIL import Image
    from attention_map_diffusers.capture.on_image import record_on_image
    res = record_on_image(pipe, Image.open("cat.png").convert("RGB").resize((1024, 1024)),
                          "a cat on a sofa", noise_levels=(0.7, 0.5, 0.3))
    res.mean_token_map          # (1, Hc, Wc, T), averaged over the levels and blocks

Flow matching (SD3, FLUX.1): ``x_t = (1 - sigma) x_0 + sigma eps`` at timestep ``1000 sigma``, with
``x_0`` the VAE latent's mean (``latent_dist.mode()``, shifted and scaled as the pipeline does) and
one noise ``eps`` per image drawn from ``seed``, shared by the levels. SD3: with classifier-free
guidance the batch is ``[negative, prompt]`` as in the pipeline and the prompt half is recorded; an
image's attention in the prompt half does not depend on it (the items of a batch do not interact),
so guidance only costs time here. FLUX.1: the latent is packed in 2 x 2 patches with its position
ids, the timestep passed as ``sigma`` (``FluxPipeline`` passes ``t / 1000``), and ``guidance_scale``
is the distilled guidance embedding's value (FLUX.1-dev; ignored by schnell), as in generation.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .aggregate import CaptureResult
from .family import FLUX, SD3, family_of
from .recorder import StepAverageRecorder


def encode_image(pipe, image) -> torch.Tensor:
    """(1, C, h, w) latent of a PIL image whose size is a multiple of the model's, as the
    transformer sees it: the mean of the VAE posterior, shifted and scaled."""
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(image, height=image.height, width=image.width)
    pixels = pixels.to(device=pipe._execution_device, dtype=vae.dtype)
    with torch.no_grad():
        latent = vae.encode(pixels).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latent - shift) * vae.config.scaling_factor


def latent_and_noise(pipe, image, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0 in the transformer's dtype, one float32 noise eps of its shape drawn from
    ``torch.Generator(seed)`` on the pipeline's device), shared by every noise level."""
    device = pipe._execution_device
    latent = encode_image(pipe, image).to(pipe.transformer.dtype)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    return latent, torch.randn(latent.shape, generator=generator, device=device, dtype=torch.float32)


def noised(latent: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """The flow-matching interpolation at noise level ``sigma`` (computed in float32)."""
    return ((1.0 - sigma) * latent.float() + sigma * noise.float()).to(latent.dtype)


def record_on_image(
    pipe,
    image,
    prompt: str,
    noise_levels: Sequence[float] = (0.7, 0.5, 0.3),
    *,
    seed: int = 0,
    guidance_scale: float = 1.0,
    negative_prompt: str = "",
    max_sequence_length: int = 256,
    recorder: Optional[dict] = None,
) -> CaptureResult:
    """Record the attention of ``prompt`` on ``image`` at each noise level (noisiest first).

    Args:
        pipe: a StableDiffusion3Pipeline (any SD3 / SD3.5 checkpoint) or a FluxPipeline (FLUX.1).
        image: PIL RGB image, its sides multiples of ``vae_scale_factor x patch_size`` (16 for both).
        noise_levels: sigmas in [0, 1]; the steps of the result, in the order given.
        seed: seeds the one noise tensor shared by the levels (a torch.Generator on the pipeline's
            device, as the dump's generation does).
        guidance_scale: SD3: > 1 runs the pipeline's CFG batch (negative + prompt); FLUX.1: the
            guidance embedding's value (``negative_prompt`` does not apply).
        recorder: keyword arguments of :class:`StepAverageRecorder` (canonical_size, keep_step_maps, ...).
    """
    family = family_of(pipe) if getattr(pipe, "transformer", None) is not None else None
    if family is FLUX:
        return _record_flux(pipe, image, prompt, noise_levels, seed, guidance_scale, max_sequence_length, recorder)
    if family is not SD3:
        raise ValueError("record_on_image supports StableDiffusion3Pipeline (SD3 / SD3.5) and FluxPipeline (FLUX.1) pipelines")
    device = pipe._execution_device
    cfg = guidance_scale > 1.0
    latent, noise = latent_and_noise(pipe, image, seed)
    with torch.no_grad():
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            prompt=[prompt], prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=cfg,
            negative_prompt=[negative_prompt] if cfg else None, max_sequence_length=max_sequence_length,
        )
        if cfg:
            embeds = torch.cat([neg_embeds, embeds])
            pooled = torch.cat([neg_pooled, pooled])
        dtype = pipe.transformer.dtype
        embeds, pooled = embeds.to(dtype), pooled.to(dtype)
        with StepAverageRecorder(pipe, cfg=cfg, **(recorder or {})) as rec:
            for sigma in noise_levels:
                x = noised(latent, noise, float(sigma))
                x = torch.cat([x, x]) if cfg else x
                t = torch.full((x.shape[0],), 1000.0 * float(sigma), device=device, dtype=torch.float32)
                pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds,
                                 pooled_projections=pooled, return_dict=False)
    return rec.result()


def _record_flux(pipe, image, prompt: str, noise_levels: Sequence[float], seed: int, guidance_scale: float,
                 max_sequence_length: int, recorder: Optional[dict]) -> CaptureResult:
    """:func:`record_on_image` for a FluxPipeline: the transformer called as ``FluxPipeline.__call__``
    calls it, on the packed noised latent."""
    device = pipe._execution_device
    latent, noise = latent_and_noise(pipe, image, seed)
    _, channels, h, w = latent.shape
    guidance = None
    if pipe.transformer.config.guidance_embeds:
        guidance = torch.full([1], float(guidance_scale), device=device, dtype=torch.float32)
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=[prompt], prompt_2=None, device=device,
                                                      max_sequence_length=max_sequence_length)
        img_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, device, embeds.dtype)
        with StepAverageRecorder(pipe, **(recorder or {})) as rec:
            for sigma in noise_levels:
                x = pipe._pack_latents(noised(latent, noise, float(sigma)), 1, channels, h, w)
                t = torch.full((1,), 1000.0 * float(sigma), device=device, dtype=torch.float32).to(x.dtype)
                pipe.transformer(hidden_states=x, timestep=t / 1000, guidance=guidance, pooled_projections=pooled,
                                 encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=img_ids, return_dict=False)
    return rec.result()
