"""Across seeds and prompts: runs that share a prompt, averaged (numpy in, numpy out).

A group is every analysed (run, item) with the same prompt text; a group of two or more is
aggregated per encoder. Spreads are sample standard deviations over the runs (``ddof=1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .stats import auc, step_average


@dataclass
class RunSummary:
    """What aggregation needs of one encoder of one analysed (run, item); small (no T axis)."""

    run: str  # the run's folder
    item: int
    seed: Optional[object]
    encoder: str
    prompt: str
    words: tuple  # Word tuple
    block_ids: tuple[int, ...]
    mass: np.ndarray  # (n,)
    curves: np.ndarray  # (Bk, S, n)
    shares: np.ndarray  # (H, W, n) float32
    timesteps: Optional[np.ndarray]  # (S,)
    model: str = ""
    random_weights: bool = False
    levels: Optional[tuple[float, ...]] = None  # a given image's noise levels σ (the S axis); None for a generation


@dataclass
class GroupResult:
    """One encoder of one prompt over ``n_runs`` runs (seeds)."""

    encoder: str
    prompt: str
    runs: list[str]
    seeds: list
    words: tuple
    block_ids: tuple[int, ...]
    timesteps: Optional[np.ndarray]
    mass_mean: np.ndarray  # (n,)
    mass_std: np.ndarray  # (n,)
    curves_mean: np.ndarray  # (Bk, S, n)
    curves_std: np.ndarray  # (Bk, S, n)
    blockavg_std: np.ndarray  # (S, n) std over runs of each run's block-averaged curve (not the mean of per-block stds)
    auc_mean: np.ndarray  # (Bk, n) mean over runs of each run's AUC
    auc_std: np.ndarray
    stepavg_mean: np.ndarray  # (Bk, n)
    stepavg_std: np.ndarray
    map_mean: np.ndarray  # (H, W, n)
    map_std: np.ndarray  # (H, W, n)
    levels: Optional[np.ndarray] = None  # (S,) the noise levels σ of given-image runs; None for generations

    @property
    def n_runs(self) -> int:
        return len(self.runs)


def group_key(summary: RunSummary) -> tuple:
    """Runs are comparable when they share the prompt, the words, the blocks, the shapes and (given
    images) the noise levels: a generation's steps and a given image's levels are never averaged."""
    return (summary.encoder, summary.prompt, tuple(w.index for w in summary.words), summary.block_ids,
            summary.curves.shape, summary.shares.shape, summary.levels)


def aggregate(members: Sequence[RunSummary]) -> GroupResult:
    """Mean and sample std (ddof=1; 0 for one run) over the members, which must share :func:`group_key`."""
    if not members:
        raise ValueError("aggregate() needs at least one run")
    keys = {group_key(m) for m in members}
    if len(keys) != 1:
        raise ValueError("aggregate(): the runs differ in prompt, words, blocks, shapes or noise levels")
    ddof = 1 if len(members) > 1 else 0
    mass = np.stack([m.mass for m in members])
    curves = np.stack([m.curves for m in members])
    shares = np.stack([m.shares.astype(np.float64) for m in members])
    aucs = np.stack([auc(m.curves, axis=1) for m in members])
    means = np.stack([step_average(m.curves, axis=1) for m in members])
    first = members[0]
    return GroupResult(
        encoder=first.encoder, prompt=first.prompt, runs=[m.run for m in members], seeds=[m.seed for m in members],
        words=first.words, block_ids=first.block_ids, timesteps=first.timesteps,
        mass_mean=mass.mean(axis=0), mass_std=mass.std(axis=0, ddof=ddof),
        curves_mean=curves.mean(axis=0), curves_std=curves.std(axis=0, ddof=ddof),
        blockavg_std=curves.mean(axis=1).std(axis=0, ddof=ddof),
        auc_mean=aucs.mean(axis=0), auc_std=aucs.std(axis=0, ddof=ddof),
        stepavg_mean=means.mean(axis=0), stepavg_std=means.std(axis=0, ddof=ddof),
        map_mean=shares.mean(axis=0), map_std=shares.std(axis=0, ddof=ddof),
        levels=None if first.levels is None else np.asarray(first.levels, dtype=np.float64),
    )


def group_runs(summaries: Sequence[RunSummary], min_runs: int = 2) -> list[list[RunSummary]]:
    """Groups of at least ``min_runs`` comparable summaries, in order of first appearance."""
    groups: dict[tuple, list[RunSummary]] = {}
    for s in summaries:
        groups.setdefault(group_key(s), []).append(s)
    return [g for g in groups.values() if len(g) >= min_runs]


def words_across_prompts(groups: Sequence[GroupResult]) -> dict[str, list[tuple[int, int, float, float]]]:
    """Words (case-folded) found in two or more prompts' groups of one encoder: word -> [(group, word position, mass mean, std)]."""
    seen: dict[str, list[tuple[int, int, float, float]]] = {}
    for g, res in enumerate(groups):
        for j, w in enumerate(res.words):
            seen.setdefault(w.text.casefold(), []).append((g, j, float(res.mass_mean[j]), float(res.mass_std[j])))
    prompts = {k: {groups[g].prompt for g, *_ in v} for k, v in seen.items()}
    return {k: v for k, v in seen.items() if len(prompts[k]) >= 2}
