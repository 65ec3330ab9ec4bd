"""Tiny random-weight SD3 pipelines, built offline in code.

Used by the tests, the benchmarks and ``sd_35_stepavg_dump.py --model tiny-random``: nothing is
downloaded. The tokenizers are real ``CLIPTokenizer`` / ``T5Tokenizer`` objects (built with the
``tokenizers`` library from a small vocabulary made here, or from the real CLIP BPE merges when a
path to them is given), so token handling, offsets and truncation behave as in SD3.5.

The weights are random: images from these pipelines are noise-like and their attention maps carry
no meaning. They exist to exercise the machinery end to end.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..bytelevel import bytes_to_unicode

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"

# Words the built-in vocabularies know as whole words. Anything else is split into sub-words or
# characters, which is what the tests want to see.
_CORPUS = """
a an the of in on at to with and or under over beneath above behind front near next by from into
cat dog bird horse cow fish mouse rabbit fox bear lion tiger owl duck man woman child girl boy
people person face hand eye hair hat dress shirt coat shoe bag table chair bed sofa lamp window
door wall floor roof house barn shed bridge road street city tree forest flower grass field river
lake sea beach mountain hill sky cloud sun moon star rain snow car bus train boat bicycle bike
plane sign book cup bottle apple banana cake bread pizza red green blue yellow black white brown
orange pink purple gray golden silver rusty old new small big large tiny huge furry fluffy shiny
wooden metal glass stone painting photo photograph portrait picture landscape style art detailed
realistic cinematic lighting night day morning evening sunset dark bright soft sharp holding
sitting standing running flying walking sleeping eating reading wearing looking top bottom left
right side corner center background foreground two three many some one
"""

_SUFFIXES = ("s", "es", "ed", "ing", "er", "est", "ly", "y")


def corpus_words() -> list[str]:
    """The built-in word list, in a fixed order (it defines the built-in vocabularies)."""
    seen: dict[str, None] = {}
    for w in _CORPUS.split():
        seen.setdefault(w, None)
    return list(seen)


def _learn_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Deterministic byte-pair merges that end with every word of ``words`` as one ``</w>`` symbol.

    Classic BPE learning (most frequent adjacent pair first, ties broken lexicographically), run
    until no word has more than one symbol left.
    """
    table = bytes_to_unicode()
    seqs = []
    for w in words:
        chars = [table[b] for b in w.encode("utf-8")]
        chars[-1] = chars[-1] + "</w>"
        seqs.append(chars)
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for s in seqs:
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for i, s in enumerate(seqs):
            out, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == best:
                    out.append(joined)
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            seqs[i] = out


def _clip_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout: bytes, bytes + ``</w>``, one entry per merge, then the two specials."""
    symbols = list(bytes_to_unicode().values())
    symbols += [s + "</w>" for s in symbols]
    symbols += ["".join(m) for m in merges]
    symbols += [CLIP_BOS, CLIP_EOS]
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    return vocab


def read_clip_bpe_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Merges from OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (line 0 is a header; SD3 uses 48894)."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    return [tuple(line.split()) for line in lines[1 : 48894 + 1]]  # type: ignore[misc]


def build_clip_tokenizer(
    bpe_path: Optional[str | os.PathLike] = None, model_max_length: int = 77, words: Optional[Sequence[str]] = None
):
    """A ``CLIPTokenizerFast`` built offline.

    Args:
        bpe_path: the real CLIP merges file; when given, the tokenizer is SD3's CLIP tokenizer
            (49408 ids). When None, a small vocabulary learnt from ``words`` is used.
        model_max_length: CLIP's context length (77 for SD3).
        words: the whole words of the small vocabulary (default: the built-in word list).
    """
    from transformers import CLIPTokenizerFast

    merges = read_clip_bpe_merges(bpe_path) if bpe_path else _learn_merges(words or corpus_words())
    vocab = _clip_vocab(merges)
    return CLIPTokenizerFast(
        vocab=vocab,
        merges=list(merges),
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        unk_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        model_max_length=model_max_length,
    )


def t5_vocab(words: Optional[Sequence[str]] = None) -> list[tuple[str, float]]:
    """A small SentencePiece-unigram vocabulary in T5's layout (pad, eos, unk first).

    Whole words carry the best scores, then common suffixes, then single characters, so known words
    stay whole and unknown ones split into realistic pieces (``▁bi`` ``cycle``-like splits).
    """
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = {p for p, _ in pieces}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    for w in words or corpus_words():
        add("▁" + w, -8.0)
        add("▁" + w.capitalize(), -8.5)
    for s in _SUFFIXES:
        add(s, -9.0)
    add("▁", -12.0)
    printable = [chr(c) for c in range(33, 127)]
    for c in printable:
        add("▁" + c, -13.0)
    for c in printable:
        add(c, -14.0)
    return pieces


def build_t5_tokenizer(words: Optional[Sequence[str]] = None, model_max_length: Optional[int] = None):
    """A ``T5TokenizerFast`` built offline from :func:`t5_vocab` (no extra ids)."""
    from transformers import T5TokenizerFast

    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return T5TokenizerFast(vocab=t5_vocab(words), extra_ids=0, **kwargs)


@dataclass(frozen=True)
class TinySD3Config:
    """Sizes of a tiny SD3-family pipeline. Every field maps onto the real model's config."""

    num_layers: int = 2  # transformer_blocks
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    patch_size: int = 2
    dual_attention_layers: tuple[int, ...] = ()  # SD3.5 medium's MMDiT-X blocks (they get attn2)
    qk_norm: Optional[str] = None  # "rms_norm" in SD3.5
    latent_channels: int = 4
    # VAE: len(block_out_channels) - 1 downsamplings, so the latent is 2**(n-1) times smaller.
    vae_block_out_channels: tuple[int, ...] = (8, 8)
    clip_hidden_size: int = 16  # each of CLIP-L and CLIP-G
    clip_layers: int = 2
    t5_d_model: int = 32  # joint_attention_dim; must be >= 2 * clip_hidden_size
    t5_layers: int = 2
    pos_embed_max_size: int = 96  # largest latent grid (in patches) the model accepts
    # Random init gives near-uniform attention; scaling q and k by this gain makes the maps peaked
    # (logits scale by gain**2), so that tests can tell a right map from a plausible wrong one.
    qk_gain: float = 3.0
    clip_bpe_path: Optional[str] = field(default=None, compare=False)  # real CLIP merges, optional
    seed: int = 0


def demo_config() -> TinySD3Config:
    """``--model tiny-random``: shaped like SD3.5 medium (MMDiT-X dual attention, qk-norm, an 8x VAE
    and 2x2 patches, so image sizes and grids match the real model's), but tiny and random."""
    return TinySD3Config(
        num_layers=4,
        num_attention_heads=2,
        attention_head_dim=16,
        dual_attention_layers=(0, 1),
        qk_norm="rms_norm",
        vae_block_out_channels=(8, 8, 16, 16),
    )


def clip_text_encoder(vocab: dict, hidden_size: int, num_layers: int, max_positions: int, *, seed: int):
    """A random ``CLIPTextModelWithProjection`` (2 heads) for a CLIP tokenizer's ``vocab``, in eval mode."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        projection_dim=hidden_size,
        max_position_embeddings=max_positions,
        bos_token_id=vocab[CLIP_BOS],
        eos_token_id=vocab[CLIP_EOS],
        pad_token_id=vocab[CLIP_EOS],
        hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(cfg).eval()


def t5_text_encoder(vocab_size: int, d_model: int, num_layers: int, *, seed: int, d_kv: int = 8, num_heads: int = 2):
    """A random ``T5EncoderModel`` (pad id 0, eos id 1, as :func:`build_t5_tokenizer`), in eval mode."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_ff=2 * d_model,
        d_kv=d_kv,
        num_heads=num_heads,
        num_layers=num_layers,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg).eval()


def tiny_vae(block_out_channels, latent_channels: int, *, seed: int, shift_factor: Optional[float] = None,
             scaling_factor: Optional[float] = None, layers_per_block: int = 1, norm_num_groups: Optional[int] = None,
             sample_size: int = 32, mid_block_add_attention: bool = True):
    """A random ``AutoencoderKL`` (no quant convs), in eval mode; the scale factor is
    2 ** (len(block_out_channels) - 1). ``norm_num_groups`` defaults to min(4, narrowest block);
    shift / scaling factors left out keep diffusers' defaults (set them after training)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(block_out_channels)
    factors = {k: v for k, v in (("shift_factor", shift_factor), ("scaling_factor", scaling_factor)) if v is not None}
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups if norm_num_groups is not None else min(4, min(block_out_channels)),
        sample_size=sample_size,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=mid_block_add_attention,
        **factors,
    ).eval()


def sd3_transformer(*, seed: int, sample_size: int, patch_size: int, latent_channels: int, num_layers: int,
                    attention_head_dim: int, num_attention_heads: int, t5_d_model: int, clip_hidden_size: int,
                    pos_embed_max_size: int, **extra):
    """A random ``SD3Transformer2DModel`` (train mode, as constructed) whose text widths match the
    tiny text encoders: joint attention over the T5 width, pooled vector of the two CLIPs.
    ``extra``: further config (``dual_attention_layers``, ``qk_norm``)."""
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=patch_size,
        in_channels=latent_channels,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=t5_d_model,
        caption_projection_dim=num_attention_heads * attention_head_dim,
        pooled_projection_dim=2 * clip_hidden_size,
        out_channels=latent_channels,
        pos_embed_max_size=pos_embed_max_size,
        **extra,
    )


def build_tiny_sd3_pipeline(config: TinySD3Config = TinySD3Config()):
    """A ``StableDiffusion3Pipeline`` with random weights, built in memory (float32, CPU)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    if config.t5_d_model < 2 * config.clip_hidden_size:
        raise ValueError(
            f"t5_d_model ({config.t5_d_model}) must be >= 2 * clip_hidden_size ({config.clip_hidden_size}): "
            "SD3 pads the concatenated CLIP embeddings to the T5 width"
        )
    tokenizer = build_clip_tokenizer(config.clip_bpe_path)
    tokenizer_3 = build_t5_tokenizer()
    vocab = tokenizer.get_vocab()

    text_encoder = clip_text_encoder(vocab, config.clip_hidden_size, config.clip_layers, tokenizer.model_max_length,
                                     seed=config.seed + 1)
    text_encoder_2 = clip_text_encoder(vocab, config.clip_hidden_size, config.clip_layers, tokenizer.model_max_length,
                                       seed=config.seed + 2)
    text_encoder_3 = t5_text_encoder(len(tokenizer_3), config.t5_d_model, config.t5_layers, seed=config.seed + 3)

    transformer = sd3_transformer(
        seed=config.seed + 4, sample_size=64, patch_size=config.patch_size, latent_channels=config.latent_channels,
        num_layers=config.num_layers, attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads, t5_d_model=config.t5_d_model,
        clip_hidden_size=config.clip_hidden_size, pos_embed_max_size=config.pos_embed_max_size,
        dual_attention_layers=tuple(config.dual_attention_layers), qk_norm=config.qk_norm,
    ).eval()
    _sharpen_attention(transformer, config.qk_gain)

    vae = tiny_vae(config.vae_block_out_channels, config.latent_channels, seed=config.seed + 5,
                   shift_factor=0.0609, scaling_factor=1.5035)

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_clip_tokenizer(config.clip_bpe_path),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _sharpen_attention(transformer, gain: float) -> None:
    """Scale every attention's q and k by ``gain`` (on the RMS norms where qk-norm is used)."""
    import torch

    with torch.no_grad():
        for module in transformer.modules():
            if not hasattr(module, "to_q") or not hasattr(module, "norm_q"):
                continue
            pairs = [("to_q", "norm_q"), ("to_k", "norm_k"), ("add_q_proj", "norm_added_q"), ("add_k_proj", "norm_added_k")]
            for proj_name, norm_name in pairs:
                norm = getattr(module, norm_name, None)
                proj = getattr(module, proj_name, None)
                target = norm if norm is not None and getattr(norm, "weight", None) is not None else proj
                if target is None:
                    continue
                target.weight.mul_(gain)
                if getattr(target, "bias", None) is not None:
                    target.bias.mul_(gain)


def save_tiny_sd3_pipeline(path: str | os.PathLike, config: TinySD3Config = TinySD3Config()) -> str:
    """Build a tiny pipeline and ``save_pretrained`` it to ``path``; returns the path."""
    pipe = build_tiny_sd3_pipeline(config)
    pipe.save_pretrained(os.fspath(path))
    return os.fspath(path)
