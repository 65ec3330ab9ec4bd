"""Attention on a given image (capture/on_image.py): the maps against the float64 reference, the
transformer's inputs against an independent computation of the flow-matching noising, and CFG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attention_map_diffusers.capture.on_image import record_on_image
from reference import ReferenceTap, reference_aggregate

LEVELS = (0.7, 0.5, 0.3)


def _picture(size=64) -> Image.Image:
    """A deterministic test picture: a red disc and a blue square on grey."""
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size, 3), 200, np.uint8)
    img[(yy - size * 0.35) ** 2 + (xx - size * 0.3) ** 2 < (size * 0.18) ** 2] = (220, 30, 30)
    img[int(size * 0.55): int(size * 0.85), int(size * 0.55): int(size * 0.85)] = (30, 60, 220)
    return Image.fromarray(img)


class _Inputs:
    """Records the hidden_states and timestep of every transformer call."""

    def __init__(self, transformer):
        self.transformer, self.calls = transformer, []

    def __enter__(self):
        def pre(module, args, kwargs):
            self.calls.append((kwargs["hidden_states"].detach().clone(), kwargs["timestep"].detach().clone()))

        self.handle = self.transformer.register_forward_pre_hook(pre, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _expected_latent(pipe, image: Image.Image, seed: int, sigma: float) -> torch.Tensor:
    """x_t computed here from the definitions: pixels in [-1, 1], VAE posterior mean, SD3's shift
    and scale, one Gaussian noise from torch.Generator(seed), (1 - sigma) x0 + sigma eps in float64."""
    px = torch.from_numpy(np.asarray(image, np.float64) / 127.5 - 1.0).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        mean = pipe.vae.encode(px).latent_dist.mean.double()
    cfg = pipe.vae.config
    x0 = (mean - (cfg.shift_factor or 0.0)) * cfg.scaling_factor
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).double()
    return (1 - sigma) * x0 + sigma * eps


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_maps_match_the_float64_reference_and_inputs_are_the_noised_image(sd35m_pipe, guidance):
    pipe, image = sd35m_pipe, _picture()
    with _Inputs(pipe.transformer) as inputs, ReferenceTap(pipe.transformer) as tap:
        res = record_on_image(pipe, image, "a red disc and a blue square", LEVELS, seed=3,
                              guidance_scale=guidance, max_sequence_length=16)
    cfg = guidance > 1
    assert res.cfg is cfg and res.num_steps == len(LEVELS)
    ref = reference_aggregate(tap, cfg)
    np.testing.assert_allclose(res.sum_token_map / res.N, ref["sum_token_map"] / ref["N"], rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(res.per_block_step_token_mean, ref["per_block_step_token_mean"], rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(res.timesteps, [1000 * s for s in LEVELS], rtol=1e-6)
    assert len(inputs.calls) == len(LEVELS)
    for (hidden, t), sigma in zip(inputs.calls, LEVELS):
        assert hidden.shape[0] == (2 if cfg else 1)
        expected = _expected_latent(pipe, image, 3, sigma)
        for half in hidden:  # with CFG both halves see the same noised image
            np.testing.assert_allclose(half[None].double().numpy(), expected.numpy(), atol=1e-4)  # float32 pixels and VAE
        np.testing.assert_allclose(t.numpy(), 1000 * sigma, rtol=1e-6)


def test_guidance_does_not_change_the_prompt_half(sd35m_pipe):
    """The recorded half is the prompt's: with and without CFG the maps agree (batch items do not interact)."""
    a = record_on_image(sd35m_pipe, _picture(), "a red disc", LEVELS, seed=1, guidance_scale=1.0, max_sequence_length=16)
    b = record_on_image(sd35m_pipe, _picture(), "a red disc", LEVELS, seed=1, guidance_scale=4.0, max_sequence_length=16)
    np.testing.assert_allclose(a.sum_token_map, b.sum_token_map, rtol=1e-4, atol=1e-6)
    # and the prompt matters: another prompt gives other maps
    c = record_on_image(sd35m_pipe, _picture(), "a blue square", LEVELS, seed=1, guidance_scale=1.0, max_sequence_length=16)
    assert np.abs(a.sum_token_map - c.sum_token_map).max() > 1e-4


def test_flux_is_refused(flux_pipe):
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline"):
        record_on_image(flux_pipe, _picture(), "a red disc", LEVELS)
