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


def test_other_pipelines_are_refused():
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline .* and FluxPipeline"):
        record_on_image(object(), _picture(), "a red disc", LEVELS)


class _FluxInputs:
    """Records every FLUX.1 transformer call's keyword arguments."""

    def __init__(self, transformer):
        self.transformer, self.calls = transformer, []

    def __enter__(self):
        def pre(module, args, kwargs):
            self.calls.append({k: v.detach().clone() for k, v in kwargs.items() if torch.is_tensor(v)})

        self.handle = self.transformer.register_forward_pre_hook(pre, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _packed(x: torch.Tensor) -> np.ndarray:
    """(1, C, h, w) -> (h/2 * w/2, 4C): FLUX.1's 2x2 packing written out, patch (i, j) in row-major
    order, feature c * 4 + dy * 2 + dx = x[c, 2i + dy, 2j + dx]."""
    _, C, h, w = x.shape
    x = x[0].numpy()
    out = np.empty(((h // 2) * (w // 2), 4 * C))
    for i in range(h // 2):
        for j in range(w // 2):
            for c in range(C):
                for dy in range(2):
                    for dx in range(2):
                        out[i * (w // 2) + j, c * 4 + dy * 2 + dx] = x[c, 2 * i + dy, 2 * j + dx]
    return out


def test_flux_maps_match_the_float64_reference_and_inputs_are_the_noised_image(flux_pipe):
    """FLUX.1 on a given image: the maps against the float64 reference (RoPE, joint and single
    blocks), the transformer's inputs against the packing, ids, timestep and guidance written out."""
    from reference_flux import FluxReferenceTap, flux_reference_aggregate
    from test_capture import assert_matches

    pipe, image = flux_pipe, _picture().resize((96, 64))
    with _FluxInputs(pipe.transformer) as inputs, FluxReferenceTap(pipe.transformer) as tap:
        res = record_on_image(pipe, image, "a red disc and a blue square", LEVELS, seed=3, guidance_scale=3.5,
                              max_sequence_length=16)
    assert res.model_family == "flux" and not res.cfg and res.num_steps == len(LEVELS)
    assert res.sum_token_map.shape == (1, 4, 6, 16)
    assert_matches(res, flux_reference_aggregate(tap, true_cfg=False))
    np.testing.assert_allclose(res.timesteps, [1000 * s for s in LEVELS], rtol=1e-6)
    assert len(inputs.calls) == len(LEVELS)
    ids = np.array([[0, i, j] for i in range(4) for j in range(6)], np.float64)
    for call, sigma in zip(inputs.calls, LEVELS):
        expected = _packed(_expected_latent(pipe, image, 3, sigma))
        np.testing.assert_allclose(call["hidden_states"][0].double().numpy(), expected, atol=1e-4)
        np.testing.assert_allclose(call["timestep"].numpy(), [sigma], rtol=1e-6)
        np.testing.assert_allclose(call["guidance"].numpy(), [3.5])
        np.testing.assert_array_equal(call["img_ids"].numpy(), ids)
        assert call["encoder_hidden_states"].shape[:2] == (1, 16) and call["pooled_projections"].shape[0] == 1


def test_flux_concept_maps_on_a_given_image(flux_pipe):
    """--concepts on a given FLUX.1 image: the concept maps against the float64 concept reference."""
    from attention_map_diffusers.capture.concepts import ConceptOptions
    from reference_concepts import BlockInputs, reference_concept_maps

    concepts = ("disc", "square", "background")
    with BlockInputs(flux_pipe.transformer) as tap:
        res = record_on_image(flux_pipe, _picture().resize((96, 64)), "a red disc and a blue square", LEVELS, seed=3,
                              max_sequence_length=16,
                              recorder={"concepts": ConceptOptions(concepts, max_sequence_length=16, keep_step_maps=True)})
    con = res.concepts
    ref = reference_concept_maps(flux_pipe, tap, concepts, max_length=16, blocks=con.blocks, steps=con.steps)
    assert con.N == ref["N"] == len(LEVELS) * len(con.blocks)
    np.testing.assert_allclose(con.mean_map, ref["mean_map"].reshape(con.mean_map.shape), atol=1e-5)
    np.testing.assert_allclose(con.per_step_map, ref["per_step_sum"].reshape(con.per_step_map.shape), atol=1e-5)
