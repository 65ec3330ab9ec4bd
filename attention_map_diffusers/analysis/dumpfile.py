"""Reading and validating a dump (``docs/FORMAT.md``) into a :class:`Dump`; numpy and the standard library only.

Reads format 2 (``sd_35_stepavg_dump.py``) and the original tool's dumps (no ``format_version``:
CLIP tokens only, no timesteps, steps by ascending timestep, which are flipped here to denoising
order). Every check happens before anything is returned; a bad dump raises :class:`UserError` with
one line that names the bad value and says what to do.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..contract import (
    FORMAT_VERSION,
    METADATA_NAME,
    NPZ_CORE_ARRAYS,
    NPZ_REQUIRED_ARRAYS,
    NPZ_NAME,
    RUNS_NAME,
    RunRecord,
    UserError,
    prompt_tokens,
    read_runs_jsonl,
)
from . import concepts as concept_io
from .dumpchecks import (
    Shape,
    check_arrays,
    check_metadata,
    check_offsets,
    check_span,
    check_tokens,
    format_version,
    per_item,
    read_block_ids,
    read_prompts,
)

# The original tool's dumps do not say where the CLIP positions end; SD3 puts its 77 CLIP positions
# first and T5 after them. Used for those dumps only (format 2 stores ``text_spans``).
ORIGINAL_CLIP_POSITIONS = 77
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class EncoderTokens:
    """One text encoder's tokens for every batch item."""

    name: str  # "clip" or "t5"
    span: tuple[int, int]  # [start, end) text positions of this encoder on the T axis
    tokens: list[list[str]]  # per item, unpadded; token j is text position span[0] + j
    special: list[list[bool]]  # aligned with tokens
    offsets: Optional[list[list[Optional[tuple[int, int]]]]]  # per item, [start, end) in the prompt; None: unknown
    truncated: list[Optional[bool]]  # per item, whether the encoder cut the prompt (None: not recorded)
    source: str  # "dump" or "tokenizer" (re-tokenised with --t5-tokenizer)

    @property
    def length(self) -> int:
        return self.span[1] - self.span[0]


@dataclass(frozen=True)
class Note:
    """Something the user should know about a run; printed as ``{level}: {text}``."""

    level: str  # "note" or "warning"
    text: str

    def __str__(self) -> str:
        return f"{self.level}: {self.text}"


@dataclass
class Dump:
    """A validated run in memory, arrays in float32 and steps in denoising order.

    From a folder: ``load_dump(folder)``. From a recording, with no files (a notebook)::

        with StepAverageRecorder(pipe) as rec:
            pipe(prompt)
        dump = Dump.from_result(rec.result(), [prompt], {"clip": pipe.tokenizer, "t5": pipe.tokenizer_3})
        words, maps = dump.word_maps(item=0, encoder="clip")   # (n,) words, (n, Hc, Wc) shares

    Shapes: B batch items, Bk blocks, S steps, T text positions, (Hc, Wc) canonical grid.
    """

    folder: str
    format_version: int  # 2, or 1 for dumps without format_version (the original tool's)
    metadata: dict
    prompts: list[str]  # (B,)
    sum_token_map: np.ndarray  # (B, Hc, Wc, T)
    N: int
    step_mean: np.ndarray  # (B, Bk, S, T) per_block_step_token_mean, denoising order
    timesteps: Optional[np.ndarray]  # (S,) denoising order; None when the dump has none (original tool)
    block_ids: list[int]  # (Bk,) the i of transformer_blocks.{i}.attn
    encoders: dict[str, EncoderTokens]
    images: list[Optional[str]]  # (B,) absolute image paths (not checked here), None when absent
    notes: list[Note] = field(default_factory=list)
    block_maps: Optional[np.ndarray] = None  # (B, Bk, Hc, Wc, T) per_block_token_map, when read
    steps_flipped: bool = False  # the file stored steps by ascending timestep (original tool); flipped on load
    concepts: Optional[concept_io.ConceptData] = None  # the concept maps (dumps made with --concepts)

    @classmethod
    def from_result(cls, result: Any, prompts: Sequence[str], tokenizers: dict[str, Any]) -> "Dump":
        """A dump of a :class:`~attention_map_diffusers.capture.aggregate.CaptureResult`, in memory.

        Args:
            result: the recorder's result (its ``text_spans`` say where each encoder's positions are).
            prompts: one prompt per batch item (with ``num_images_per_prompt`` > 1, repeat each).
            tokenizers: encoder name -> the pipeline's tokenizer (``pipe.tokenizer``, ``pipe.tokenizer_3``);
                encoders without a tokenizer are left out.
        """
        B = int(result.batch_size)
        if len(prompts) != B:
            raise UserError(f"Dump.from_result: {len(prompts)} prompts for a result of {B} batch items")
        spans = getattr(result, "text_spans", None)
        if not spans:
            raise UserError("Dump.from_result: the result has no text_spans (record the pipeline, not a bare transformer)")
        encoders = {}
        for name, span in spans.items():
            tok = tokenizers.get(name)
            if tok is None or span[1] <= span[0]:
                continue
            encoders[name] = _encoder_tokens(name, (int(span[0]), int(span[1])), tok, prompts, "tokenizer")
        return cls(
            folder="(in memory)",
            format_version=FORMAT_VERSION,
            metadata={"text_spans": {k: list(v) for k, v in spans.items()}},
            prompts=list(prompts),
            sum_token_map=np.asarray(result.sum_token_map, dtype=np.float32),
            N=int(result.N),
            step_mean=np.asarray(result.per_block_step_token_mean, dtype=np.float32),
            timesteps=np.asarray(result.timesteps, dtype=np.float32),
            block_ids=read_block_ids(list(result.blocks), len(result.blocks)),
            encoders=encoders,
            images=[None] * B,
            block_maps=None if result.per_block_token_map is None else np.asarray(result.per_block_token_map, np.float32),
        )

    @property
    def batch_size(self) -> int:
        return int(self.sum_token_map.shape[0])

    @property
    def avg_map(self) -> np.ndarray:
        """(B, Hc, Wc, T) the average map over steps and blocks, ``sum_token_map / N``."""
        return self.sum_token_map / np.float32(self.N)

    def word_maps(self, item: int = 0, encoder: str = "clip"):
        """The prompt's words and their heatmaps for one item and encoder.

        Returns:
            (words, maps): the :class:`~attention_map_diffusers.analysis.words.Word` list and
            (n, Hc, Wc) float64 maps, renormalised over the words at each pixel (the heatmaps the
            analysis draws).
        """
        from .stats import renormalise, word_maps
        from .words import map_words

        enc = self.encoders.get(encoder)
        if enc is None:
            raise UserError(f"this dump has no tokens for encoder {encoder!r} (has {', '.join(self.encoders) or 'none'})")
        offs = enc.offsets[item] if enc.offsets is not None else None
        wm = map_words(enc.tokens[item], enc.special[item], self.prompts[item], enc.length, offsets=offs)
        a, b = enc.span
        shares = renormalise(word_maps(self.avg_map[item, :, :, a:b], wm.weights))
        return list(wm.words), np.moveaxis(shares, -1, 0)

    def block_positions(self, block_ids: Optional[Sequence[int]]) -> list[int]:
        """Positions on the Bk axis of the given block ids (all blocks when None)."""
        if block_ids is None:
            return list(range(len(self.block_ids)))
        where = {b: i for i, b in enumerate(self.block_ids)}
        missing = [b for b in block_ids if b not in where]
        if missing:
            raise UserError(
                f"--blocks: block {missing[0]} is not in this dump, which has blocks "
                f"{format_ranges(self.block_ids)} ({self.folder})"
            )
        return [where[b] for b in block_ids]

    def select_blocks(self, ranges: Optional[Sequence[tuple[int, int]]]) -> list[int]:
        """Positions on the Bk axis of the blocks in ``ranges`` (inclusive ``(first, last)`` pairs, as
        :func:`~attention_map_diffusers.analysis.stats.parse_blocks` returns them; all blocks when None).

        Checked arithmetically, so ``0-99999999999`` costs no more than ``0-9``.
        """
        if ranges is None:
            return list(range(len(self.block_ids)))
        missing = first_missing(ranges, self.block_ids)
        if missing is not None:
            raise UserError(
                f"--blocks: block {missing} is not in this dump, which has blocks "
                f"{format_ranges(self.block_ids)} ({self.folder})"
            )
        return [p for p, b in enumerate(self.block_ids) if any(a <= b <= z for a, z in ranges)]


def first_missing(ranges: Sequence[tuple[int, int]], have: Sequence[int]) -> Optional[int]:
    """The smallest integer in the inclusive ``ranges`` that is not in ``have``, or None.

    Walks ``have`` once per range instead of enumerating the range.
    """
    ids = sorted(set(have))
    best: Optional[int] = None
    for a, z in ranges:
        want = a
        for b in ids:
            if b < want:
                continue
            if b > want or want > z:
                break
            want += 1
        if want <= z and (best is None or want < best):
            best = want
    return best


def format_ranges(ids: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    out, ids = [], sorted(ids)
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


# ---------------------------------------------------------------------------------------------
# runs.jsonl


def read_runs(root: str) -> list[RunRecord]:
    """The runs listed in ``root/runs.jsonl``, each line checked (whether their folders are complete is
    :mod:`~attention_map_diffusers.analysis.discover`'s business)."""
    return read_runs_jsonl(os.path.join(root, RUNS_NAME))


# ---------------------------------------------------------------------------------------------
# Loading


def _read_metadata(folder: str) -> dict:
    path = os.path.join(folder, METADATA_NAME)
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing; point --root at a run folder written by sd_35_stepavg_dump.py")
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); re-run the dump") from None
    except RecursionError:
        raise UserError(f"{path} nests its JSON values too deeply to be read; the file is damaged, re-run the dump") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} must hold a JSON object, got {type(meta).__name__}; re-run the dump")
    return meta


def _read_arrays(folder: str, required: Sequence[str], optional: Sequence[str] = (), meta: Optional[dict] = None) -> dict[str, np.ndarray]:
    path = os.path.join(folder, NPZ_NAME)
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing; point --root at a run folder written by sd_35_stepavg_dump.py")
    arrays: dict[str, np.ndarray] = {}
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not magic.startswith(b"PK"):
        raise UserError(f"{path} is not an .npz (zip) file; the file is damaged, re-run the dump")
    try:
        headers = npy_headers(path)
        check_headers(headers, meta, [*required, "timesteps", "per_block_step_token_max", *optional], path)
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in required if k not in npz.files]
            if missing:
                raise UserError(
                    f"{path} lacks the array {missing[0]!r} (has {', '.join(sorted(npz.files)) or 'none'}); "
                    "re-run the dump"
                )
            for key in [*required, "timesteps", "per_block_step_token_max", *optional]:
                if key in npz.files:
                    arrays[key] = npz[key]
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as exc:
        raise UserError(f"cannot read {path} ({type(exc).__name__}: {exc}); the file is damaged, re-run the dump") from None
    except MemoryError:
        raise UserError(f"{path} holds arrays too large for this machine's memory; analyse it on a larger one") from None
    return arrays


MAX_DEFLATE_RATIO = 1100  # deflate expands at most ~1032:1; a member that claims more is damaged


def npy_headers(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each ``.npy`` member of the npz at ``path``: its name (without ``.npy``) -> (shape, dtype), read
    from its header only, after checking that the data the header claims is what the member holds
    (so that no array larger than the file is ever allocated). Raises :class:`UserError`."""
    out = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[:-4]
            with zf.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                elif version in ((2, 0), (3, 0)):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                else:
                    raise ValueError(f"{key}: npy format {version} is not read")
                header = fh.tell()
            count = 1
            for n in shape:
                count *= n
            claimed = count * dtype.itemsize
            held = info.file_size - header
            if dtype.hasobject or claimed != held or (
                info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_DEFLATE_RATIO * info.compress_size + 4096
            ):
                raise UserError(
                    f"{path}: the array {key!r} claims shape {tuple(shape)} of {dtype} ({_size(claimed)}) but the file "
                    f"holds {_size(max(held, 0))} of it; the file is damaged, re-run the dump"
                )
            out[key] = (tuple(shape), dtype)
    return out


def check_headers(headers: dict, meta: Optional[dict], keys: Sequence[str], where: str) -> None:
    """The shapes of the arrays ``keys`` (from their npy headers, nothing read yet) against the counts
    the metadata states (batch_size, num_blocks, num_steps, T_from_model, canonical_size)."""
    meta = meta or {}
    want = {name: meta.get(name) for name in ("batch_size", "num_blocks", "num_steps", "T_from_model")}
    size = meta.get("canonical_size")
    grid = size if isinstance(size, list) and len(size) == 2 else [None, None]
    axes = {  # per array, the metadata key of each axis (None: not stated)
        "sum_token_map": ["batch_size", grid[0], grid[1], "T_from_model"],
        "per_block_step_token_mean": ["batch_size", "num_blocks", "num_steps", "T_from_model"],
        "per_block_step_token_max": ["batch_size", "num_blocks", "num_steps", "T_from_model"],
        "per_block_token_map": ["batch_size", "num_blocks", grid[0], grid[1], "T_from_model"],
        "timesteps": ["num_steps"],
    }
    for key in keys:
        if key not in headers or key not in axes:
            continue
        shape = headers[key][0]
        stated = [want.get(a) if isinstance(a, str) else a for a in axes[key]]
        if len(shape) != len(stated):
            continue  # check_arrays says what was expected, once the (small) arrays are read
        for n, s, name in zip(shape, stated, axes[key]):
            if isinstance(s, int) and not isinstance(s, bool) and n != s:
                label = name if isinstance(name, str) else "canonical_size"
                raise UserError(
                    f"{where}: {key} has shape {shape} but the metadata says {label}={s}; the file is "
                    "damaged, re-run the dump"
                )


def _size(n: int) -> str:
    """Bytes in binary units: ``"32.0 PiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def load_dump(folder: str, *, t5_tokenizer: Optional[Callable[[], Any]] = None, block_maps: bool = False,
              step_maps: bool = False) -> Dump:
    """Read, validate and normalise the run in ``folder``.

    Args:
        folder: a run folder (``stepavg_token_maps_v1.npz`` + ``metadata.json``).
        t5_tokenizer: a function returning a Hugging Face tokenizer, called only when the dump has
            no T5 tokens (original tool) to tokenise its prompts; see :func:`load_t5_tokenizer`.
        block_maps: also read ``per_block_token_map`` when the dump kept it (``Dump.block_maps``).
        step_maps: also read ``concept_per_step_map`` when the dump kept it (``Dump.concepts.step_maps``;
            the word maps' per-step frames are read when needed, :func:`read_frames`).

    Raises:
        UserError: anything missing, unreadable, inconsistent or not finite.
    """
    folder = os.path.abspath(folder)
    where = folder
    if not os.path.isdir(folder):
        raise UserError(f"{folder} is not a folder; --root must be a run folder or a folder with {RUNS_NAME}")
    meta = _read_metadata(folder)
    version = format_version(meta, where)
    required = NPZ_REQUIRED_ARRAYS if version >= 2 else NPZ_CORE_ARRAYS
    optional = (("per_block_token_map",) if block_maps else ()) + concept_io.NPZ_REQUIRED
    optional += ((concept_io.BLOCK_MAP_KEY,) if block_maps else ()) + ((concept_io.STEP_MAP_KEY,) if step_maps else ())
    arrays = _read_arrays(folder, required, optional=optional, meta=meta)
    concept_arrays = concept_io.split_arrays(arrays)  # checked by read_concepts (NaN marks blocks without a stream)
    shape = check_arrays(arrays, where)
    check_metadata(meta, shape, version, where)
    prompts = read_prompts(meta, shape.B, where)
    encoders, notes = _read_encoders(meta, version, shape, prompts, t5_tokenizer, where)

    step_mean = arrays["per_block_step_token_mean"].astype(np.float32, copy=False)
    timesteps = arrays["timesteps"].astype(np.float32, copy=False) if "timesteps" in arrays else None
    flip, note = _steps_reversed(meta, version, timesteps, where)
    if note is not None:
        notes.append(note)
    if flip:
        step_mean = np.ascontiguousarray(step_mean[:, :, ::-1])
        timesteps = None if timesteps is None else np.ascontiguousarray(timesteps[::-1])
    if timesteps is None:
        notes.append(Note("note", "the dump has no timesteps (original tool): steps are numbered by index only, 0 = first denoising step"))
    concepts = concept_io.read_concepts(concept_arrays, meta, shape.B, shape.Hc, shape.Wc, shape.Bk, shape.S, where)
    if flip and concepts is not None:
        concepts = concepts.flipped_steps()
    pbm = arrays.get("per_block_token_map")
    expected = (shape.B, shape.Bk, shape.Hc, shape.Wc, shape.T)
    if pbm is not None and pbm.shape != expected:
        raise UserError(f"{where}: per_block_token_map has shape {pbm.shape}, expected {expected}; re-run the dump")
    if meta.get("random_weights"):
        family = "FLUX.1" if meta.get("model_family") == "flux" else "SD3.5"
        model = meta.get("model_id") if isinstance(meta.get("model_id"), str) else "tiny-random"
        notes.append(Note("note", f"this run used random weights (--model {model}): its maps say nothing about {family}"))
    return Dump(
        folder=folder,
        format_version=int(version),
        metadata=meta,
        prompts=prompts,
        sum_token_map=arrays["sum_token_map"].astype(np.float32, copy=False),
        N=shape.n_updates,
        step_mean=step_mean,
        timesteps=timesteps,
        block_ids=read_block_ids(meta.get("blocks"), shape.Bk),
        encoders=encoders,
        images=_image_paths(meta, folder, shape.B, where),
        notes=notes,
        block_maps=None if pbm is None else pbm.astype(np.float32, copy=False),
        steps_flipped=flip,
        concepts=concepts,
    )


def _steps_reversed(meta: dict, version: int, timesteps: Optional[np.ndarray], where: str) -> tuple[bool, Optional[Note]]:
    """Whether the stored step axis is by ascending timestep (to be flipped), and a note when that was inferred.

    ``step_order`` decides when present (only ``"denoising"`` exists); format 2 is in denoising order;
    the original tool stored ascending timesteps, unless the timesteps it stored say otherwise.
    """
    order = meta.get("step_order")
    if order is not None:
        if order != "denoising":
            raise UserError(
                f"{where}: metadata step_order={order!r} is not supported; dumps store steps in denoising order "
                "(\"denoising\"), re-run the dump"
            )
        return False, None
    if version >= 2:
        return False, None
    if timesteps is not None and timesteps.size > 1 and bool((np.diff(timesteps) < 0).all()):
        return False, Note("note", "steps kept as stored: the dump has no step_order but its timesteps decrease (denoising order)")
    return True, None


# metadata keys of each encoder's tokens: (tokens, special mask, character offsets)
_TOKEN_KEYS = {"clip": ("tokens", "special_mask", "token_offsets_clip"), "t5": ("tokens_t5", "special_mask_t5", "token_offsets_t5")}


def _read_encoders(meta: dict, version: int, shape: Shape, prompts: list[str], t5_tokenizer, where: str):
    """Each encoder's span and tokens; returns (encoders, notes)."""
    T, B = shape.T, shape.B
    spans = meta.get("text_spans")
    if version >= 2 or spans is not None:
        if not isinstance(spans, dict) or not ("clip" in spans or "t5" in spans):
            raise UserError(f"{where}: metadata text_spans is missing or has neither a clip nor a t5 range; "
                            "re-run the dump")
        # FLUX.1's sequence is T5 only: no clip range
        clip_span = check_span(spans["clip"], T, "clip", where) if spans.get("clip") is not None else (0, 0)
        t5_span = check_span(spans["t5"], T, "t5", where) if spans.get("t5") is not None else (T, T)
        if max(clip_span[0], t5_span[0]) < min(clip_span[1], t5_span[1]):
            raise UserError(
                f"{where}: metadata text_spans clip {list(clip_span)} and t5 {list(t5_span)} overlap; each text "
                "position belongs to one encoder, re-run the dump"
            )
    else:
        clip_span = (0, min(ORIGINAL_CLIP_POSITIONS, T))
        t5_span = (clip_span[1], T)
    truncated = meta.get("truncated") if isinstance(meta.get("truncated"), list) else None
    if truncated is not None and len(truncated) != B:
        raise UserError(f"{where}: metadata truncated has {len(truncated)} entries, expected B={B}; re-run the dump")
    if "tokens" not in meta and clip_span[1] > clip_span[0]:
        raise UserError(f"{where}: metadata has no CLIP tokens (key 'tokens'); re-run the dump")

    encoders: dict[str, EncoderTokens] = {}
    notes: list[Note] = []
    prompts_equal = len(set(prompts)) == 1
    for name, span in (("clip", clip_span), ("t5", t5_span)):
        tok_key, sp_key, off_key = _TOKEN_KEYS[name]
        if span[1] <= span[0]:
            continue
        if tok_key in meta:
            tok = per_item(meta[tok_key], B, tok_key, where, prompts_equal)
            sp = per_item(meta[sp_key], B, sp_key, where, prompts_equal) if sp_key in meta else None
            toks, specials = check_tokens(tok, sp, B, span[1] - span[0], tok_key, where)
            offs = check_offsets(meta.get(off_key), toks, prompts, off_key, where)
            trunc = [
                bool(t.get(name)) if isinstance(t, dict) and name in t else None for t in truncated
            ] if truncated is not None else [None] * B
            encoders[name] = EncoderTokens(name, span, toks, specials, offs, trunc, "dump")
        elif t5_tokenizer is not None:
            encoders[name] = tokenize_t5(t5_tokenizer(), prompts, span)
        else:
            notes.append(Note(
                "note",
                "T5 not analysed: this dump (original tool) has no T5 tokens; pass --t5-tokenizer "
                "PATH_OR_ID (the pipeline's tokenizer_3, e.g. stabilityai/stable-diffusion-3.5-large "
                "with its tokenizer_3 sub-folder) to analyse T5 too",
            ))
    return encoders, notes


def _image_paths(meta: dict, folder: str, B: int, where: str) -> list[Optional[str]]:
    """Per item, the image path (format 2: ``images``; original tool: the one image found, or ``idx{i}`` names)."""
    images = meta.get("images")
    if images is not None:
        if not isinstance(images, list) or len(images) != B or not all(p is None or isinstance(p, str) for p in images):
            raise UserError(f"{where}: metadata images must be a list of B={B} paths or nulls; re-run the dump")
        return [None if p is None else os.path.normpath(os.path.join(folder, p)) for p in images]
    found = []
    for sub in ("images", "."):
        d = os.path.join(folder, sub)
        if os.path.isdir(d):
            found += sorted(os.path.join(d, f) for f in os.listdir(d) if f.lower().endswith(IMAGE_SUFFIXES))
    found = [os.path.normpath(p) for p in found]
    if B == 1:
        return [found[0]] if len(found) == 1 else [None]
    out: list[Optional[str]] = []
    for i in range(B):
        hits = [p for p in found if re.search(rf"idx{i}(?!\d)", os.path.basename(p))]
        out.append(hits[0] if len(hits) == 1 else None)
    return out


# ---------------------------------------------------------------------------------------------
# T5 tokens for the original tool's dumps


def load_t5_tokenizer(path_or_id: str):
    """``transformers.AutoTokenizer.from_pretrained(path_or_id)``; the only place transformers is imported.

    A pipeline folder or hub id with a ``tokenizer_3`` sub-folder is accepted too.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise UserError(f"--t5-tokenizer needs the transformers package ({exc}); pip install transformers") from None
    errors = []
    for kwargs in ({}, {"subfolder": "tokenizer_3"}):
        try:
            return AutoTokenizer.from_pretrained(path_or_id, **kwargs)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; report the first
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise UserError(
        f"--t5-tokenizer {path_or_id!r} could not be loaded ({errors[0]}); give a local folder with the "
        "T5 tokenizer files or a hub id available offline"
    )


def tokenize_t5(tokenizer: Any, prompts: Sequence[str], span: tuple[int, int]) -> EncoderTokens:
    """Tokenise the prompts as SD3 does for T5 (special tokens added, truncated at the span length)."""
    return _encoder_tokens("t5", span, tokenizer, prompts, "tokenizer")


def _encoder_tokens(name: str, span: tuple[int, int], tokenizer: Any, prompts: Sequence[str], source: str) -> EncoderTokens:
    toks = [prompt_tokens(tokenizer, p, span[1] - span[0]) for p in prompts]
    offsets = None
    if all(t.offsets is not None for t in toks):
        offsets = [[None if o is None else (o[0], o[1]) for o in t.offsets] for t in toks]
    return EncoderTokens(
        name,
        span,
        [t.tokens for t in toks],
        [[bool(v) for v in t.special] for t in toks],
        offsets,
        [t.truncated for t in toks],
        source,
    )
