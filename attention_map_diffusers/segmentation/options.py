"""The options of one evaluation, as a type (the command line builds it; the package never sees argparse)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..contract import UserError
from .maps import METHODS

#: Encoder choices: one encoder's word maps, or the mean of both encoders' maps.
ENCODER_CHOICES = ("clip", "t5", "both")
KEY_SOURCES = ("auto", "folder", "image")


@dataclass(frozen=True)
class SegmentationOptions:
    """What to score and how; every field checked on construction (:class:`UserError`)."""

    dumps: str  # a run folder, or a folder of runs (runs.jsonl / run sub-folders)
    masks: str  # ground-truth folder: MASKS/<key>/<word>.png, or MASKS/<key>.png with voc
    out: str  # output folder
    voc: bool = False  # index PNGs, one per image
    classes: Optional[str] = None  # --classes FILE (voc); None: the 21 PascalVOC classes
    methods: tuple[str, ...] = METHODS
    encoders: Optional[tuple[str, ...]] = None  # None: every encoder the dump has, then "both" when it has two
    tau: float = 0.4  # threshold of the min-max normalised maps (daam and the centre/random baselines)
    bg_threshold: Optional[float] = None  # argmax: background below this; None: tau
    block_ranges: Optional[tuple[tuple[int, int], ...]] = None  # inclusive block ranges; None: all blocks
    step_ranges: Optional[tuple[tuple[int, int], ...]] = None  # inclusive step ranges (denoising order); None: all
    key_from: str = "auto"  # "auto": the source image's stem for image-mode dumps, else the run folder
    seed: int = 0  # seed of the random baseline
    cases: int = 3  # best and worst (image, word) pairs drawn in cases.png
    overwrite: bool = False  # replace an --out this tool did not write

    def __post_init__(self) -> None:
        for name, v in (("--tau", self.tau), ("--bg-threshold", self.bg_threshold)):
            if v is not None and not 0.0 <= v <= 1.0:
                raise UserError(f"{name} must be between 0 and 1 (maps are normalised to [0, 1]), got {v:g}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise UserError(f"--methods: {bad[0] if bad else ''!r} is not a method; use a comma-separated subset of {','.join(METHODS)}")
        if self.encoders is not None:
            bad = [e for e in self.encoders if e not in ENCODER_CHOICES]
            if bad or not self.encoders:
                raise UserError(f"--encoder: {bad[0] if bad else ''!r} is not one of {', '.join(ENCODER_CHOICES)}")
        if self.key_from not in KEY_SOURCES:
            raise UserError(f"--key-from must be one of {', '.join(KEY_SOURCES)}, got {self.key_from!r}")
        if self.classes is not None and not self.voc:
            raise UserError("--classes names the labels of --voc masks; add --voc (per-word masks are named by their word)")
        if self.block_ranges is not None and self.step_ranges is not None:
            raise UserError("--blocks and --steps cannot be combined: a dump keeps per-block maps and per-step maps, not per block and step")
        if self.cases < 0:
            raise UserError(f"--cases must be 0 or more, got {self.cases}")

    @property
    def background_threshold(self) -> float:
        return self.tau if self.bg_threshold is None else self.bg_threshold

    @property
    def selection(self) -> str:
        """What part of the maps is scored, for the tables: ``all``, ``blocks 0-5,8`` or ``steps 0-2``."""
        for what, ranges in (("blocks", self.block_ranges), ("steps", self.step_ranges)):
            if ranges is not None:
                return what + " " + ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges)
        return "all"


def parse_list(spec: str, choices: tuple[str, ...], flag: str) -> tuple[str, ...]:
    """``"daam,argmax"`` -> ``("daam", "argmax")`` (lower-cased, duplicates dropped, order kept)."""
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in choices]
    if bad or not names:
        raise UserError(f"{flag}: {bad[0] if bad else spec!r} is not one of {', '.join(choices)}; give a comma-separated subset")
    return tuple(dict.fromkeys(names))


def parse_ranges(spec: Optional[str], flag: str) -> Optional[tuple[tuple[int, int], ...]]:
    """``"0-5,8"`` -> ``((0, 5), (8, 8))``: inclusive ranges, sorted and merged; None for None/empty."""
    from ..analysis.stats import parse_blocks

    return parse_blocks(spec, flag, "an index")
