"""Which runs an analysis of ``--root`` covers: ``runs.jsonl``, checked against the run folders on disk.

``--root`` is a run folder itself, or a folder of runs. For a folder of runs, ``runs.jsonl`` lists
them; a run it lists that is not complete on disk cannot be analysed (the analysis says why and goes
on with the others), and complete run folders one level down that it does not list (or all of them,
when there is no ``runs.jsonl``) are analysed too, with a note that says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from ..contract import METADATA_NAME, NPZ_NAME, RUNS_NAME, UserError, run_is_complete
from .dumpfile import Note, read_runs

NOT_LISTED = "not in runs.jsonl"


@dataclass
class RunEntry:
    """One run of a folder of runs: a row of the top-level ``index.html``.

    Attributes:
        folder: the run folder, relative to ``--root``.
        prompt: its prompts (from ``runs.jsonl``, else from its metadata once read).
        status: what ``runs.jsonl`` says ("done", "skipped", "failed"), or :data:`NOT_LISTED`.
        error: the dump's own error for a run it marked failed.
        problem: why the analysis could not analyse it (one line); None while it can.
    """

    folder: str
    prompt: list[str] = field(default_factory=list)
    status: str = "done"
    error: Optional[str] = None
    problem: Optional[str] = None

    @property
    def to_analyse(self) -> bool:
        return self.status != "failed" and self.problem is None


def _lacks(path: str) -> list[str]:
    return [name for name in (NPZ_NAME, METADATA_NAME) if not os.path.isfile(os.path.join(path, name))]


def _run_folders(root: str, out: str) -> tuple[list[str], list[str]]:
    """Sub-folders of ``root`` (one level down) that hold a complete run, and those that hold half of
    one (one of its two files: an interrupted dump). Hidden folders and ``out`` are skipped."""
    complete, partial = [], []
    try:
        names = sorted(os.listdir(root))
    except OSError as exc:
        raise UserError(f"cannot list --root {root}: {exc}") from None
    for name in names:
        path = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(path) or os.path.realpath(path) == os.path.realpath(out):
            continue
        if run_is_complete(path):
            complete.append(name)
        elif len(_lacks(path)) == 1:
            partial.append(name)
    return complete, partial


def _names(folders: list[str], limit: int = 5) -> str:
    shown = ", ".join(folders[:limit])
    return shown + (f", ... ({len(folders)} in all)" if len(folders) > limit else "")


def discover(root: str, out: str) -> tuple[Optional[list[RunEntry]], list[Note]]:
    """The runs under ``root``: ``(None, [])`` when ``root`` is a run itself, else (entries, notes).

    Entries come in ``runs.jsonl`` order, then the unlisted folders by name. A listed run that is not
    complete on disk, and an unlisted half-written run folder, get a ``problem``.

    Raises:
        UserError: ``root`` holds no run at all, or ``runs.jsonl`` is malformed.
    """
    runs_path = os.path.join(root, RUNS_NAME)
    if not os.path.isfile(runs_path) and (
        run_is_complete(root) or any(os.path.exists(os.path.join(root, n)) for n in (NPZ_NAME, METADATA_NAME))
    ):
        return None, []  # a half-present run is reported by load_dump, naming the missing file
    complete, partial = _run_folders(root, out)
    notes: list[Note] = []
    if not os.path.isfile(runs_path):
        if not complete:
            if partial:
                raise UserError(
                    f"--root {root} holds no complete run: {os.path.join(root, partial[0])} lacks "
                    f"{' and '.join(_lacks(os.path.join(root, partial[0])))} (an interrupted dump?); re-run the dump"
                )
            raise UserError(
                f"--root {root} holds neither a run ({NPZ_NAME} + {METADATA_NAME}) nor {RUNS_NAME} nor run folders; "
                "point it at the --out folder of sd_35_stepavg_dump.py"
            )
        notes.append(Note("note", f"{root} has no {RUNS_NAME}: analysing the {len(complete)} complete run folders in it ({_names(complete)})"))
        entries = [RunEntry(name, status=NOT_LISTED) for name in complete]
        entries += [_partial(root, name) for name in partial]
        return entries, notes

    records = read_runs(root)
    if not records and not complete and not partial:
        raise UserError(f"{runs_path} lists no runs and {root} has no run folders; run sd_35_stepavg_dump.py first or point --root at a run folder")
    entries = []
    listed = set()
    for r in records:
        listed.add(os.path.normpath(r.folder))
        e = RunEntry(r.folder, list(r.prompt), r.status, r.error)
        path = os.path.join(root, r.folder)
        if r.status != "failed" and not run_is_complete(path):
            what = "does not exist" if not os.path.isdir(path) else "lacks " + " and ".join(_lacks(path))
            e.problem = f"run {r.folder!r} is marked {r.status} in {runs_path} but {path} {what}; re-run the dump for it"
        entries.append(e)
    unlisted = [name for name in complete if name not in listed]
    if unlisted:
        notes.append(Note("note", f"{runs_path} does not list {len(unlisted)} complete run folders found next to it ({_names(unlisted)}); they are analysed too"))
        entries += [RunEntry(name, status=NOT_LISTED) for name in unlisted]
    entries += [_partial(root, name) for name in partial if name not in listed]
    return entries, notes


def _partial(root: str, name: str) -> RunEntry:
    path = os.path.join(root, name)
    return RunEntry(
        name,
        status=NOT_LISTED,
        problem=f"{path} lacks {' and '.join(_lacks(path))} (an interrupted dump?); re-run the dump for it",
    )
