"""Resume: what an existing ``--out`` and its run folders hold, decided before the model loads.

Standard library only, but for numpy in :func:`npz_damage`. A run folder is complete when its
``metadata.json`` records the settings fingerprint this command would write for it, its npz reads
whole (every member's CRC, finite values) and the images its metadata lists are there
(docs/FORMAT.md). Anything else is either unfinished or damaged (redo it) or made with other
settings (refuse: nothing is touched without ``--overwrite``).
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass
from typing import Optional, Sequence

from ..contract import FINGERPRINT_KEY, METADATA_NAME, NPZ_NAME, RUNS_NAME, SETTINGS_KEY, UserError, file_sha256, npz_problem
from .runs import Run
from .settings import RunSettings

NEW, COMPLETE, REDO, OTHER = "new", "complete", "redo", "other"


@dataclass(frozen=True)
class Existing:
    """What a run's folder holds.

    Attributes:
        state: NEW (nothing there), COMPLETE (skip it), REDO (unfinished or damaged), OTHER (made
            with other settings, or by a version that recorded none).
        reason: why, for REDO (empty when the folder is merely unfinished: a kill before its
            metadata.json) and OTHER.
    """

    state: str
    reason: str = ""


def image_hash(run: Run) -> Optional[str]:
    """The sha256 of an image-mode run's image (None for generation, or when it cannot be read: the
    image checks report that)."""
    if run.image is None:
        return None
    try:
        return file_sha256(run.image)
    except OSError:
        return None


def existing_run(folder: str, settings: RunSettings, run: Run) -> Existing:
    """The state of ``folder`` for ``run`` made with ``settings``."""
    meta_path = os.path.join(folder, METADATA_NAME)
    if not os.path.lexists(meta_path):
        if os.path.isdir(folder) and os.listdir(folder):
            return Existing(REDO)  # killed before its metadata.json: the run never finished
        return Existing(NEW)
    try:
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        return Existing(REDO, f"{METADATA_NAME} is damaged ({type(exc).__name__})")
    if not isinstance(meta, dict):
        return Existing(REDO, f"{METADATA_NAME} is damaged (not a JSON object)")
    sha = image_hash(run)
    wanted = settings.recorded(run.prompts, run.seed, sha)
    found = meta.get(FINGERPRINT_KEY)
    if found is None:
        return Existing(OTHER, "it records no settings fingerprint: written by an older version or another tool")
    if found != settings.fingerprint(run.prompts, run.seed, sha):
        return Existing(OTHER, _difference(meta.get(SETTINGS_KEY), wanted))
    problem = npz_problem(os.path.join(folder, NPZ_NAME)) or npz_damage(os.path.join(folder, NPZ_NAME))
    if problem:
        return Existing(REDO, f"{NPZ_NAME}: {problem}")
    problem = missing_image(folder, meta)
    if problem:
        return Existing(REDO, problem)
    return Existing(COMPLETE)


def npz_damage(path: str, chunk_bytes: int = 1 << 24) -> Optional[str]:
    """Why the arrays of the npz at ``path`` cannot be trusted (a member fails its CRC check: a
    flipped bit; an array is cut short or holds NaN or infinite values), or None. Reads every member
    through once, ``chunk_bytes`` at a time (the memory stays small whatever the arrays' size)."""
    import numpy as np

    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                array = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                with zf.open(info) as fh:
                    problem = _member_damage(np, fh, chunk_bytes)
                if problem:
                    return f"{array} {problem}"
    except zipfile.BadZipFile as exc:  # "Bad CRC-32 for file 'N.npy'"
        return f"it is damaged ({exc})"
    except Exception as exc:  # noqa: BLE001 - any other failure to read it through is damage too
        return f"it does not read ({type(exc).__name__}: {exc})"
    return None


def _member_damage(np, fh, chunk_bytes: int) -> Optional[str]:
    """One ``.npy`` member of an npz, read to its end (so that zipfile checks its CRC)."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    else:  # not written by this tool's np.savez; read the rest whole
        fh.read()
        return None
    if dtype.hasobject:
        return "holds Python objects"
    left = math.prod(shape) * dtype.itemsize
    step = max(1, chunk_bytes // max(1, dtype.itemsize)) * max(1, dtype.itemsize)
    bad = 0
    while left > 0:
        data = fh.read(min(step, left))
        if not data:
            return "is cut short"
        left -= len(data)
        if dtype.kind in "fc" and len(data) % dtype.itemsize == 0:
            bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(data, dtype=dtype))))
    fh.read()  # to the end: a CRC mismatch raises here at the latest
    if bad:
        return f"holds {bad} NaN or infinite value(s)"
    return None


def missing_image(folder: str, meta: dict) -> Optional[str]:
    """The first image that ``meta`` (a run's metadata.json) lists and that is not in ``folder``
    (``images``, and image mode's saved source), as a reason; None when all are there."""
    listed = meta.get("images") or []
    if not isinstance(listed, list):
        return f"{METADATA_NAME} is damaged (images is not a list)"
    source = meta.get("source_image")
    if isinstance(source, dict) and source.get("saved"):
        listed = listed + [source["saved"]]
    for rel in listed:
        if rel is not None and not (isinstance(rel, str) and os.path.isfile(os.path.join(folder, rel))):
            return f"its image {rel} listed in {METADATA_NAME} is missing"
    return None


def _difference(old, new: dict) -> str:
    """``"steps 2 there, 3 now"``: the first settings that differ (all of them when few)."""
    if not isinstance(old, dict):
        return "its settings fingerprint differs"
    keys = [k for k in new if old.get(k) != new[k]] + [k for k in old if k not in new]
    if not keys:
        return "its settings fingerprint differs"
    parts = [f"{k} {_short(old.get(k))} there, {_short(new.get(k))} now" for k in keys[:2]]
    more = f", and {len(keys) - 2} more" if len(keys) > 2 else ""
    return "; ".join(parts) + more


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 60 else text[:57] + "..."


def check_out_kind(out: str, single: bool) -> None:
    """Refuse to mix a single run and a folder of runs in one ``--out``: the analysis reads
    ``runs.jsonl`` when there is one and would silently ignore the other kind.

    Raises:
        UserError: naming what is there and the fix (a new --out).
    """
    if not os.path.isdir(out):
        return
    if single:
        found = RUNS_NAME if os.path.isfile(os.path.join(out, RUNS_NAME)) else _run_subfolder(out)
        if found:
            raise UserError(
                f"--out {out} holds several runs ({found}); a single run written into it would be ignored by "
                "the analysis, which reads the runs listed in runs.jsonl: give a new --out"
            )
    else:
        for name in (METADATA_NAME, NPZ_NAME):
            if os.path.lexists(os.path.join(out, name)):
                raise UserError(
                    f"--out {out} holds a single run ({name}); run folders and a runs.jsonl written into it would "
                    "hide that run from the analysis: give a new --out"
                )


def _run_subfolder(out: str) -> Optional[str]:
    """A sub-folder of ``out`` that holds a run's files (named as ``out/NAME/``), or None."""
    try:
        entries = sorted(os.scandir(out), key=lambda e: e.name)
    except OSError:
        return None
    for entry in entries:
        if entry.is_dir() and any(os.path.lexists(os.path.join(entry.path, n)) for n in (METADATA_NAME, NPZ_NAME)):
            return f"run folders such as {entry.name}/"
    return None


def refuse_other_settings(out: str, others: Sequence[tuple[str, Existing]]) -> None:
    """Raise one UserError line for the runs made with other settings (the first named)."""
    if not others:
        return
    folder, ex = others[0]
    more = f" (and {len(others) - 1} more run folder(s))" if len(others) > 1 else ""
    where = out if os.path.normpath(folder) == os.path.normpath(out) else folder
    raise UserError(
        f"--out {where} holds a run made with other settings ({ex.reason}){more}; nothing was changed: "
        "pass --overwrite to replace it, or give a new --out"
    )
