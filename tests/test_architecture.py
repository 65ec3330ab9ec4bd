"""The layers, the public names and the in-memory path from a recording to word maps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import numpy as np
import pytest
import torch

from conftest import ROOT


def _modules_after_import(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_contract_is_standard_library_only():
    mods = _modules_after_import("import attention_map_diffusers.contract")
    third_party = {m.split(".")[0] for m in mods} & {"numpy", "torch", "diffusers", "transformers", "matplotlib", "PIL"}
    assert not third_party


@pytest.mark.parametrize("layer, known", [("analysis", "write"), ("segmentation", "report")])
def test_layer_imports_neither_torch_nor_the_capture_and_dump_layers(layer, known):
    mods = _modules_after_import(
        f"import importlib, pkgutil, attention_map_diffusers.{layer} as a\n"
        f"for m in pkgutil.iter_modules(a.__path__): importlib.import_module('attention_map_diffusers.{layer}.' + m.name)"
    )
    assert f"attention_map_diffusers.{layer}.{known}" in mods  # the walk did import the layer
    assert "torch" not in mods
    assert not {m for m in mods if m.startswith(("attention_map_diffusers.capture", "attention_map_diffusers.dump"))}


def test_public_names_are_the_real_objects():
    import attention_map_diffusers as amd
    from attention_map_diffusers.analysis.dumpfile import Dump
    from attention_map_diffusers.capture import compat
    from attention_map_diffusers.capture.aggregate import CaptureResult
    from attention_map_diffusers.capture.recorder import StepAverageRecorder

    assert amd.StepAverageRecorder is StepAverageRecorder and amd.CaptureResult is CaptureResult
    assert amd.Dump is Dump and amd.attn_maps is compat.attn_maps and amd.init_pipeline is compat.init_pipeline
    assert set(amd.__all__) >= {"StepAverageRecorder", "CaptureResult", "Dump", "init_pipeline", "attn_maps", "restore_pipeline"}
    assert "with StepAverageRecorder(pipe) as rec" in StepAverageRecorder.__doc__


def test_project_scripts_point_at_the_commands(capsys):
    import importlib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"sd35-stepavg-dump", "sd35-analyse-stepavg", "sd35-evaluate-segmentation"}
    for target in scripts.values():
        module, func = target.split(":")
        main = getattr(importlib.import_module(module), func)
        assert main(["--help"]) == 0
    assert "--root" in capsys.readouterr().out


@pytest.mark.slow
def test_pip_install_gives_both_commands(tmp_path):
    import shutil

    # build from a copy: setuptools writes build/ and *.egg-info into the source folder
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "attention_map_diffusers", src / "attention_map_diffusers",
                    ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(src)],
        check=True, capture_output=True,
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    for cmd in ("sd35-stepavg-dump", "sd35-analyse-stepavg", "sd35-evaluate-segmentation"):
        exe = target / "bin" / cmd
        res = subprocess.run([sys.executable, str(exe), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert res.returncode == 0 and "usage:" in res.stdout, res.stderr


def _record(pipe, prompts):
    from attention_map_diffusers import StepAverageRecorder

    with StepAverageRecorder(pipe) as rec:
        pipe(prompts, num_inference_steps=2, guidance_scale=3.0, height=64, width=64, max_sequence_length=16,
             generator=torch.Generator().manual_seed(3), output_type="latent")
    return rec.result()


def test_result_spans_mean_map_and_in_memory_word_maps(sd3_pipe, tmp_path):
    from attention_map_diffusers import Dump
    from attention_map_diffusers.analysis.dumpfile import load_dump
    from attention_map_diffusers.contract import prompt_tokens
    from attention_map_diffusers.dump.settings import RunSettings
    from attention_map_diffusers.dump.writer import build_metadata, write_run

    prompts = ["a red cube on a blue table", "two cats"]
    res = _record(sd3_pipe, prompts)
    T = res.num_tokens
    clip_len = sd3_pipe.tokenizer.model_max_length
    assert res.text_spans == {"clip": [0, clip_len], "t5": [clip_len, T]} and T == clip_len + 16
    assert res.num_updates == res.N
    np.testing.assert_array_equal(res.mean_token_map, res.sum_token_map / np.float32(res.N))

    tokenizers = {"clip": sd3_pipe.tokenizer, "t5": sd3_pipe.tokenizer_3}
    mem = Dump.from_result(res, prompts, tokenizers)

    # independent reference: each word's map is the sum of the maps of the tokens whose character
    # span lies inside it, renormalised over the words at each pixel
    for item, prompt in enumerate(prompts):
        for enc, (a, b) in res.text_spans.items():
            words, maps = mem.word_maps(item, enc)
            toks = prompt_tokens(tokenizers[enc], prompt, b - a)
            avg = res.sum_token_map[item].astype(np.float64) / res.N
            ref = []
            for w in words:
                cols = [a + j for j, o in enumerate(toks.offsets) if o is not None and w.start <= o[0] and o[1] <= w.end and o[1] > o[0]]
                ref.append(avg[:, :, cols].sum(axis=-1))
            ref = np.stack(ref)
            ref /= ref.sum(axis=0, keepdims=True) + 1e-8
            assert [w.text for w in words] == prompt.split()
            np.testing.assert_allclose(maps, ref, rtol=1e-6, atol=1e-9)

    # the same result written as a run folder and read back gives the same word maps
    settings = RunSettings(
        model_id="test", negative_prompt="", steps=2, guidance_scale=3.0, height=64, width=64, max_sequence_length=16,
        skip_guidance_layers=None, num_images_per_prompt=1, canonical_size=None, store_dtype="float32",
        save_block_maps=False, save_step_maps=False, save_image=False, image_format="png", embed_metadata=False,
        random_weights=True,
    )
    clip = [prompt_tokens(sd3_pipe.tokenizer, p, clip_len) for p in prompts]
    t5 = [prompt_tokens(sd3_pipe.tokenizer_3, p, 16) for p in prompts]
    meta = build_metadata(result=res, prompts=prompts, seeds=[3, 3], base_seed=3, clip=clip, t5=t5, clip_length=clip_len,
                          settings=settings, scheduler="x", device="cpu", dtype="float32", images=[None, None],
                          elapsed_s=0.0, versions={})
    write_run(str(tmp_path), res.arrays(), meta, [], "png", embed=False, store_dtype="float32")
    disk = load_dump(str(tmp_path))
    for item in range(2):
        for enc in ("clip", "t5"):
            w_disk, m_disk = disk.word_maps(item, enc)
            w_mem, m_mem = mem.word_maps(item, enc)
            assert w_disk == w_mem
            np.testing.assert_array_equal(m_disk, m_mem)


def test_from_result_refuses_a_mismatch(sd3_pipe):
    from attention_map_diffusers import Dump
    from attention_map_diffusers.contract import UserError

    res = _record(sd3_pipe, ["a red cube"])
    with pytest.raises(UserError, match="2 prompts for a result of 1"):
        Dump.from_result(res, ["a", "b"], {"clip": sd3_pipe.tokenizer})
    with pytest.raises(UserError, match="no tokens for encoder 't5'"):
        Dump.from_result(res, ["a red cube"], {"clip": sd3_pipe.tokenizer}).word_maps(0, "t5")


def test_analysis_options_are_checked():
    from attention_map_diffusers.analysis.options import AnalysisOptions
    from attention_map_diffusers.contract import UserError

    assert AnalysisOptions(root="x").encoders == ("clip", "t5")
    for kwargs, msg in (({"topk": 0}, "--topk"), ({"dpi": 5}, "--dpi"), ({"encoders": ("clip", "bert")}, "'bert'"),
                        ({"weights": "max"}, "--weights"), ({"fmt": "gif"}, "--format")):
        with pytest.raises(UserError, match=msg):
            AnalysisOptions(root="x", **kwargs)
