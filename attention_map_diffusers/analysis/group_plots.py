"""Figures of groups of runs (matplotlib): per-block curves with bands over seeds, and the words that
several prompts share. The numbers come from :mod:`.aggregate_runs`; nothing is computed here but
the layout."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from .layout import EDGE, fixed_layout, fontsize_of, legend_height, suptitle_band, suptitle_height, x_axis_band, y_axis_band
from .figure import footer_band, new_figure
from .plots import CURVE_LABEL, LINE_COLOURS, draw_bands, line_colours, line_styles, step_ticks
from .views import MAX_LINES, FigureFacts

BLOCK_COLUMNS = 6  # panels per row of the per-block figure


def blocks_bands_figure(
    curves_mean: np.ndarray, curves_std: np.ndarray, labels: Sequence[str], block_ids: Sequence[int],
    timesteps: Optional[np.ndarray], title: str, *, facts: Optional[FigureFacts] = None, colours: Optional[Sequence[str]] = None,
    levels: Optional[np.ndarray] = None,
) -> Figure:
    """One panel per block: (Bk, S, m) mean curves with their +- std bands (m <= :data:`MAX_LINES`),
    one y scale for every block (stated), one legend. ``colours``: one per word (default :data:`LINE_COLOURS`).
    ``levels``: (S,) a given image's noise levels σ: a marker per level, no line joining them, σ ticks."""
    Bk, S, m = curves_mean.shape
    if m > MAX_LINES:
        raise ValueError(f"at most {MAX_LINES} lines per panel, got {m}")
    cols = min(BLOCK_COLUMNS, Bk)
    rows = -(-Bk // cols)
    # fixed margins in inches, no layout engine and no sharex / sharey: with 24 panels, constrained
    # layout and matplotlib's shared-limit bookkeeping cost seconds; every panel gets the same limits
    # and ticks instead, labelled on the outer panels only
    legend_width = 0.45 + 0.06 * max((len(t) for t in labels), default=0)
    fig = new_figure(2.3 * cols + 0.8 + legend_width, 1.75 * rows + 1.15, layout=None, facts=facts)
    axes = fig.subplots(rows, cols, squeeze=False)
    fixed_layout(fig, top=0.75, bottom=0.55 + footer_band(facts), left=0.75, right=legend_width + 0.1,
                  wspace=0.12, hspace=0.38)
    top = float(np.nanmax(curves_mean + curves_std)) if curves_mean.size else 1.0
    ymax = top * 1.05 if top > 0 else 1.0
    x = np.arange(S)
    ticks = step_ticks(S, 4)
    names = [str(t) for t in ticks] if levels is None else [f"{levels[t]:.2f}" for t in ticks]
    colours = line_colours(m, colours)
    styles = line_styles(colours)
    lines = []
    for k, ax in enumerate(axes.flat):
        if k >= Bk:
            ax.set_axis_off()
            continue
        lines = []
        for j in range(m):
            if levels is not None:  # independent levels: markers only
                (line,) = ax.plot(x, curves_mean[k, :, j], linestyle="None", color=colours[j], marker="o", ms=4)
            else:
                (line,) = ax.plot(x, curves_mean[k, :, j], styles[j], color=colours[j], lw=1.6, marker="o" if S < 3 else None, ms=3)
            lines.append(line)
        if levels is not None:  # independent levels: error bars, no band joining two levels
            for j in range(m):
                ax.errorbar(x, curves_mean[k, :, j], yerr=curves_std[k, :, j], fmt="none", ecolor=colours[j], elinewidth=0.8, capsize=2)
        else:
            draw_bands(ax, x, curves_mean[k] - curves_std[k], curves_mean[k] + curves_std[k], colours)
        ax.set_title(f"block {block_ids[k]}", fontsize=8)
        ax.set_xlim(-0.5, S - 0.5)
        ax.set_ylim(0.0, ymax)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=6)
        ax.set_xticks(ticks)
        if k + cols >= Bk:  # the lowest panel of its column
            ax.set_xticklabels(names, fontsize=6)
        else:
            ax.set_xticklabels([])
        if k % cols:  # not in the first column
            ax.set_yticklabels([])
    fig.supylabel(CURVE_LABEL, fontsize=8)
    fig.supxlabel("noise level \u03c3 (independent levels of the given image)" if levels is not None
                  else "denoising step (0 = first, noisiest)", fontsize=8, y=(footer_band(facts) + 0.05) / fig.get_size_inches()[1],
                  va="bottom")
    if lines:
        W, H = fig.get_size_inches()
        fig.legend(lines, labels, loc="upper left", bbox_to_anchor=(1 - legend_width / W, 1 - 0.7 / H), fontsize=7, frameon=False)
    fig.suptitle(f"{title}\nx: denoising step, 0 = first (noisiest); one y scale for every block; "
                 "bands: mean \u00b1 sample std over the runs", fontsize=9)
    return fig


def cross_prompt_figure(rows: Sequence[tuple[str, Sequence[tuple[str, str, float, float]]]], title: str, *,
                        facts: Optional[FigureFacts] = None) -> Figure:
    """Words found in several prompts: per word a group of horizontal bars, one per occurrence in
    each prompt (coloured by prompt, labelled with the word's number there), its mass mean with a
    +- std error bar. ``rows``: (word, [(prompt label, bar label, mean, std), ...])."""
    prompts = list(dict.fromkeys(p for _, hits in rows for p, _, _, _ in hits))
    colour = {p: LINE_COLOURS[i % len(LINE_COLOURS)] for i, p in enumerate(prompts)}
    n_bars = sum(len(h) for _, h in rows)
    names = [bar for _, hits in rows for _, bar, _, _ in hits]
    plot_h = 0.26 * n_bars + 0.3 * len(rows) + 0.2
    top = suptitle_height(title, 10)
    legend = legend_height(len(prompts), 8, title=True)
    xlabel = "share of the prompt's word attention (%): mean \u00b1 sample std over the group's runs"
    bottom = EDGE + footer_band(facts) + legend + 0.1 + x_axis_band(fontsize_of("medium"), 1, 10)
    left = EDGE + y_axis_band(names, 8)
    fig = new_figure(8.5, top + plot_h + bottom - footer_band(facts), layout=None, facts=facts)
    suptitle_band(fig, title, 10)
    ax = fig.add_subplot(1, 1, 1)
    fixed_layout(fig, top=top, bottom=bottom, left=left, right=0.3)
    y, ticks = 0.0, []
    seen = set()
    for word, hits in rows:
        for p, bar, mean, std in hits:
            ax.barh(y, 100 * mean, xerr=100 * std, color=colour[p], height=0.8, capsize=2,
                    label=p if p not in seen else None)
            seen.add(p)
            ticks.append(y)
            y += 1
        y += 0.7
    ax.set_yticks(ticks)
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, -(x_axis_band(fontsize_of("medium"), 1, 10) + 0.1) / plot_h), fontsize=8,
              frameon=False, title="prompt", title_fontsize=8, borderaxespad=0.0)
    return fig
