"""The numbers of the tables: per-image rows and the summary over a set (numpy and the standard library)."""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .maps import BASELINES, MULTICLASS

PER_IMAGE_COLUMNS = ("encoder", "method", "word", "iou", "ap", "pixel_acc", "pred_px", "gt_px")
SUMMARY_COLUMNS = ("method", "encoder", "selection", "images", "n", "mIoU", "class_mIoU", "pixel_acc", "mAP")
SKIPPED_COLUMNS = ("key", "name", "reason")


@dataclass(frozen=True)
class SummaryRow:
    """One method and encoder over the whole set."""

    method: str
    encoder: str
    selection: str  # "all", "blocks 0-5", "steps 0-2"
    images: int  # images with at least one scored word
    n: int  # scored (image, word) pairs
    miou: float  # mean IoU over the pairs
    class_miou: float  # mean over words (classes) of their mean IoU
    pixel_acc: float  # mean over pairs; argmax: mean over images of the multi-class accuracy
    map: float  # mean AP over the pairs

    @property
    def baseline(self) -> bool:
        return self.method in BASELINES


def _mean(values) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def summarise(scores: Sequence, methods: Sequence[str], encoders: Sequence[str], selection: str) -> list[SummaryRow]:
    """Per method (in ``methods`` order) and encoder, the set's scores; pairs without rows are left out."""
    groups = defaultdict(list)
    for s in scores:
        groups[(s.method, s.encoder)].append(s)
    out = []
    for m in methods:
        for e in encoders:
            rows = groups.get((m, e))
            if not rows:
                continue
            by_word = defaultdict(list)
            for r in rows:
                by_word[r.word.lower()].append(r.iou)
            if m in MULTICLASS:  # one multi-class accuracy per image, repeated on its rows
                acc = _mean(list({r.key: r.pixel_acc for r in rows}.values()))
            else:
                acc = _mean(r.pixel_acc for r in rows)
            out.append(SummaryRow(
                m, e, selection, len({r.key for r in rows}), len(rows), _mean(r.iou for r in rows),
                _mean(_mean(v) for v in by_word.values()), acc, _mean(r.ap for r in rows),
            ))
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6f}"
    return str(v)


def csv_text(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_fmt(v) for v in r])
    return buf.getvalue()


def per_image_csv(scores: Sequence) -> str:
    return csv_text(PER_IMAGE_COLUMNS, [(s.encoder, s.method, s.word, s.iou, s.ap, s.pixel_acc, s.pred_px, s.gt_px) for s in scores])


def summary_csv(rows: Sequence[SummaryRow]) -> str:
    return csv_text(SUMMARY_COLUMNS, [(r.method, r.encoder, r.selection, r.images, r.n, r.miou, r.class_miou, r.pixel_acc, r.map) for r in rows])


def skipped_csv(skips: Sequence) -> str:
    return csv_text(SKIPPED_COLUMNS, [(s.key, s.name, s.reason) for s in skips])


def text_table(rows: Sequence[SummaryRow]) -> str:
    """A short fixed-width table for the terminal (percentages)."""
    w = max([8] + [len(r.method) for r in rows])
    head = f"{'method':<{w}} {'encoder':<8} {'n':>6} {'mIoU':>6} {'cls-mIoU':>8} {'pix-acc':>7} {'mAP':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        tag = " (baseline)" if r.baseline else ""
        lines.append(
            f"{r.method:<{w}} {r.encoder:<8} {r.n:>6} {100 * r.miou:6.1f} {100 * r.class_miou:8.1f} "
            f"{100 * r.pixel_acc:7.1f} {100 * r.map:6.1f}{tag}"
        )
    return "\n".join(lines)


def best_method(rows: Sequence[SummaryRow]):
    """The non-baseline (method, encoder) with the highest mIoU (the first on ties), else the best row."""
    pool = [r for r in rows if not r.baseline] or list(rows)
    pool = [r for r in pool if not math.isnan(r.miou)]
    return max(pool, key=lambda r: r.miou) if pool else None
