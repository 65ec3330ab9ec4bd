"""The dump command (``sd_35_stepavg_dump.py``, ``sd35-stepavg-dump``): flags -> RunSettings -> run folders.

Generate images with Stable Diffusion 3 / 3.5 and dump step-averaged image->text attention. Each run
(one pipeline call) writes a folder with ``stepavg_token_maps_v1.npz``, ``metadata.json`` and
``images/`` (format: docs/FORMAT.md); ``analyse_stepavg.py`` reads it without the model.

    python sd_35_stepavg_dump.py --prompt "A furry cat beneath a table" --steps 28
    python sd_35_stepavg_dump.py --model tiny-random --steps 8 --height 512 --width 512   # no GPU
    accelerate launch sd_35_stepavg_dump.py --prompts-file prompts.txt --seed 1 2 3      # many GPUs
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Optional

# torch-free imports only here, so that --help and bad input answer at once
from ..cli import OneLineParser, fail, parse
from ..atomic import remove_temp_files
from ..contract import (
    IMAGES_DIR,
    METADATA_NAME,
    NPZ_NAME,
    RUN_STATUSES,
    RUNS_NAME,
    RunRecord,
    UserError,
    read_runs_jsonl,
)
from .interrupts import Interrupted, interrupts
from .journal import PART_RE, RunsJournal, remove_leftovers
from .loading import (
    TINY_MODELS,
    Geometry,
    check_model_reference,
    load_pipeline,
    guess_family,
    model_geometry,
    model_num_blocks,
    native_max_sequence_length,
    native_size,
    pipeline_family,
    resolve_placement,
)
from .resume import COMPLETE, OTHER, REDO, check_out_kind, existing_run, refuse_other_settings
from .runs import plan_image_runs, plan_runs, read_prompts_file
from ..capture.concept_names import CONCEPT_RULES, MAX_CONCEPTS
from .concept_checks import check_concept_flags, check_concepts_on_model
from .source_images import check_noise_levels, open_checked, pair_images, read_images_csv
from .settings import RunSettings

PROG = "sd_35_stepavg_dump.py"
DEFAULT_PROMPT = "A furry cat beneath a table"
DEFAULT_MODEL = "stabilityai/stable-diffusion-3.5-medium"
DEFAULT_NOISE_LEVELS = (0.3, 0.5, 0.7)
T5_MAX_LENGTH = 512  # the longest T5 sequence SD3 pipelines accept
DEFAULT_SIZE = 1024  # the original tool's --height / --width, for models whose native size is unknown
DEFAULT_T5_LENGTH = 256  # the pipeline's max_sequence_length default
DEFAULT_SEED = 42
# what torch.Generator.manual_seed accepts (negative seeds wrap around)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_STEPS = 1000  # the flow-matching schedulers' training timesteps: more steps repeat them
MAX_BATCH_ITEMS = 64  # images per pipeline call (prompts per run x images per prompt)


class _Extend(argparse.Action):
    """``nargs="+"`` values that add up over repeated flags and replace the default (argparse's own
    "extend" action appends to a list default instead)."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, (current if current is not self.default else []) + list(values))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        allow_abbrev=False,
        description="Generate images with an SD3 / SD3.5 or FLUX.1 pipeline and record where each text token is "
        "attended to, per denoising step and per transformer block (exact, streaming capture).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("generation (flags of the original tool)")
    g.add_argument("--prompt", action="append", default=None,
                   help=f"prompt; repeat the flag for several prompts (default: {DEFAULT_PROMPT!r})")
    g.add_argument("--neg", "--negative-prompt", dest="neg", default="", help="negative prompt")
    g.add_argument("--steps", type=int, default=50, help=f"number of denoising steps (at most {MAX_STEPS})")
    g.add_argument("--guidance_scale", "--guidance-scale", dest="guidance_scale", type=float, default=7.5,
                   help="SD3: classifier-free guidance scale, <= 1 disables CFG (e.g. SD3.5 large turbo); "
                   "FLUX.1-dev: the distilled guidance embedding (e.g. 3.5; schnell ignores it)")
    g.add_argument("--true-cfg-scale", type=float, default=1.0,
                   help="FLUX.1 only: > 1 with --neg runs true classifier-free guidance, a second transformer "
                   "call per step on the negative prompt (not recorded)")
    g.add_argument("--seed", type=int, nargs="+", action=_Extend, default=[DEFAULT_SEED],
                   help="seed(s), as several values or repeated flags; each seed is one run per prompt batch; "
                   "image j of a prompt uses seed + j")
    g.add_argument("--height", type=int, default=None,
                   help="image height in pixels (multiple of 16); default: the model's native size (its "
                   "transformer's sample_size, e.g. 1024 for SD3.5) when its folder says, else 1024")
    g.add_argument("--width", type=int, default=None,
                   help="image width in pixels (multiple of 16); default: as --height")
    g.add_argument("--out", default="out_sd35_stepavg",
                   help="output folder: the run folder itself for one run, else one sub-folder per run")

    m = p.add_argument_group("model and device")
    m.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id or local diffusers folder (SD3 / SD3.5, or FLUX.1 e.g. "
                   "black-forest-labs/FLUX.1-dev); 'tiny-random' / 'tiny-random-flux' build a tiny "
                   "random-weight SD3 / FLUX.1 pipeline offline (demonstrates the flow in seconds, no GPU, "
                   "no download)")
    m.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    m.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp16 on MPS, fp32 on CPU), bf16, fp16, fp32")
    m.add_argument("--cpu-offload", action="store_true",
                   help="enable_model_cpu_offload(): keep only the active model on the GPU (less memory)")
    m.add_argument("--max-sequence-length", type=int, default=None,
                   help=f"T5 tokens (at most {T5_MAX_LENGTH}); the text length T is 77 + this for SD3, this for "
                   "FLUX.1; default: the length the model was trained with when its folder records it "
                   "(toy-shapes), else 256")
    m.add_argument("--skip-guidance-layers", type=int, nargs="+", action=_Extend, default=None, metavar="I",
                   help="SD3 / SD3.5 only: skip-layer guidance on these transformer blocks (e.g. 7 8 9 for SD3.5 medium), "
                   "each once and below the model's number of blocks (checked before loading when the model is "
                   "a local folder or its config is in the Hugging Face cache); its extra transformer call is not "
                   "recorded")

    c = p.add_argument_group("capture and files")
    c.add_argument("--canonical-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="grid of the aggregated maps, at most the image size (--height --width) (default: the "
                   "latent patch grid, e.g. 64 64 at 1024px)")
    c.add_argument("--store-dtype", choices=("float16", "float32"), default="float16",
                   help="dtype of the stored maps (accumulation is always float32)")
    c.add_argument("--save-block-maps", action="store_true",
                   help="also store per_block_token_map (B, blocks, Hc, Wc, T) (with --concepts also "
                   "concept_per_block_map (B, blocks, Hc, Wc, C))")
    c.add_argument("--save-step-maps", action="store_true",
                   help="also store per_step_token_map (B, steps, Hc, Wc, T) (with --concepts also "
                   "concept_per_step_map (B, steps, Hc, Wc, C)); always on in --image mode with noise levels")
    c.add_argument("--no-image", action="store_true", help="do not decode or save images")
    c.add_argument("--image-format", choices=("png", "jpg"), default="png", help="image file format")
    c.add_argument("--no-embed-metadata", action="store_true",
                   help="do not embed the run's metadata in the images (PNG text chunks / JPEG comment)")
    c.add_argument("--overwrite", action="store_true",
                   help="redo runs whose folder is already complete, or was made with other settings "
                   "(default: skip complete runs, i.e. resume, and refuse folders made with other settings)")

    i = p.add_argument_group(
        "attention on given images (SD3 / SD3.5 and FLUX.1; instead of generating)",
        "Each image is resized to cover --height x --width (default: the model's native size; bicubic, aspect "
        "ratio kept) and its centre is cropped to it (metadata 'source_image' records the crop box); the run's "
        "steps are the noise levels, noisiest first, and the analysis reads the folder like any other.")
    i.add_argument("--image", nargs="+", action=_Extend, default=None, metavar="PATH",
                   help="image file(s) (PNG, JPEG, ...; alpha is composited over white); with one --prompt for all "
                   "images, or one --prompt (or --prompts-file line) per image in order")
    i.add_argument("--images-csv", default=None, metavar="FILE",
                   help="UTF-8 CSV with a header line and the columns image,prompt (paths relative to the CSV's folder)")
    i.add_argument("--noise-levels", type=float, nargs="+", default=None, metavar="SIGMA",
                   help="flow-matching noise levels in [0, 1]: the image latent x0 becomes (1 - sigma) x0 + sigma "
                   "noise (one noise per image, from --seed) and the transformer runs once per level "
                   f"(default with --image: {' '.join(map(str, DEFAULT_NOISE_LEVELS))}); per-level maps are kept")
    i.add_argument("--timesteps", type=float, nargs="+", default=None, metavar="T",
                   help="the same levels as timesteps in [0, 1000] (timestep = 1000 x sigma)")
    i.add_argument("--strength", type=float, default=None, metavar="S",
                   help="instead of noise levels: img2img (StableDiffusion3Img2ImgPipeline; SD3 / SD3.5 only) from "
                   "level S in (0, 1], "
                   "int(--steps x S) denoising steps recorded like generation; the run's image is the output")

    k = p.add_argument_group(
        "concept maps (ConceptAttention, docs/concepts.md)",
        "Each concept (its first T5 token) runs through the text stream's weights of every joint block in its own "
        "stream; its map is the softmax over the concepts of the dot product of image and concept attention outputs, "
        "per image token. The image is unchanged. Stored beside the word maps (docs/FORMAT.md: concept_*).")
    k.add_argument("--concepts", nargs="+", action=_Extend, default=None, metavar="WORD",
                   help=f"concepts to map, e.g. cat table sky background (1 to {MAX_CONCEPTS}, distinct "
                   "case-insensitively); each adds one token to a side stream and 4 x (Hc x Wc + blocks x steps) "
                   "bytes of state per image (SD3.5 large, 1024px, 50 steps: 24 KB)")
    k.add_argument("--concept-blocks", type=int, nargs="+", action=_Extend, default=None, metavar="I",
                   help="joint blocks (indices into 'blocks') averaged into the map; default: FLUX.1 the last four "
                   "joint blocks (as upstream, 15-18 of 19), SD3 / SD3.5 all joint blocks")
    k.add_argument("--concept-steps", type=int, nargs="+", action=_Extend, default=None, metavar="S",
                   help="step indices (0 = first, noisiest; with --image the noise levels) averaged into the map; "
                   "default: all")
    k.add_argument("--concept-rule", choices=tuple(CONCEPT_RULES), default=None,
                   help="keys the concept queries attend to: "
                   + "; ".join(f"{name}: {text}" for name, text in CONCEPT_RULES.items())
                   + " (default: concept)")

    r = p.add_argument_group("several runs")
    r.add_argument("--prompts-file", default=None,
                   help="UTF-8 text file, one prompt per line (blank lines and lines starting with # ignored)")
    r.add_argument("--batch-size", type=int, default=1,
                   help=f"prompts per pipeline call (one run); prompts x images per prompt: at most {MAX_BATCH_ITEMS}")
    r.add_argument("--num-images-per-prompt", type=int, default=1,
                   help=f"images per prompt in each run (at most {MAX_BATCH_ITEMS} images per run in all)")
    return p


def _check_out(out: str) -> None:
    if not out.strip():
        raise UserError(f"--out {out!r} names no folder (it would write into the current one); give a folder name")
    _check_text("--out", out)  # the analysis writes it into its tables and pages as UTF-8
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out!r} is an existing file; give a folder")
    probe = os.path.abspath(out)
    while not os.path.exists(probe):
        if os.path.islink(probe):
            raise UserError(
                f"--out {out!r}: {probe!r} is a symbolic link to {os.readlink(probe)!r}, which does not exist; "
                "create its target or give another --out"
            )
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"--out {out!r} cannot be created: {probe!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--out {out!r} is not writable (no write permission on {probe!r})")


def _check_text(flag: str, text: str) -> None:
    """Text that cannot be written as UTF-8: a byte the shell could not decode arrives as a lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(
            f"{flag} {ascii(text[:40])} is not valid UTF-8 text (an undecodable byte at character {exc.start}); "
            + ("give a folder name that is valid UTF-8" if flag == "--out" else
               "check the terminal's encoding, or put the prompts in a UTF-8 --prompts-file")
        ) from None


def _seeds(args) -> list[int]:
    seeds = list(args.seed)
    dup = next((s for i, s in enumerate(seeds) if s in seeds[:i]), None)
    if dup is not None:
        raise UserError(f"--seed {dup} is given twice; each seed is a run, give each once")
    last = args.num_images_per_prompt - 1  # image j of a prompt uses seed + j
    for s in seeds:
        if s < SEED_MIN or s + last > SEED_MAX:
            extra = f" (image j of a prompt uses seed + j, up to + {last})" if last else ""
            raise UserError(
                f"--seed {s} is outside what torch.Generator.manual_seed accepts: {SEED_MIN} to {SEED_MAX}{extra}"
            )
    return seeds


def _validate(args, jobs: Optional[list] = None) -> tuple[list[str], list[int], RunSettings]:
    """Checks that need no model. Returns the prompts, the seeds and the settings. Raises UserError.

    ``jobs``: image mode's (image, prompt) pairs, whose prompts :func:`_validate_images` read and checked."""
    _check_text("--model", args.model)
    check_model_reference(args.model)
    native = native_size(args.model)
    if args.height is None:
        args.height = native[0] if native else DEFAULT_SIZE
    if args.width is None:
        args.width = native[1] if native else DEFAULT_SIZE
    if args.max_sequence_length is None:
        args.max_sequence_length = native_max_sequence_length(args.model) or DEFAULT_T5_LENGTH

    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--num-images-per-prompt", args.num_images_per_prompt)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.steps > MAX_STEPS:
        raise UserError(f"--steps must be at most {MAX_STEPS} (the scheduler's training timesteps), got {args.steps}")
    if args.num_images_per_prompt > MAX_BATCH_ITEMS:
        raise UserError(f"--num-images-per-prompt must be at most {MAX_BATCH_ITEMS}, got {args.num_images_per_prompt}")
    if not math.isfinite(args.guidance_scale):
        raise UserError(f"--guidance-scale must be a finite number, got {args.guidance_scale}")
    seeds = _seeds(args)
    (model_geometry(args.model) or Geometry(16, None)).check(args.height, args.width)
    if not 1 <= args.max_sequence_length <= T5_MAX_LENGTH:
        raise UserError(f"--max-sequence-length must be between 1 and {T5_MAX_LENGTH}, got {args.max_sequence_length}")
    if args.canonical_size is not None and min(args.canonical_size) < 1:
        raise UserError(f"--canonical-size must be two positive integers H W, got {args.canonical_size}")
    if args.canonical_size is not None and (args.canonical_size[0] > args.height or args.canonical_size[1] > args.width):
        raise UserError(f"--canonical-size {args.canonical_size[0]} {args.canonical_size[1]} is finer than the image "
                        f"({args.height} x {args.width} pixels): give at most the image size")
    if not math.isfinite(args.true_cfg_scale) or args.true_cfg_scale < 1:
        raise UserError(f"--true-cfg-scale must be a finite number >= 1, got {args.true_cfg_scale}")
    family = guess_family(args.model)
    if family is not None:
        check_family_flags(family, args.skip_guidance_layers, args.true_cfg_scale)
    check_skip_layers(args.skip_guidance_layers, model_num_blocks(args.model))
    _check_text("--neg", args.neg)
    if jobs is not None:
        prompts = [job.prompt for job in jobs]
    else:
        prompts = list(args.prompt or [])
        for p in prompts:
            _check_text("--prompt", p)
        if args.prompts_file:
            prompts += read_prompts_file(args.prompts_file)
            if not prompts:
                raise UserError(f"--prompts-file {args.prompts_file!r} holds no prompt (only blank or # lines)")
        elif not prompts:
            prompts = [DEFAULT_PROMPT]
        if any(not p.strip() for p in prompts):
            raise UserError("empty prompt: every --prompt must have some text")
    items = min(args.batch_size, len(prompts)) * args.num_images_per_prompt
    if items > MAX_BATCH_ITEMS:
        raise UserError(f"--batch-size {args.batch_size} x --num-images-per-prompt {args.num_images_per_prompt} makes "
                        f"{items} images per pipeline call; at most {MAX_BATCH_ITEMS}: lower one of them")
    check_concept_flags(args)
    _check_out(args.out)
    return prompts, seeds, settings_from_args(args)


def _validate_images(args) -> Optional[list]:
    """Image mode's checks (before the model loads). Returns the (image, prompt) jobs, or None
    without --image / --images-csv. Sets ``args.noise_levels`` to the levels used."""
    given = args.image is not None or args.images_csv is not None
    levels = check_noise_levels(args.noise_levels, args.timesteps)
    if not given:
        for flag, value in (("--noise-levels", args.noise_levels), ("--timesteps", args.timesteps),
                            ("--strength", args.strength)):
            if value is not None:
                raise UserError(f"{flag} applies to given images: add --image (or --images-csv)")
        return None
    if args.image is not None and args.images_csv is not None:
        raise UserError("give --image or --images-csv, not both")
    if guess_family(args.model) == "flux" and args.strength is not None:
        raise UserError("--strength (img2img) supports SD3 / SD3.5 for now, not FLUX.1: use --noise-levels")
    if args.true_cfg_scale != 1.0:
        raise UserError(f"--true-cfg-scale applies to generation; with --image FLUX.1 takes its guidance embedding from "
                        f"--guidance-scale (got --true-cfg-scale {args.true_cfg_scale:g})")
    for flag, value in (("--batch-size", args.batch_size), ("--num-images-per-prompt", args.num_images_per_prompt)):
        if value != 1:
            raise UserError(f"{flag} applies to generation; with --image each run is one image (got {value})")
    if args.strength is not None:
        if levels is not None:
            raise UserError("--strength (img2img) and --noise-levels / --timesteps are two ways of noising the image: "
                            "give one")
        if not (math.isfinite(args.strength) and 0 < args.strength <= 1):
            raise UserError(f"--strength must lie in (0, 1], got {args.strength}")
        if int(args.steps * args.strength) < 1:
            raise UserError(f"--strength {args.strength} with --steps {args.steps} runs no denoising step "
                            f"(int(steps x strength) = 0); raise one of them")
    else:
        levels = levels or tuple(sorted(DEFAULT_NOISE_LEVELS, reverse=True))
        args.save_step_maps = True  # one map per level: what the segmentation evaluation selects from
        args.steps = len(levels)
    args.noise_levels = levels
    if args.images_csv is not None:
        if args.prompt or args.prompts_file:
            raise UserError("--images-csv holds the prompts: leave out --prompt / --prompts-file")
        jobs = read_images_csv(args.images_csv)
    else:
        for path in args.image:
            _check_text("--image", path)
        prompts = list(args.prompt or [])
        if args.prompts_file:
            prompts += read_prompts_file(args.prompts_file)
        if not prompts:
            raise UserError("--image needs the prompt(s) to read the image with: --prompt (one for all images, or one "
                            "per image) or --prompts-file")
        jobs = pair_images(list(args.image), prompts)
    for job in jobs:
        _check_text("--prompt", job.prompt)
        if not job.prompt.strip():
            raise UserError(f"empty prompt for image {job.path!r}")
        open_checked(job.path)  # unreadable, too small, wrong mode: refused before the model loads
    return jobs


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    """The parsed flags as :class:`RunSettings`."""
    return RunSettings(
        model_id=args.model,
        negative_prompt=args.neg,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        max_sequence_length=args.max_sequence_length,
        skip_guidance_layers=tuple(args.skip_guidance_layers) if args.skip_guidance_layers else None,
        true_cfg_scale=args.true_cfg_scale,
        num_images_per_prompt=args.num_images_per_prompt,
        canonical_size=tuple(args.canonical_size) if args.canonical_size else None,
        store_dtype=args.store_dtype,
        save_block_maps=args.save_block_maps,
        save_step_maps=args.save_step_maps,
        save_image=not args.no_image,
        image_format=args.image_format,
        embed_metadata=not args.no_embed_metadata,
        random_weights=args.model in TINY_MODELS,
        noise_levels=args.noise_levels if args.strength is None else None,
        strength=args.strength,
        concepts=tuple(args.concepts) if args.concepts else None,
        concept_blocks=tuple(args.concept_blocks) if args.concept_blocks is not None else None,
        concept_steps=tuple(args.concept_steps) if args.concept_steps is not None else None,
        concept_rule=args.concept_rule or "concept",
    )


def check_skip_layers(layers, n_blocks: Optional[int]) -> None:
    """--skip-guidance-layers: block indices >= 0, each once, below ``n_blocks`` when it is known.
    Raises UserError."""
    if layers is None:
        return
    if min(layers) < 0:
        raise UserError(f"--skip-guidance-layers must be block indices >= 0, got {layers}")
    dup = next((i for k, i in enumerate(layers) if i in layers[:k]), None)
    if dup is not None:
        raise UserError(f"--skip-guidance-layers: block {dup} is given twice, got {list(layers)}; give each block once")
    if n_blocks is not None and max(layers) >= n_blocks:
        raise UserError(f"--skip-guidance-layers: this model has blocks 0..{n_blocks - 1}, got {list(layers)}")


def check_family_flags(family: str, skip_guidance_layers, true_cfg_scale: float) -> None:
    """Refuse the flags that do not apply to the model family. Raises UserError."""
    if family == "flux" and skip_guidance_layers:
        raise UserError("--skip-guidance-layers applies to SD3 / SD3.5 only: FLUX.1 has no skip-layer guidance "
                        "(leave the flag out)")
    if family == "sd3" and true_cfg_scale != 1.0:
        raise UserError(f"--true-cfg-scale applies to FLUX.1 only, got {true_cfg_scale}: SD3 / SD3.5 take "
                        "classifier-free guidance from --guidance-scale")


def _check_model_limits(pipe, settings: RunSettings) -> None:
    """The checks that need the loaded model (a hub id whose configs were not in the cache)."""
    family = pipeline_family(pipe)
    check_family_flags(family, settings.skip_guidance_layers, settings.true_cfg_scale)
    if settings.image_mode and family == "flux" and settings.strength is not None:
        raise UserError("--strength (img2img) supports SD3 / SD3.5 for now, not FLUX.1: use --noise-levels")
    patch = 2 if family == "flux" else int(pipe.transformer.config.patch_size)  # FLUX.1 packs 2x2 latents
    multiple = int(pipe.vae_scale_factor) * patch
    max_patches = getattr(pipe.transformer.config, "pos_embed_max_size", None)
    Geometry(multiple, int(max_patches) * multiple if max_patches else None).check(
        settings.height, settings.width, " for this model")
    check_concepts_on_model(pipe, settings.concepts, settings.concept_blocks)
    check_skip_layers(settings.skip_guidance_layers, len(pipe.transformer.transformer_blocks))


def main(argv=None) -> int:
    args, code = parse(build_parser(), argv)
    if args is None:
        return code
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    t_start = time.perf_counter()
    try:
        jobs = _validate_images(args)
        prompts, seeds, settings = _validate(args, jobs)
        runs = plan_image_runs(jobs, seeds) if jobs is not None else plan_runs(prompts, seeds, args.batch_size)
        check_out_kind(args.out, single=len(runs) == 1)
    except UserError as exc:
        return fail(PROG, str(exc))

    from accelerate import PartialState

    try:
        placement = resolve_placement(args.device, args.dtype, cpu_offload=args.cpu_offload)
        state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by accelerate launch / torchrun
            on_cpu = placement.device.startswith("cpu")
            state = PartialState(cpu=on_cpu)
            if not on_cpu and ":" not in placement.device:  # one GPU per process
                placement = resolve_placement(str(state.device), args.dtype, cpu_offload=args.cpu_offload)
    except UserError as exc:
        return fail(PROG, str(exc))

    def folder_of(run):
        return os.path.join(args.out, run.folder) if run.folder else args.out

    # What the folders hold, decided before the model loads. Every process looks at every run so
    # that all of them refuse alike.
    existing = {} if args.overwrite else {r.index: existing_run(folder_of(r), settings, r) for r in runs}
    try:
        refuse_other_settings(args.out, [(folder_of(r), existing[r.index]) for r in runs
                                         if not args.overwrite and existing[r.index].state == OTHER])
    except UserError as exc:
        return fail(PROG, str(exc))

    def complete(run) -> bool:
        return not args.overwrite and existing[run.index].state == COMPLETE

    if state is not None:
        with state.split_between_processes(runs) as share:
            my_runs = list(share)
    else:
        my_runs = runs
    todo = [r for r in my_runs if not complete(r)]
    for r in todo:
        found = existing.get(r.index)
        if found is not None and found.state == REDO and found.reason:
            print(f"warning: {folder_of(r)}: {found.reason}; the run is done again", file=sys.stderr)
    # With several processes, all of them load the model when any run is left, so that a load error
    # stops every process alike instead of leaving some waiting for the others.
    need_model = bool(todo) or (state is not None and not all(complete(r) for r in runs))
    process = state.process_index if state is not None else 0
    journal = RunsJournal(args.out, [r.folder for r in runs], process, state.num_processes if state else 1,
                          write=len(runs) > 1)
    for r in my_runs:
        if complete(r):
            journal.record(_record(r, "skipped", process), flush=False)

    with interrupts():
        try:
            paths_used: list[str] = []  # the capture paths of this process's runs, each once
            code = _execute(args, settings, placement, state, len(runs), todo, need_model, journal,
                            [folder_of(r) for r in my_runs], folder_of, paths_used)
        except Interrupted as exc:
            if journal.started:  # before the runs start, runs.jsonl is left as it was
                journal.flush()
            if journal.write:
                done = sum(1 for r in journal.records.values() if r.status == "done")
                message = (f"interrupted by {exc.name}: {done} run(s) finished here and are listed in "
                           f"{os.path.join(args.out, RUNS_NAME)}; run the same command again to do the rest")
            else:
                message = f"interrupted by {exc.name} before the run finished; run the same command again to do it"
            return fail(PROG, message, exc.exit_code)
    if code is not None:
        return code

    if journal.failed_write is not None:
        print(f"warning: could not write {os.path.join(args.out, RUNS_NAME)}: "
              f"{journal.failed_write.strerror or journal.failed_write}", file=sys.stderr)
    if state is None or state.is_main_process:
        listed = list(journal.records.values())
        if state is not None:  # the main process counts every process's runs, from runs.jsonl
            try:
                listed = read_runs_jsonl(os.path.join(args.out, RUNS_NAME))
            except UserError:
                pass
        counts = {s: sum(1 for r in listed if r.status == s) for s in RUN_STATUSES}
        via = f"; attention captured through {', '.join(paths_used)} (metadata capture_path)" if paths_used else ""
        print(f"{counts['done']} run(s) written, {counts['skipped']} skipped (already complete), "
              f"{counts['failed']} failed; output in {args.out} ({time.perf_counter() - t_start:.1f} s){via}")
        return 1 if counts["failed"] else 0
    return 0


def _record(run, status: str, process: int, error=None) -> RunRecord:
    return RunRecord(run.index, run.folder or ".", tuple(run.prompts), run.seed, status, error, process)


def _tidy(out: str, folders: list[str], is_main: bool) -> None:
    """Remove what a killed command left: temporary files in the run folders (this process's) and,
    on the main process, in ``out`` (with the per-process parts of runs.jsonl and their lock)."""
    from .writer import IMAGE_FILE

    def run_file(name: str) -> bool:
        return name in (NPZ_NAME, METADATA_NAME)

    def out_file(name: str) -> bool:  # a single run's folder is out itself
        return run_file(name) or name == RUNS_NAME or bool(PART_RE.fullmatch(name))

    removed = []
    if is_main:
        removed += remove_temp_files(out, out_file) + remove_leftovers(out)
    for folder in folders:
        removed += remove_temp_files(folder, run_file)
        removed += remove_temp_files(os.path.join(folder, IMAGES_DIR), lambda name: bool(IMAGE_FILE.fullmatch(name)))
    if removed:
        print(f"note: removed {len(set(removed))} temporary file(s) left by an interrupted command", file=sys.stderr)


def _execute(args, settings, placement, state, n_runs, todo, need_model, journal, my_folders, folder_of, paths_used):
    """Load the model when needed, tidy up after a killed command, do this process's runs. Returns
    an exit code to return at once, or None when the summary follows."""
    is_main = state is None or state.is_main_process
    pipe = None
    if need_model:
        if args.model in TINY_MODELS:
            print(f"note: --model {args.model} has RANDOM weights: its images are noise and its maps say nothing "
                  "about SD3.5 or FLUX.1 (the outputs say so too); it demonstrates the flow", file=sys.stderr)
        try:
            pipe = load_pipeline(args.model, placement, cpu_offload=args.cpu_offload)
            _check_model_limits(pipe, settings)
        except UserError as exc:
            return fail(PROG, str(exc))
        pipe.set_progress_bar_config(leave=False)
    _tidy(args.out, my_folders, is_main)
    if state is not None:
        state.wait_for_everyone()  # the main process's tidying is over before anyone writes
    journal.flush()  # from here on runs.jsonl lists this command's finished runs only
    if todo:
        from tqdm.auto import tqdm

        from ..capture.paths import KernelPaths
        from .image_run import run_image
        from .run import run_one

        kernel_paths = KernelPaths()  # one self-check per configuration for all runs of this process
        from .writer import NonFiniteMaps, WriteError, discard_unfinished

        for run in tqdm(todo, desc="runs", unit="run", disable=len(todo) < 2 or not is_main):
            try:
                run_fn = run_image if run.image is not None else run_one
                path = run_fn(pipe, run, settings, placement, folder_of(run), kernel_paths)
            except Interrupted:  # leave no half run that the analysis would count as failed
                discard_unfinished(folder_of(run), own_folder=bool(run.folder))
                raise
            except WriteError as exc:  # a full disk fails every later run too: stop here
                journal.record(_record(run, "failed", journal.process, str(exc)))
                message = (f"{exc}; free some space (or fix the permissions) and run the same command again: "
                           "finished runs are kept")
                if n_runs == 1:
                    return fail(PROG, message, 1)
                tqdm.write(f"error: run {run.index} ({run.folder}): {message}; stopping", file=sys.stderr)
                break
            except NonFiniteMaps as exc:  # this run's numbers overflowed; the others may not
                journal.record(_record(run, "failed", journal.process, str(exc)))
                if n_runs == 1:
                    return fail(PROG, str(exc), 1)
                tqdm.write(f"error: run {run.index} ({run.folder}) failed: {exc}", file=sys.stderr)
                continue
            except Exception as exc:  # a failed run is reported and the others go on
                if n_runs == 1:
                    raise
                journal.record(_record(run, "failed", journal.process, f"{type(exc).__name__}: {exc}"))
                tqdm.write(f"error: run {run.index} ({run.folder}) failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            journal.record(_record(run, "done", journal.process))
            if path not in paths_used:  # named once, in the closing line; metadata.json has the verdicts
                paths_used.append(path)
    journal.finish(state)
    return None
