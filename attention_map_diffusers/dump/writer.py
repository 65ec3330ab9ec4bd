"""Writing one run folder of a dump (format 2, see docs/FORMAT.md): npz, metadata.json, images."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
from typing import Optional, Sequence

import numpy as np

from .. import __version__
from ..atomic import atomic_path, remove_temp_files, write_json, write_npz
from ..contract import FINGERPRINT_KEY, FORMAT_VERSION, IMAGES_DIR, METADATA_NAME, NPZ_NAME, SETTINGS_KEY, PromptTokens
from .settings import RunSettings


class WriteError(Exception):
    """A run folder could not be written (disk full, no permission, ...): the output location is
    broken, so the command stops there. ``reason`` is the OS error's one-line text."""

    def __init__(self, folder: str, error: OSError):
        self.folder = folder
        self.error = error
        self.reason = error.strerror or str(error)
        super().__init__(f"cannot write {folder}: {self.reason}")


#: The names of the images a run writes: :func:`image_name`, and image mode's fitted source
#: (``source-{stem}-{w}x{h}.{ext}``, image_run.source_image_name).
IMAGE_FILE = re.compile(r"(seed-?\d+-\d+x\d+-idx\d+|source-.+-\d+x\d+)\.(png|jpg)")


class NonFiniteMaps(ValueError):
    """The maps of a run hold NaN or infinite values (the pipeline's numbers overflowed, e.g. under a
    huge --guidance-scale): the run fails and nothing of it is written."""


# Arrays whose whole block rows (axis 1) are NaN by design: blocks without a concept stream (FLUX.1's
# single blocks; docs/FORMAT.md, concept maps).
_NAN_BLOCK_ROWS = ("concept_per_block_step_mean", "concept_per_block_map")


def _non_finite(key: str, value) -> int:
    v = np.asarray(value)
    if key in _NAN_BLOCK_ROWS and v.ndim >= 2:
        rows = np.isnan(v).reshape(v.shape[0], v.shape[1], -1).all(axis=(0, 2))  # (Bk,): a block without concepts
        v = v[:, ~rows]
    return int(np.count_nonzero(~np.isfinite(v)))


def check_finite(arrays: dict) -> None:
    """Raise :class:`NonFiniteMaps` when a floating array of ``arrays`` holds NaN or an infinity (the
    all-NaN block rows of the concept arrays aside)."""
    bad = {k: _non_finite(k, v) for k, v in arrays.items() if np.asarray(v).dtype.kind in "fc"}
    bad = {k: n for k, n in bad.items() if n}
    if bad:
        key = next(iter(bad))
        more = f" and {len(bad) - 1} more array(s)" if len(bad) > 1 else ""
        raise NonFiniteMaps(
            f"the attention maps hold NaN or infinite values ({bad[key]} in {key}{more}): the pipeline's numbers "
            "overflowed (check --guidance-scale, --dtype); nothing of this run was kept"
        )


def image_ext(fmt: str) -> str:
    """The file extension of an --image-format."""
    return {"png": "png", "jpg": "jpg", "jpeg": "jpg"}[fmt]


def image_name(seed: int, width: int, height: int, index: int, fmt: str) -> str:
    """The original tool's pattern: ``seed{seed}-{w}x{h}-idx{i}.png``."""
    return f"seed{seed}-{width}x{height}-idx{index}.{image_ext(fmt)}"


def build_metadata(
    *,
    result,
    prompts: Sequence[str],
    seeds: Sequence[int],
    base_seed: int,
    clip: Sequence[PromptTokens],
    t5: Sequence[PromptTokens],
    clip_length: int,
    settings: RunSettings,
    scheduler: str,
    device: str,
    dtype: str,
    images: Sequence[Optional[str]],
    elapsed_s: float,
    versions: dict,
    source: Optional[dict] = None,
) -> dict:
    """metadata.json for one run. Per-item lists follow the batch order of ``result``.

    Args:
        result: the recorder's :class:`~attention_map_diffusers.capture.aggregate.CaptureResult`.
        prompts / seeds / clip / t5 / images: one entry per batch item.
        clip_length: number of CLIP text positions (the tokenizer's model_max_length, 77 for SD3).
        settings: the command's :class:`~attention_map_diffusers.dump.settings.RunSettings`.
        scheduler / device / dtype: the pipeline's scheduler class name, device and dtype.
        source: image mode: the given image's record (``SourceImage.record()``, plus ``saved``).
    """
    T = int(result.num_tokens)
    n_items = int(result.batch_size)
    for name, seq in (("prompts", prompts), ("seeds", seeds), ("clip", clip), ("t5", t5), ("images", images)):
        if len(seq) != n_items:
            raise ValueError(f"{name}: {len(seq)} entries for {n_items} batch items")
    meta = {
        # keys of the original tool
        "prompt": list(prompts),
        "negative_prompt": settings.negative_prompt,
        "seed": int(base_seed),
        "steps": int(settings.steps),
        "guidance_scale": float(settings.guidance_scale),
        "model_id": settings.model_id,
        "scheduler": scheduler,
        "image_size": list(settings.image_size),
        "canonical_size": [int(v) for v in result.canonical_size],
        "batch_size": n_items,
        "num_steps": int(result.num_steps),
        "num_blocks": len(result.blocks),
        "blocks": list(result.blocks),
        "block_latent_sizes": [list(map(int, s)) for s in result.block_latent_sizes],
        "tokens": [c.tokens for c in clip],  # CLIP's (left out for FLUX.1, below)
        "T_from_model": T,
        "special_mask": [c.special for c in clip],
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        # format 2
        "format_version": FORMAT_VERSION,
        "model_family": result.model_family,
        "step_order": "denoising",
        "timesteps": [float(t) for t in result.timesteps],
        "text_spans": result.text_spans or {"clip": [0, int(clip_length)], "t5": [int(clip_length), T]},
        "tokens_t5": [t.tokens for t in t5],
        "special_mask_t5": [t.special for t in t5],
        "token_offsets_clip": _offsets(clip),
        "token_offsets_t5": _offsets(t5),
        "truncated": [{"clip": c.truncated, "t5": t.truncated} for c, t in zip(clip, t5)],
        "max_sequence_length": int(settings.max_sequence_length),
        "skip_guidance_layers": list(settings.skip_guidance_layers) if settings.skip_guidance_layers else None,
        "true_cfg_scale": float(settings.true_cfg_scale),
        "cfg": bool(result.cfg),
        "capture_path": result.capture_path,
        "capture_verdicts": list(result.capture_verdicts),
        "device": device,
        "dtype": dtype,
        "versions": dict(versions, attention_map_diffusers=__version__),
        "elapsed_s": round(float(elapsed_s), 3),
        "seeds": [int(s) for s in seeds],
        "num_images_per_prompt": int(settings.num_images_per_prompt),
        "images": list(images),
        "store_dtype": settings.store_dtype,
        "random_weights": bool(settings.random_weights),
        "num_tokens_clip": int(clip_length),
        "num_tokens_t5": T - int(clip_length),
    }
    if result.model_family == "flux":  # T5 only in the sequence: no CLIP tokens to describe
        for key in ("tokens", "special_mask", "token_offsets_clip"):
            del meta[key]
        meta["truncated"] = [{"t5": t.truncated} for t in t5]
    concepts = getattr(result, "concepts", None)
    if concepts is not None:  # ConceptAttention maps (docs/FORMAT.md): concepts, concept_blocks, concept_steps, concept_rule
        meta.update(concepts.metadata())
    meta["mode"] = "image" if settings.image_mode else "generate"
    if settings.image_mode:
        if source is None:
            raise ValueError("an image-mode run needs its source image's record")
        meta["source_image"] = dict(source)
        meta["noise_levels"] = list(settings.noise_levels) if settings.noise_levels is not None else None
        meta["strength"] = settings.strength
    sha = source["sha256"] if source else None
    recorded = settings.recorded(list(prompts)[:: max(1, int(settings.num_images_per_prompt))], base_seed, sha)
    meta[SETTINGS_KEY] = recorded
    meta[FINGERPRINT_KEY] = settings.fingerprint(recorded["prompt"], base_seed, sha)
    if meta["random_weights"]:
        meta["note"] = (f"RANDOM WEIGHTS (--model {settings.model_id}): these maps demonstrate the tool, not "
                        + ("FLUX.1" if result.model_family == "flux" else "SD3.5"))
    return meta


def _offsets(items: Sequence[PromptTokens]):
    if any(it.offsets is None for it in items):
        return None
    return [it.offsets for it in items]


def png_text(metadata: dict) -> dict[str, str]:
    """Text chunks embedded in each PNG: a few readable keys plus the whole metadata as JSON."""
    text = {
        "prompt": " | ".join(metadata["prompt"]),
        "negative_prompt": metadata["negative_prompt"] or "",
        "seed": str(metadata["seed"]),
        "model_id": metadata["model_id"],
        "steps": str(metadata["steps"]),
        "guidance_scale": str(metadata["guidance_scale"]),
        "sd35_attention_metadata": json.dumps(metadata, ensure_ascii=False),
    }
    if metadata.get("random_weights"):
        text["comment"] = metadata["note"]
    return text


def save_image(image, path: str, fmt: str, metadata: Optional[dict], item: int) -> None:
    """Save a PIL image atomically, with the run's metadata embedded unless ``metadata`` is None."""
    from PIL.PngImagePlugin import PngInfo

    with atomic_path(path) as tmp:
        if fmt == "png":
            info = None
            if metadata is not None:
                info = PngInfo()
                for k, v in png_text(metadata).items():
                    info.add_itxt(k, v)
                info.add_itxt("item", str(item))
            image.save(tmp, format="PNG", pnginfo=info)
        else:
            kwargs = {"quality": 95}
            if metadata is not None:
                kwargs["comment"] = json.dumps(metadata, ensure_ascii=False).encode("utf-8")
            image.convert("RGB").save(tmp, format="JPEG", **kwargs)


def write_run(folder: str, arrays: dict, metadata: dict, images: Sequence, image_format: str, embed: bool,
              store_dtype: str) -> None:
    """Write a run folder. metadata.json goes last: a folder with it and the npz is complete.

    Args:
        arrays: ``CaptureResult.arrays()``; maps are cast to ``store_dtype``.
        images: PIL images per batch item (empty with --no-image); names are ``metadata["images"]``.

    Raises:
        WriteError: a file could not be written (no temporary file is left behind).
        NonFiniteMaps: the maps (as stored) hold NaN or infinite values; nothing is written, and an
            earlier run's metadata.json and npz in ``folder`` (a run being redone) are removed.
    """
    stored = {}
    for key, value in arrays.items():
        if key in ("N", "concept_N"):
            stored[key] = np.asarray(value, dtype=np.int64)
        elif key == "timesteps":
            stored[key] = np.asarray(value, dtype=np.float32)
        else:
            stored[key] = np.asarray(value).astype(store_dtype, copy=False)
    refuse_non_finite(folder, stored)  # after the cast: float16 overflows beyond 65504
    try:
        _write_run(folder, stored, metadata, images, image_format, embed)
    except OSError as exc:
        raise WriteError(folder, exc) from exc


def refuse_non_finite(folder: str, arrays: dict) -> None:
    """:func:`check_finite`; when it raises, first remove ``folder``'s metadata.json and npz (an
    earlier run being redone there) so that the failed run's folder never reads as complete.

    Raises:
        NonFiniteMaps, or WriteError when those files cannot be removed.
    """
    try:
        check_finite(arrays)
    except NonFiniteMaps:
        try:
            for name in (METADATA_NAME, NPZ_NAME):
                path = os.path.join(folder, name)
                if os.path.lexists(path):
                    os.unlink(path)
        except OSError as exc:
            raise WriteError(folder, exc) from exc
        raise


def discard_unfinished(folder: str, own_folder: bool) -> list[str]:
    """After a stop (SIGTERM, Ctrl-C) in the middle of a run: unless ``folder`` holds its
    metadata.json (then the run, or the earlier one being redone, is whole), remove what the run left
    there: its npz, its images and the temporary files of both, then ``images/`` and, when
    ``own_folder`` (a run sub-folder, not ``--out`` itself), ``folder`` if they are empty. Other files
    stay. Returns the removed paths."""
    if os.path.lexists(os.path.join(folder, METADATA_NAME)) or not os.path.isdir(folder):
        return []
    removed = remove_temp_files(folder, lambda name: name in (NPZ_NAME, METADATA_NAME))
    images = os.path.join(folder, IMAGES_DIR)
    removed += remove_temp_files(images, lambda name: bool(IMAGE_FILE.fullmatch(name)))
    paths = [os.path.join(folder, NPZ_NAME)]
    if os.path.isdir(images):
        paths += [os.path.join(images, n) for n in sorted(os.listdir(images)) if IMAGE_FILE.fullmatch(n)]
    for path in paths:
        if os.path.isfile(path) and not os.path.islink(path):
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed.append(path)
    for empty in ([images, folder] if own_folder else [images]):
        with contextlib.suppress(OSError):
            os.rmdir(empty)  # only when empty
    return removed


def _write_run(folder, stored, metadata, images, image_format, embed) -> None:
    os.makedirs(os.path.join(folder, IMAGES_DIR) if images else folder, exist_ok=True)
    meta_path = os.path.join(folder, METADATA_NAME)
    if os.path.exists(meta_path):
        os.unlink(meta_path)  # overwriting: the folder is incomplete until the new metadata lands
    for i, (img, rel) in enumerate(zip(images, metadata["images"])):
        save_image(img, os.path.join(folder, rel), image_format, metadata if embed else None, i)
    write_npz(os.path.join(folder, NPZ_NAME), stored)
    write_json(meta_path, metadata)
