"""The output folder of an evaluation: what it may replace, and writing it so that no reader sees half of it.

The files are written into ``.OUT.tmp-*`` next to ``OUT`` and put in place at the end. Every folder
this tool writes holds :data:`MANIFEST`, the list of its files, kept up to date as they are written
(a file is listed before it is written). An existing ``OUT`` is replaced as a whole when it is
empty or when every file in it is on its manifest (an earlier evaluation, untouched); a folder
holding anything else is refused, unless ``--overwrite``: then the new files are moved into it one
by one (each rename is atomic), the files of the earlier evaluation that the new one does not
write are removed, and the other files stay where they are.

A kill leaves ``.OUT.tmp-*`` (or ``.OUT.old-*``, an earlier evaluation being replaced) next to
``OUT``; the next evaluation into ``OUT`` removes such a folder only when every file in it is on its
manifest (or is the temporary file of one that is: :func:`~attention_map_diffusers.atomic.atomic_path`),
and else leaves it alone and says so. Nothing this tool did not write is ever deleted. Two
evaluations writing into the same ``OUT`` at the same time are not supported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Optional

from ..atomic import current_umask, temp_target, write_json, write_text
from ..contract import UserError

GENERATOR = "evaluate_segmentation.py (attention_map_diffusers)"
MANIFEST = ".segmentation-manifest.json"


def _rel(path: str, base: str) -> str:
    return os.path.relpath(path, base).replace(os.sep, "/")


def manifest_files(folder: str) -> Optional[set[str]]:
    """The files listed by ``folder``'s manifest (relative, ``/``-separated), or None when it has no
    readable manifest written by this tool."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("generator") != GENERATOR:
        return None
    files = data.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return set(files)


def _temp_of(name: str, listed: set[str]) -> bool:
    """Whether ``name`` (in one folder) is the temporary name :func:`~attention_map_diffusers.atomic.atomic_path`
    gives one of ``listed`` (names in the same folder)."""
    return temp_target(name) in listed


def foreign_entries(folder: str, files: set[str]) -> list[str]:
    """What ``folder`` holds that is neither a file of ``files`` (its manifest's list), nor the manifest,
    nor the temporary file of one of them: relative paths, folders with a trailing ``/``, sorted."""
    listed = set(files) | {MANIFEST}
    dirs = {"/".join(f.split("/")[:k]) for f in listed for k in range(1, f.count("/") + 1)}
    foreign = []
    for here, subdirs, names in os.walk(folder):
        rel_here = _rel(here, folder)
        prefix = "" if rel_here == "." else rel_here + "/"
        same_dir = {f[len(prefix):] for f in listed if f.startswith(prefix) and "/" not in f[len(prefix):]}
        for d in subdirs:
            path = os.path.join(here, d)
            if os.path.islink(path) or prefix + d not in dirs:
                foreign.append(prefix + d + "/")
        for n in names:
            path = os.path.join(here, n)
            if os.path.islink(path) or not (n in same_dir or _temp_of(n, same_dir)):
                foreign.append(prefix + n)
        subdirs[:] = [d for d in subdirs if prefix + d in dirs and not os.path.islink(os.path.join(here, d))]
    return sorted(foreign)


def _ours(folder: str) -> bool:
    """``folder`` holds an evaluation of this tool and nothing else."""
    files = manifest_files(folder)
    return files is not None and not foreign_entries(folder, files)


def check_out(out: str, overwrite: bool) -> None:
    """Refuse an ``out`` the evaluation may not write to (:class:`UserError`); nothing is changed."""
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out) or os.path.islink(out):
        raise UserError(f"--out {out} exists and is not a folder; choose another --out")
    if not os.listdir(out) or _ours(out) or overwrite:
        return
    files = manifest_files(out)
    if files is not None:
        foreign = foreign_entries(out, files)
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise UserError(
            f"--out {out} holds an earlier evaluation and {foreign[0]}{more}, which this tool did not write; move "
            "it out of there, choose another --out, or --overwrite to write into it (files this tool did not "
            "write are kept)"
        )
    raise UserError(
        f"--out {out} is not empty and holds no earlier evaluation (no {MANIFEST}); choose another --out, or "
        "--overwrite to write into it (files it holds are kept unless this tool writes one of the same name)"
    )


def new_folder(out: str) -> str:
    """A new temporary folder next to ``out``, marked as ours from the start (an empty manifest)."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~current_umask())
    write_json(os.path.join(tmp, MANIFEST), {"generator": GENERATOR, "files": []})
    return tmp


def claim(tmp: str, rels) -> None:
    """List ``rels`` (relative paths) in ``tmp``'s manifest, before they are written there."""
    files = manifest_files(tmp) or set()
    write_json(os.path.join(tmp, MANIFEST), {"generator": GENERATOR, "files": sorted(files | set(rels))})


def commit(tmp: str, out: str, overwrite: bool) -> int:
    """Put the finished folder ``tmp`` in place as ``out``; returns the number of files."""
    files = sorted(
        _rel(os.path.join(here, n), tmp) for here, _, names in os.walk(tmp) for n in names if n != MANIFEST or here != tmp
    )
    write_json(os.path.join(tmp, MANIFEST), {"generator": GENERATOR, "files": files})
    check_out(out, overwrite)
    if os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)
    if not os.path.lexists(out):
        os.replace(tmp, out)
        return len(files)
    if _ours(out):  # an earlier evaluation and nothing else: swap, then delete it
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.old-", dir=os.path.dirname(os.path.abspath(out)))
        os.rmdir(old)
        os.replace(out, old)
        os.replace(tmp, out)
        remove_if_ours(old)
        return len(files)
    # --overwrite into a folder with files of others: file by file, ours replace theirs of the same name
    # only, and the files of an earlier evaluation there that this one does not write go
    earlier = manifest_files(out) or set()
    for rel in files + [MANIFEST]:
        dst = os.path.join(out, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(os.path.join(tmp, rel), dst)
    for rel in sorted(earlier - set(files) - {MANIFEST}):
        path = os.path.join(out, rel)
        if os.path.isfile(path) and not os.path.islink(path):
            os.unlink(path)
    shutil.rmtree(tmp, ignore_errors=True)
    return len(files)


def remove_if_ours(folder: str) -> Optional[list[str]]:
    """Delete ``folder`` when every file in it is on its manifest; else leave it and return what is
    not (None when it was deleted; ``[MANIFEST]`` when it has no manifest of this tool)."""
    files = manifest_files(folder)
    if files is None:
        return [MANIFEST]
    foreign = foreign_entries(folder, files)
    if foreign:
        return foreign
    shutil.rmtree(folder, ignore_errors=True)
    return None


def clean_leftovers(out: str) -> list[str]:
    """Remove the folders a killed evaluation left next to ``out`` (``.OUT.tmp-*``, ``.OUT.old-*``)
    that hold nothing but files on their manifest; returns one warning line per folder left alone."""
    parent, base = os.path.split(os.path.abspath(out))
    pattern = re.compile(rf"\.{re.escape(base)}\.(?:tmp|old)-[A-Za-z0-9_]+")
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return []
    warnings = []
    for name in names:
        path = os.path.join(parent, name)
        if not pattern.fullmatch(name) or not os.path.isdir(path) or os.path.islink(path):
            continue
        if manifest_files(path) is None:
            continue  # not ours (or from a version that marked its folders only at the end): not a word about it
        kept = remove_if_ours(path)
        if kept:
            more = f" (and {len(kept) - 1} more)" if len(kept) > 1 else ""
            warnings.append(f"left {path} alone: it holds {kept[0]}{more}, which this tool did not write; it is what "
                            "a killed evaluation left behind: move out what you want to keep and delete it")
    return warnings


def safe_name(key: str) -> str:
    """A key as a file name (path separators and a leading dot replaced)."""
    name = key.replace("/", "_").replace("\\", "_")
    return "_" + name[1:] if name.startswith(".") else name


def write_all(tmp: str, files: dict[str, str]) -> None:
    """Text files (relative path -> content) into ``tmp``, listed in its manifest first."""
    claim(tmp, files)
    for rel, text in files.items():
        path = os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_text(path, text)


def remove(tmp: Optional[str]) -> None:
    if tmp and os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
