"""The dump command and the analysis on FLUX.1 (tiny pipelines, --model <folder> and tiny-random-flux)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import analyse_stepavg
import sd_35_stepavg_dump as dump

SMALL = ["--steps", "2", "--height", "64", "--width", "96", "--max-sequence-length", "16", "--device", "cpu",
         "--guidance-scale", "3.5"]


def test_dump_and_analysis_of_a_flux_folder(flux_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = dump.main(["--model", flux_dir, "--prompt", "a red cat", "--prompt", "a blue barn", "--batch-size", "2",
                      "--true-cfg-scale", "2", "--neg", "blurry", "--out", str(out), *SMALL])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["model_family"] == "flux" and meta["true_cfg_scale"] == 2.0 and meta["cfg"] is False
    assert meta["text_spans"] == {"t5": [0, 16]} and meta["num_tokens_clip"] == 0
    assert "tokens" not in meta and meta["tokens_t5"][0][:3] == ["▁a", "▁red", "▁cat"]
    assert meta["blocks"][-1] == "single_transformer_blocks.1.attn" and meta["num_blocks"] == 4
    assert meta["block_latent_sizes"] == [[4, 6]] * 4 and meta["settings"]["true_cfg_scale"] == 2.0
    with np.load(out / "stepavg_token_maps_v1.npz") as z:
        assert z["sum_token_map"].shape == (2, 4, 6, 16)
        assert z["per_block_step_token_mean"].shape == (2, 4, 2, 16)
    capsys.readouterr()
    assert analyse_stepavg.main(["--root", str(out), "--phrases", "red cat"]) == 0
    err = capsys.readouterr().err
    assert "CLIP not analysed" not in err  # FLUX.1 has no CLIP positions, by design: no note
    html = (out / "analysis" / "index.html").read_text()
    assert "model_family" in html and "flux" in html
    assert all(os.path.isdir(out / "analysis" / f"item{i}" / "t5" / "heatmaps") for i in (0, 1))


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny-random-flux", "--skip-guidance-layers", "1"], "--skip-guidance-layers applies to SD3"),
    (["--model", "tiny-random", "--true-cfg-scale", "2"], "--true-cfg-scale applies to FLUX.1 only"),
    (["--model", "tiny-random-flux", "--true-cfg-scale", "0.5"], "--true-cfg-scale must be"),
    (["--model", "tiny-random-flux", "--max-sequence-length", "513"], "--max-sequence-length must be between 1 and 512"),
    (["--model", "tiny-random-flux", "--height", "72"], "--height must be a positive multiple of 16"),
])
def test_flags_that_do_not_apply_are_refused(tmp_path, capsys, argv, message):
    assert dump.main([*argv, "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_tiny_random_flux(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert dump.main(["--model", "tiny-random-flux", "--steps", "1", "--height", "32", "--width", "32",
                      "--max-sequence-length", "8", "--device", "cpu", "--no-image", "--out", str(out)]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["model_family"] == "flux" and meta["random_weights"] and "FLUX.1" in meta["note"]
    assert meta["block_latent_sizes"][0] == [2, 2]  # (H/16, W/16)
