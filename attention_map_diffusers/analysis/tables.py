"""CSV tables of one encoder's analysis (``tables/*.csv``)."""

from __future__ import annotations

import csv
import io
import os
from typing import Sequence

import numpy as np

from ..atomic import write_text
from .options import ENCODER_TITLES
from .original_words import ORIGINAL
from .stats import EncoderResult, auc, auc_per_step, step_average, table_curves, word_summary
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


def summary_table(result: EncoderResult, labels: Sequence[str]) -> str:
    """``word,mass,peak_block,peak_step,word_index``, one row per word in prompt order.

    ``word`` is the word's column name in the other tables (``labels``); ``word_index`` its number in
    the prompt (tells repeated words apart); it comes last so that readers of the earlier four columns
    keep working.
    """
    rows = [[lab, fmt(m), b, s, wd.index] for lab, wd, (_, m, b, s) in zip(labels, result.words, word_summary(result))]
    return csv_text(["word", "mass", "peak_block", "peak_step", "word_index"], rows)


def tables_readme(encoder: str, steps: int, bare: bool, group: bool = False) -> str:
    """``tables/README.txt``: what the columns and the units are, beside the CSVs (a comment line in a CSV
    would break its readers; this file travels with the tables when the folder is copied)."""
    names = (
        "each word by its text alone, as the original tool named them (--words original): a word that occurs "
        "twice is two columns of the same name; words_summary.csv's word_index tells them apart"
        if bare
        else 'each word by its text, and a word that occurs more than once (in any case) also by its number in '
        'the prompt\'s word list ("a #6"); words_summary.csv\'s word_index is that number'
    )
    spread = (
        "Group tables: per value the mean over the runs, and beside it \"<name> std\" (sample standard deviation).\n\n"
        if group else ""
    )
    return (
        f"Tables of the {ENCODER_TITLES.get(encoder, encoder)} words (CSV, comma-separated, UTF-8, 7 significant digits).\n\n"
        f"Names: every table names the words the same way: {names}.\n\n"
        "Rows of words_*.csv and phrases_*.csv: one per analysed block (first cell: its index). A word's curve is its\n"
        "share of the pixels' text attention at each denoising step (per_block_step_token_mean summed over its tokens).\n\n"
        "words_auc.csv, phrases_auc.csv: the area under the curve over the step index, trapezoid rule with unit spacing:\n"
        "sum over s of (c[s] + c[s+1]) / 2. Its unit is curve value x steps, so it grows with the number of steps:\n"
        f"these tables have S = {steps} steps, so AUC = {max(steps - 1, 0)} x the curve's trapezoid average.\n"
        "words_auc_norm.csv, phrases_auc_norm.csv: AUC / (S - 1), that trapezoid average, in the curve's own unit,\n"
        "comparable across runs with different step counts (S = 1: the one step's value).\n"
        "words_stepavg.csv, phrases_stepavg.csv: the plain mean over the S steps (AUC / (S - 1) weighs the first and\n"
        "last step half).\n"
        "words_summary.csv: per word its mass (share of the heatmap mass, 0 to 1), the block and step of its curve's\n"
        "peak (steps in denoising order, 0 = first, noisiest) and word_index.\n\n"
        f"{spread}More: docs/analysis.md (attention_map_diffusers).\n"
    )


def column_labels(words: Sequence, bare: bool) -> list[str]:
    """Column names of words: bare texts (the original tool's rule: a repeated word is two columns of the same
    name) or :func:`~.views.word_labels` (a repeated word numbered, "a #6")."""
    return [w.text for w in words] if bare else word_labels(words)


def write_tables(folder: str, result: EncoderResult, with_phrases: bool) -> list[str]:
    """Write ``folder/tables/*.csv`` and ``README.txt``; returns their paths relative to ``folder``.

    Phrase tables are written when phrases were asked for (columns: the phrases, in --phrases order).
    """
    os.makedirs(os.path.join(folder, "tables"), exist_ok=True)
    bare = result.wordmap.source == ORIGINAL
    labels = column_labels(result.words, bare)
    written = {}
    for kind in ["words", "phrases"] if with_phrases else ["words"]:
        names, curves = table_curves(result, kind)
        names = labels if kind == "words" else names
        for stat, values in (("auc", auc(curves, axis=1)), ("stepavg", step_average(curves, axis=1)),
                             ("auc_norm", auc_per_step(curves, axis=1))):
            written[f"tables/{kind}_{stat}.csv"] = block_table(result.block_ids, names, values)
    written["tables/words_summary.csv"] = summary_table(result, labels)
    written["tables/README.txt"] = tables_readme(result.encoder, result.curves.shape[1], bare)
    for rel, text in written.items():
        write_text(os.path.join(folder, rel), text)
    return list(written)


def write_group_tables(folder: str, group, bare: bool = False) -> list[str]:
    """Tables of an aggregated group (:class:`~.aggregate_runs.GroupResult`) into ``folder/tables``;
    ``bare``: words named by their text alone (the original tool's rule, :func:`column_labels`).

    ``words_summary.csv``: word,mass_mean,mass_std,n_runs,word_index; ``words_auc.csv``,
    ``words_auc_norm.csv`` and ``words_stepavg.csv``: per block, each word's mean over runs and ``<word> std``.
    """
    os.makedirs(os.path.join(folder, "tables"), exist_ok=True)
    labels = column_labels(group.words, bare)
    rows = [[labels[j], fmt(group.mass_mean[j]), fmt(group.mass_std[j]), group.n_runs, w.index] for j, w in enumerate(group.words)]
    written = {"tables/words_summary.csv": csv_text(["word", "mass_mean", "mass_std", "n_runs", "word_index"], rows)}
    header = ["block"] + [c for name in labels for c in (name, f"{name} std")]
    S = group.curves_mean.shape[1]
    norm = (group.auc_mean / (S - 1), group.auc_std / (S - 1)) if S > 1 else (group.stepavg_mean, group.stepavg_std)
    for stat, mean, std in (("auc", group.auc_mean, group.auc_std), ("stepavg", group.stepavg_mean, group.stepavg_std),
                            ("auc_norm", *norm)):
        body = [[b] + [fmt(v) for j in range(len(labels)) for v in (mean[i, j], std[i, j])] for i, b in enumerate(group.block_ids)]
        written[f"tables/words_{stat}.csv"] = csv_text(header, body)
    written["tables/README.txt"] = tables_readme(group.encoder, S, bare, group=True)
    for rel, text in written.items():
        write_text(os.path.join(folder, rel), text)
    return list(written)
