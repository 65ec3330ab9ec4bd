"""``StepAverageRecorder``: exact, streaming capture of SD3 image->text attention, as a context manager.

    with StepAverageRecorder(pipe) as rec:
        image = pipe(prompt, num_inference_steps=28).images[0]
    res = rec.result()            # CaptureResult: numpy arrays + the facts for metadata
    res.sum_token_map / res.N     # (B, Hc, Wc, T) average image->text map over steps and blocks
    res.capture_path              # which path gave the row log-sum-exp, e.g. "flash-lse"
"""

from __future__ import annotations

from typing import Optional

import torch

from .aggregate import CaptureResult, StepAverageAccumulator
from .blocks import attention_blocks, install_capture, restore_processors
from .calls import TransformerCalls
from .concepts import ConceptOptions, ConceptStream, encode_concepts
from .family import family_of
from .exact import image_text_probs, image_text_probs_from_keys
from .paths import METHODS, KernelPaths
from .processor import JointAttention


def recorded_probs(att: JointAttention, *, mean_heads: bool, budget_bytes: int) -> torch.Tensor:
    """Image->text probabilities of one joint-attention call's recorded items (float32).

    Args:
        att: the call's joint q, k of the R recorded items, and the image rows' lse when a path gave it.
    Returns:
        (R, N, T) head-averaged, or (R, H, N, T) with ``mean_heads=False``.
    """
    lay = att.layout
    q, k = att.query, att.key
    if att.image_lse is None:
        return image_text_probs_from_keys(q[:, :, lay.image], k, att.scale, mean_heads=mean_heads,
                                          budget_bytes=budget_bytes, text=lay.text)
    return image_text_probs(
        q[:, :, lay.image], k[:, :, lay.text], att.image_lse, att.scale, mean_heads=mean_heads,
        budget_bytes=budget_bytes,
    )


def path_summary(used: dict) -> str:
    """The paths in ``used`` (configuration -> path), each once, in order of first use."""
    return ", ".join(dict.fromkeys(used.values()))


def resolve_transformer(pipe):
    """The transformer of an SD3 / FLUX.1 pipeline (or the transformer itself)."""
    transformer = getattr(pipe, "transformer", pipe)
    if not hasattr(transformer, "attn_processors") or not hasattr(transformer, "config"):
        raise TypeError(
            "expected a StableDiffusion3Pipeline / FluxPipeline or its transformer, got "
            f"{type(pipe).__name__}"
        )
    return transformer


def text_spans(pipe, num_tokens: int) -> Optional[dict[str, list[int]]]:
    """Where each text encoder's positions lie on the T axis, read from the pipeline (see
    :meth:`~.family.Family.text_spans`). None for a bare transformer."""
    return family_of(pipe).text_spans(pipe, num_tokens)


def cfg_source(pipe, cfg):
    """A callable telling whether the current transformer batch has an unconditional half."""
    return family_of(pipe).cfg_source(pipe, cfg)


class StepAverageRecorder:
    """Records image->text attention of every ``transformer_blocks.{i}.attn`` over a denoising loop.

    Example::

        with StepAverageRecorder(pipe) as rec:        # processors wrapped here, restored on exit
            image = pipe("A furry cat beneath a table", num_inference_steps=28).images[0]
        res = rec.result()                            # CaptureResult: numpy arrays + facts for metadata
        res.mean_token_map                            # (B, Hc, Wc, T) average over steps and blocks
        res.per_block_step_token_mean                 # (B, Bk, S, T), step 0 = first (noisiest) step
        res.text_spans                                # {"clip": [0, 77], "t5": [77, T]}

    Installs a :class:`~attention_map_diffusers.processor.CaptureProcessor` on each joint-attention
    module (never on ``attn2``) through ``set_attn_processor`` and restores the original processors
    on exit, also when the pipeline raises. Captures the conditional branch of classifier-free
    guidance only; ignores the extra transformer call of skip-layer guidance.

    Args:
        pipe: a ``StableDiffusion3Pipeline`` (or its ``SD3Transformer2DModel`` with ``cfg`` given).
        canonical_size: (Hc, Wc) grid of ``sum_token_map``; default: the latent patch grid.
        keep_block_maps: also keep ``per_block_token_map`` (B, Bk, Hc, Wc, T).
        keep_step_maps: also keep ``per_step_token_map`` (B, S, Hc, Wc, T).
        stats_dtype: storage dtype of the per-(block, step) mean / max (float32 or float16; computed
            in float32 either way).
        method: where the row log-sum-exp comes from (see
            :mod:`~attention_map_diffusers.capture.paths`). "auto": the best path that passes its
            self-check: the kernel SDPA picks through its lse-returning op, else SDPA plus a side
            call on the image rows, else the exact chunked fallback. "kernel-lse" / "side-lse" force
            the first / second (and raise where it fails its check); "chunked" always computes the
            lse exactly on the side. Images are bit-identical to stock on every path.
        paths: the :class:`~attention_map_diffusers.capture.paths.KernelPaths` that checks and
            remembers the paths; default: a new one, so each configuration is checked once per
            recorder. Share one between recorders to check once per process.
        scratch_bytes: bound on the temporary float32 logits of one chunk of heads / rows.
        cfg: "auto" (ask the pipeline), or True / False.
        concepts: a :class:`~attention_map_diffusers.capture.concepts.ConceptOptions`: also compute
            ConceptAttention maps (``result().concepts``); needs the pipeline (its T5 encoder).
    """

    def __init__(
        self,
        pipe,
        *,
        canonical_size: Optional[tuple[int, int]] = None,
        keep_block_maps: bool = False,
        keep_step_maps: bool = False,
        stats_dtype: torch.dtype = torch.float32,
        method: str = "auto",
        paths: Optional[KernelPaths] = None,
        scratch_bytes: int = 64 << 20,
        cfg="auto",
        concepts: Optional[ConceptOptions] = None,
    ):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if stats_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"stats_dtype must be torch.float32, float16 or bfloat16, got {stats_dtype}")
        self.pipe = pipe
        self.transformer = resolve_transformer(pipe)
        self.family = family_of(self.transformer)
        self.blocks = [(b.position, b.name) for b in attention_blocks(self.transformer, self.family)]
        self.method = method
        self.paths = paths if paths is not None else KernelPaths()
        self._used: dict = {}  # configuration -> path, in order of first use
        self.scratch_bytes = int(scratch_bytes)
        self._acc = StepAverageAccumulator(
            len(self.blocks),
            canonical_size=canonical_size,
            keep_block_maps=keep_block_maps,
            keep_step_maps=keep_step_maps,
            stats_dtype=stats_dtype,
        )
        self._position = {i: pos for pos, (i, _) in enumerate(self.blocks)}
        self._calls = TransformerCalls(self.transformer, self.family.cfg_source(pipe, cfg), self._begin_step,
                                       self.family)
        self._concepts: Optional[ConceptStream] = None
        if concepts is not None:
            if self.pipe is self.transformer:
                raise ValueError("concept maps need the pipeline (its T5 encoder), not the bare transformer")
            self._concepts = ConceptStream(
                self.transformer, self.family, attention_blocks(self.transformer, self.family),
                encode_concepts(pipe, concepts.concepts, concepts.max_sequence_length), concepts,
                lambda: self._calls.recording, self.first_recorded_item,
            )
        self._saved: Optional[dict] = None
        self._entered = False
        self._grid: tuple[int, int] = (0, 0)
        self._cfg_seen: Optional[bool] = None

    # -- context manager ---------------------------------------------------------------------------
    def __enter__(self) -> "StepAverageRecorder":
        if self._entered:
            raise RuntimeError(
                "this StepAverageRecorder was already entered; create a new one for each recording"
            )
        self._entered = True
        self._saved = install_capture(self.transformer, lambda i: self, self.family)
        try:
            self._calls.attach()
            if self._concepts is not None:
                self._concepts.attach()
        except BaseException:
            self._calls.detach()
            restore_processors(self.transformer, self._saved)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._calls.detach()
            if self._concepts is not None:
                self._concepts.detach()
        finally:
            if self._saved is not None:
                restore_processors(self.transformer, self._saved)
                self._saved = None

    # -- sink protocol (called by CaptureProcessor / TransformerCalls) -------------------------------
    def wants_capture(self) -> bool:
        return self._calls.recording

    def first_recorded_item(self, batch_size: int) -> int:
        return batch_size // 2 if self._calls.cfg else 0

    def text_tokens(self) -> int:
        return self._calls.text_tokens

    def _begin_step(self, timestep: torch.Tensor, grid: tuple[int, int], cfg: bool) -> None:
        if self._cfg_seen is not None and cfg != self._cfg_seen:
            raise RuntimeError("classifier-free guidance changed within one recording; use one recorder per call")
        self._cfg_seen = cfg
        self._grid = grid
        self._acc.begin_step(timestep, grid)
        if self._concepts is not None:
            self._concepts.begin_step(self._acc.canonical_size)

    def on_attention(self, block_index: int, att: JointAttention) -> None:
        h, w = self._grid
        if att.num_image_tokens != h * w:
            raise RuntimeError(
                f"{self.blocks[self._position[block_index]][1]} saw {att.num_image_tokens} image tokens, but the "
                f"latent patch grid is {h}x{w}"
            )
        self._used.setdefault(att.configuration, att.path)
        probs = recorded_probs(att, mean_heads=True, budget_bytes=self.scratch_bytes)
        B, _, T = probs.shape
        self._acc.add(self._position[block_index], probs.view(B, h, w, T))
        if self._concepts is not None:
            self._concepts.on_attention(self._position[block_index], att, self._grid)

    # -- results ---------------------------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of the persistent capture state on the device right now."""
        return self._acc.state_bytes() + (self._concepts.state_bytes() if self._concepts is not None else 0)

    def result(self) -> CaptureResult:
        """The recording, on the host (numpy). Call after the pipeline returned."""
        arrays = self._acc.to_numpy()
        acc = self._acc
        sizes = [list(s) if s is not None else list(self._grid) for s in acc.block_sizes]
        return CaptureResult(
            sum_token_map=arrays["sum_token_map"],
            N=arrays["N"],
            per_block_step_token_mean=arrays["per_block_step_token_mean"],
            per_block_step_token_max=arrays["per_block_step_token_max"],
            timesteps=arrays["timesteps"],
            per_block_token_map=arrays["per_block_token_map"],
            per_step_token_map=arrays["per_step_token_map"],
            blocks=[name for _, name in self.blocks],
            block_latent_sizes=sizes,
            canonical_size=tuple(acc.canonical_size),
            num_tokens=int(acc.num_tokens),
            batch_size=int(acc.batch_size),
            cfg=bool(self._cfg_seen),
            state_bytes=self.state_bytes(),
            text_spans=self.family.text_spans(self.pipe, int(acc.num_tokens)) if self.pipe is not self.transformer else None,
            model_family=self.family.name,
            capture_path=path_summary(self._used),
            capture_verdicts=[v for c in self._used for v in self.paths.verdicts(c, self.method)],
            concepts=self._concepts.result() if self._concepts is not None else None,
        )
