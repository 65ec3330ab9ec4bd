"""Streaming, on-device aggregation of per-block image->text maps over denoising steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..contract import RENORM_EPS


@dataclass
class CaptureResult:
    """What a recording produced, on the host (``StepAverageRecorder.result()``).

    Example::

        with StepAverageRecorder(pipe) as rec:
            image = pipe("A furry cat beneath a table").images[0]
        res = rec.result()
        res.mean_token_map              # (B, Hc, Wc, T): the map averaged over steps and blocks
        a, b = res.text_spans["clip"]   # CLIP's positions on the T axis (T5 follows)
        res.mean_token_map[0, :, :, a:b]

    Arrays (numpy, float32 unless noted; B batch items of the conditional branch, Bk joint-attention
    blocks, S denoising steps in denoising order (0 = first, noisiest), T text tokens, (Hc, Wc) the
    canonical grid):

    - ``sum_token_map`` (B, Hc, Wc, T): sum over steps and blocks of the head-averaged map, resized
      bilinearly (align_corners=False) to the canonical grid.
    - ``N`` (also ``num_updates``): number of (step, block) updates in that sum (``N`` is the
      upstream name; ``mean_token_map = sum_token_map / N`` is the average).
    - ``per_block_step_token_mean`` / ``per_block_step_token_max`` (B, Bk, S, T): per block and step,
      the map renormalised over text tokens at each pixel (divided by its sum over T plus 1e-8), then
      averaged / maxed over the block's own pixels.
    - ``timesteps`` (S,): the scheduler timestep of each step.
    - ``per_block_token_map`` (B, Bk, Hc, Wc, T) and ``per_step_token_map`` (B, S, Hc, Wc, T): the
      same sum split per block / per step; None unless asked for.

    ``concepts``: the ConceptAttention maps (:class:`~.concepts.ConceptArrays`) when the recorder
    was given ``concepts=``, else None; ``arrays()`` then adds their ``concept_*`` npz keys.

    How the row log-sum-exp was obtained (see :mod:`~attention_map_diffusers.capture.paths`):
    ``capture_path`` names the path that ran ("flash-lse", "efficient-lse", "cudnn-lse",
    "sdpa+side-lse" or "chunked"; several joined by ", " if configurations differed within the
    recording), and ``capture_verdicts`` holds, per configuration, the self-check verdict of every
    path tried, the one used last (JSON-ready dicts: see ``KernelPaths``).
    """

    sum_token_map: np.ndarray
    N: int
    per_block_step_token_mean: np.ndarray
    per_block_step_token_max: np.ndarray
    timesteps: np.ndarray
    per_block_token_map: Optional[np.ndarray]
    per_step_token_map: Optional[np.ndarray]
    blocks: list[str]  # "transformer_blocks.{i}.attn", in index order
    block_latent_sizes: list[list[int]]  # per block, its (h, w) patch grid
    canonical_size: tuple[int, int]
    num_tokens: int  # T
    batch_size: int  # B (conditional items only)
    cfg: bool  # whether an unconditional half was present (and dropped)
    state_bytes: int = 0  # bytes the persistent on-device capture state held
    # encoder -> [start, end) of its positions on the T axis, from the pipeline (SD3: CLIP then T5);
    # None when a bare transformer was recorded
    text_spans: Optional[dict[str, list[int]]] = None
    capture_path: str = ""  # the path that gave the row log-sum-exp
    capture_verdicts: list[dict] = field(default_factory=list)  # the self-checks behind it
    model_family: str = "sd3"  # "sd3" or "flux" (FLUX.1: text_spans holds only "t5")
    # ConceptAttention maps (capture.concepts.ConceptArrays) when the recorder was given concepts
    concepts: Optional[Any] = None

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def num_updates(self) -> int:
        """``N``: the number of (step, block) maps summed in ``sum_token_map``."""
        return int(self.N)

    @property
    def mean_token_map(self) -> np.ndarray:
        """(B, Hc, Wc, T) float32: ``sum_token_map / N``, the map averaged over steps and blocks."""
        return self.sum_token_map / np.float32(self.N)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays under their file names (``stepavg_token_maps_v1.npz``); optional ones if kept."""
        out = {
            "sum_token_map": self.sum_token_map,
            "N": np.asarray(self.N, dtype=np.int64),
            "per_block_step_token_mean": self.per_block_step_token_mean,
            "per_block_step_token_max": self.per_block_step_token_max,
            "timesteps": self.timesteps,
        }
        if self.per_block_token_map is not None:
            out["per_block_token_map"] = self.per_block_token_map
        if self.per_step_token_map is not None:
            out["per_step_token_map"] = self.per_step_token_map
        if self.concepts is not None:
            out.update(self.concepts.arrays())
        return out


class StepAverageAccumulator:
    """Running sums and per-(block, step) statistics, kept on the device in float32.

    Persistent state: O(B*Hc*Wc*T + B*Bk*S*T) (plus the opt-in per-block / per-step maps). Updates never
    synchronise with the host.

    Args:
        num_blocks: Bk.
        canonical_size: (Hc, Wc), or None for the grid of the first step (the latent patch grid,
            which every SD3 block shares and none exceeds).
        keep_block_maps / keep_step_maps: also keep ``per_block_token_map`` / ``per_step_token_map``.
        stats_dtype: storage dtype of the per-(block, step) mean / max (computed in float32; each value
            is written once). float16 halves that part of the state.
    """

    def __init__(
        self,
        num_blocks: int,
        *,
        canonical_size: Optional[tuple[int, int]] = None,
        keep_block_maps: bool = False,
        keep_step_maps: bool = False,
        stats_dtype: torch.dtype = torch.float32,
    ):
        if canonical_size is not None:
            canonical_size = _check_size(canonical_size)
        self.num_blocks = num_blocks
        self.canonical_size = canonical_size
        self.keep_block_maps = keep_block_maps
        self.keep_step_maps = keep_step_maps
        self.stats_dtype = stats_dtype
        self.sum_map: Optional[torch.Tensor] = None
        self.block_maps: Optional[torch.Tensor] = None
        self.step_maps: list[torch.Tensor] = []
        self.means: list[torch.Tensor] = []  # per step: (Bk, B, T)
        self.maxes: list[torch.Tensor] = []
        self.timesteps: list[torch.Tensor] = []
        self.block_sizes: list[Optional[tuple[int, int]]] = [None] * num_blocks
        self.n_updates = 0
        self.batch_size: Optional[int] = None
        self.num_tokens: Optional[int] = None

    def begin_step(self, timestep: torch.Tensor, grid: tuple[int, int]) -> None:
        """Open step ``len(timesteps)``; ``grid`` is the transformer's latent patch grid for it."""
        if self.canonical_size is None:
            self.canonical_size = (int(grid[0]), int(grid[1]))
        self.timesteps.append(timestep)
        self.means.append(None)  # allocated by the first add of the step
        self.maxes.append(None)
        if self.keep_step_maps:
            self.step_maps.append(None)

    def add(self, block: int, probs: torch.Tensor) -> None:
        """Fold one block's map into the state.

        Args:
            block: block index in [0, Bk).
            probs: (B, h, w, T) float32, head-averaged image->text probabilities of the current step.
        """
        if not self.timesteps:
            raise RuntimeError("add() before begin_step(): no denoising step is open")
        B, h, w, T = probs.shape
        if self.batch_size is None:
            self._allocate(B, T, probs.device)
        elif (B, T) != (self.batch_size, self.num_tokens):
            raise RuntimeError(
                f"batch / text length changed within one recording: had (B={self.batch_size}, "
                f"T={self.num_tokens}), got (B={B}, T={T}). Use one recorder per pipeline call."
            )
        self.block_sizes[block] = (h, w)
        if self.means[-1] is None:
            shape = (self.num_blocks, B, T)
            self.means[-1] = torch.zeros(shape, dtype=self.stats_dtype, device=probs.device)
            self.maxes[-1] = torch.zeros(shape, dtype=self.stats_dtype, device=probs.device)
        renorm = probs / probs.sum(dim=-1, keepdim=True).add_(RENORM_EPS)
        self.means[-1][block] = renorm.mean(dim=(1, 2))
        self.maxes[-1][block] = renorm.amax(dim=(1, 2))
        del renorm

        resized = self._to_canonical(probs)
        self.sum_map += resized
        if self.block_maps is not None:
            self.block_maps[:, block] += resized
        if self.keep_step_maps:
            if self.step_maps[-1] is None:
                self.step_maps[-1] = resized.clone()
            else:
                self.step_maps[-1] += resized
        self.n_updates += 1

    def _allocate(self, B: int, T: int, device) -> None:
        Hc, Wc = self.canonical_size
        self.batch_size, self.num_tokens = B, T
        self.sum_map = torch.zeros(B, Hc, Wc, T, dtype=torch.float32, device=device)
        if self.keep_block_maps:
            self.block_maps = torch.zeros(B, self.num_blocks, Hc, Wc, T, dtype=torch.float32, device=device)

    def _to_canonical(self, probs: torch.Tensor) -> torch.Tensor:
        Hc, Wc = self.canonical_size
        if probs.shape[1:3] == (Hc, Wc):
            return probs
        x = probs.permute(0, 3, 1, 2)  # (B, T, h, w): interpolate over the pixel grid
        x = F.interpolate(x, size=(Hc, Wc), mode="bilinear", align_corners=False)
        return x.permute(0, 2, 3, 1)

    def state_bytes(self) -> int:
        """Bytes of persistent state currently held (allocated tensors only)."""
        tensors = [self.sum_map, self.block_maps, *self.step_maps, *self.means, *self.maxes, *self.timesteps]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to_numpy(self) -> dict:
        """Host copies: the only place that synchronises with the device."""
        if self.sum_map is None:
            raise RuntimeError(
                "nothing was recorded: run the pipeline inside the recorder's `with` block "
                "(with StepAverageRecorder(pipe) as rec: pipe(...))"
            )
        B, T = self.batch_size, self.num_tokens
        dev = self.sum_map.device

        def stats(per_step):
            z = torch.zeros(self.num_blocks, B, T, dtype=self.stats_dtype, device=dev)
            st = torch.stack([z if s is None else s for s in per_step])  # (S, Bk, B, T)
            return st.permute(2, 1, 0, 3).float().cpu().numpy()

        step_maps = None
        if self.keep_step_maps:
            Hc, Wc = self.canonical_size
            z = torch.zeros(B, Hc, Wc, T, dtype=torch.float32, device=dev)
            step_maps = torch.stack([z if s is None else s for s in self.step_maps], dim=1).cpu().numpy()
        return {
            "sum_token_map": self.sum_map.cpu().numpy(),
            "N": self.n_updates,
            "per_block_step_token_mean": stats(self.means),
            "per_block_step_token_max": stats(self.maxes),
            "timesteps": torch.stack(self.timesteps).float().cpu().numpy(),
            "per_block_token_map": None if self.block_maps is None else self.block_maps.cpu().numpy(),
            "per_step_token_map": step_maps,
        }


def _check_size(size) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"canonical_size must be two positive integers (H, W), got {size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"canonical_size must be two positive integers (H, W), got {size!r}")
    return h, w
