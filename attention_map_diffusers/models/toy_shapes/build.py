"""The untrained parts of the toy-shapes pipeline, built offline in code.

Every part is a real diffusers / transformers class, so the capture code sees SD3's structure:
two ``CLIPTextModelWithProjection`` encoders and a ``T5EncoderModel`` (random and frozen: the
grammar is finite and their embeddings of it are distinct; the transformer's context embedder
learns to read them), an ``AutoencoderKL`` with 16 latent channels and 4x downsampling (128 px ->
32x32 latents -> 16x16 = 256 image tokens at patch 2), an ``SD3Transformer2DModel`` and a
``FlowMatchEulerDiscreteScheduler``.

The CLIP encoders' text projections are zero, so the pooled prompt embedding is the same for every
prompt: everything the transformer learns about the prompt reaches the image through joint
attention, which is what this model exists to show.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..tiny import build_clip_tokenizer, build_t5_tokenizer, clip_text_encoder, sd3_transformer, t5_text_encoder, tiny_vae
from .data import COLORS, CONNECTIVES, SHAPES, SIZE


def grammar_words() -> list[str]:
    """The words of the caption grammar, in a fixed order (the tokenizers know each as one token)."""
    words = ["a", *COLORS, *SHAPES]
    for c in CONNECTIVES:
        words += c.split()
    return list(dict.fromkeys(words))


@dataclass(frozen=True)
class ToyShapesConfig:
    """Sizes of the toy-shapes pipeline."""

    num_layers: int = 4  # transformer_blocks
    num_attention_heads: int = 4  # width 128: twice the 64 values of a 2x2 patch of 16 channels
    attention_head_dim: int = 32
    patch_size: int = 2
    latent_channels: int = 16
    vae_block_out_channels: tuple[int, ...] = (8, 16, 32)  # two downsamplings: 4x
    vae_layers_per_block: int = 1
    clip_hidden_size: int = 32  # each of the two CLIP encoders
    clip_layers: int = 2
    clip_max_length: int = 16  # CLIP positions (SD3: 77); the longest caption takes 10
    t5_d_model: int = 64  # joint_attention_dim = 2 * clip_hidden_size
    t5_layers: int = 2
    t5_max_length: int = 16  # T5 positions the model is trained with (the pipeline's max_sequence_length)
    seed: int = 0

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return SIZE // self.vae_scale_factor


def build_tokenizers(config: ToyShapesConfig):
    """(CLIP tokenizer, second CLIP tokenizer, T5 tokenizer), each knowing the grammar's words whole."""
    words = grammar_words()
    return (
        build_clip_tokenizer(model_max_length=config.clip_max_length, words=words),
        build_clip_tokenizer(model_max_length=config.clip_max_length, words=words),
        build_t5_tokenizer(words=words, model_max_length=config.t5_max_length),
    )


def build_text_encoders(config: ToyShapesConfig, tokenizer, tokenizer_3):
    """Random, frozen (text_encoder, text_encoder_2, text_encoder_3)."""
    import torch

    vocab = tokenizer.get_vocab()

    def clip(seed: int):
        model = clip_text_encoder(vocab, config.clip_hidden_size, config.clip_layers, config.clip_max_length, seed=seed)
        with torch.no_grad():
            model.text_projection.weight.zero_()  # a constant pooled embedding: see the module docstring
        return model.requires_grad_(False)

    t5 = t5_text_encoder(len(tokenizer_3), config.t5_d_model, config.t5_layers, seed=config.seed + 3, d_kv=16, num_heads=4)
    return clip(config.seed + 1), clip(config.seed + 2), t5.requires_grad_(False)


def build_vae(config: ToyShapesConfig):
    """An untrained ``AutoencoderKL`` (scaling and shift factors are set after training)."""
    return tiny_vae(
        config.vae_block_out_channels, config.latent_channels, seed=config.seed + 5,
        layers_per_block=config.vae_layers_per_block, norm_num_groups=8, sample_size=SIZE,
        mid_block_add_attention=False,  # flat shapes need no global context; saves a third of the time
    ).train()


def build_transformer(config: ToyShapesConfig):
    """An untrained ``SD3Transformer2DModel`` whose native sample is the 128 px image's latent."""
    return sd3_transformer(
        seed=config.seed + 4, sample_size=config.latent_size, patch_size=config.patch_size,
        latent_channels=config.latent_channels, num_layers=config.num_layers,
        attention_head_dim=config.attention_head_dim, num_attention_heads=config.num_attention_heads,
        t5_d_model=config.t5_d_model, clip_hidden_size=config.clip_hidden_size,
        pos_embed_max_size=2 * config.latent_size // config.patch_size,  # up to 256 px images
    )


def build_scheduler():
    """Flow matching with shift 1: at 128 px the sequence is short, no shift towards noise is needed."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def assemble_pipeline(transformer, vae, text_encoders, tokenizers):
    from diffusers import StableDiffusion3Pipeline

    te1, te2, te3 = text_encoders
    tok1, tok2, tok3 = tokenizers
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=build_scheduler(),
        vae=vae,
        text_encoder=te1,
        tokenizer=tok1,
        text_encoder_2=te2,
        tokenizer_2=tok2,
        text_encoder_3=te3,
        tokenizer_3=tok3,
    )
