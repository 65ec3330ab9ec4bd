"""Planning an analysis: every input read and checked, every result computed, before anything is written."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from ..contract import UserError
from . import outdir
from .colours import WordColours
from .discover import NOT_LISTED, RunEntry, discover
from .dumpfile import Dump, Note, load_dump, load_t5_tokenizer
from .options import ENCODER_TITLES, AnalysisOptions
from .stats import EncoderResult, analyse_encoder
from .original_words import original_words
from .words import map_words

if TYPE_CHECKING:
    from .fonts import FontChoice


@dataclass
class RunPlan:
    """One run, analysed; ``folder`` is its sub-folder of the output (None for a single run)."""

    folder: Optional[str]
    dump: Dump
    images: list  # per item: (path, display array) or None
    results: list[list[EncoderResult]]  # per item, per encoder
    notes: list[Note] = field(default_factory=list)


@dataclass
class RunSpec:
    """A run that passed validation. Its arrays are kept only when it is the only run; with several
    runs each is planned again when written, so memory does not grow with the number of runs."""

    folder: Optional[str]
    run_dir: str
    notes: list[Note]
    n_files: int  # files it will write (for the progress bar)
    plan: Optional[RunPlan]
    entry: Optional[RunEntry] = None  # its row of the top-level index (several runs)


@dataclass
class Plan:
    options: AnalysisOptions
    root: str
    out: str
    runs: list[RunSpec]  # the runs to write
    entries: list[RunEntry]  # every run of a folder of runs, analysable or not (empty for a single run)
    multi: bool
    t5_loader: Optional[Callable[[], object]]
    notes: list[Note] = field(default_factory=list)  # about the whole analysis, said once
    fonts: Optional["FontChoice"] = None  # for the words in figures (None: tables only)
    leftovers: list[str] = field(default_factory=list)  # folders of a killed analysis, removed when writing
    colours: Optional[WordColours] = None  # one colour per word for every run's figures

    @property
    def failed(self) -> list[RunEntry]:
        """Runs the analysis could not analyse (each with its ``problem``)."""
        return [e for e in self.entries if e.problem is not None]


def index_rows(plan: Plan) -> list[dict]:
    """Rows of the top-level ``index.html`` (folder, prompt, status, error, link), once the runs are written."""
    rows = []
    for e in plan.entries:
        failed = e.problem is not None
        rows.append({
            "folder": e.folder,
            "prompt": list(e.prompt),
            "status": "not analysed" if failed else e.status,
            "error": e.problem if failed else e.error,
            "link": f"{e.folder}/index.html" if e.to_analyse else None,
        })
    return rows


def restrict_blocks(dump: Dump, block_ranges: Optional[tuple[tuple[int, int], ...]]) -> tuple[np.ndarray, list[Note]]:
    """(B, Hc, Wc, T) the average map over the chosen blocks (all blocks when None).

    Needs the dump's per-block maps (``--save-block-maps``) to restrict; without them the map of all
    blocks is returned with a note saying so.
    """
    if block_ranges is None:
        return dump.avg_map, []
    if dump.block_maps is None:
        return dump.avg_map, [Note(
            "note",
            "heatmaps average all blocks: the dump has no per_block_token_map (dump with --save-block-maps "
            "to restrict them with --blocks)",
        )]
    pos = dump.select_blocks(block_ranges)
    n_updates = max(1, round(dump.N * len(pos) / len(dump.block_ids)))
    return dump.block_maps[:, pos].sum(axis=1) / np.float32(n_updates), []


def _load_image(path: Optional[str], where: str):
    if path is None:
        return None
    from PIL import UnidentifiedImageError

    from ..imagefile import TooManyPixels, open_upright
    from .plots import display_image

    try:
        return path, display_image(open_upright(path).image)
    except TooManyPixels as exc:
        raise UserError(
            f"{where}: the image {path} listed by the dump is too large to open safely ({exc}); replace it, or "
            "pass --no-overlay to analyse without it"
        ) from None
    except MemoryError:
        raise UserError(
            f"{where}: the image {path} listed by the dump is too large for this machine's memory; replace it, or "
            "pass --no-overlay to analyse without it"
        ) from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise UserError(
            f"{where}: the image {path} listed by the dump is missing or unreadable ({type(exc).__name__}); "
            "restore it, or pass --no-overlay to analyse without it"
        ) from None


def plan_run(folder: Optional[str], run_dir: str, options: AnalysisOptions, t5_loader=None) -> RunPlan:
    """Load one run and compute every encoder's results."""
    dump = load_dump(
        run_dir,
        t5_tokenizer=t5_loader if "t5" in options.encoders else None,
        block_maps=options.block_ranges is not None,
        step_maps=not options.tables_only,  # concept_per_step_map, for the concepts' per-step segmentation
    )
    positions = dump.select_blocks(options.block_ranges)
    sel_ids = [dump.block_ids[p] for p in positions]
    have = [n for n in ENCODER_TITLES if n in dump.encoders]
    if not any(n in dump.encoders for n in options.encoders):  # nothing to analyse: an empty report
        why = "FLUX.1 dumps have t5 only" if dump.metadata.get("model_family") == "flux" else (
            "dumps of the original tool have t5 only with --t5-tokenizer" if dump.format_version < 2 else "")
        raise UserError(
            f"--encoders {','.join(options.encoders)}: {run_dir} has no {' or '.join(options.encoders)} tokens "
            f"(it has {', '.join(have) or 'none'}{'; ' + why if why else ''}); choose --encoders {','.join(have) or 'clip,t5'}"
        )
    avg, notes = restrict_blocks(dump, options.block_ranges)
    notes = list(dump.notes) + notes
    images = []
    for path in dump.images:
        if options.tables_only or path is None:
            images.append(None)
            continue
        try:
            images.append(_load_image(path, run_dir))
        except UserError as exc:
            if options.overlay:
                raise
            images.append(None)  # --no-overlay: a lost image only costs the summary its first panel
            notes.append(Note("note", str(exc)))
    results: list[list[EncoderResult]] = []
    missing: dict[str, list[str]] = {}  # phrase -> where it is absent: one warning per phrase, not per encoder
    for i in range(dump.batch_size):
        per_item = []
        for name in options.encoders:
            enc = dump.encoders.get(name)
            if enc is None:
                flux_clip = name == "clip" and dump.metadata.get("model_family") == "flux"  # T5 only, by design
                if i == 0 and not flux_clip and not any(ENCODER_TITLES[name] + " not analysed" in n.text for n in notes):
                    notes.append(Note("note", f"{ENCODER_TITLES[name]} not analysed: the dump has no text positions for it"))
                continue
            offs = enc.offsets[i] if enc.offsets is not None else None
            if options.words == "original":
                wm = original_words(enc.tokens[i], enc.special[i], enc.length, name)
            else:
                wm = map_words(enc.tokens[i], enc.special[i], dump.prompts[i], enc.length, offsets=offs)
            a, b = enc.span
            res = analyse_encoder(
                avg[i, :, :, a:b],
                dump.step_mean[i][positions][:, :, a:b],
                wm,
                encoder=name,
                item=i,
                block_ids=sel_ids,
                timesteps=dump.timesteps,
                topk=options.topk,
                phrases=options.phrases,
                weights=options.weights,
            )
            where = f"{ENCODER_TITLES[name]}" + (f", item {i}" if dump.batch_size > 1 else "")
            if wm.words and not res.mass.sum() > 0:
                raise UserError(
                    f"{run_dir}: the {where} words get no attention at all (their maps in sum_token_map are all "
                    "zero), so their shares are undefined; the dump is damaged, re-run it"
                )
            for ph in res.missing_phrases:
                missing.setdefault(ph, []).append(where)
            if wm.dropped:
                notes.append(Note(
                    "note",
                    f"{where}: the encoder truncated the prompt; {len(wm.dropped)} words from "
                    f"{wm.dropped[0].text!r} (word {wm.dropped[0].index}) on are absent from its analysis",
                ))
            if not wm.words and wm.in_specials:
                typed = ", ".join(sorted({t for t, sp in zip(enc.tokens[i], enc.special[i]) if sp and t in dump.prompts[i]}))
                notes.append(Note("note", f"{where}: the prompt holds only special tokens ({typed}), which are no words; "
                                          "only empty tables are written"))
            elif not wm.words:
                notes.append(Note("note", f"{where}: the prompt has no words for this encoder; only empty tables are written"))
            per_item.append(res)
        results.append(per_item)
    for ph, wheres in missing.items():
        what = "its column is all zero" if options.words == "original" else "no file for it"
        notes.append(Note("warning", f"phrase {ph!r} does not occur in the {' / '.join(wheres)} words; {what}"))
    return RunPlan(folder, dump, images, results, notes)


def _word_texts(run: RunPlan, options: AnalysisOptions) -> set[str]:
    """The strings a run's figures show: its words and the phrases."""
    texts = {w.text for per_item in run.results for res in per_item for w in res.words}
    return texts | set(options.phrases)


def folders(options: AnalysisOptions) -> tuple[str, str]:
    """The absolute ``--root`` and output folder (``--out``, by default ``ROOT/analysis``)."""
    root = os.path.abspath(options.root)
    return root, os.path.abspath(options.out) if options.out else os.path.join(root, "analysis")


def make_plan(options: AnalysisOptions) -> Plan:
    """Validate every input and compute what will be written; nothing is written.

    With a folder of runs, a run that cannot be analysed does not stop the others: its entry gets
    the reason (:attr:`Plan.failed`). A single run that cannot be analysed raises.
    """
    from .write import count_files

    root, out = folders(options)
    if not os.path.isdir(root):
        raise UserError(f"--root {options.root} is not a folder; give a run folder or a folder with runs.jsonl")
    outdir.check_out(out, options.overwrite)

    cache: dict = {}

    def t5_loader():
        if "tok" not in cache:
            cache["tok"] = load_t5_tokenizer(options.t5_tokenizer)
        return cache["tok"]

    loader = t5_loader if options.t5_tokenizer else None
    entries, notes = discover(root, out)
    if entries is None:
        todo: list[tuple[Optional[str], str, Optional[RunEntry]]] = [(None, root, None)]
    else:
        todo = [(e.folder, os.path.join(root, e.folder), e) for e in entries if e.to_analyse]
    runs = []
    texts: set[str] = set()
    prompt_words: list[list[str]] = []  # per (run, item): its words and the phrases, for their colours
    for folder, run_dir, entry in todo:
        try:
            rp = plan_run(folder, run_dir, options, loader)
        except UserError as exc:
            if entry is None:
                raise
            entry.problem = str(exc)
            continue
        if entry is not None and (entry.status == NOT_LISTED or not entry.prompt):
            entry.prompt = list(rp.dump.prompts)
        texts |= _word_texts(rp, options)
        prompt_words += [[w.text for res in per_item for w in res.words] + list(options.phrases) for per_item in rp.results]
        keep = rp if len(todo) == 1 else None
        runs.append(RunSpec(folder, run_dir, rp.notes, count_files(rp, options), keep, entry))
    fonts = None
    if not options.tables_only:
        from .fonts import choose_fonts

        fonts = choose_fonts(sorted(texts))
        if fonts.note():
            notes.append(Note("warning", fonts.note()))
    leftovers, kept = outdir.leftovers(out)
    if leftovers:
        names = ", ".join(os.path.basename(p) for p in leftovers)
        notes.append(Note("note", f"removing what an interrupted analysis left next to {out}: {names}"))
    if kept:
        names = ", ".join(f"{os.path.basename(p)} (holds {what})" for p, what in kept)
        notes.append(Note(
            "warning",
            f"leaving alone folders next to {out} that look like an interrupted analysis's but hold files their "
            f"manifest does not list: {names}; delete them yourself once you have kept what you need",
        ))
    return Plan(options, root, out, runs, entries or [], entries is not None, loader, notes, fonts, leftovers,
                WordColours.build(prompt_words))
