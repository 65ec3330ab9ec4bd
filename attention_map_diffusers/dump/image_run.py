"""One run of the dump command's image mode (``--image``): attention on a given image, written as a
run folder the analysis reads like any other (the steps are the noise levels, or the img2img steps).

- noise levels (default): the image is encoded and noised at each level and the transformer runs
  once per level (:func:`~attention_map_diffusers.capture.on_image.record_on_image`); the run's
  image is the fitted source image.
- ``--strength S``: ``StableDiffusion3Img2ImgPipeline`` (built from the loaded pipeline's parts)
  denoises the image from that level, recorded like generation; the run's image is its output and
  the fitted source is saved beside it (``source_image.saved``).
"""

from __future__ import annotations

import os
import time

from ..contract import IMAGES_DIR
from .loading import Placement, pipeline_family
from .run import concept_options, prompt_token_lists, quiet_nan_cast, versions
from .runs import Run
from .settings import RunSettings
from .source_images import read_source
from .writer import WriteError, build_metadata, image_ext, image_name, refuse_non_finite, save_image, write_run


def source_image_name(stem: str, width: int, height: int, fmt: str) -> str:
    """``source-{stem}-{w}x{h}.png``: the fitted source image in a run's ``images/``."""
    return f"source-{stem}-{width}x{height}.{image_ext(fmt)}"


def run_image(pipe, run: Run, settings: RunSettings, placement: Placement, out_dir: str, paths=None) -> str:
    """Record the attention of ``run``'s prompt on ``run.image`` and write its folder ``out_dir``.

    Returns:
        the capture path that gave the attention (``CaptureResult.capture_path``).
    """
    import torch

    from ..capture.on_image import record_on_image
    from ..capture.recorder import StepAverageRecorder

    source = read_source(run.image, settings.height, settings.width)
    prompt = run.prompts[0]
    clip_len, clip, t5 = prompt_token_lists(pipe, [prompt], settings, pipeline_family(pipe))
    recorder = dict(
        canonical_size=settings.canonical_size,
        keep_block_maps=settings.save_block_maps,
        keep_step_maps=settings.save_step_maps,
        stats_dtype=torch.float16 if settings.store_dtype == "float16" else torch.float32,
        paths=paths,
        concepts=concept_options(settings),
    )
    stem = os.path.splitext(source.name)[0]
    record = source.record()
    t0 = time.perf_counter()
    if settings.strength is None:
        result = record_on_image(
            pipe, source.fitted, prompt, settings.noise_levels, seed=run.seed,
            guidance_scale=settings.guidance_scale, negative_prompt=settings.negative_prompt,
            max_sequence_length=settings.max_sequence_length, recorder=recorder,
        )
        images = [source.fitted] if settings.save_image else []
        names = [f"{IMAGES_DIR}/" + source_image_name(stem, settings.width, settings.height, settings.image_format)
                 if settings.save_image else None]
    else:
        from diffusers import StableDiffusion3Img2ImgPipeline

        img2img = StableDiffusion3Img2ImgPipeline(**pipe.components)
        img2img.set_progress_bar_config(leave=False)
        generator = torch.Generator(device=pipe._execution_device).manual_seed(run.seed)
        with StepAverageRecorder(img2img, **recorder) as rec, quiet_nan_cast():
            output = img2img(
                prompt=[prompt], negative_prompt=settings.negative_prompt, image=source.fitted,
                strength=settings.strength, num_inference_steps=settings.steps,
                guidance_scale=settings.guidance_scale, height=settings.height, width=settings.width,
                max_sequence_length=settings.max_sequence_length, generator=[generator],
                output_type="pil" if settings.save_image else "latent",
            )
        result = rec.result()
        if result.num_steps == 0:
            raise RuntimeError(f"--strength {settings.strength} with --steps {settings.steps} runs no denoising step; "
                               "raise one of them")
        images = list(output.images) if settings.save_image else []
        names = [f"{IMAGES_DIR}/" + image_name(run.seed, settings.width, settings.height, 0, settings.image_format)
                 if settings.save_image else None]
        if settings.save_image:
            record["saved"] = f"{IMAGES_DIR}/" + source_image_name(stem, settings.width, settings.height,
                                                                   settings.image_format)
    elapsed = time.perf_counter() - t0
    metadata = build_metadata(
        result=result, prompts=[prompt], seeds=[run.seed], base_seed=run.seed, clip=clip, t5=t5,
        clip_length=clip_len, settings=settings, scheduler=type(pipe.scheduler).__name__,
        device=str(pipe._execution_device), dtype=placement.dtype, images=names, elapsed_s=elapsed,
        versions=versions(), source=record,
    )
    if "saved" in record:  # the fitted source beside the img2img output
        refuse_non_finite(out_dir, result.arrays())  # a run that fails writes nothing
        try:
            os.makedirs(os.path.join(out_dir, IMAGES_DIR), exist_ok=True)
            save_image(source.fitted, os.path.join(out_dir, record["saved"]), settings.image_format,
                       metadata if settings.embed_metadata else None, 0)
        except OSError as exc:
            raise WriteError(out_dir, exc) from exc
    write_run(out_dir, result.arrays(), metadata, images, settings.image_format,
              embed=settings.embed_metadata, store_dtype=settings.store_dtype)
    return result.capture_path
