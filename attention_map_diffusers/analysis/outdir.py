"""The analysis' output folder: what it may replace, the leftovers of a killed run, and putting a
finished analysis in place.

The analysis never deletes a file it did not write. Each analysis folder holds :data:`MANIFEST`,
the list of the files written into it with their sizes and sha256. An existing ``--out`` is replaced
as a whole only when everything in it is on that list; one that holds anything else is refused with
a line naming it, and so is one where a listed file changed since (an edited table), unless
``--overwrite``.
The analysis is written into ``.OUT.tmp-*`` next to ``OUT`` and renamed into place (an earlier
analysis goes to ``.OUT.old-*`` meanwhile); when a kill leaves such folders behind, the next
analysis into the same ``OUT`` removes them, and only those that hold a manifest (ours) and nothing
it does not list (a folder holding anything else is left alone, with a warning).
Two analyses writing into the same ``OUT`` at the same time are not supported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Collection, Optional

from ..atomic import current_umask, write_json
from ..contract import UserError, file_sha256
from .report import GENERATOR

MANIFEST = ".analysis-manifest.json"


def _rel(path: str, base: str) -> str:
    return os.path.relpath(path, base).replace(os.sep, "/")


def manifest_files(folder: str) -> Optional[dict[str, Optional[tuple[int, str]]]]:
    """The files listed by ``folder``'s manifest (relative, ``/``-separated) -> their (size, sha256)
    when written (None for a file listed by name only, as earlier versions did); None when the folder
    has no readable manifest written by this tool."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("generator") != GENERATOR:
        return None
    files = data.get("files")
    if not isinstance(files, list):
        return None
    listed: dict[str, Optional[tuple[int, str]]] = {}
    for f in files:
        if isinstance(f, str):  # names only (before sizes and hashes were recorded)
            listed[f] = None
        elif (isinstance(f, dict) and isinstance(f.get("path"), str) and type(f.get("size")) is int
              and isinstance(f.get("sha256"), str)):
            listed[f["path"]] = (f["size"], f["sha256"])
        else:
            return None
    return listed


def changed_files(folder: str, files: dict[str, Optional[tuple[int, str]]]) -> list[str]:
    """The listed files of ``folder`` whose size or sha256 is no longer what the manifest recorded
    (edited, truncated or deleted since), sorted; files listed by name only are not checked."""
    changed = []
    for rel, recorded in sorted(files.items()):
        if recorded is None:
            continue
        path = os.path.join(folder, *rel.split("/"))
        try:
            same = os.path.getsize(path) == recorded[0] and file_sha256(path) == recorded[1]
        except OSError:
            same = False
        if not same:
            changed.append(rel)
    return changed


def _written_by_us(out: str) -> bool:
    try:
        with open(os.path.join(out, "index.html"), encoding="utf-8") as fh:
            return f'content="{GENERATOR}"' in fh.read(4096)
    except (OSError, UnicodeDecodeError):
        return False


def check_out(out: str, overwrite: bool = False) -> None:
    """Refuse an ``out`` that the analysis may not replace (:class:`UserError`); nothing is changed.

    ``overwrite``: replace an earlier analysis even when some of its files changed since it was
    written (never one that holds files it did not write)."""
    if not os.path.lexists(out):
        parent = os.path.dirname(os.path.abspath(out))
        while not os.path.lexists(parent) and os.path.dirname(parent) != parent:
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):  # the folders cannot be made under a file
            raise UserError(f"--out {out} cannot be made: {parent} is a file, not a folder; choose another --out")
        return
    if not os.path.isdir(out) or os.path.islink(out):
        raise UserError(f"--out {out} exists and is not a folder; choose another --out")
    if not os.listdir(out):
        return
    files = manifest_files(out)
    if files is None:
        if _written_by_us(out):
            raise UserError(
                f"--out {out} holds an analysis by an earlier version of this tool, which did not list the files it "
                "wrote; delete that folder yourself or choose another --out"
            )
        raise UserError(
            f"--out {out} exists and does not hold an earlier analysis (no {MANIFEST} written by this tool); "
            "choose another --out or empty it"
        )
    foreign = foreign_entries(out, files)
    if foreign:
        raise UserError(
            f"--out {out} holds {_first(foreign)}, which this analysis did not write; the analysis replaces {out} as a "
            "whole, so move it out of there or choose another --out"
        )
    changed = [] if overwrite else changed_files(out, files)
    if changed:
        raise UserError(
            f"--out {out}: {_first(changed)} changed after the analysis wrote it (its size or content is no longer "
            "what the manifest recorded); move it out of there to keep it, or pass --overwrite to replace it"
        )


def foreign_entries(folder: str, files: Collection[str]) -> list[str]:
    """What ``folder`` holds besides its manifest and ``files``: other files, folders no listed file is
    in (``name/``), and links (sorted, relative, ``/``-separated)."""
    dirs = {"/".join(f.split("/")[:k]) for f in files for k in range(1, f.count("/") + 1)}
    foreign = []
    for here, subdirs, names in os.walk(folder):
        for d in subdirs:
            path = os.path.join(here, d)
            if os.path.islink(path) or _rel(path, folder) not in dirs:
                foreign.append(_rel(path, folder) + "/")
        for n in names:
            path = os.path.join(here, n)
            rel = _rel(path, folder)
            if rel == MANIFEST and os.path.islink(path):
                foreign.append(rel)
            elif rel != MANIFEST and (rel not in files or os.path.islink(path) or not os.path.isfile(path)):
                foreign.append(rel)
        subdirs[:] = [d for d in subdirs if _rel(os.path.join(here, d), folder) in dirs]
    return sorted(foreign)


def _first(entries: list[str]) -> str:
    """The first of ``entries``, and how many more there are."""
    return entries[0] + (f" (and {len(entries) - 1} more)" if len(entries) > 1 else "")


def leftovers(out: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Folders left next to ``out`` by an analysis that was killed (``.OUT.tmp-*``, ``.OUT.old-*``
    holding a manifest of this tool): those that hold only the files their manifest lists (removable),
    and those that hold anything else, as (folder, what), which are left alone."""
    parent, base = os.path.split(os.path.abspath(out))
    pattern = re.compile(rf"\.{re.escape(base)}\.(?:tmp|old)-[A-Za-z0-9_]+")
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return [], []
    removable, kept = [], []
    for name in names:
        path = os.path.join(parent, name)
        if not pattern.fullmatch(name) or not os.path.isdir(path) or os.path.islink(path):
            continue
        files = manifest_files(path)
        if files is None:
            continue  # a look-alike: not ours
        foreign = foreign_entries(path, files) + changed_files(path, files)
        if foreign:
            kept.append((path, _first(foreign)))
        else:
            removable.append(path)
    return removable, kept


def remove(paths: list[str]) -> None:
    """Delete the leftovers ``paths`` that still hold only the files their manifest lists."""
    for path in paths:
        files = manifest_files(path)
        if files is not None and not foreign_entries(path, files) and not changed_files(path, files):  # only ours
            shutil.rmtree(path, ignore_errors=True)


def discard(tmp: str) -> None:
    """Delete ``tmp``, the folder :func:`new_folder` made for this analysis (half written)."""
    shutil.rmtree(tmp, ignore_errors=True)


def new_folder(out: str) -> str:
    """A new temporary folder next to ``out``, marked as ours from the start (an empty manifest)."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the output folder should not be
    write_json(os.path.join(tmp, MANIFEST), {"generator": GENERATOR, "files": []})
    return tmp


def commit(tmp: str, out: str, overwrite: bool = False) -> int:
    """List the files of ``tmp`` in its manifest (with their sizes and sha256) and move it to ``out``; an
    earlier analysis there (checked by :func:`check_out`) is removed only once the new one is in place.
    Returns the number of files."""
    files = sorted(
        _rel(os.path.join(here, n), tmp) for here, _, names in os.walk(tmp) for n in names
    )
    files = [f for f in files if f != MANIFEST]
    listed = []
    for f in files:
        path = os.path.join(tmp, *f.split("/"))
        listed.append({"path": f, "size": os.path.getsize(path), "sha256": file_sha256(path)})
    write_json(os.path.join(tmp, MANIFEST), {"generator": GENERATOR, "files": listed})
    check_out(out, overwrite)  # again: something may have been put there while the analysis ran
    old = None
    if os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)
    elif os.path.lexists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(os.path.abspath(out)))
        os.rmdir(old)
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return len(files)
