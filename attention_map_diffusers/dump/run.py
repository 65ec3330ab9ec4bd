"""One run of the dump command: a pipeline call under the recorder, then its folder."""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from typing import Iterator

from ..contract import IMAGES_DIR, PromptTokens, prompt_tokens
from .loading import Placement, pipeline_family
from .runs import Run
from .settings import RunSettings
from .writer import build_metadata, image_name, write_run


def versions() -> dict:
    """The versions of the libraries that made a dump (recorded in its metadata)."""
    import diffusers
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


@contextlib.contextmanager
def quiet_nan_cast() -> Iterator[None]:
    """Silence numpy's "invalid value encountered in cast" from the pipeline's image decoding: a run
    that diverged into NaN fails with one line of its own (writer.NonFiniteMaps)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="invalid value encountered in cast", category=RuntimeWarning)
        yield


def prompt_token_lists(pipe, prompts, settings: RunSettings, family: str):
    """Per prompt, the CLIP and T5 tokens in the text sequence, as the pipeline feeds them (truncation
    warned about). FLUX.1's sequence is T5 only (its CLIP gives a pooled vector): no CLIP tokens."""
    empty = PromptTokens([], [], [], False)
    if family == "flux":
        clip_len, clip = 0, [empty for _ in prompts]
        t5_tokenizer = pipe.tokenizer_2
    else:
        clip_len = int(pipe.tokenizer_max_length)
        clip = [prompt_tokens(pipe.tokenizer, p, clip_len) for p in prompts]
        t5_tokenizer = pipe.tokenizer_3
    if t5_tokenizer is not None:
        t5 = [prompt_tokens(t5_tokenizer, p, settings.max_sequence_length) for p in prompts]
    else:
        t5 = [PromptTokens([], [], [], False) for _ in prompts]
    for p, c, t in zip(prompts, clip, t5):
        for name, tok, limit in (("CLIP", c, clip_len), ("T5", t, settings.max_sequence_length)):
            if tok.truncated:
                print(f"warning: prompt {p[:40]!r}... is longer than {name}'s {limit} tokens; it is truncated "
                      "as the pipeline does (metadata 'truncated' records it)", file=sys.stderr)
    return clip_len, clip, t5


def concept_options(settings: RunSettings):
    """The recorder's ``concepts=`` for ``settings`` (None without --concepts)."""
    if not settings.concepts:
        return None
    from ..capture.concepts import ConceptOptions

    return ConceptOptions(settings.concepts, settings.concept_blocks, settings.concept_steps, settings.concept_rule,
                          keep_block_maps=settings.save_block_maps, keep_step_maps=settings.save_step_maps,
                          max_sequence_length=settings.max_sequence_length)


def run_one(pipe, run: Run, settings: RunSettings, placement: Placement, out_dir: str, paths=None) -> str:
    """Generate the images of ``run`` with ``pipe`` under a :class:`StepAverageRecorder` and write
    its folder ``out_dir`` (npz, metadata.json, images). ``paths``: a ``KernelPaths`` shared by the
    runs of one command, so that each configuration's self-check runs once per process.

    Returns:
        the capture path that gave the attention (``CaptureResult.capture_path``).
    """
    import torch

    from ..capture.recorder import StepAverageRecorder

    n_img = settings.num_images_per_prompt
    item_prompts = [p for p in run.prompts for _ in range(n_img)]
    seeds = [run.seed + j for _ in run.prompts for j in range(n_img)]
    device = pipe._execution_device
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    family = pipeline_family(pipe)
    clip_len, clip, t5 = prompt_token_lists(pipe, run.prompts, settings, family)
    clip = [c for c in clip for _ in range(n_img)]
    t5 = [t for t in t5 for _ in range(n_img)]

    kwargs = dict(
        prompt=list(run.prompts),
        # FLUX.1 runs true CFG whenever a negative prompt is given (even "") and true_cfg_scale > 1
        negative_prompt=(settings.negative_prompt or None) if family == "flux" else settings.negative_prompt,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        height=settings.height,
        width=settings.width,
        max_sequence_length=settings.max_sequence_length,
        num_images_per_prompt=n_img,
        generator=generators,
        output_type="pil" if settings.save_image else "latent",
    )
    if settings.skip_guidance_layers:
        kwargs["skip_guidance_layers"] = list(settings.skip_guidance_layers)
    if family == "flux":
        kwargs["true_cfg_scale"] = settings.true_cfg_scale
    t0 = time.perf_counter()
    with StepAverageRecorder(
        pipe,
        canonical_size=settings.canonical_size,
        keep_block_maps=settings.save_block_maps,
        keep_step_maps=settings.save_step_maps,
        stats_dtype=torch.float16 if settings.store_dtype == "float16" else torch.float32,
        paths=paths,
        concepts=concept_options(settings),
    ) as rec, quiet_nan_cast():
        output = pipe(**kwargs)
    result = rec.result()
    elapsed = time.perf_counter() - t0

    images = list(output.images) if settings.save_image else []
    names = [
        f"{IMAGES_DIR}/" + image_name(seeds[i], settings.width, settings.height, i, settings.image_format)
        if settings.save_image else None
        for i in range(len(item_prompts))
    ]
    metadata = build_metadata(
        result=result, prompts=item_prompts, seeds=seeds, base_seed=run.seed, clip=clip, t5=t5,
        clip_length=clip_len, settings=settings, scheduler=type(pipe.scheduler).__name__, device=str(device),
        dtype=placement.dtype, images=names, elapsed_s=elapsed, versions=versions(),
    )
    write_run(out_dir, result.arrays(), metadata, images, settings.image_format,
              embed=settings.embed_metadata, store_dtype=settings.store_dtype)
    return result.capture_path
