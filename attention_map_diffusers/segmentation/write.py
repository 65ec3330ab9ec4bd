"""The output folder of an evaluation: what it may replace, and writing it so that no reader sees half of it.

The files are written into ``.OUT.tmp-*`` next to ``OUT`` and put in place at the end. An existing
``OUT`` is replaced as a whole when it is empty or holds an earlier evaluation (its
:data:`MANIFEST` lists every file in it); a folder holding anything else is refused, unless
``--overwrite``: then the new files are moved into it one by one (each rename is atomic) and the
files that are not ours stay where they are; nothing this tool did not write is ever deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

from ..atomic import current_umask, write_json, write_text
from ..contract import UserError

GENERATOR = "evaluate_segmentation.py (attention_map_diffusers)"
MANIFEST = ".segmentation-manifest.json"


def _ours(folder: str) -> bool:
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and data.get("generator") == GENERATOR


def check_out(out: str, overwrite: bool) -> None:
    """Refuse an ``out`` the evaluation may not write to (:class:`UserError`); nothing is changed."""
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out) or os.path.islink(out):
        raise UserError(f"--out {out} exists and is not a folder; choose another --out")
    if not os.listdir(out) or _ours(out) or overwrite:
        return
    raise UserError(
        f"--out {out} is not empty and holds no earlier evaluation (no {MANIFEST}); choose another --out, or "
        "--overwrite to write into it (files it holds are kept unless this tool writes one of the same name)"
    )


def new_folder(out: str) -> str:
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def commit(tmp: str, out: str, overwrite: bool) -> int:
    """Put the finished folder ``tmp`` in place as ``out``; returns the number of files."""
    files = sorted(
        os.path.relpath(os.path.join(here, n), tmp).replace(os.sep, "/") for here, _, names in os.walk(tmp) for n in names
    )
    write_json(os.path.join(tmp, MANIFEST), {"generator": GENERATOR, "files": files})
    check_out(out, overwrite)
    if os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)
    if not os.path.lexists(out):
        os.replace(tmp, out)
        return len(files)
    if _ours(out):  # an earlier evaluation: swap, then delete it
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.old-", dir=os.path.dirname(os.path.abspath(out)))
        os.rmdir(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return len(files)
    # --overwrite into a foreign folder: file by file, ours replace theirs of the same name only
    for rel in files + [MANIFEST]:
        dst = os.path.join(out, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(os.path.join(tmp, rel), dst)
    shutil.rmtree(tmp, ignore_errors=True)
    return len(files)


def safe_name(key: str) -> str:
    """A key as a file name (path separators and a leading dot replaced)."""
    name = key.replace("/", "_").replace("\\", "_")
    return "_" + name[1:] if name.startswith(".") else name


def write_all(tmp: str, files: dict[str, str]) -> None:
    """Text files (relative path -> content) into ``tmp``."""
    for rel, text in files.items():
        path = os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_text(path, text)


def remove(tmp: Optional[str]) -> None:
    if tmp and os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
