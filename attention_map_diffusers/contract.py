"""What a dump is: the one definition that the writer (``dump/``) and the reader (``analysis/``) share.

Standard library only. Everything two layers must agree on lives here and nowhere else: file
names, the format version, what makes a run folder complete (and whose settings it records),
``runs.jsonl`` lines, the renormalisation epsilon, the block-name pattern, the user-error class,
the slug of names, and the call that tokenises a prompt with character offsets. See
docs/FORMAT.md for the files themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
import zipfile
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional

NPZ_NAME = "stepavg_token_maps_v1.npz"
METADATA_NAME = "metadata.json"
RUNS_NAME = "runs.jsonl"
IMAGES_DIR = "images"
FORMAT_VERSION = 2

#: Added to the per-pixel sum over text tokens (capture) or words (analysis) before renormalising.
RENORM_EPS = 1e-8

#: ``transformer_blocks.{i}.attn`` (SD3's and FLUX.1's joint-attention modules); group 1 is the block
#: index. Not the tail of FLUX.1's ``single_transformer_blocks.{j}.attn``.
JOINT_BLOCK = re.compile(r"(?<!single_)transformer_blocks\.(\d+)\.attn")

#: ``single_transformer_blocks.{j}.attn`` (FLUX.1's single-stream blocks, recorded after the joint ones).
SINGLE_BLOCK = re.compile(r"single_transformer_blocks\.(\d+)\.attn")

#: The model families a dump may come from (metadata ``model_family``).
MODEL_FAMILIES = ("sd3", "flux")

#: The statuses of a ``runs.jsonl`` line. It lists finished runs only: a run still to do (or cut
#: off by a kill) has no line, so every line whose status is not "failed" names a complete folder.
RUN_STATUSES = ("done", "skipped", "failed")

#: The arrays every dump's npz holds (``per_block_step_token_max`` and the optional maps aside).
#: Arrays every dump holds, the original tool's too; format 2 adds ``timesteps`` (NPZ_REQUIRED_ARRAYS).
NPZ_CORE_ARRAYS = ("sum_token_map", "N", "per_block_step_token_mean")
NPZ_REQUIRED_ARRAYS = NPZ_CORE_ARRAYS + ("timesteps",)

#: metadata.json keys of the settings a run was made with (see :func:`settings_fingerprint`).
SETTINGS_KEY = "settings"
FINGERPRINT_KEY = "settings_fingerprint"


class UserError(ValueError):
    """Bad input from the user (a flag, a file, a dump): reported as one line on stderr, exit code 2."""


def block_index(name: str) -> Optional[int]:
    """``"transformer_blocks.7.attn"`` -> 7; None for any other name (FLUX.1's single blocks included:
    a FLUX.1 dump's blocks are then numbered by position, joint blocks first)."""
    m = JOINT_BLOCK.search(str(name))
    return int(m.group(1)) if m else None


def run_is_complete(folder: str | os.PathLike) -> bool:
    """A run folder is complete when its npz and its metadata exist (both are written atomically, the
    metadata last). To resume, the dump command asks more: the same :func:`settings_fingerprint` in
    the metadata and an npz that opens (:func:`npz_problem`)."""
    return os.path.isfile(os.path.join(folder, NPZ_NAME)) and os.path.isfile(os.path.join(folder, METADATA_NAME))


def npz_problem(path: str | os.PathLike) -> Optional[str]:
    """Why the npz at ``path`` cannot be read as a dump's (missing, not a zip archive, truncated, an
    array missing), or None when it opens. Reads the archive's directory only, not the arrays."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except FileNotFoundError:
        return "it is missing"
    except (OSError, zipfile.BadZipFile) as exc:
        return f"it does not open ({exc})"
    missing = [k for k in NPZ_REQUIRED_ARRAYS if f"{k}.npy" not in names]
    if missing:
        return f"it lacks {', '.join(missing)}"
    return None


def settings_fingerprint(settings: dict) -> str:
    """``"sha256:<hex>"`` of ``settings`` (JSON values) written canonically: keys sorted, no spaces.

    A dump run stores the settings that decide its files (prompts, seed, model, steps, sizes, ...,
    see docs/FORMAT.md) under :data:`SETTINGS_KEY` and this fingerprint under :data:`FINGERPRINT_KEY`;
    a later command resumes a folder only when the fingerprint it would write is the same.
    """
    text = json.dumps(settings, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, hex, read in 1 MiB blocks (source images, analysis manifests)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def slugify(text: str, max_len: int = 40) -> str:
    """A short name part safe on every OS: letters (Unicode ones too, case kept), digits, ``_`` and
    ``-`` only; ``"x"`` when nothing is left."""
    text = unicodedata.normalize("NFC", text)
    out = re.sub(r"[^\w\-]+", "-", text)
    out = re.sub(r"-{2,}", "-", out).strip("-_")
    return out[:max_len].rstrip("-_") or "x"


# ---------------------------------------------------------------------------------------------
# runs.jsonl


@dataclass(frozen=True)
class RunRecord:
    """One line of ``runs.jsonl``: one run (pipeline call) of a dump command.

    Attributes:
        run: index in the plan (0-based).
        folder: the run folder, relative to the folder holding ``runs.jsonl``, normalised (``/``-separated,
            no ``.`` parts or trailing ``/``: ``./0000-a/`` is ``0000-a``; a run in that folder itself is ``.``).
        prompt: the prompts of the run's batch.
        seed: its base seed (None when not recorded).
        status: "done", "skipped" (complete from an earlier call) or "failed".
        error: why it failed, else None.
        process: the rank of the process that ran it.
    """

    run: int
    folder: str
    prompt: tuple[str, ...]
    seed: Optional[int] = None
    status: str = "done"
    error: Optional[str] = None
    process: int = 0

    def to_json(self) -> dict:
        out = asdict(self)
        out["prompt"] = list(self.prompt)
        if out["error"] is None:
            del out["error"]
        return out


def runs_jsonl_text(records: Iterable[RunRecord]) -> str:
    """The text of ``runs.jsonl``: one JSON object per run, in run order."""
    rows = sorted(records, key=lambda r: r.run)
    return "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in rows)


def parse_runs_jsonl(text: str, where: str) -> list[RunRecord]:
    """The records of a ``runs.jsonl`` text, each field checked.

    Raises:
        UserError: a line that is not a JSON object with the right fields (names the line and the fix).
    """
    records: list[RunRecord] = []
    spelled: list[str] = []  # each record's folder as written
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 and the like may be in a prompt
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where} line {n} is not JSON ({exc.msg}); fix or delete that line") from None
        except RecursionError:
            raise UserError(f"{where} line {n} nests its JSON values too deeply to be read; fix or delete that line") from None
        records.append(_record(obj, f"{where} line {n}"))
        spelled.append(obj["folder"])
    seen: dict[str, str] = {}  # normalised folder -> as written on its first line
    for r, raw in zip(records, spelled):
        if r.folder in seen:
            also = f" (as {seen[r.folder]!r} and {raw!r})" if seen[r.folder] != raw else ""
            raise UserError(f"{where} lists folder {r.folder!r} twice{also}; keep one line per run")
        seen[r.folder] = raw
    return records


def _record(obj: Any, where: str) -> RunRecord:
    if not isinstance(obj, dict) or not isinstance(obj.get("folder"), str) or not obj["folder"]:
        raise UserError(f"{where} has no \"folder\" string; each line needs run, folder, status")
    folder = obj["folder"]
    if os.path.isabs(folder) or ".." in folder.replace("\\", "/").split("/"):
        raise UserError(f"{where}: folder {folder!r} must be a sub-folder of the runs.jsonl folder")
    run = obj.get("run", 0)
    if not _is_int(run) or run < 0:
        raise UserError(f"{where}: \"run\" must be a whole number >= 0, got {run!r}; fix or delete that line")
    status = obj.get("status", "done")
    if status not in RUN_STATUSES:
        raise UserError(f"{where}: status {status!r} is not one of {', '.join(RUN_STATUSES)}")
    prompt = obj.get("prompt", [])
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not all(isinstance(p, str) for p in prompt):
        raise UserError(f"{where}: \"prompt\" must be a string or a list of strings, got {prompt!r}")
    seed = obj.get("seed")
    if seed is not None and not _is_int(seed):
        raise UserError(f"{where}: \"seed\" must be a whole number, got {seed!r}")
    error = obj.get("error")
    process = obj.get("process", 0)
    return RunRecord(
        run=run,
        folder=os.path.normpath(folder).replace(os.sep, "/"),  # "./0000-a" and "0000-a/" are "0000-a"
        prompt=tuple(prompt),
        seed=seed,
        status=status,
        error=None if error is None else str(error),
        process=process if _is_int(process) else 0,
    )


def read_runs_jsonl(path: str | os.PathLike) -> list[RunRecord]:
    """The records of the ``runs.jsonl`` file at ``path`` (see :func:`parse_runs_jsonl`)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    return parse_runs_jsonl(text, os.fspath(path))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------
# Tokens


@dataclass(frozen=True)
class PromptTokens:
    """One prompt through one tokenizer, as the pipeline feeds it (truncated, unpadded).

    Attributes:
        tokens: token strings, specials included; position j is text position ``start + j`` of the
            encoder's span.
        special: 1 for special tokens, else 0.
        offsets: per token, [start, end) in the prompt, None for special tokens; None altogether when
            the tokenizer cannot give offsets (a slow tokenizer).
        truncated: whether the prompt had more tokens than ``max_length``.
    """

    tokens: list[str]
    special: list[int]
    offsets: Optional[list[Optional[list[int]]]]
    truncated: bool


def prompt_tokens(tokenizer: Any, prompt: str, max_length: int) -> PromptTokens:
    """Tokenize ``prompt`` the way SD3's pipeline does (specials added, truncated at ``max_length``),
    with character offsets when the tokenizer is a fast one. The one place both layers call a
    tokenizer.

    A token is special when its id is one of the tokenizer's special ids, wherever it came from:
    the ones the tokenizer adds and the ones typed in the prompt (``<|endoftext|>``, ``</s>``,
    ``<pad>``), which the tokenizer turns into the same ids. The unknown-token id is the exception
    when it also stands for text the vocabulary lacks (T5's ``<unk>`` for ``é`` or an emoji): such
    a token is part of its word, and only an ``<unk>`` typed literally is special.
    """
    full = tokenizer(prompt, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    kwargs = dict(add_special_tokens=True, truncation=True, max_length=max_length, return_special_tokens_mask=True)
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(prompt, return_offsets_mapping=fast, **kwargs)
    ids = [int(i) for i in enc["input_ids"]]
    spans = [(int(a), int(b)) for a, b in enc["offset_mapping"]] if fast else None
    special = _special_mask(tokenizer, prompt, ids, [int(s) for s in enc["special_tokens_mask"]], spans)
    offsets = None
    if spans is not None:
        offsets = [None if s else [a, b] for (a, b), s in zip(spans, special)]
    return PromptTokens(
        tokens=[str(t) for t in tokenizer.convert_ids_to_tokens(ids)],
        special=special,
        offsets=offsets,
        truncated=len(full) > len(ids),
    )


def _special_mask(tokenizer: Any, prompt: str, ids: list[int], added: list[int], spans) -> list[int]:
    """1 for special tokens (see :func:`prompt_tokens`); ``added`` is the tokenizer's own mask, which
    marks only the specials it added itself."""
    special_ids = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    unk_id = getattr(tokenizer, "unk_token_id", None)
    unk = str(getattr(tokenizer, "unk_token", "") or "")
    others = {int(tokenizer.convert_tokens_to_ids(str(t))) for t in getattr(tokenizer, "all_special_tokens", []) if str(t) != unk}
    # CLIP's unknown token is <|endoftext|>, a special token in its own right; T5's <unk> is not
    ambiguous = unk_id if unk_id is not None and unk_id not in others else None
    out = []
    for j, (i, a) in enumerate(zip(ids, added)):
        if a or (i in special_ids and i != ambiguous):
            out.append(1)
        elif i == ambiguous:
            if spans is not None:
                start, end = spans[j]
                out.append(int(end > start and prompt[start:end] == unk))
            else:  # a slow tokenizer gives no spans: trust the prompt's own text
                out.append(int(bool(unk) and unk in prompt))
        else:
            out.append(0)
    return out
