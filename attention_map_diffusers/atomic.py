"""Writing files so that a reader never sees a half-written one: temp name in the same folder, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from typing import Any, Callable, Iterator, Optional

#: The marker in every temporary name :func:`atomic_path` gives: ``.{stem}.attnmap-{8 random}.tmp{suffix}``
#: (``.stepavg_token_maps_v1.attnmap-k2j4h5l1.tmp.npz`` for ``stepavg_token_maps_v1.npz``).
TEMP_MARK = "attnmap-"
#: Those names; ``stem`` + ``suffix`` is the name of the file the temporary one was to become. A kill
#: leaves them behind. (Before the marker they were ``.{stem}.{8 random}.tmp{suffix}``, a shape a user's
#: own files can have, so such names are never removed.)
TEMP_NAME = re.compile(r"\.(?P<stem>.+)\." + TEMP_MARK + r"[a-z0-9_]{8}\.tmp(?P<suffix>\.[^.]+)?")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, else delete it.

    The temporary name keeps ``path``'s suffix (some writers, e.g. ``np.savez`` and Pillow, choose
    the format from it) and starts with ``.`` so that it is hidden.
    """
    path = os.fspath(path)
    folder, name = os.path.split(path)
    stem, suffix = os.path.splitext(name)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.{TEMP_MARK}", suffix=f".tmp{suffix}", dir=folder or ".")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def temp_target(name: str) -> Optional[str]:
    """The file name a temporary file of :func:`atomic_path` named ``name`` was to become, or None
    when ``name`` is not such a temporary name."""
    found = TEMP_NAME.fullmatch(name)
    return found["stem"] + (found["suffix"] or "") if found else None


def remove_temp_files(folder: str | os.PathLike, owned: Callable[[str], bool]) -> list[str]:
    """Delete the temporary files of :func:`atomic_path` left in ``folder`` (not in its sub-folders)
    by a killed writer, of the files for which ``owned(name)`` is true (the caller's own names: a
    user's files that happen to look alike are kept); returns their paths. Call it only when no
    writer is at work there."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        target = temp_target(entry.name)
        if target is not None and owned(target) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(entry.path)
    return removed


def current_umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def write_npz(path: str | os.PathLike, arrays: dict, compressed: bool = False) -> None:
    """``np.savez`` (or ``savez_compressed``) to ``path`` atomically."""
    import numpy as np

    save = np.savez_compressed if compressed else np.savez
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            save(fh, **arrays)
