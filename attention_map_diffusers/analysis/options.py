"""The options of one analysis, as a type (the command line builds it; the package never sees argparse)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..contract import UserError
from .stats import WEIGHT_MODES

ENCODERS = ("clip", "t5")
FORMATS = ("png", "svg", "pdf")
WORD_RULES = ("prompt", "original")
SCALES = ("own", "shared")  # --scale
ENCODER_TITLES = {"clip": "CLIP", "t5": "T5"}


@dataclass(frozen=True)
class AnalysisOptions:
    """What to analyse and how; every field checked on construction (:class:`UserError`)."""

    root: str  # a run folder, or a folder with runs.jsonl
    out: Optional[str] = None  # output folder; None: ROOT/analysis
    topk: int = 12  # words (by heatmap mass) that get heatmaps and curves
    phrases: tuple[str, ...] = ()  # contiguous word sequences of the prompt, matched case-insensitively
    weights: str = "attention"  # how a phrase combines its words: "attention" (by mass) or "uniform"
    encoders: tuple[str, ...] = ENCODERS  # text encoders to analyse, in this order
    fmt: str = "png"  # figure file format
    dpi: int = 200  # the highest figure resolution (views.sensible_dpi: each figure at what its maps and texts need)
    block_ranges: Optional[tuple[tuple[int, int], ...]] = None  # blocks to analyse, inclusive (first, last) ranges; None: all
    overlay: bool = True  # draw heatmaps over the generated image
    tables_only: bool = False  # CSV tables and index.html only, no figures
    t5_tokenizer: Optional[str] = None  # for original-tool dumps: a T5 tokenizer folder or id
    vmax_percentile: float = 99.0  # heatmap colour scales run from 0 to this percentile of the map (100: its maximum)
    overwrite: bool = False  # replace an earlier analysis in --out even where one of its files was changed since
    words: str = "prompt"  # what a word is: "prompt" (the prompt's words) or "original" (the original tool's, from tokens)
    scale: str = "own"  # "own": each word map on its own colour scale; "shared": one scale for all the words of an encoder

    def __post_init__(self) -> None:
        if self.topk < 1:
            raise UserError(f"--topk must be at least 1, got {self.topk}")
        if not 10 <= self.dpi <= 1200:
            raise UserError(f"--dpi must be between 10 and 1200, got {self.dpi}")
        bad = [n for n in self.encoders if n not in ENCODERS]
        if bad or not self.encoders:
            raise UserError(
                f"--encoders: {bad[0] if bad else ''!r} is not an encoder; use a comma-separated subset of "
                + ",".join(ENCODERS)
            )
        if not 50.0 <= self.vmax_percentile <= 100.0:
            raise UserError(f"--vmax-percentile must be between 50 and 100, got {self.vmax_percentile:g}")
        if self.weights not in WEIGHT_MODES:
            raise UserError(f"--weights must be one of {', '.join(WEIGHT_MODES)}, got {self.weights!r}")
        if self.block_ranges is not None and any(a < 0 or a > b for a, b in self.block_ranges):
            raise UserError(f"--blocks: ranges must be (first, last) with 0 <= first <= last, got {self.block_ranges}")
        if self.words not in WORD_RULES:
            raise UserError(f"--words must be one of {', '.join(WORD_RULES)}, got {self.words!r}")
        if self.scale not in SCALES:
            raise UserError(f"--scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        if self.fmt not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {self.fmt!r}")


def parse_encoders(spec: str) -> tuple[str, ...]:
    """``"clip,t5"`` -> ``("clip", "t5")`` (lower-cased, duplicates dropped, order kept)."""
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in ENCODERS]
    if bad or not names:
        raise UserError(
            f"--encoders: {bad[0] if bad else spec!r} is not an encoder; use a comma-separated subset of clip,t5"
        )
    return tuple(dict.fromkeys(names))
