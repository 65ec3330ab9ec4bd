"""ConceptAttention (Helbling et al., ICML 2025): output-space concept maps, captured beside the
image->text attention in the same pipeline call.

Each concept (a word: "cat", "sky", "background") is encoded on its own by the pipeline's T5
encoder, of which the first token is kept, and projected by the transformer's ``context_embedder``.
In every joint (double-stream) block the concept tokens run through the **text stream's weights**
-- ``norm1_context`` modulated by the concepts' own conditioning vector (the transformer's
``time_text_embed`` of the same timestep and guidance, with a pooled vector of zeros),
``add_q/k/v_proj``, ``norm_added_q/k``, then ``to_add_out``, ``norm2_context`` and ``ff_context`` for
their residual stream -- with their own attention: concept queries over [concept keys, image keys]
(``rule="concept"``; see :data:`~.concept_names.CONCEPT_RULES` for the ablations). Image and prompt
tokens never see the concepts, so the generated image is bit-identical to a run without them.
FLUX.1's concepts sit at position 0 of its RoPE, which is the identity, so none is applied.

The concept stream computes in float32 whatever the model's dtype (:func:`float32_call`: the block's
own modules called with float32 copies of their weights, one module at a time): in bfloat16 or float16
the map is then exact given the image tokens' keys, values and attention outputs the model produced,
instead of compounding half-precision rounding over the blocks. Only the image tokens' side is the
model's, in its dtype, bit for bit.

The map of a block at a step: the dot product of each image token's attention output and each
concept's attention output, both **before the output projection** (summed over heads), then a
softmax over the concepts per image token. Averaged over the chosen blocks and steps (defaults:
:func:`default_concept_blocks`, all steps).

Nothing of diffusers' forward methods is copied: the block's own modules are called, the image
tokens' keys, values and attention outputs come from the recorder's SDPA tap
(:class:`~.processor.JointAttention`), and the conditioning vector from a forward hook on
``time_text_embed``. Only the conditional half of classifier-free guidance is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .concept_names import CONCEPT_RULES, DEFAULT_RULE, MAX_CONCEPTS
from .family import Block, Family
from .processor import JointAttention

#: FLUX.1's upstream default (``layer_indices=range(15, 19)`` of its 19 double blocks): the last four.
FLUX_DEFAULT_LAST_BLOCKS = 4


@dataclass(frozen=True)
class ConceptOptions:
    """What to compute beside the recording. ``StepAverageRecorder(pipe, concepts=ConceptOptions(...))``.

    Attributes:
        concepts: the concept texts, in the order of the C axis.
        blocks: indices into the recorder's ``blocks`` of the joint blocks averaged into the map;
            None: :func:`default_concept_blocks`.
        steps: denoising step indices (0 = first, noisiest) averaged into the map; None: all.
        rule: one of :data:`~.concept_names.CONCEPT_RULES`.
        keep_block_maps: also keep the per-block map sums (``per_block_map``).
        keep_step_maps: also keep the per-step map sums (``per_step_map``).
        max_sequence_length: the T5 length the concepts are encoded with (padding included, as the
            pipeline encodes prompts); None: the pipeline's default (SD3 256, FLUX.1 512).
    """

    concepts: tuple[str, ...]
    blocks: Optional[tuple[int, ...]] = None
    steps: Optional[tuple[int, ...]] = None
    rule: str = DEFAULT_RULE
    keep_block_maps: bool = False
    keep_step_maps: bool = False
    max_sequence_length: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.concepts, str):
            raise TypeError("concepts must be a list of strings, not one string")
        if not self.concepts or len(self.concepts) > MAX_CONCEPTS:
            raise ValueError(f"give 1 to {MAX_CONCEPTS} concepts, got {len(self.concepts)}")
        if self.rule not in CONCEPT_RULES:
            raise ValueError(f"rule must be one of {tuple(CONCEPT_RULES)}, got {self.rule!r}")


@dataclass
class ConceptArrays:
    """The concept maps of a recording, on the host (``CaptureResult.concepts``).

    Arrays (numpy float32; B conditional batch items, Bk the recorder's blocks, S steps, C concepts,
    (Hc, Wc) the canonical grid):

    - ``sum_map`` (B, Hc, Wc, C): the sum over the chosen (step, block) updates of the per-image-token
      softmax over concepts, each resized bilinearly to (Hc, Wc).
    - ``N``: the number of those updates (``mean_map = sum_map / N``).
    - ``per_block_step_mean`` (B, Bk, S, C): every block and step, the map averaged over the image
      tokens; NaN for blocks without a concept stream (FLUX.1's single blocks).
    - ``per_block_map`` (B, Bk, Hc, Wc, C) or None: per block, the sum over the chosen steps; NaN
      for blocks without a concept stream.
    - ``per_step_map`` (B, S, Hc, Wc, C) or None: per step (every step, chosen or not), the sum over
      the chosen blocks; the sum over the chosen steps is ``sum_map``.
    """

    sum_map: np.ndarray
    N: int
    per_block_step_mean: np.ndarray
    per_block_map: Optional[np.ndarray]
    concepts: list[str]
    blocks: list[int]  # indices into the recorder's blocks, averaged
    steps: list[int]  # step indices, averaged
    rule: str
    per_step_map: Optional[np.ndarray] = None

    @property
    def mean_map(self) -> np.ndarray:
        """(B, Hc, Wc, C): the ConceptAttention map, averaged over the chosen blocks and steps."""
        return self.sum_map / np.float32(self.N)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays under their npz names (docs/FORMAT.md)."""
        out = {
            "concept_sum_map": self.sum_map,
            "concept_N": np.asarray(self.N, dtype=np.int64),
            "concept_per_block_step_mean": self.per_block_step_mean,
        }
        if self.per_block_map is not None:
            out["concept_per_block_map"] = self.per_block_map
        if self.per_step_map is not None:
            out["concept_per_step_map"] = self.per_step_map
        return out

    def metadata(self) -> dict:
        return {"concepts": list(self.concepts), "concept_blocks": list(self.blocks),
                "concept_steps": list(self.steps), "concept_rule": self.rule}


def default_concept_blocks(family: Family, blocks: Sequence[Block]) -> tuple[int, ...]:
    """Positions of the joint blocks averaged by default, as upstream: FLUX.1 the last four double
    blocks (15-18 of FLUX.1's 19), SD3 / SD3.5 all joint blocks (the upstream SD3 port's default)."""
    joint = [b.position for b in blocks if not b.single]
    if family.name == "flux":
        return tuple(joint[-FLUX_DEFAULT_LAST_BLOCKS:])
    return tuple(joint)


def t5_tokenizer(pipe):
    """The T5 tokenizer of an SD3 (``tokenizer_3``) or FLUX.1 (``tokenizer_2``) pipeline, or None."""
    name = "tokenizer_2" if hasattr(getattr(pipe, "transformer", None), "single_transformer_blocks") else "tokenizer_3"
    return getattr(pipe, name, None)


def empty_concepts(tokenizer, concepts: Sequence[str]) -> list[str]:
    """The concepts that T5 tokenises to nothing but special tokens (no first token to keep)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out = []
    for c in concepts:
        ids = tokenizer(c, add_special_tokens=False)["input_ids"]
        if not [i for i in ids if i not in special]:
            out.append(c)
    return out


def encode_concepts(pipe, concepts: Sequence[str], max_sequence_length: Optional[int] = None) -> torch.Tensor:
    """(C, D_t5) the first T5 token of each concept, encoded separately as the pipeline encodes a
    prompt (padded to ``max_sequence_length``), as float32 on the encoder's device.

    Raises:
        ValueError: the pipeline has no T5 encoder, or a concept tokenises to nothing.
    """
    is_flux = hasattr(pipe.transformer, "single_transformer_blocks")
    encoder = getattr(pipe, "text_encoder_2" if is_flux else "text_encoder_3", None)
    tokenizer = t5_tokenizer(pipe)
    if encoder is None or tokenizer is None:
        raise ValueError("concept maps need the pipeline's T5 text encoder (each concept is its first T5 token); "
                         "load the pipeline with its T5 encoder")
    bad = empty_concepts(tokenizer, concepts)
    if bad:
        raise ValueError(f"concept {bad[0]!r} tokenises to nothing in T5; use a word")
    length = int(max_sequence_length or (512 if is_flux else 256))
    with torch.no_grad():
        embeds = pipe._get_t5_prompt_embeds(prompt=list(concepts), num_images_per_prompt=1,
                                            max_sequence_length=length, device=pipe._execution_device)
    return embeds[:, 0].float()


def float32_call(module, *args, fallback_dtype: Optional[torch.dtype] = None, **kwargs):
    """``module(*args, **kwargs)`` computed in float32: a float32 module is called as it is; a half
    precision one through ``torch.func.functional_call`` with float32 copies of its parameters (made
    for this call only) and its floating inputs upcast. Its own forward runs, nothing is re-implemented.

    A module that cannot be copied to float32 -- quantized weights (bitsandbytes, GGUF: parameters
    that are not floating point) or weights an offloading hook brings in (parameters on the meta
    device) -- is called as the model calls it, its floating inputs cast to ``fallback_dtype`` (the
    model's dtype; None: left as they are), and its output upcast: such a module computes in the
    model's precision."""
    params = dict(module.named_parameters())
    if all(p.dtype == torch.float32 for p in params.values()):
        return module(*args, **kwargs)

    def up(x):
        return x.float() if torch.is_tensor(x) and x.is_floating_point() else x

    if any(p.device.type == "meta" or not p.is_floating_point() for p in params.values()):
        def down(x):
            ok = fallback_dtype is not None and torch.is_tensor(x) and x.is_floating_point()
            return x.to(fallback_dtype) if ok else x

        out = module(*map(down, args), **{k: down(v) for k, v in kwargs.items()})
        return tuple(up(o) for o in out) if isinstance(out, tuple) else up(out)
    return torch.func.functional_call(module, {n: p.float() for n, p in params.items()},
                                      tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()})


class ConceptStream:
    """The concept tokens' residual stream and their maps, fed by a recorder (its sink hooks).

    Args:
        transformer: the recorded transformer (SD3 or FLUX.1).
        blocks: the recorder's :class:`~.family.Block` list (the Bk axis).
        embeds: (C, D_t5) from :func:`encode_concepts`.
        options: :class:`ConceptOptions`.
        recording: tells whether the current transformer call is recorded.
        first_item: batch size -> first recorded item (drops the unconditional CFG half).
    """

    def __init__(self, transformer, family: Family, blocks: Sequence[Block], embeds: torch.Tensor,
                 options: ConceptOptions, recording: Callable[[], bool], first_item: Callable[[int], int]):
        self.transformer = transformer
        self.options = options
        self.names = list(options.concepts)
        if embeds.shape[0] != len(self.names):
            raise ValueError(f"{embeds.shape[0]} concept embeddings for {len(self.names)} concepts")
        self.embeds = embeds
        self.num_blocks = len(blocks)
        self._module = {}  # position -> the joint block module
        for b in blocks:
            if not b.single:
                self._module[b.position] = transformer.get_submodule(b.name.rsplit(".", 1)[0])
        joint = sorted(self._module)
        chosen = default_concept_blocks(family, blocks) if options.blocks is None else tuple(options.blocks)
        for p in chosen:
            if p not in self._module:
                raise ValueError(f"concept block {p} is not a joint block with a text stream (joint: {joint})")
        self.chosen_blocks = tuple(sorted(set(chosen)))
        self._last_joint = joint[-1]
        self._recording = recording
        self._first_item = first_item
        self._dtype = getattr(transformer, "dtype", None)  # what quantized / offloaded modules compute in
        self._handle = None
        self._in_hook = False
        # per step
        self._temb: Optional[torch.Tensor] = None
        self._hidden: Optional[torch.Tensor] = None
        self._step = -1
        # accumulated (float32, on the device)
        self.canonical_size: Optional[tuple[int, int]] = None
        self.sum_map: Optional[torch.Tensor] = None
        self.block_maps: Optional[torch.Tensor] = None
        self.step_maps: list[Optional[torch.Tensor]] = []  # per step: the sum over the chosen blocks
        self.means: list[torch.Tensor] = []
        self.n_updates = 0
        self.steps_used: list[int] = []

    def _f32(self, module, *args, **kwargs):
        return float32_call(module, *args, fallback_dtype=self._dtype, **kwargs)

    # -- hooks -------------------------------------------------------------------------------------
    def attach(self) -> None:
        embed = getattr(self.transformer, "time_text_embed", None)
        if embed is None:
            raise RuntimeError("concept maps need the transformer's time_text_embed (SD3 / FLUX.1)")
        self._handle = embed.register_forward_hook(self._on_temb, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._temb = self._hidden = None

    def _on_temb(self, module, args, kwargs, output):
        # The concepts' conditioning: the same call with the pooled projection (its last argument) zeroed.
        if self._in_hook or not self._recording():
            return None
        # float32 zeros: the time projection is cast to the pooled vector's dtype, so it stays float32
        args, kwargs = list(args), dict(kwargs)
        if "pooled_projection" in kwargs:
            kwargs["pooled_projection"] = torch.zeros_like(kwargs["pooled_projection"], dtype=torch.float32)
        else:
            args[-1] = torch.zeros_like(args[-1], dtype=torch.float32)
        self._in_hook = True
        try:
            with torch.no_grad():
                self._temb = self._f32(module, *args, **kwargs)
        finally:
            self._in_hook = False
        return None

    # -- sink side ---------------------------------------------------------------------------------
    def begin_step(self, canonical_size: tuple[int, int]) -> None:
        self.canonical_size = tuple(int(v) for v in canonical_size)
        self._step += 1
        self._hidden = None
        self.means.append(None)
        if self.options.keep_step_maps:
            self.step_maps.append(None)

    def on_attention(self, position: int, att: JointAttention, grid: tuple[int, int]) -> None:
        block = self._module.get(position)
        if block is None:
            return  # a FLUX.1 single block: no text stream, no concepts
        if self._temb is None:
            raise RuntimeError("the concept stream got no conditioning vector (time_text_embed was not called)")
        with torch.no_grad():
            self._block(position, block, att, grid)

    def _block(self, position: int, block, att: JointAttention, grid: tuple[int, int]) -> None:
        attn = block.attn
        lay = att.layout
        R = att.query.shape[0]
        if att.value is None or att.output is None:
            raise RuntimeError("the attention tap gave no values / outputs: concept maps need them")
        temb = self._temb[-R:] if self._temb.shape[0] != R else self._temb
        if self._hidden is None:  # first joint block of the step: the projected concept embeddings
            x = self._f32(self.transformer.context_embedder, self.embeds.to(att.query.device))
            self._hidden = x.unsqueeze(0).expand(R, *x.shape).contiguous()
        c = self._hidden
        pre_only = bool(getattr(block, "context_pre_only", False))
        if pre_only:
            norm_c, gates = self._f32(block.norm1_context, c, temb), None
        else:
            norm_c, *gates = self._f32(block.norm1_context, c, emb=temb)
        D = att.query.shape[-1]

        def heads(x):  # (R, C, H*D) -> (R, H, C, D)
            return x.unflatten(-1, (-1, D)).transpose(1, 2)

        q, k, v = (heads(self._f32(p, norm_c)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if getattr(attn, "norm_added_q", None) is not None:
            q = self._f32(attn.norm_added_q, q)
        if getattr(attn, "norm_added_k", None) is not None:
            k = self._f32(attn.norm_added_k, k)
        img = lay.image
        k_img, v_img = att.key[:, :, img].float(), att.value[:, :, img].float()
        rule = self.options.rule
        if rule == "concept":
            out = F.scaled_dot_product_attention(q, torch.cat([k, k_img], 2), torch.cat([v, v_img], 2),
                                                 scale=att.scale)
        elif rule == "cross":
            out = F.scaled_dot_product_attention(q, k_img, v_img, scale=att.scale)
        elif rule == "self":
            out = F.scaled_dot_product_attention(q, k, v, scale=att.scale)
        else:  # "none"
            out = v
        o_img = att.output[:, :, img].float()  # (R, H, N, D): the image tokens' attention outputs, before to_out
        # sum over heads of (N, D) x (D, C) per head: the dot product over the flattened (H, D) features
        scores = torch.matmul(o_img, out.transpose(-1, -2)).sum(dim=1)  # (R, N, C)
        probs = scores.softmax(dim=-1)
        self._add(position, probs.view(R, grid[0], grid[1], -1))

        if position != self._last_joint and not pre_only:  # the concepts' residual update
            g_msa, shift_mlp, scale_mlp, g_mlp = gates
            c = c + g_msa.unsqueeze(1) * self._f32(attn.to_add_out, out.transpose(1, 2).flatten(2))
            n2 = self._f32(block.norm2_context, c) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            self._hidden = c + g_mlp.unsqueeze(1) * self._f32(block.ff_context, n2)

    def _add(self, position: int, probs: torch.Tensor) -> None:
        """probs: (R, h, w, C) float32 softmax over concepts of one block at the current step."""
        R, h, w, C = probs.shape
        if self.means[-1] is None:
            self.means[-1] = torch.full((self.num_blocks, R, C), float("nan"), device=probs.device)
        self.means[-1][position] = probs.mean(dim=(1, 2))
        chosen_step = self.options.steps is None or self._step in self.options.steps
        chosen_block = position in self.chosen_blocks
        keep_step = self.options.keep_step_maps and chosen_block
        if not chosen_step and not keep_step:
            return
        resized = _resize(probs, self.canonical_size)
        if keep_step:
            self.step_maps[-1] = resized.clone() if self.step_maps[-1] is None else self.step_maps[-1] + resized
        if not chosen_step:
            return
        if self.sum_map is None:
            Hc, Wc = self.canonical_size
            self.sum_map = torch.zeros(R, Hc, Wc, C, device=probs.device)
            if self.options.keep_block_maps:
                self.block_maps = torch.zeros(R, self.num_blocks, Hc, Wc, C, device=probs.device)
        if self.block_maps is not None:
            self.block_maps[:, position] += resized
        if chosen_block:
            self.sum_map += resized
            self.n_updates += 1
            if not self.steps_used or self.steps_used[-1] != self._step:
                self.steps_used.append(self._step)

    def state_bytes(self) -> int:
        tensors = [self.sum_map, self.block_maps, *self.means, *self.step_maps]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def result(self) -> ConceptArrays:
        """Host copies (the only synchronisation)."""
        if self.sum_map is None:
            raise RuntimeError("no concept map was recorded: no chosen step ran inside the recorder")
        if self.options.steps is not None:
            missing = sorted(set(self.options.steps) - set(self.steps_used))
            if missing:
                raise ValueError(f"concept steps {missing} never ran (the call had {self._step + 1} steps)")
        R, C = self.sum_map.shape[0], self.sum_map.shape[-1]
        nan = torch.full((self.num_blocks, R, C), float("nan"), device=self.sum_map.device)
        means = torch.stack([nan if m is None else m for m in self.means])  # (S, Bk, R, C)
        step_maps = None
        if self.options.keep_step_maps:
            zero = torch.zeros_like(self.sum_map)  # a step that ran no chosen block (never, in a whole call)
            step_maps = torch.stack([zero if m is None else m for m in self.step_maps], 1).cpu().numpy()
        block_maps = None
        if self.block_maps is not None:
            block_maps = self.block_maps.cpu().numpy()
            for p in range(self.num_blocks):
                if p not in self._module:
                    block_maps[:, p] = np.nan
        return ConceptArrays(
            sum_map=self.sum_map.cpu().numpy(), N=int(self.n_updates),
            per_block_step_mean=means.permute(2, 1, 0, 3).cpu().numpy(), per_block_map=block_maps,
            concepts=list(self.names), blocks=list(self.chosen_blocks), steps=list(self.steps_used),
            rule=self.options.rule, per_step_map=step_maps,
        )


def _resize(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(R, h, w, C) -> (R, Hc, Wc, C), bilinear (align_corners=False), as the token maps are resized."""
    if tuple(probs.shape[1:3]) == tuple(size):
        return probs
    x = F.interpolate(probs.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1)
