"""CSV tables of one encoder's analysis (``tables/*.csv``)."""

from __future__ import annotations

import csv
import io
import os
from typing import Sequence

import numpy as np

from ..atomic import write_text
from .original_words import ORIGINAL
from .stats import EncoderResult, table_values, word_summary
from .views import word_labels


def fmt(value: float) -> str:
    """A float with 7 significant digits (more than float16/float32 dumps carry)."""
    return format(float(value), ".7g")


def csv_text(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """CSV text (RFC 4180 quoting, ``\\n`` line ends)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(header))
    writer.writerows(rows)
    return buf.getvalue()


def block_table(block_ids: Sequence[int], names: Sequence[str], values: np.ndarray) -> str:
    """``block,<name>...``: one row per block (its index), one column per name; values (Bk, n)."""
    rows = [[b] + [fmt(v) for v in values[i]] for i, b in enumerate(block_ids)]
    return csv_text(["block", *names], rows)


def summary_table(result: EncoderResult) -> str:
    """``word,mass,peak_block,peak_step,word_index``, one row per word in prompt order.

    ``word_index`` is the word's number in the prompt (tells repeated words apart); it comes last so
    that readers of the earlier four columns keep working.
    """
    rows = [[w, fmt(m), b, s, wd.index] for wd, (w, m, b, s) in zip(result.words, word_summary(result))]
    return csv_text(["word", "mass", "peak_block", "peak_step", "word_index"], rows)


def column_labels(words: Sequence, bare: bool) -> list[str]:
    """Column names of words: bare texts (the original tool's rule: a repeated word is two columns of the same
    name) or :func:`~.views.word_labels` (a repeated word numbered, "a #6")."""
    return [w.text for w in words] if bare else word_labels(words)


def write_tables(folder: str, result: EncoderResult, with_phrases: bool) -> list[str]:
    """Write ``folder/tables/*.csv``; returns their paths relative to ``folder``.

    Phrase tables are written when phrases were asked for (columns: the phrases found, in --phrases order).
    """
    os.makedirs(os.path.join(folder, "tables"), exist_ok=True)
    written = []
    kinds = ["words", "phrases"] if with_phrases else ["words"]
    for kind in kinds:
        names, auc_values, mean_values = table_values(result, kind)
        if kind == "words":
            names = column_labels(result.words, result.wordmap.source == ORIGINAL)
        for stat, values in (("auc", auc_values), ("stepavg", mean_values)):
            rel = f"tables/{kind}_{stat}.csv"
            write_text(os.path.join(folder, rel), block_table(result.block_ids, names, values))
            written.append(rel)
    rel = "tables/words_summary.csv"
    write_text(os.path.join(folder, rel), summary_table(result))
    written.append(rel)
    return written


def write_group_tables(folder: str, group, bare: bool = False) -> list[str]:
    """Tables of an aggregated group (:class:`~.aggregate_runs.GroupResult`) into ``folder/tables``;
    ``bare``: words named by their text alone (the original tool's rule, :func:`column_labels`).

    ``words_summary.csv``: word,mass_mean,mass_std,n_runs,word_index; ``words_auc.csv`` and
    ``words_stepavg.csv``: per block, each word's mean over runs and ``<word> std``.
    """
    os.makedirs(os.path.join(folder, "tables"), exist_ok=True)
    labels = column_labels(group.words, bare)
    rows = [[w.text, fmt(group.mass_mean[j]), fmt(group.mass_std[j]), group.n_runs, w.index] for j, w in enumerate(group.words)]
    written = {"tables/words_summary.csv": csv_text(["word", "mass_mean", "mass_std", "n_runs", "word_index"], rows)}
    header = ["block"] + [c for name in labels for c in (name, f"{name} std")]
    for stat, mean, std in (("auc", group.auc_mean, group.auc_std), ("stepavg", group.stepavg_mean, group.stepavg_std)):
        body = [[b] + [fmt(v) for j in range(len(labels)) for v in (mean[i, j], std[i, j])] for i, b in enumerate(group.block_ids)]
        written[f"tables/words_{stat}.csv"] = csv_text(header, body)
    for rel, text in written.items():
        write_text(os.path.join(folder, rel), text)
    return list(written)
