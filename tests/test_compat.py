"""Upstream-compatible init_pipeline / attn_maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attention_map_diffusers import attn_maps, init_pipeline, restore_pipeline
from attention_map_diffusers.capture.processor import CaptureProcessor
from reference import ReferenceTap, reference_probs


def test_attn_maps_shapes_and_values(sd35m_pipe):
    pipe = sd35m_pipe
    before = dict(pipe.transformer.attn_processors)
    attn_maps.clear()
    assert init_pipeline(pipe) is pipe
    try:
        with ReferenceTap(pipe.transformer) as tap:
            pipe(
                ["a cat", "a red barn"],
                num_inference_steps=2,
                height=64,
                width=64,
                max_sequence_length=16,
                guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
            )
    finally:
        restore_pipeline(pipe)
    after = dict(pipe.transformer.attn_processors)
    assert all(after[k] is before[k] for k in before)
    assert not any(isinstance(p, CaptureProcessor) for p in after.values())

    expected_keys = [float(t) for t in pipe.scheduler.timesteps]
    assert list(attn_maps) == pytest.approx(expected_keys)
    heads = pipe.transformer.config.num_attention_heads
    for step, key in zip(tap.steps(), attn_maps):
        names = list(attn_maps[key])
        assert names == [f"transformer_blocks.{i}.attn" for i in range(3)]
        for i, name in enumerate(names):
            m = attn_maps[key][name]
            assert m.device.type == "cpu" and m.dtype == torch.float32
            assert tuple(m.shape) == (4, heads, 16, 16, 77 + 16)  # B_total = 2 prompts x (uncond + cond)
            ref = reference_probs(step["blocks"][i]).reshape(m.shape)
            np.testing.assert_allclose(m.numpy(), ref, rtol=2e-4, atol=1e-6)
    attn_maps.clear()


def test_init_pipeline_then_recorder_is_refused(sd3_pipe):
    from attention_map_diffusers import StepAverageRecorder

    init_pipeline(sd3_pipe)
    try:
        with pytest.raises(RuntimeError, match="restore_pipeline"):
            with StepAverageRecorder(sd3_pipe):
                pass
    finally:
        restore_pipeline(sd3_pipe)
    with StepAverageRecorder(sd3_pipe):
        pass
