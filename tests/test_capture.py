"""The recorder against an independent float64 full-softmax reference, on tiny pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from attention_map_diffusers import StepAverageRecorder
from attention_map_diffusers.capture.paths import KernelPaths
from attention_map_diffusers.capture.processor import CaptureProcessor
from reference import ReferenceTap, reference_aggregate

TOL32 = 1e-5  # float32 pipeline, absolute, on probabilities (the specified accuracy)
RTOL32 = 2e-4  # and relative: most probabilities are far below 1e-2, where 1e-5 alone says little

BASE = dict(num_inference_steps=3, height=64, width=64, max_sequence_length=16, output_type="np")


def generate(pipe, prompt, seed=0, **kw):
    args = dict(BASE)
    args.update(kw)
    n = len(prompt) if isinstance(prompt, list) else 1
    n *= args.get("num_images_per_prompt", 1)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return pipe(prompt, generator=gens, **args).images


def record(pipe, prompt, recorder_kw=None, **kw):
    with ReferenceTap(pipe.transformer) as tap:
        with StepAverageRecorder(pipe, **(recorder_kw or {})) as rec:
            images = generate(pipe, prompt, **kw)
    return rec.result(), tap, images


def close(actual, expected, tol=TOL32):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol)
    np.testing.assert_allclose(actual, expected, rtol=RTOL32, atol=1e-7)


def assert_matches(res, ref, tol=TOL32):
    assert res.N == ref["N"]
    close(res.sum_token_map / res.N, ref["sum_token_map"] / ref["N"], tol)
    close(res.per_block_step_token_mean, ref["per_block_step_token_mean"], tol)
    close(res.per_block_step_token_max, ref["per_block_step_token_max"], tol)
    np.testing.assert_allclose(res.timesteps, ref["timesteps"], rtol=1e-6)


CASES = {
    "cfg": dict(prompt="A furry cat beneath a table", guidance_scale=5.0),
    "no-cfg": dict(prompt="A furry cat beneath a table", guidance_scale=1.0),
    "two-prompts": dict(prompt=["A furry cat beneath a table", "a red bicycle"], guidance_scale=4.0),
    "two-prompts-x2-images": dict(
        prompt=["a dog on a sofa", "a barn at sunset"], guidance_scale=4.0, num_images_per_prompt=2
    ),
    "skip-layer-guidance": dict(
        prompt="a rusty bicycle in front of a barn",
        guidance_scale=5.0,
        num_inference_steps=4,
        skip_guidance_layers=[1],
        skip_layer_guidance_start=0.0,
        skip_layer_guidance_stop=1.0,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(sd3_pipe, case):
    kw = dict(CASES[case])
    prompt = kw.pop("prompt")
    res, tap, _ = record(sd3_pipe, prompt, **kw)
    cfg = kw["guidance_scale"] > 1
    ref = reference_aggregate(tap, cfg=cfg)
    steps = kw.get("num_inference_steps", BASE["num_inference_steps"])
    n_items = (len(prompt) if isinstance(prompt, list) else 1) * kw.get("num_images_per_prompt", 1)
    T = 77 + BASE["max_sequence_length"]
    assert res.sum_token_map.shape == (n_items, 16, 16, T)
    assert res.per_block_step_token_mean.shape == (n_items, 2, steps, T)
    assert res.num_steps == steps and res.N == steps * 2
    assert res.cfg is cfg and res.batch_size == n_items and res.num_tokens == T
    if case == "skip-layer-guidance":
        assert len(tap.calls) > len(tap.steps()), "the pipeline made no skip-layer call: the case tests nothing"
    assert_matches(res, ref)


def test_items_follow_their_prompts(sd3_pipe):
    """Item i of a batch equals a single-prompt run of prompt i with the same seed."""
    prompts = ["A furry cat beneath a table", "a red bicycle"]
    both, _, _ = record(sd3_pipe, prompts, guidance_scale=4.0, seed=7)
    for i, p in enumerate(prompts):
        one, _, _ = record(sd3_pipe, p, guidance_scale=4.0, seed=7 + i)
        np.testing.assert_allclose(both.sum_token_map[i], one.sum_token_map[0], atol=1e-4)


def test_timesteps_in_denoising_order(sd3_pipe):
    res, _, _ = record(sd3_pipe, "a cat", guidance_scale=3.0, num_inference_steps=4)
    sched = sd3_pipe.scheduler.timesteps.numpy()
    np.testing.assert_allclose(res.timesteps, sched, rtol=1e-6)
    assert np.all(np.diff(res.timesteps) < 0), "step 0 must be the first, noisiest step"


def test_dual_attention_qk_norm_model(sd35m_pipe):
    res, tap, _ = record(sd35m_pipe, "A rusty bicycle in front of a barn", guidance_scale=4.5)
    assert res.blocks == [f"transformer_blocks.{i}.attn" for i in range(3)]
    assert_matches(res, reference_aggregate(tap, cfg=True))


def test_chunked_fallback_matches_reference(sd35m_pipe):
    res, tap, _ = record(
        sd35m_pipe, "A rusty bicycle in front of a barn", recorder_kw=dict(method="chunked", scratch_bytes=4096),
        guidance_scale=4.5,
    )
    assert_matches(res, reference_aggregate(tap, cfg=True))


@pytest.mark.parametrize("size", [(12, 10), (20, 24)])
def test_canonical_size_resizes_bilinearly(sd3_pipe, size):
    res, tap, _ = record(
        sd3_pipe, "a cat on a table", recorder_kw=dict(canonical_size=size, keep_block_maps=True, keep_step_maps=True),
        guidance_scale=3.0,
    )
    ref = reference_aggregate(tap, cfg=True, canonical_size=size)
    assert res.sum_token_map.shape[1:3] == size
    assert res.block_latent_sizes == [[16, 16], [16, 16]] and res.canonical_size == size
    assert_matches(res, ref)
    close(res.per_block_token_map / 3, ref["per_block_token_map"] / 3)  # sums of 3 steps
    close(res.per_step_token_map / 2, ref["per_step_token_map"] / 2)  # sums of 2 blocks
    np.testing.assert_allclose(res.per_block_token_map.sum(1), res.sum_token_map, atol=1e-5)


@pytest.mark.parametrize("method", ["auto", "side-lse", "chunked"])
@pytest.mark.parametrize("slg", [False, True])
def test_image_identical_with_capture(sd35m_pipe, method, slg):
    kw = dict(guidance_scale=4.0, num_inference_steps=3)
    if slg:
        kw.update(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    plain = generate(sd35m_pipe, "a fluffy dog", seed=3, **kw)
    with StepAverageRecorder(sd35m_pipe, method=method):
        captured = generate(sd35m_pipe, "a fluffy dog", seed=3, **kw)
    assert np.array_equal(plain, captured)


def _processors(pipe):
    return dict(pipe.transformer.attn_processors)


def test_processors_restored_after_normal_exit(sd35m_pipe):
    before = _processors(sd35m_pipe)
    with StepAverageRecorder(sd35m_pipe):
        during = _processors(sd35m_pipe)
        generate(sd35m_pipe, "a cat", num_inference_steps=1)
    after = _processors(sd35m_pipe)
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    wrapped = sorted(k for k, v in during.items() if isinstance(v, CaptureProcessor))
    assert wrapped == [f"transformer_blocks.{i}.attn.processor" for i in range(3)]
    for k in before:
        if ".attn2." in k:
            assert during[k] is before[k], "attn2 (MMDiT-X image-only attention) must not be touched"


def test_processors_restored_after_exception(sd35m_pipe):
    before = _processors(sd35m_pipe)

    def boom(pipe, i, t, kwargs):
        raise KeyError("stop in the middle of the loop")

    with pytest.raises(KeyError):
        with StepAverageRecorder(sd35m_pipe):
            generate(sd35m_pipe, "a cat", callback_on_step_end=boom)
    after = _processors(sd35m_pipe)
    assert all(after[k] is before[k] for k in before)
    assert not sd35m_pipe.transformer._forward_pre_hooks and not sd35m_pipe.transformer._forward_hooks
    # and the pipeline still works, uncaptured
    generate(sd35m_pipe, "a cat", num_inference_steps=1)


def test_entering_twice_raises(sd3_pipe):
    rec = StepAverageRecorder(sd3_pipe)
    with rec:
        with pytest.raises(RuntimeError, match="already"):
            with StepAverageRecorder(sd3_pipe):
                pass
    with pytest.raises(RuntimeError, match="already entered"):
        with rec:
            pass


def test_result_before_recording_explains(sd3_pipe):
    rec = StepAverageRecorder(sd3_pipe)
    with pytest.raises(RuntimeError, match="with StepAverageRecorder"):
        rec.result()


class _SyncCounter(TorchFunctionMode):
    """Counts the tensor -> host conversions made while it is active."""

    NAMES = {"item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_no_host_synchronisation_in_the_loop(sd3_pipe):
    """Once its path is checked, the recorder adds no .item() / .cpu() / .tolist() (or bool / float
    conversions) to the loop; the self-check reads back one number per path checked, once."""
    kw = dict(guidance_scale=4.0, num_inference_steps=3, output_type="latent")
    with _SyncCounter() as plain:
        generate(sd3_pipe, "a cat", **kw)
    paths = KernelPaths()
    with StepAverageRecorder(sd3_pipe, paths=paths):
        with _SyncCounter() as checking:
            generate(sd3_pipe, "a cat", **kw)
    assert plain.count < checking.count <= plain.count + 2
    with StepAverageRecorder(sd3_pipe, paths=paths) as rec:
        with _SyncCounter() as captured:
            generate(sd3_pipe, "a cat", **kw)
    assert captured.count == plain.count
    assert rec.result().N == 6


def test_state_is_small_and_as_specified(sd3_pipe):
    with StepAverageRecorder(sd3_pipe, stats_dtype=torch.float16) as rec:
        generate(sd3_pipe, "a cat", guidance_scale=3.0, num_inference_steps=3)
    res = rec.result()
    B, Hc, Wc, T = res.sum_token_map.shape
    S, Bk = 3, 2
    expected = B * Hc * Wc * T * 4 + 2 * S * Bk * B * T * 2 + S * 4
    assert rec.state_bytes() == expected == res.state_bytes


@pytest.mark.parametrize("method", ["auto", "side-lse", "chunked"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pipeline_matches_reference(sd35m_dir, method, dtype):
    from conftest import load_pipeline

    pipe = load_pipeline(sd35m_dir, dtype=dtype)
    res, tap, _ = record(pipe, "A rusty bicycle in front of a barn", recorder_kw=dict(method=method), guidance_scale=4.5)
    ref = reference_aggregate(tap, cfg=True)
    assert_matches(res, ref, tol=1e-4)
