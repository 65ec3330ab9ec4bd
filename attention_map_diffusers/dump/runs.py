"""Planning the runs of one dump command: prompts x seeds, batches, folders, resume.

Standard library only (no torch): unit-testable in isolation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

from ..contract import UserError, slugify


@dataclass(frozen=True)
class Run:
    """One pipeline call.

    Attributes:
        index: position in the plan (0-based).
        prompts: the batch of prompts (each gets ``num_images_per_prompt`` images).
        seed: base seed; image j of each prompt uses ``seed + j``.
        folder: the run folder relative to ``--out`` (``""``: ``--out`` itself).
        image: image mode: the given image's path (its one prompt in ``prompts``).
    """

    index: int
    prompts: tuple[str, ...]
    seed: int
    folder: str
    image: Optional[str] = None


def read_prompts_file(path: str) -> list[str]:
    """Prompts from a UTF-8 text file: one per line (lines end at ``\n`` or ``\r\n`` only: other
    characters that ``str.splitlines`` breaks at, such as U+2028, ``\x0b``, ``\x0c`` or ``\x85``,
    stay inside the prompt); blank lines and lines starting with ``#`` ignored; a byte-order mark
    (Windows editors write one) is not part of the first prompt.

    Raises:
        UserError: unreadable file (with the reason).
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:  # newline="": no translation of "\r"
            lines = [ln[:-1] if ln.endswith("\r") else ln for ln in fh.read().split("\n")]
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UserError(f"cannot read --prompts-file {path!r}: {reason}") from None
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def plan_runs(prompts: Sequence[str], seeds: Sequence[int], batch_size: int) -> list[Run]:
    """Batches of ``batch_size`` prompts (in order) x seeds, prompts outer, seeds inner.

    A plan of one run (one prompt batch, one seed) writes into ``--out`` itself, as the original
    tool did; otherwise run r goes to ``NNNN-<slug of its first prompt>[-s<seed>]``.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    batches = [tuple(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    combos = [(b, s) for b in batches for s in seeds]
    if len(combos) == 1:
        return [Run(0, combos[0][0], int(combos[0][1]), "")]
    runs = []
    for r, (batch, seed) in enumerate(combos):
        suffix = f"-s{seed}" if len(seeds) > 1 else ""
        runs.append(Run(r, batch, int(seed), f"{r:04d}-{slugify(batch[0].lower())}{suffix}"))
    return runs


def plan_image_runs(jobs: Sequence, seeds: Sequence[int]) -> list[Run]:
    """Image mode: one run per (image, prompt) pair (``ImageJob``) and seed, pairs outer. One run
    writes into ``--out`` itself; otherwise run r goes to ``NNNN-<slug of the image's name>[-s<seed>]``."""
    combos = [(job, s) for job in jobs for s in seeds]
    if len(combos) == 1:
        job, seed = combos[0]
        return [Run(0, (job.prompt,), int(seed), "", job.path)]
    runs = []
    for r, (job, seed) in enumerate(combos):
        stem = os.path.splitext(os.path.basename(job.path))[0]
        suffix = f"-s{seed}" if len(seeds) > 1 else ""
        runs.append(Run(r, (job.prompt,), int(seed), f"{r:04d}-{slugify(stem.lower())}{suffix}", job.path))
    return runs
