"""Tiny random-weight FLUX.1 pipelines, built offline in code (``--model tiny-random-flux``).

The same tokenizers as :mod:`.tiny` (a real ``CLIPTokenizerFast`` and ``T5TokenizerFast`` over a
small built-in vocabulary), a ``FluxTransformer2DModel`` with joint and single-stream blocks, RoPE
and RMS qk-norm, a 16-channel VAE with FLUX.1's scaling / shift factors and an 8x downsampling (so
that, as in FLUX.1, the image token grid is (H/16, W/16)). Random weights: the images are noise and
the maps carry no meaning; they exercise the machinery end to end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .tiny import CLIP_BOS, CLIP_EOS, _sharpen_attention, build_clip_tokenizer, build_t5_tokenizer, tiny_vae


@dataclass(frozen=True)
class TinyFluxConfig:
    """Sizes of a tiny FLUX.1 pipeline. Every field maps onto the real model's config."""

    num_layers: int = 2  # transformer_blocks (joint, two streams)
    num_single_layers: int = 2  # single_transformer_blocks (one stream [text, image])
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)  # sums to attention_head_dim
    guidance_embeds: bool = True  # FLUX.1-dev; False for schnell
    latent_channels: int = 16
    vae_block_out_channels: tuple[int, ...] = (8, 8, 16, 16)  # 3 downsamplings: an 8x VAE
    clip_hidden_size: int = 16  # pooled_projection_dim
    clip_layers: int = 2
    t5_d_model: int = 32  # joint_attention_dim
    t5_layers: int = 2
    qk_gain: float = 3.0  # see TinySD3Config.qk_gain
    seed: int = 0


def build_tiny_flux_pipeline(config: TinyFluxConfig = TinyFluxConfig()):
    """A ``FluxPipeline`` with random weights, built in memory (float32, CPU)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if sum(config.axes_dims_rope) != config.attention_head_dim:
        raise ValueError(f"axes_dims_rope {config.axes_dims_rope} must sum to attention_head_dim "
                         f"{config.attention_head_dim}")
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer()
    vocab = tokenizer.get_vocab()

    torch.manual_seed(config.seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=config.clip_hidden_size,
        intermediate_size=2 * config.clip_hidden_size,
        num_hidden_layers=config.clip_layers,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=vocab[CLIP_BOS],
        eos_token_id=vocab[CLIP_EOS],
        pad_token_id=vocab[CLIP_EOS],
        hidden_act="gelu",
    )).eval()
    torch.manual_seed(config.seed + 2)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2),
        d_model=config.t5_d_model,
        d_ff=2 * config.t5_d_model,
        d_kv=8,
        num_heads=2,
        num_layers=config.t5_layers,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )).eval()

    torch.manual_seed(config.seed + 3)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * config.latent_channels,  # 2x2 packed latents
        num_layers=config.num_layers,
        num_single_layers=config.num_single_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=config.t5_d_model,
        pooled_projection_dim=config.clip_hidden_size,
        guidance_embeds=config.guidance_embeds,
        axes_dims_rope=tuple(config.axes_dims_rope),
    ).eval()
    _sharpen_attention(transformer, config.qk_gain)

    vae = tiny_vae(config.vae_block_out_channels, config.latent_channels, seed=config.seed + 4,
                   shift_factor=0.1159, scaling_factor=0.3611)  # FLUX.1's VAE factors

    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.15, base_image_seq_len=256,
                                                  max_image_seq_len=4096),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def save_tiny_flux_pipeline(path: str | os.PathLike, config: TinyFluxConfig = TinyFluxConfig()) -> str:
    """Build a tiny FLUX.1 pipeline and ``save_pretrained`` it to ``path``; returns the path."""
    pipe = build_tiny_flux_pipeline(config)
    pipe.save_pretrained(os.fspath(path))
    return os.fspath(path)
