"""Reading a few steps (or blocks) of the optional per-step / per-block maps without loading them whole.

``per_step_token_map`` (B, S, Hc, Wc, T) of a full-size dump is ~136 MB in float16 (x2 in float32 once
loaded); the strips and the report's slider need ~6 of its S steps for one item. ``np.savez`` stores
members uncompressed, so the member is memory-mapped and only the chosen slices are read; a
compressed member (``savez_compressed``) is read whole, once, and sliced.
"""

from __future__ import annotations

import os
import struct
import zipfile
from typing import Optional, Sequence

import numpy as np

from ..contract import NPZ_NAME

STEP_KEY = "per_step_token_map"
BLOCK_KEY = "per_block_token_map"


def available(folder: str) -> set[str]:
    """Which of the optional per-step / per-block map arrays the run's npz holds (by name, nothing read)."""
    try:
        with zipfile.ZipFile(os.path.join(folder, NPZ_NAME)) as zf:
            names = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    except (OSError, zipfile.BadZipFile):
        return set()
    return names & {STEP_KEY, BLOCK_KEY}


def read_frames(folder: str, key: str, item: int, indices: Sequence[int], *, flip: bool = False) -> Optional[np.ndarray]:
    """(K, Hc, Wc, T) float32: ``npz[key][item, indices]``; None when the member is absent or unreadable.

    Args:
        flip: the axis is stored in reverse (the original tool's step order): index i reads ``len - 1 - i``.
    """
    path = os.path.join(folder, NPZ_NAME)
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(key + ".npy")
            if info.compress_type == zipfile.ZIP_STORED:
                arr = _memmap_member(path, info)
            else:
                with zf.open(info) as fh:
                    arr = np.lib.format.read_array(fh, allow_pickle=False)
    except (KeyError, OSError, ValueError, zipfile.BadZipFile):
        return None
    if arr.ndim != 5 or not 0 <= item < arr.shape[0]:
        return None
    n = arr.shape[1]
    idx = [n - 1 - i if flip else i for i in indices]
    if any(not 0 <= i < n for i in idx):
        return None
    out = np.stack([np.asarray(arr[item, i], dtype=np.float32) for i in idx]) if idx else np.zeros((0,) + arr.shape[2:], np.float32)
    return out if np.isfinite(out).all() else None


def _memmap_member(path: str, info: zipfile.ZipInfo) -> np.ndarray:
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError("bad local header")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        fh.seek(start)
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"npy format {version} is not memory-mapped")
        offset = fh.tell()
    if dtype.hasobject:
        raise ValueError("object arrays are not read")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
