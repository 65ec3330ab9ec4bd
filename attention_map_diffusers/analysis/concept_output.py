"""The concept maps of one item on disk (``concepts/``) and their section of the report.

What is written, relative to the item's folder (docs/analysis.md, "Concept maps")::

    concepts/concept_maps.npz            maps (C, H, W) float32, concepts (C,), image_size [H, W]
    concepts/tables/concepts_mass.csv    concept,mean_share
    concepts/heatmaps/{k:03d}-{name}.png one per concept, one colour scale for all (1/C marked)
    concepts/segmentation.png            the winning concept per pixel, with the concepts that own pixels
    concepts/segmentation_map.png        the same picture alone, at the image size, in the exact colours
    concepts/curves.png                  per block and per step (blocks with a concept stream)
    concepts/curves_blocks.png           one panel per block: per step
    concepts/segmentation_steps.png      the winning concept per pixel at up to 6 steps (noise levels), each
                                         step's map alone; when the dump kept concept_per_step_map

With ``--tables-only``, the npz and the CSV only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from ..atomic import write_npz, write_text
from ..contract import slugify
from . import concepts as cm
from .dumpfile import Dump, format_ranges
from .options import AnalysisOptions
from .tables import csv_text, fmt
from .given import given_image
from .views import FRAMES, FigureFacts, pick_frames, robust_vmax

MAPS_NAME = "concept_maps.npz"
MASS_TABLE = "tables/concepts_mass.csv"


@dataclass
class ConceptPage:
    """What was written for the concepts of one item; paths relative to the report page."""

    names: list[str]
    mass: np.ndarray  # (C,) mean share over the grid's pixels
    maps: str  # concept_maps.npz
    table: str  # concepts_mass.csv
    selection: str  # which updates the maps average, in words
    heatmaps: list[tuple[str, str]] = field(default_factory=list)  # (caption, path)
    vmax: float = 0.0
    segmentation: Optional[str] = None
    segmentation_map: Optional[str] = None
    owners: list[str] = field(default_factory=list)
    curves: Optional[str] = None
    block_curves: Optional[str] = None
    step_segmentation: Optional[str] = None
    step_caption: str = ""
    notes: list[str] = field(default_factory=list)


def figure_names(names: Sequence[str], options: AnalysisOptions, steps: bool = False) -> list[str]:
    """The figures written for concepts ``names`` (none with --tables-only), relative to ``concepts/``;
    ``steps``: the dump kept per-step concept maps."""
    if options.tables_only:
        return []
    f = options.fmt
    heat = [f"heatmaps/{k:03d}-{slugify(n, 60)}.{f}" for k, n in enumerate(names)]
    return heat + [f"segmentation.{f}", "segmentation_map.png", f"curves.{f}", f"curves_blocks.{f}"] + (
        [f"segmentation_steps.{f}"] if steps else [])


def count_files(dump: Dump, options: AnalysisOptions) -> int:
    """Progress-bar units of the concepts of a run: per item, the npz, the table and the figures."""
    if dump.concepts is None:
        return 0
    return dump.batch_size * (2 + len(figure_names(dump.concepts.names, options, dump.concepts.step_maps is not None)))


def _selection(dump: Dump, positions: Optional[Sequence[int]]) -> str:
    data = dump.concepts
    ids = [dump.block_ids[p] for p in (data.blocks if positions is None else positions)]
    S = dump.step_mean.shape[2]
    steps = "all steps" if list(data.steps) == list(range(S)) else f"steps {format_ranges(list(data.steps))}"
    rule = f", rule {data.rule}" if data.rule else ""
    return f"blocks {format_ranges(ids)}, {steps} (denoising order){rule}"


def write_concepts(folder: str, rel: str, dump: Dump, item: int, image, facts: FigureFacts, options: AnalysisOptions,
                   positions: Sequence[int], tick: Callable[[], None]) -> ConceptPage:
    """The concept outputs of one item into ``folder`` (= ``rel`` relative to the report page).

    ``positions``: the analysed blocks (Bk axis); with ``--blocks`` the maps are restricted to them
    when the dump kept per-block concept maps, else the dump's average is used and a note says so.
    """
    data = dump.concepts
    names = list(data.names)
    C = len(names)
    notes = []
    restrict = options.block_ranges is not None and data.block_maps is not None
    if options.block_ranges is not None and not restrict:
        notes.append("The concept maps average the blocks the dump chose: it kept no per-block concept maps "
                      "(concept_per_block_map) to restrict them with --blocks; the curves follow --blocks.")
    grid = cm.item_maps(data, item, positions if restrict else None)  # (C, Hc, Wc)
    chosen = [p for p in positions if p in set(data.stream_blocks())] if restrict else None
    H, W = cm.image_size(dump.metadata, grid.shape[1:])
    up = cm.upsample(grid, H, W)
    mass = cm.mass(grid)
    page = ConceptPage(names, mass, f"{rel}/{MAPS_NAME}", f"{rel}/{MASS_TABLE}", _selection(dump, chosen), notes=notes)
    os.makedirs(os.path.join(folder, "tables"), exist_ok=True)
    write_npz(os.path.join(folder, MAPS_NAME), cm.maps_arrays(up, names, (H, W)))
    tick()
    write_text(os.path.join(folder, MASS_TABLE), csv_text(["concept", "mean_share"], [[n, fmt(m)] for n, m in zip(names, mass)]))
    tick()
    files = figure_names(names, options, data.step_maps is not None)
    if not files:
        return page

    from . import concept_plots as cp
    from .figure import save_figure

    def save(fig, name):
        save_figure(fig, os.path.join(folder, name), options.fmt, options.dpi, facts)
        tick()

    disp = image[1] if image is not None and options.overlay else None
    os.makedirs(os.path.join(folder, "heatmaps"), exist_ok=True)
    vmax = max(robust_vmax(grid, options.vmax_percentile), 1.0 / C)
    page.vmax = vmax
    cp.save_concept_heatmaps(grid, [f"concept \u201c{n}\u201d: mean share {m:.1%}" for n, m in zip(names, mass)],
                             [os.path.join(folder, f) for f in files[:C]], disp, vmax=vmax, fmt=options.fmt, dpi=options.dpi,
                             facts=facts, on_saved=tick)
    page.heatmaps = [(f"{n} (mean share {m:.1%})", f"{rel}/{f}") for n, m, f in zip(names, mass, files)]
    seg, seg_map, curves_name, blocks_name = files[C:C + 4]
    labels = cm.winners(up)
    colours = cm.colours(names)
    picture = cm.label_picture(labels, colours)
    own = cm.owners(labels, C)
    save(cp.concept_segmentation_figure(picture, disp, names, colours, own,
                                        "the concept with the largest share at each pixel (argmax over the concepts)", facts=facts),
         seg)
    from .pngfile import write_png

    write_png(os.path.join(folder, seg_map), picture, facts.png_text() if facts is not None else {})
    tick()
    page.segmentation, page.segmentation_map = f"{rel}/{seg}", f"{rel}/{seg_map}"
    page.owners = [names[k] for k in own]
    keep, curves = cm.curves(data.step_mean[item], positions)
    ts = dump.timesteps if dump.timesteps is not None and np.ndim(dump.timesteps) == 1 else None
    if keep:
        ids = [dump.block_ids[p] for p in keep]
        save(cp.concept_curves_figure(ids, curves, names, colours, ts, "concepts per block and per denoising step", facts=facts),
             curves_name)
        save(cp.concept_block_curves_figure(ids, curves, names, colours, "concepts per denoising step, per block", facts=facts),
             blocks_name)
        page.curves, page.block_curves = f"{rel}/{curves_name}", f"{rel}/{blocks_name}"
    else:
        page.notes.append("None of the analysed blocks has a concept stream: no concept curves.")
        tick()
        tick()
    if data.step_maps is not None:
        _step_segmentation(files[C + 4], rel, dump, item, (H, W), colours, disp, page, save, facts)
    return page


def _step_segmentation(name: str, rel: str, dump: Dump, item: int, size: tuple[int, int], colours: np.ndarray,
                       image: Optional[np.ndarray], page: ConceptPage, save: Callable, facts: FigureFacts) -> None:
    """The winning concept per pixel at up to :data:`~.views.FRAMES` steps (or noise levels), each step's map alone."""
    from . import concept_plots as cp

    data = dump.concepts
    S = data.step_maps.shape[1]
    steps = pick_frames(S, FRAMES)
    labels = cm.step_winners(data, item, steps, size)
    given = given_image(dump.metadata, S)
    levels = given.levels if given is not None else None
    ts = dump.timesteps if dump.timesteps is not None and np.ndim(dump.timesteps) == 1 else None
    if levels is not None:
        titles = [f"noise level \u03c3 = {levels[s]:.2f}" for s in steps]
        what = "noise level"
    else:
        titles = [f"step {s}" + (f" (t = {ts[s]:.0f})" if ts is not None else "") for s in steps]
        what = "denoising step"
    own = sorted(set().union(*(cm.owners(lab, data.C) for lab in labels)))
    blocks = format_ranges([dump.block_ids[p] for p in data.blocks])
    save(cp.concept_steps_figure(cm.label_picture(labels, colours), titles, data.names, colours, own,
                                 f"the winning concept per pixel at each {what}, its map alone (blocks {blocks})",
                                 image=image, facts=facts), name)
    page.step_segmentation = f"{rel}/{name}"
    shown = "every" if len(steps) == S else f"{len(steps)} of the {S}"
    page.step_caption = (f"the winning concept per pixel at {shown} {what}s, each from that {what}'s map alone "
                         f"(summed over blocks {blocks}): where the concepts settle as the noise goes down")


def concept_section(page: ConceptPage, fmt_: str, prefix: str) -> tuple[str, tuple[str, str]]:
    """HTML of the "Concept maps" section of an item and its table-of-contents entry (anchor, title)."""
    from .report import _anchor, _e, _figure, _grid, _table, href

    aid = _anchor(prefix, "concepts")
    out = [f'<h2 id="{_e(aid)}">Concept maps</h2>',
           f"<p>{len(page.names)} concepts: " + ", ".join(f"&ldquo;{_e(n)}&rdquo;" for n in page.names)
           + f". Each pixel's softmax over the concepts, averaged over {_e(page.selection)}.</p>"]
    out += [f'<p class="note">{_e(n)}</p>' for n in page.notes]
    order = np.argsort(-page.mass, kind="stable")
    rows = [[_e(page.names[k]), f"{100 * page.mass[k]:.2f}%"] for k in order]
    out.append(_table(["concept", "mean share"], rows, num=(1,)))
    if page.segmentation:
        owners = ", ".join(page.owners)
        out.append(_figure(page.segmentation, f"the concept with the largest share at each pixel; concepts that own pixels: {owners}",
                           fmt_))
    if page.heatmaps:
        out.append(f"<p>Heatmaps on one colour scale for all concepts, 0 to {page.vmax:.3g}; the cyan line on the colour bar "
                   f"marks the even share 1/C = {1 / len(page.names):.3g}.</p>" + _grid(page.heatmaps, fmt_))
    if page.curves:
        out.append(_figure(page.curves, "each concept's mean share per block (averaged over the steps) and per step "
                                        "(averaged over the blocks); dotted: 1/C", fmt_))
    if page.block_curves:
        out.append(_figure(page.block_curves, "per block with a concept stream: each concept's mean share per step", fmt_))
    if page.step_segmentation:
        out.append(_figure(page.step_segmentation, page.step_caption, fmt_))
    links = [(MAPS_NAME, page.maps), ("concepts_mass.csv", page.table)]
    if page.segmentation_map:
        links.append(("segmentation_map.png", page.segmentation_map))
    out.append("<p>Files: " + " &middot; ".join(f'<a href="{href(p)}">{_e(n)}</a>' for n, p in links)
               + f" ({MAPS_NAME}: maps, concepts x H x W float32, each pixel's shares summing to 1; concepts; image_size).</p>")
    return "\n".join(out), (aid, "Concept maps")
