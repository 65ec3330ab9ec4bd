"""Loading an SD3-family or FLUX.1 pipeline for the dump command: model ids, devices, dtypes, clear errors."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Optional

from ..contract import UserError

TINY_RANDOM = "tiny-random"
TOY_SHAPES = "toy-shapes"  # trained here by models/toy_shapes/train.py into models/toy_shapes/weights
TINY_RANDOM_FLUX = "tiny-random-flux"
TINY_MODELS = (TINY_RANDOM, TINY_RANDOM_FLUX)

# model_index.json's _class_name -> model family (contract.MODEL_FAMILIES)
_PIPELINE_FAMILIES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}

_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
           "fp32": "float32", "float32": "float32"}


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda", "cuda:1", "mps", "cpu"
    dtype: str  # "bfloat16", "float16", "float32"


def resolve_placement(device: str = "auto", dtype: str = "auto", *, cpu_offload: bool = False) -> Placement:
    """``auto`` device: cuda, then mps, then cpu. ``auto`` dtype: bf16 on CUDA, fp16 on MPS, fp32 on CPU.

    Raises:
        UserError: an unavailable device, an unknown dtype, or ``cpu_offload`` on the CPU.
    """
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (use --device cpu or auto)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise UserError(f"--device {device}: MPS is not available on this machine (use --device cpu or auto)")
    if kind not in ("cuda", "mps", "cpu"):
        raise UserError(f"--device must be auto, cuda, cuda:N, mps or cpu, got {device!r}")
    if dtype == "auto":
        dtype = {"cuda": "bfloat16", "mps": "float16", "cpu": "float32"}[kind]
    elif dtype in _DTYPES:
        dtype = _DTYPES[dtype]
    else:
        raise UserError(f"--dtype must be auto, bf16, fp16 or fp32, got {dtype!r}")
    if cpu_offload and kind == "cpu":
        raise UserError("--cpu-offload needs an accelerator device (cuda or mps), not the CPU")
    return Placement(device, dtype)


def toy_shapes_path() -> str:
    """The toy-shapes pipeline folder (written by its training command)."""
    from ..models.toy_shapes import WEIGHTS_DIR

    return WEIGHTS_DIR


def _local_folder(model: str) -> str:
    """The folder a model reference names (``toy-shapes`` is the committed folder)."""
    return toy_shapes_path() if model == TOY_SHAPES else os.path.expanduser(model)


def check_model_reference(model: str) -> None:
    """Cheap checks before any loading: a folder must exist and be a diffusers pipeline folder."""
    if model in TINY_MODELS:
        return
    if model == TOY_SHAPES:
        if not os.path.isfile(os.path.join(toy_shapes_path(), "model_index.json")):
            raise UserError(
                f"--model {TOY_SHAPES}: its weights are not in {toy_shapes_path()} (not committed yet); train "
                f"them with `python -m attention_map_diffusers.models.toy_shapes.train --out {toy_shapes_path()}`"
            )
        return
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise UserError(
                f"--model {model!r} is a folder but not a diffusers pipeline (no model_index.json); "
                "give the folder saved by pipe.save_pretrained() or a hub id"
            )
        return
    if os.path.exists(path):
        raise UserError(f"--model {model!r} is a file; give a diffusers pipeline folder or a hub id")
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model:
        raise UserError(f"--model {model!r}: no such folder")


@dataclass(frozen=True)
class Geometry:
    """The image sizes a model accepts, read from its configs."""

    multiple: int  # sizes must be a multiple of this: VAE scale factor x patch size
    max_size: Optional[int]  # the largest height and width in pixels (pos_embed_max_size patches), None: no limit

    def check(self, height: int, width: int, where: str = "") -> None:
        """Raises UserError for a size the model refuses (``where``: e.g. " for this model")."""
        for flag, value in (("--height", height), ("--width", width)):
            if value < 1 or value % self.multiple:
                raise UserError(f"{flag} must be a positive multiple of {self.multiple}{where}, got {value}")
            if self.max_size is not None and value > self.max_size:
                raise UserError(
                    f"{flag} {value} is larger than this model accepts: at most {self.max_size} pixels "
                    f"(its pos_embed_max_size x {self.multiple}); choose a smaller size"
                )


def is_flux_config(transformer: dict) -> bool:
    """A FLUX.1 transformer config (single-stream blocks)."""
    return "num_single_layers" in transformer


def geometry_from_configs(vae: dict, transformer: dict) -> Geometry:
    """:class:`Geometry` from a pipeline's ``vae/config.json`` and ``transformer/config.json`` contents.

    FLUX.1 packs 2x2 latents into one token (its transformer's own patch_size is 1)."""
    patch = 2 if is_flux_config(transformer) else int(transformer.get("patch_size", 2))
    multiple = 2 ** (len(vae["block_out_channels"]) - 1) * patch
    max_patches = transformer.get("pos_embed_max_size")
    return Geometry(multiple, int(max_patches) * multiple if max_patches else None)


def model_geometry(model: str) -> Optional[Geometry]:
    """The model's :class:`Geometry` when it can be read without loading weights (``tiny-random``,
    ``toy-shapes``, a local folder, a hub id whose configs are in the local cache); None otherwise."""
    if model == TINY_RANDOM:
        from ..models.tiny import demo_config

        cfg = demo_config()
        multiple = 2 ** (len(cfg.vae_block_out_channels) - 1) * cfg.patch_size
        return Geometry(multiple, cfg.pos_embed_max_size * multiple)
    if model == TINY_RANDOM_FLUX:
        from ..models.tiny_flux import TinyFluxConfig

        return Geometry(2 ** (len(TinyFluxConfig().vae_block_out_channels) - 1) * 2, None)
    configs = _vae_and_transformer_configs(model, cached=True)
    try:
        return geometry_from_configs(*configs) if configs else None
    except (ValueError, KeyError, TypeError):
        return None


def _vae_and_transformer_configs(model: str, *, cached: bool) -> Optional[tuple[dict, dict]]:
    """The contents of ``vae/config.json`` and ``transformer/config.json`` of a local folder (and, with
    ``cached``, of a hub id in the local cache), or None when they cannot be read."""
    path = _local_folder(model)
    if os.path.isdir(path):
        files = [os.path.join(path, sub, "config.json") for sub in ("vae", "transformer")]
    elif cached:
        files = [_cached_config(model, sub) for sub in ("vae", "transformer")]
        if None in files:
            return None
    else:
        return None
    try:
        configs = []
        for name in files:
            with open(name, encoding="utf-8") as fh:
                configs.append(json.load(fh))
    except (OSError, ValueError):
        return None
    return configs[0], configs[1]


def _cached_config(model: str, sub: str, name: str = "config.json") -> Optional[str]:
    """The path of ``{sub}/{name}`` of hub id ``model`` in the local cache (no network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, f"{sub}/{name}" if sub else name)
    except Exception:  # noqa: BLE001 - an odd id or cache: the check after loading still runs
        return None
    return found if isinstance(found, str) else None


def model_num_blocks(model: str) -> Optional[int]:
    """The number of joint transformer blocks (``transformer_blocks``: the transformer config's
    ``num_layers``) when it can be read without loading weights (``tiny-random``, a local folder, a
    hub id whose configs are in the local cache); None otherwise."""
    if model == TINY_RANDOM:
        from ..models.tiny import demo_config

        return demo_config().num_layers
    if model in TINY_MODELS:
        return None  # FLUX.1: no skip-layer guidance to check
    configs = _vae_and_transformer_configs(model, cached=True)
    try:
        return int(configs[1]["num_layers"]) if configs else None
    except (ValueError, KeyError, TypeError):
        return None


def native_size(model: str) -> Optional[tuple[int, int]]:
    """(height, width) the model was trained at, when it can be read without loading weights: the
    transformer's ``sample_size`` (latent patches x patch size) times the VAE's scale factor, as the
    pipeline's own default. None for ``tiny-random`` (random weights have no native size) and hub ids."""
    configs = None if model in TINY_MODELS else _vae_and_transformer_configs(model, cached=False)
    if configs is None:
        return None
    vae, transformer = configs
    try:
        side = int(transformer["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (ValueError, KeyError, TypeError):
        return None
    return (side, side)


def native_max_sequence_length(model: str) -> Optional[int]:
    """The T5 length a model was trained with, when its folder records it (``tokenizer_3``'s
    ``model_max_length``, as toy-shapes does); None otherwise (SD3's own folders say 512 there,
    which is the tokenizer's limit, not a training length, so hub ids and tiny-random get None)."""
    if model != TOY_SHAPES:
        return None
    try:
        with open(os.path.join(toy_shapes_path(), "tokenizer_3", "tokenizer_config.json"), encoding="utf-8") as fh:
            return int(json.load(fh)["model_max_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def model_family(model: str) -> Optional[str]:
    """"sd3" or "flux" when it can be told without loading weights (the tiny models, a local folder or
    a cached hub id: model_index.json's pipeline class); None otherwise (told after loading)."""
    if model in TINY_MODELS:
        return "flux" if model == TINY_RANDOM_FLUX else "sd3"
    path = _local_folder(model)
    name = os.path.join(path, "model_index.json") if os.path.isdir(path) else _cached_config(model, "model_index.json", "")
    if not name:
        return None
    try:
        with open(name, encoding="utf-8") as fh:
            return _PIPELINE_FAMILIES.get(json.load(fh).get("_class_name"))
    except (OSError, ValueError, AttributeError):
        return None


def guess_family(model: str) -> Optional[str]:
    """:func:`model_family`, else "flux" for a hub id whose name says FLUX (e.g. black-forest-labs/FLUX.1-dev)
    and None (not known before loading) for any other."""
    family = model_family(model)
    if family is None and "flux" in model.rsplit("/", 1)[-1].lower():
        family = "flux"
    return family


def pipeline_family(pipe) -> str:
    """"flux" for a FLUX.1 pipeline (single-stream blocks), else "sd3"."""
    return "flux" if hasattr(getattr(pipe, "transformer", None), "single_transformer_blocks") else "sd3"


def load_pipeline(model: str, placement: Placement, *, cpu_offload: bool = False, tiny_config=None):
    """Load ``model`` (hub id, local folder, ``tiny-random``, ``tiny-random-flux`` or ``toy-shapes``) as a
    ``StableDiffusion3Pipeline`` or a ``FluxPipeline``.

    Raises:
        UserError: unknown id or folder, gated model without a token, neither an SD3 nor a FLUX.1 pipeline.
    """
    import torch
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    dtype = getattr(torch, placement.dtype)
    check_model_reference(model)
    if model in TINY_MODELS:
        if model == TINY_RANDOM:
            from ..models.tiny import build_tiny_sd3_pipeline, demo_config

            pipe = build_tiny_sd3_pipeline(tiny_config or demo_config())  # float32
        else:
            from ..models.tiny_flux import TinyFluxConfig, build_tiny_flux_pipeline

            pipe = build_tiny_flux_pipeline(tiny_config or TinyFluxConfig())  # float32
        if dtype != torch.float32:
            from diffusers.utils import logging as dlog

            level = dlog.get_verbosity()
            dlog.set_verbosity_error()  # the "keep in float32" notice does not apply to random weights
            try:
                pipe = pipe.to(dtype=dtype)
            finally:
                dlog.set_verbosity(level)
    elif model == TOY_SHAPES:
        pipe = _from_pretrained(StableDiffusion3Pipeline, toy_shapes_path(), dtype)
    else:
        # a hub id not in the cache: its name decides (FLUX.1 ids say "flux"); the type is checked after
        cls = FluxPipeline if guess_family(model) == "flux" else StableDiffusion3Pipeline
        pipe = _from_pretrained(cls, model, dtype)
    if cpu_offload:  # resolve_placement(..., cpu_offload=True) refused the CPU
        pipe.enable_model_cpu_offload(device=placement.device)
    else:
        pipe = pipe.to(placement.device)
    return pipe


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """Hold library loggers at ERROR (their retry notices would bury our one-line error)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _gated_message(model: str) -> str:
    return (
        f"--model {model!r} is a gated model: accept its license on https://huggingface.co/{model}, "
        "then log in with `huggingface-cli login` (or set HF_TOKEN) and run again"
    )


def _from_pretrained(cls, model: str, dtype):
    try:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:  # older huggingface_hub
        from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError  # type: ignore

    try:
        with warnings.catch_warnings(), _quiet_loggers("diffusers", "huggingface_hub"):
            # diffusers >= 0.36 prefers `dtype=`; `torch_dtype=` works on every supported version
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = cls.from_pretrained(os.path.expanduser(model), torch_dtype=dtype)
    except GatedRepoError:
        raise UserError(_gated_message(model)) from None
    except RepositoryNotFoundError:
        raise UserError(f"--model {model!r}: no such model on the Hugging Face hub (check the id)") from None
    except (OSError, ValueError, TypeError) as exc:
        text = str(exc)
        # diffusers re-raises some hub errors as EnvironmentError with the reason in the text
        if "gated" in text.lower() or "401" in text:
            raise UserError(_gated_message(model)) from None
        if "cached" in text or "outgoing traffic" in text or "connect" in text.lower():
            raise UserError(
                f"--model {model!r} is not a local folder, not in the local cache, and the Hugging Face hub "
                "could not be reached: check the id and your network (or HF_HUB_OFFLINE), or give a local folder"
            ) from None
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        if len(first) > 300:
            first = first[:300] + "..."
        raise UserError(f"--model {model!r} could not be loaded: {first}") from None
    if not hasattr(pipe, "transformer") or not hasattr(pipe.transformer, "transformer_blocks"):
        raise UserError(f"--model {model!r} is a {type(pipe).__name__}, not an SD3 / SD3.5 or FLUX.1 pipeline")
    if pipeline_family(pipe) == "flux" and not isinstance(pipe, _flux_pipeline_class()):
        raise UserError(f"--model {model!r} is a {type(pipe).__name__}: of FLUX.1 only the text-to-image "
                        "FluxPipeline is supported (Kontext / FLUX.2 feed reference-image tokens)")
    return pipe


def _flux_pipeline_class():
    from diffusers import FluxPipeline

    return FluxPipeline
