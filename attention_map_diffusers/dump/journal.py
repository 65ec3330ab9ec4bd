"""``runs.jsonl`` kept current while a dump command runs, so that a kill leaves a usable folder.

Standard library only. The file is rewritten atomically after every run, and once more when the
command ends or is interrupted (SIGTERM, Ctrl-C). It lists finished runs only (done, skipped,
failed): a run still to do, or cut off by a kill, has no line, so at any moment every listed run
that did not fail is complete on disk. (After a SIGKILL the one run that finished in the instant
before it may be missing from the file; it is skipped, complete, by the next command.)

With several processes (``accelerate launch``, ``torchrun``) each process keeps its own records in
``.runs-part-{rank}.jsonl`` and rewrites ``runs.jsonl`` from every part, under a lock where the
system has one; at the end the main process merges the parts once more and removes them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from typing import Iterable, Iterator, Optional

from ..atomic import write_text
from ..contract import RUNS_NAME, RunRecord, UserError, read_runs_jsonl, runs_jsonl_text

PART_NAME = ".runs-part-{}.jsonl"
PART_RE = re.compile(r"\.runs-part-\d+\.jsonl")
LOCK_NAME = ".runs.lock"


class RunsJournal:
    """The finished runs of one command, written to ``out/runs.jsonl``.

    Args:
        out: the ``--out`` folder.
        folders: the run folders of the whole plan (records for others are never listed).
        process: this process's rank; ``processes``: how many there are.
        write: False for a command of one run, which writes no runs.jsonl (its folder is ``out``).
    """

    def __init__(self, out: str, folders: Iterable[str], process: int = 0, processes: int = 1, write: bool = True):
        self.out = out
        self.write = write
        self.folders = set(folders)
        self.process = process
        self.processes = processes
        self.records: dict[int, RunRecord] = {}
        self.started = False  # flushed once: from then on runs.jsonl is this command's
        self.failed_write: Optional[OSError] = None  # the last write that failed (a full disk)

    def record(self, rec: RunRecord, flush: bool = True) -> None:
        self.records[rec.run] = rec
        if flush:
            self.flush()

    def flush(self) -> bool:
        """Rewrite this process's records and ``runs.jsonl``; False (and :attr:`failed_write` set)
        when the disk refuses: the command goes on, and the next flush tries again."""
        self.started = True
        if not self.write:
            return True
        try:
            os.makedirs(self.out, exist_ok=True)
            if self.processes == 1:
                write_text(os.path.join(self.out, RUNS_NAME), runs_jsonl_text(self.records.values()))
            else:
                write_text(self._part(self.process), runs_jsonl_text(self.records.values()))
                with self._lock():
                    self._merge()
        except OSError as exc:
            self.failed_write = exc
            return False
        self.failed_write = None
        return True

    def finish(self, state) -> None:
        """The end of a command that was not interrupted: with several processes, wait for all of
        them, merge every part into ``runs.jsonl`` on the main one, and remove the parts."""
        self.flush()
        if not self.write or state is None or self.processes == 1:
            return
        state.wait_for_everyone()
        if state.is_main_process:
            try:
                self._merge()
            except OSError as exc:
                self.failed_write = exc
            else:
                for path in self._parts():
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.out, LOCK_NAME))
        state.wait_for_everyone()

    def _part(self, rank: int) -> str:
        return os.path.join(self.out, PART_NAME.format(rank))

    def _parts(self) -> list[str]:
        names = glob.glob(os.path.join(glob.escape(self.out), ".runs-part-*.jsonl"))
        return sorted(p for p in names if PART_RE.fullmatch(os.path.basename(p)))

    def _merge(self) -> None:
        merged: dict[str, RunRecord] = {}
        for path in self._parts():
            try:
                records = read_runs_jsonl(path)
            except UserError:  # a part being replaced this instant is read whole or not found
                continue
            for r in records:
                if r.folder in self.folders:
                    merged[r.folder] = r
        write_text(os.path.join(self.out, RUNS_NAME), runs_jsonl_text(merged.values()))

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """An exclusive lock on ``out/.runs.lock`` (fcntl; none where the system has no fcntl)."""
        try:
            import fcntl
        except ImportError:  # Windows: rewrites may interleave; the main process's last merge is whole
            yield
            return
        with open(os.path.join(self.out, LOCK_NAME), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def remove_leftovers(out: str) -> list[str]:
    """Files of an earlier, killed command in ``out``: per-process parts (only those that read as
    run records) and the lock (only an empty one: this command never writes into it). A user's file
    under such a name is kept. Call it from the main process before the others start writing."""
    removed = []
    try:
        names = os.listdir(out)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(out, name)
        if (PART_RE.fullmatch(name) and _is_part(path)) or (name == LOCK_NAME and _is_empty_file(path)):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out, name))
                removed.append(os.path.join(out, name))
    return removed


def _is_part(path: str) -> bool:
    """A regular file that reads as ``runs.jsonl`` records (what :class:`RunsJournal` writes)."""
    if not os.path.isfile(path) or os.path.islink(path):
        return False
    try:
        read_runs_jsonl(path)
    except UserError:
        return False
    return True


def _is_empty_file(path: str) -> bool:
    return os.path.isfile(path) and not os.path.islink(path) and os.path.getsize(path) == 0
