"""ConceptAttention maps: the capture against an independent float64 reference (tests/reference_concepts.py),
images bit-identical to a run without concepts, hooks and processors restored."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attention_map_diffusers import StepAverageRecorder
from attention_map_diffusers.capture.concepts import ConceptOptions
from reference_concepts import BlockInputs, reference_concept_maps

CONCEPTS = ("cat", "table", "sky", "background")
SEQ = 16
SD3_ARGS = dict(num_inference_steps=2, height=64, width=96, max_sequence_length=SEQ, output_type="latent",
                guidance_scale=5.0)
FLUX_ARGS = dict(num_inference_steps=2, height=64, width=96, max_sequence_length=SEQ, output_type="latent",
                 guidance_scale=3.5)


def generate(pipe, prompt, args, seed=0):
    n = len(prompt) if isinstance(prompt, list) else 1
    return pipe(prompt, generator=[torch.Generator().manual_seed(seed + i) for i in range(n)], **args).images


def record(pipe, prompt, args, **options):
    opts = ConceptOptions(CONCEPTS, max_sequence_length=SEQ, **options)
    with BlockInputs(pipe.transformer) as tap:
        with StepAverageRecorder(pipe, concepts=opts) as rec:
            latents = generate(pipe, prompt, args)
    return rec.result(), tap, latents


def check(pipe, prompt, args, *, cfg, tol=1e-5, image_side="recompute", **options):
    plain = generate(pipe, prompt, args)
    res, tap, latents = record(pipe, prompt, args, **options)
    assert torch.equal(plain, latents), "the generated latents changed"
    B = len(prompt) if isinstance(prompt, list) else 1
    items = slice(B, 2 * B) if cfg else None
    con = res.concepts
    ref = reference_concept_maps(pipe, tap, CONCEPTS, max_length=SEQ, rule=con.rule, items=items,
                                 blocks=con.blocks, steps=con.steps, image_side=image_side)
    h, w = res.canonical_size
    got = con.mean_map
    assert got.shape == (B, h, w, len(CONCEPTS))
    assert con.N == ref["N"]
    err = np.abs(got - ref["mean_map"].reshape(got.shape)).max()
    n_joint = len(pipe.transformer.transformer_blocks)
    mean = con.per_block_step_mean
    assert mean.shape == (B, len(res.blocks), res.num_steps, len(CONCEPTS))
    err_mean = np.abs(mean[:, :n_joint] - ref["per_block_step_mean"]).max()
    assert np.isnan(mean[:, n_joint:]).all()  # FLUX.1's single blocks: no concept stream
    assert err < tol and err_mean < tol, (err, err_mean)
    if options.get("keep_step_maps"):  # per step (chosen or not), the sum over the chosen blocks
        steps = con.per_step_map
        assert steps.shape == (B, res.num_steps, h, w, len(CONCEPTS))
        assert np.abs(steps - ref["per_step_sum"].reshape(steps.shape)).max() < tol * len(con.blocks)
        np.testing.assert_allclose(steps[:, con.steps].sum(1), con.sum_map, rtol=1e-5, atol=1e-6)
    else:
        assert con.per_step_map is None
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)  # a softmax over concepts per pixel
    return res, err


def test_sd35_dual_attention_matches_reference(sd35m_pipe):
    """MMDiT-X (attn2 in blocks 0, 1), RMS qk-norm, the last block context_pre_only, CFG, two prompts."""
    res, err = check(sd35m_pipe, ["a cat on a table", "the sky above a field"], SD3_ARGS, cfg=True, keep_step_maps=True)
    assert res.concepts.blocks == [0, 1, 2] and res.concepts.steps == [0, 1] and res.concepts.rule == "concept"


def test_sd3_matches_reference(sd3_pipe):
    check(sd3_pipe, "a cat on a table", SD3_ARGS, cfg=True)


def test_flux_matches_reference(flux_pipe):
    res, _ = check(flux_pipe, "a cat on a table", FLUX_ARGS, cfg=False)
    assert res.concepts.blocks == [0, 1]  # the last four joint blocks (there are two)


@pytest.mark.parametrize("rule", ["cross", "self", "none"])
def test_rules_match_reference(sd35m_pipe, rule):
    check(sd35m_pipe, "a cat on a table", SD3_ARGS, cfg=True, rule=rule)


def test_chosen_blocks_and_steps(flux_pipe):
    res, _ = check(flux_pipe, "a cat on a table", dict(FLUX_ARGS, num_inference_steps=3), cfg=False,
                   blocks=(1,), steps=(0, 2), keep_block_maps=True, keep_step_maps=True)
    con = res.concepts
    assert con.N == 2 and con.blocks == [1] and con.steps == [0, 2]
    # the per-block sums over the chosen steps: the chosen block's equals the map's sum; single blocks NaN
    np.testing.assert_allclose(con.per_block_map[:, 1], con.sum_map, rtol=1e-6)
    assert np.isnan(con.per_block_map[:, 2:]).all()
    arrays = res.arrays()
    assert arrays["concept_N"].dtype == np.int64 and arrays["concept_sum_map"].shape == con.sum_map.shape


def test_hooks_restored_after_an_exception(sd3_pipe):
    before = dict(sd3_pipe.transformer.attn_processors)
    opts = ConceptOptions(CONCEPTS, max_sequence_length=SEQ)
    with pytest.raises(ZeroDivisionError):
        with StepAverageRecorder(sd3_pipe, concepts=opts):
            1 / 0
    assert sd3_pipe.transformer.attn_processors == before
    assert not sd3_pipe.transformer.time_text_embed._forward_hooks


def test_bad_options(sd3_pipe):
    with pytest.raises(ValueError, match="rule"):
        ConceptOptions(CONCEPTS, rule="both")
    with pytest.raises(TypeError):
        ConceptOptions("cat")
    with pytest.raises(ValueError, match="not a joint block"):
        StepAverageRecorder(sd3_pipe, concepts=ConceptOptions(CONCEPTS, blocks=(7,)))


def test_notebook_call(sd35m_pipe):
    """concept_maps: one call, the same maps as the recorder, upsampled to the image, image unchanged."""
    from attention_map_diffusers import ConceptResult, concept_maps

    args = dict(SD3_ARGS, output_type="np")
    plain = generate(sd35m_pipe, "a cat on a table", args)
    res = concept_maps(sd35m_pipe, "a cat on a table", list(CONCEPTS), generator=torch.Generator().manual_seed(0),
                       **args)
    assert isinstance(res, ConceptResult) and res.concepts == list(CONCEPTS)
    assert np.array_equal(res.image, plain[0])
    h, w = res.capture.canonical_size
    assert res.maps.shape == (len(CONCEPTS), h, w) and res.image_maps.shape == (len(CONCEPTS), 64, 96)
    np.testing.assert_allclose(res.maps, res.capture.concepts.mean_map[0].transpose(2, 0, 1))
    # bilinear upsampling (align_corners=False), checked at one pixel by hand
    y, x = 21, 40
    sy, sx = (y + 0.5) * h / 64 - 0.5, (x + 0.5) * w / 96 - 0.5
    y0, x0 = int(np.floor(sy)), int(np.floor(sx))
    fy, fx = sy - y0, sx - x0
    m = res.maps.astype(np.float64)
    want = ((1 - fy) * ((1 - fx) * m[:, y0, x0] + fx * m[:, y0, x0 + 1])
            + fy * ((1 - fx) * m[:, y0 + 1, x0] + fx * m[:, y0 + 1, x0 + 1]))
    np.testing.assert_allclose(res.image_maps[:, y, x], want, rtol=1e-5)
    assert res.segmentation().shape == (64, 96)
    with pytest.raises(TypeError):
        concept_maps(sd35m_pipe, ["a", "b"], list(CONCEPTS))


def test_given_image_call_from_docs(sd35m_pipe):
    """docs/concepts.md's given-image call: the maps per level sum to the averaged map."""
    from PIL import Image

    from attention_map_diffusers import ConceptOptions as Exported
    from attention_map_diffusers.capture.on_image import record_on_image

    image = Image.fromarray((np.random.default_rng(1).random((64, 96, 3)) * 255).astype(np.uint8))
    res = record_on_image(sd35m_pipe, image, "a cat on a sofa", [0.7, 0.5, 0.3], max_sequence_length=SEQ,
                          recorder={"concepts": Exported(["cat", "sofa", "background"], keep_step_maps=True,
                                                         max_sequence_length=SEQ)})
    con = res.concepts
    h, w = res.canonical_size
    assert con.mean_map.shape == (1, h, w, 3) and con.per_step_map.shape == (1, 3, h, w, 3)
    np.testing.assert_allclose(con.per_step_map.sum(1) / con.N, con.mean_map, rtol=1e-5)
    np.testing.assert_allclose(con.per_step_map.sum(-1), len(con.blocks), rtol=1e-5)


# -- the dump command ------------------------------------------------------------------------------

DUMP_SMALL = ["--steps", "2", "--height", "64", "--width", "96", "--max-sequence-length", str(SEQ), "--device", "cpu",
              "--store-dtype", "float32", "--no-image"]


def _dump(argv, capsys):
    import sd_35_stepavg_dump as dump

    code = dump.main([str(a) for a in argv])
    return code, capsys.readouterr()


def test_dump_stores_the_concept_maps(sd35m_dir, sd35m_pipe, tmp_path, capsys):
    import json

    out = tmp_path / "run"
    code, cap = _dump(["--model", sd35m_dir, "--prompt", "a cat on a table", "--seed", 3, "--guidance-scale", 5,
                       "--concepts", *CONCEPTS, "--concept-blocks", 1, 2, "--concept-steps", 1, "--save-block-maps",
                       "--out", out, *DUMP_SMALL], capsys)
    assert code == 0, cap.err
    z = np.load(out / "stepavg_token_maps_v1.npz")
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["concepts"] == list(CONCEPTS) and meta["concept_blocks"] == [1, 2] and meta["concept_steps"] == [1]
    assert meta["concept_rule"] == "concept" and meta["settings"]["concepts"] == list(CONCEPTS)
    # the same call against the float64 reference
    with BlockInputs(sd35m_pipe.transformer) as tap:
        sd35m_pipe("a cat on a table", generator=[torch.Generator().manual_seed(3)],
                   **dict(SD3_ARGS, height=64, width=96))
    ref = reference_concept_maps(sd35m_pipe, tap, CONCEPTS, max_length=SEQ, items=slice(1, 2), blocks=[1, 2],
                                 steps=[1])
    assert int(z["concept_N"]) == 2 and z["concept_N"].dtype == np.int64
    got = z["concept_sum_map"] / z["concept_N"]
    assert np.abs(got - ref["mean_map"].reshape(got.shape)).max() < 1e-5
    assert np.abs(z["concept_per_block_step_mean"] - ref["per_block_step_mean"]).max() < 1e-5
    assert z["concept_per_block_map"].shape == (1, 3) + got.shape[1:]
    np.testing.assert_allclose(z["concept_per_block_map"][:, 1:].sum(1), z["concept_sum_map"], rtol=1e-5)
    # another concept list is another run: the settings fingerprint changes
    from attention_map_diffusers.dump import cli

    args = cli.build_parser().parse_args(["--model", sd35m_dir, "--prompt", "x", "--concepts", "cat", *DUMP_SMALL])
    s1 = cli.settings_from_args(args)
    args.concepts = ["dog"]
    assert s1.fingerprint(["x"], 1) != cli.settings_from_args(args).fingerprint(["x"], 1)
    args.concepts = None
    assert "concepts" not in cli.settings_from_args(args).recorded(["x"], 1)  # older dumps' fingerprints stay


def test_flux_and_image_mode_dumps(flux_dir, sd3_dir, tmp_path, capsys):
    import analyse_stepavg
    from PIL import Image

    out = tmp_path / "flux"
    code, cap = _dump(["--model", flux_dir, "--concepts", "cat", "sky", "--concept-rule", "cross", "--out", out,
                       *DUMP_SMALL], capsys)
    assert code == 0, cap.err
    z = np.load(out / "stepavg_token_maps_v1.npz")
    mean = z["concept_per_block_step_mean"]
    assert mean.shape == (1, 4, 2, 2) and np.isnan(mean[:, 2:]).all() and not np.isnan(mean[:, :2]).any()
    np.testing.assert_allclose(z["concept_sum_map"].sum(-1), float(z["concept_N"]), rtol=1e-5)
    # image mode: the steps are the noise levels
    pic = tmp_path / "a.png"
    Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)).save(pic)
    out2 = tmp_path / "img"
    code, cap = _dump(["--model", sd3_dir, "--image", pic, "--prompt", "a cat", "--noise-levels", "0.7", "0.4",
                       "--concepts", "cat", "sky", "--concept-steps", "1", "--out", out2, *DUMP_SMALL], capsys)
    assert code == 0, cap.err
    z = np.load(out2 / "stepavg_token_maps_v1.npz")
    assert int(z["concept_N"]) == 2 and z["concept_sum_map"].shape[-1] == 2  # 2 blocks at the chosen level
    # image mode keeps a map per level (what the evaluator's --steps picks): the chosen level's is the sum
    per_step = z["concept_per_step_map"]
    assert per_step.shape == (1, 2) + z["concept_sum_map"].shape[1:]
    np.testing.assert_allclose(per_step[:, 1], z["concept_sum_map"], rtol=1e-6)
    np.testing.assert_allclose(per_step.sum(-1), 2.0, rtol=1e-5)  # two blocks' softmaxes per level
    # the analysis still reads such dumps
    assert analyse_stepavg.main(["--root", str(out2), "--out", str(tmp_path / "an"), "--tables-only"]) == 0


BAD_CONCEPTS = {
    "empty concept": (["--concepts", "cat", " "], "--concepts: an empty concept"),
    "duplicate": (["--concepts", "cat", "Cat"], "'Cat' is given twice"),
    "too many": (["--concepts", *[f"w{i}" for i in range(65)]], "65 concepts; at most 64"),
    "tokenises to nothing": (["--concepts", "cat", "</s>"], "'</s>' tokenises to nothing in T5"),
    "steps beyond the run": (["--concepts", "cat", "--concept-steps", "2"], "--concept-steps 2: the run has 2 step(s)"),
    "negative block": (["--concepts", "cat", "--concept-blocks", "-1"], "--concept-blocks: indices count from 0"),
    "blocks without concepts": (["--concept-blocks", "1"], "--concept-blocks applies to concept maps: add --concepts"),
    "unknown rule": (["--concepts", "cat", "--concept-rule", "both"], "invalid choice: 'both'"),
}


@pytest.mark.parametrize("case", list(BAD_CONCEPTS))
def test_bad_concepts_exit_2_before_the_model_loads(case, tmp_path, capsys, monkeypatch):
    from attention_map_diffusers.dump import cli

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "load_pipeline", no_load)
    args, message = BAD_CONCEPTS[case]
    code, cap = _dump(["--model", "tiny-random", "--steps", "2", "--out", tmp_path / "out", *args], capsys)
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], cap.err
    assert not (tmp_path / "out").exists()


def test_too_many_blocks_after_loading(sd3_dir, tmp_path, capsys):
    code, cap = _dump(["--model", sd3_dir, "--concepts", "cat", "--concept-blocks", "5", "--out", tmp_path / "o",
                       *DUMP_SMALL], capsys)
    assert code == 2 and "--concept-blocks 5: this model has joint blocks 0..1" in cap.err
    assert not (tmp_path / "o").exists()


def test_bench_concepts_toy(tmp_path):
    """The benchmark runs at a toy size and writes its JSON keys (no timing asserts)."""
    import json
    import sys

    sys.path.insert(0, str(__import__("conftest").ROOT / "benchmarks"))
    import bench_concepts

    out = tmp_path / "b.json"
    assert bench_concepts.main(["--preset", "toy", "--steps", "1", "--repeats", "1", "--concepts", "3",
                                "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["median_s"]) == {"stock", "capture", "concepts"} and all(data["identical_to_stock"].values())
    assert data["state_bytes"]["concepts"] > data["state_bytes"]["capture"]


@pytest.mark.parametrize("family", ["sd35m", "flux"])
def test_bfloat16_matches_reference(family, sd35m_dir, flux_dir):
    """bf16: the latents stay bit-identical, and the concept stream (run in float32 whatever the
    model's dtype) matches the float64 reference over the image tokens' keys, values and attention
    outputs the bf16 model produced."""
    from conftest import load_flux_pipeline, load_pipeline

    if family == "flux":
        pipe = load_flux_pipeline(flux_dir, dtype=torch.bfloat16)
        _, err = check(pipe, "a cat on a table", FLUX_ARGS, cfg=False, tol=1e-4, image_side="model")
    else:
        pipe = load_pipeline(sd35m_dir, dtype=torch.bfloat16)
        _, err = check(pipe, ["a cat on a table", "the sky"], SD3_ARGS, cfg=True, tol=1e-4, image_side="model")
    print(f"{family} bf16: max abs {err:.2e}")


def test_a_bfloat16_concept_stream_would_fail(flux_dir, monkeypatch):
    """The 1e-4 above tells a float32 concept stream from one that computes in the model's bf16
    (upstream's way): with the block's modules called in bf16 the maps land > 1e-3 away."""
    from attention_map_diffusers.capture import concepts
    from conftest import load_flux_pipeline

    def in_model_dtype(module, *args, fallback_dtype=None, **kwargs):
        params = list(module.parameters())
        if not params:
            return module(*args, **kwargs)
        cast = lambda x: x.to(params[0].dtype) if torch.is_tensor(x) and x.is_floating_point() else x  # noqa: E731
        out = module(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()

    monkeypatch.setattr(concepts, "float32_call", in_model_dtype)
    pipe = load_flux_pipeline(flux_dir, dtype=torch.bfloat16)
    _, err = check(pipe, "a cat on a table", FLUX_ARGS, cfg=False, tol=1.0, image_side="model")
    assert err > 1e-3, err


def test_float32_call():
    """A bf16 module computes in float32 through float32_call (its own forward, float32 weight copies);
    a quantized one (integer weights) is called in the model's dtype instead; float32 is left alone."""
    from attention_map_diffusers.capture.concepts import float32_call

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(3, 64, generator=g)
    exact = x.double() @ lin.weight.double().T + lin.bias.double()
    got = float32_call(lin, x, fallback_dtype=torch.bfloat16)
    assert got.dtype == torch.float32 and (got.double() - exact).abs().max() < 1e-5
    assert (lin(x.bfloat16()).double() - exact).abs().max() > 1e-3  # what the model's own bf16 call gives
    assert lin.weight.dtype == torch.bfloat16  # the module keeps its weights

    class Quantized(torch.nn.Module):  # int8 weights dequantized in forward, as bitsandbytes / GGUF layers do
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Parameter(torch.randint(-8, 8, (32, 64), dtype=torch.int8, generator=g), requires_grad=False)
            self.seen = None

        def forward(self, x):
            self.seen = x.dtype
            return x @ (self.q.to(x.dtype) * 0.1).T

    qm = Quantized()
    out = float32_call(qm, x, fallback_dtype=torch.bfloat16)
    assert qm.seen == torch.bfloat16 and out.dtype == torch.float32
    assert torch.equal(out, qm(x.bfloat16()).float())
    f32 = torch.nn.Linear(64, 32)
    assert torch.equal(float32_call(f32, x), f32(x))


def test_reference_model_image_side_agrees_in_float32(flux_pipe):
    """The reference's two ways to the image tokens' side (float64 from the block inputs; the
    model's own tensors) agree in float32, so its hooks read the right tensors."""
    res, err = check(flux_pipe, "a cat on a table", FLUX_ARGS, cfg=False, image_side="model")
    assert err < 1e-5


def test_finite_check_allows_only_whole_nan_block_rows():
    """The dump refuses non-finite maps; the concept arrays' all-NaN rows (blocks without a concept
    stream) are by design, a NaN inside a concept block's row is an overflow."""
    from attention_map_diffusers.dump.writer import NonFiniteMaps, check_finite

    mean = np.full((1, 4, 2, 3), 0.25, dtype=np.float16)
    mean[:, 2:] = np.nan
    check_finite({"concept_per_block_step_mean": mean})
    mean[0, 1, 0, 0] = np.nan
    with pytest.raises(NonFiniteMaps, match="concept_per_block_step_mean"):
        check_finite({"concept_per_block_step_mean": mean})
    with pytest.raises(NonFiniteMaps):
        check_finite({"concept_sum_map": np.full((1, 2, 2, 3), np.nan)})


def test_img2img_concept_steps_are_the_steps_it_runs(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from attention_map_diffusers.dump import cli

    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    pic = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(pic)
    # diffusers runs 28 - int(28 - 0.6 x 28) = 17 steps (not int(28 x 0.6) = 16): index 16 is the last one
    code, cap = _dump(["--model", "tiny-random", "--image", pic, "--prompt", "a cat", "--strength", "0.6", "--steps",
                       "28", "--concepts", "cat", "--concept-steps", "17", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "--concept-steps 17: the run has 17 step(s)" in cap.err, cap.err
