"""sd_35_stepavg_dump.py end to end on tiny pipelines loaded with --model <folder>."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sd_35_stepavg_dump as dump
from attention_map_diffusers import StepAverageRecorder
from conftest import CLIP_BPE, ROOT, load_pipeline

SMALL = ["--steps", "2", "--height", "64", "--width", "64", "--max-sequence-length", "16", "--device", "cpu"]

ORIGINAL_KEYS = {
    "prompt", "negative_prompt", "seed", "steps", "guidance_scale", "model_id", "scheduler", "image_size",
    "canonical_size", "batch_size", "num_steps", "num_blocks", "blocks", "block_latent_sizes", "tokens",
    "T_from_model", "special_mask", "timestamp",
}
V2_KEYS = {
    "format_version", "step_order", "timesteps", "text_spans", "tokens_t5", "special_mask_t5",
    "token_offsets_clip", "token_offsets_t5", "truncated", "max_sequence_length", "skip_guidance_layers", "cfg",
    "device", "dtype", "versions", "elapsed_s", "seeds", "num_images_per_prompt", "images", "store_dtype",
    "random_weights", "num_tokens_clip", "num_tokens_t5", "capture_path", "capture_verdicts",
}


def run_main(args, capsys=None):
    code = dump.main([str(a) for a in args])
    out = capsys.readouterr() if capsys is not None else None
    return code, out


def files_under(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def test_run_matches_recorder_and_schema(sd35m_dir, tmp_path, capsys):
    out = tmp_path / "run"
    prompt = "A rusty bicycle in front of a barn"
    code, cap = run_main(
        ["--model", sd35m_dir, "--prompt", prompt, "--seed", 5, "--guidance_scale", 4.0, "--neg", "blurry",
         "--store-dtype", "float32", "--save-block-maps", "--save-step-maps", "--out", out, *SMALL], capsys)
    assert code == 0, cap.err
    assert "1 run(s) written" in cap.out
    assert sorted(files_under(out)) == ["images/seed5-64x64-idx0.png", "metadata.json", "stepavg_token_maps_v1.npz"]

    # the same generation through the recorder directly
    pipe = load_pipeline(sd35m_dir)
    with StepAverageRecorder(pipe, keep_block_maps=True, keep_step_maps=True) as rec:
        pipe(prompt, negative_prompt="blurry", num_inference_steps=2, guidance_scale=4.0, height=64, width=64,
             max_sequence_length=16, generator=[torch.Generator().manual_seed(5)], output_type="latent")
    res = rec.result()
    z = np.load(out / "stepavg_token_maps_v1.npz")
    assert set(z.files) == set(res.arrays())
    for key, value in res.arrays().items():
        np.testing.assert_allclose(z[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
        assert z[key].dtype == (np.int64 if key == "N" else np.float32)

    meta = json.loads((out / "metadata.json").read_text())
    assert ORIGINAL_KEYS | V2_KEYS <= set(meta)
    T = 77 + 16
    assert meta["prompt"] == [prompt] and meta["negative_prompt"] == "blurry" and meta["seed"] == 5
    assert meta["format_version"] == 2 and meta["step_order"] == "denoising"
    assert meta["T_from_model"] == T == z["sum_token_map"].shape[-1]
    assert meta["text_spans"] == {"clip": [0, 77], "t5": [77, T]} == res.text_spans
    # on this CPU the fused flash kernel gives the lse and passes its self-check
    assert meta["capture_path"] == res.capture_path == "flash-lse"
    assert meta["capture_verdicts"] and all(v["ok"] for v in meta["capture_verdicts"])
    assert "attention captured through flash-lse (metadata capture_path)" in cap.out
    assert meta["num_blocks"] == 3 and meta["blocks"] == [f"transformer_blocks.{i}.attn" for i in range(3)]
    assert meta["block_latent_sizes"] == [[16, 16]] * 3 and meta["canonical_size"] == [16, 16]
    assert meta["num_steps"] == 2 and meta["timesteps"] == pytest.approx(z["timesteps"].tolist())
    assert meta["cfg"] is True and meta["skip_guidance_layers"] is None and meta["random_weights"] is False
    assert meta["images"] == ["images/seed5-64x64-idx0.png"] and meta["seeds"] == [5]
    assert meta["dtype"] == "float32" and meta["device"] == "cpu" and meta["store_dtype"] == "float32"
    assert set(meta["versions"]) == {"torch", "diffusers", "transformers", "attention_map_diffusers"}

    # tokens are the tokenizers' own, unpadded, specials included, with spans into the prompt
    ids = pipe.tokenizer(prompt)["input_ids"]
    assert meta["tokens"] == [pipe.tokenizer.convert_ids_to_tokens(ids)]
    assert meta["special_mask"][0][0] == 1 and meta["special_mask"][0][-1] == 1
    assert sum(meta["special_mask"][0]) == 2
    offsets = meta["token_offsets_clip"][0]
    assert offsets[0] is None and offsets[-1] is None
    words = [prompt[a:b].lower() for a, b in offsets[1:-1]]
    assert words == ["a", "rusty", "bicycle", "in", "front", "of", "a", "barn"]
    t5_ids = pipe.tokenizer_3(prompt)["input_ids"]
    assert meta["tokens_t5"] == [pipe.tokenizer_3.convert_ids_to_tokens(t5_ids)]
    assert meta["tokens_t5"][0][-1] == "</s>" and meta["special_mask_t5"][0][-1] == 1
    t5_off = meta["token_offsets_t5"][0]
    assert all(prompt[a:b].strip() for a, b in (o for o in t5_off if o is not None))
    assert meta["truncated"] == [{"clip": False, "t5": False}]

    # the PNG carries the metadata
    text = Image.open(out / "images" / "seed5-64x64-idx0.png").text
    assert json.loads(text["sd35_attention_metadata"]) == meta
    assert text["prompt"] == prompt and text["seed"] == "5"


def test_batches_seeds_and_images_per_prompt(sd3_dir, tmp_path, capsys):
    out = tmp_path / "many"
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# a comment\na red barn\n\n  a dog on a sofa  \n# another\na cat\n")
    code, cap = run_main(["--model", sd3_dir, "--prompts-file", prompts_file, "--prompt", "a tiny owl",
                          "--seed", 1, 2, "--batch-size", 2, "--num-images-per-prompt", 2, "--out", out, *SMALL], capsys)
    assert code == 0, cap.err
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    # prompts: --prompt first, then the file's, batched by 2, x 2 seeds
    assert [(r["prompt"], r["seed"]) for r in rows] == [
        (["a tiny owl", "a red barn"], 1), (["a tiny owl", "a red barn"], 2),
        (["a dog on a sofa", "a cat"], 1), (["a dog on a sofa", "a cat"], 2),
    ]
    assert [r["folder"] for r in rows] == ["0000-a-tiny-owl-s1", "0001-a-tiny-owl-s2", "0002-a-dog-on-a-sofa-s1",
                                           "0003-a-dog-on-a-sofa-s2"]
    assert all(r["status"] == "done" for r in rows)
    meta = json.loads((out / "0003-a-dog-on-a-sofa-s2" / "metadata.json").read_text())
    assert meta["prompt"] == ["a dog on a sofa", "a dog on a sofa", "a cat", "a cat"]
    assert meta["seeds"] == [2, 3, 2, 3] and meta["batch_size"] == 4 and meta["num_images_per_prompt"] == 2
    assert len(meta["tokens"]) == 4 and meta["tokens"][2] == ["<|startoftext|>", "a</w>", "cat</w>", "<|endoftext|>"]
    assert meta["images"] == [f"images/seed{s}-64x64-idx{i}.png" for i, s in enumerate([2, 3, 2, 3])]
    for rel in meta["images"]:
        assert Image.open(out / "0003-a-dog-on-a-sofa-s2" / rel).size == (64, 64)
    z = np.load(out / "0003-a-dog-on-a-sofa-s2" / "stepavg_token_maps_v1.npz")
    assert z["sum_token_map"].shape[0] == 4 and z["sum_token_map"].dtype == np.float16

    # item 2 (prompt "a cat", seed 2) is the same image a plain single-prompt call gives
    pipe = load_pipeline(sd3_dir)
    single = pipe("a cat", num_inference_steps=2, height=64, width=64, max_sequence_length=16, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(2), output_type="np").images[0]
    batched = np.asarray(Image.open(out / "0003-a-dog-on-a-sofa-s2" / meta["images"][2]), dtype=np.float32) / 255
    assert np.abs(batched - single).max() <= 1.5 / 255


def test_resume_skips_and_overwrite_redoes(sd3_dir, tmp_path, capsys):
    out = tmp_path / "resume"
    args = ["--model", sd3_dir, "--prompt", "a cat", "--prompt", "a dog", "--out", out, "--no-image", *SMALL]
    assert run_main(args, capsys)[0] == 0
    first = (out / "0001-a-dog" / "stepavg_token_maps_v1.npz").stat().st_mtime_ns
    os.unlink(out / "0000-a-cat" / "metadata.json")  # as if interrupted before the last file
    code, cap = run_main(args, capsys)
    assert code == 0 and "1 run(s) written, 1 skipped" in cap.out
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["done", "skipped"]
    assert (out / "0001-a-dog" / "stepavg_token_maps_v1.npz").stat().st_mtime_ns == first
    code, cap = run_main(args + ["--overwrite"], capsys)
    assert code == 0 and "2 run(s) written, 0 skipped" in cap.out
    assert (out / "0001-a-dog" / "stepavg_token_maps_v1.npz").stat().st_mtime_ns != first


def test_single_run_resume_without_loading(tmp_path, capsys, sd3_dir):
    out = tmp_path / "one"
    args = ["--model", sd3_dir, "--out", out, "--no-image", *SMALL]
    assert run_main(args, capsys)[0] == 0
    code, cap = run_main(args, capsys)
    assert code == 0 and "0 run(s) written, 1 skipped" in cap.out
    assert not (out / "runs.jsonl").exists()


def test_long_prompt_is_truncated_with_a_warning(sd3_dir, tmp_path, capsys):
    out = tmp_path / "long"
    prompt = " ".join(["a small red house next to a big green tree"] * 10)
    code, cap = run_main(["--model", sd3_dir, "--prompt", prompt, "--out", out, "--no-image", *SMALL], capsys)
    assert code == 0
    assert "longer than CLIP's 77 tokens" in cap.err and "longer than T5's 16 tokens" in cap.err
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["truncated"] == [{"clip": True, "t5": True}]
    assert len(meta["tokens"][0]) == 77 and meta["tokens"][0][-1] == "<|endoftext|>"
    assert len(meta["tokens_t5"][0]) == 16


@pytest.mark.skipif(not CLIP_BPE.exists(), reason="needs ../shared/data/clip_bpe_simple_vocab_16e6.txt.gz")
def test_real_clip_vocabulary_tokens_and_offsets(tmp_path, capsys):
    from attention_map_diffusers.models.tiny import TinySD3Config, save_tiny_sd3_pipeline

    model = save_tiny_sd3_pipeline(tmp_path / "model", TinySD3Config(clip_bpe_path=str(CLIP_BPE)))
    out = tmp_path / "real"
    prompt = "A capybara holding a sign, photorealistic!"
    assert run_main(["--model", model, "--prompt", prompt, "--out", out, "--no-image", *SMALL], capsys)[0] == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["tokens"][0] == ["<|startoftext|>", "a</w>", "cap", "y", "bara</w>", "holding</w>", "a</w>", "sign</w>",
                                 ",</w>", "photo", "realistic</w>", "!</w>", "<|endoftext|>"]
    spans = [prompt[a:b] for a, b in meta["token_offsets_clip"][0][1:-1]]
    assert spans == ["A", "cap", "y", "bara", "holding", "a", "sign", ",", "photo", "realistic", "!"]


@pytest.mark.slow
def test_tiny_random_end_to_end_in_a_subprocess(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "sd_35_stepavg_dump.py"), "--model", "tiny-random", "--steps", "2",
         "--height", "128", "--width", "96", "--skip-guidance-layers", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 run(s) written" in proc.stdout
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["random_weights"] is True and "RANDOM WEIGHTS" in meta["note"]
    assert meta["model_id"] == "tiny-random" and meta["T_from_model"] == 77 + 256
    assert meta["canonical_size"] == [8, 6] and meta["skip_guidance_layers"] == [1]
    text = Image.open(out / meta["images"][0]).text
    assert "RANDOM WEIGHTS" in text["comment"]


def test_jpeg_and_no_embed(sd3_dir, tmp_path, capsys):
    out = tmp_path / "jpg"
    args = ["--model", sd3_dir, "--out", out, "--image-format", "jpg", *SMALL]
    assert run_main(args, capsys)[0] == 0
    meta = json.loads((out / "metadata.json").read_text())
    img = Image.open(out / meta["images"][0])
    assert img.format == "JPEG" and json.loads(img.info["comment"])["seed"] == 42
    out2 = tmp_path / "plain"
    assert run_main(["--model", sd3_dir, "--out", out2, "--no-embed-metadata", *SMALL], capsys)[0] == 0
    meta2 = json.loads((out2 / "metadata.json").read_text())
    assert "sd35_attention_metadata" not in Image.open(out2 / meta2["images"][0]).text


def test_canonical_size_and_guidance_off(sd3_dir, tmp_path, capsys):
    out = tmp_path / "canon"
    args = ["--model", sd3_dir, "--out", out, "--canonical-size", 10, 12, "--guidance-scale", 1.0, "--no-image", *SMALL]
    assert run_main(args, capsys)[0] == 0
    meta = json.loads((out / "metadata.json").read_text())
    z = np.load(out / "stepavg_token_maps_v1.npz")
    assert meta["canonical_size"] == [10, 12] and z["sum_token_map"].shape == (1, 10, 12, 93)
    assert meta["cfg"] is False and meta["images"] == [None]


def test_help_explains_every_flag(capsys):
    assert dump.main(["--help"]) == 0
    text = capsys.readouterr().out
    for action in dump.build_parser()._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, f"{action.option_strings} has no help"


BAD = {
    "missing folder": (["--model", "./no/such/folder"], "no such folder"),
    "not a pipeline folder": (["--model", "{tmp}"], "no model_index.json"),
    "unknown hub id": (["--model", "nobody-here/not-a-model"], "'nobody-here/not-a-model' is not a local folder"),
    "height": (["--height", "500"], "--height must be a positive multiple of 16, got 500"),
    "width": (["--width", "0"], "--width must be a positive multiple of 16, got 0"),
    "steps": (["--steps", "0"], "--steps must be >= 1, got 0"),
    "batch size": (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    "sequence length": (["--max-sequence-length", "600"], "--max-sequence-length must be between 1 and 512, got 600"),
    "empty prompts file": (["--prompts-file", "{tmp}/empty.txt"], "holds no prompt"),
    "unreadable prompts file": (["--prompts-file", "{tmp}/nope.txt"], "cannot read --prompts-file"),
    "empty prompt": (["--prompt", "  "], "empty prompt"),
    "out is a file": (["--out", "{tmp}/afile"], "is an existing file"),
    "out under a file": (["--out", "{tmp}/afile/sub"], "cannot be created"),
    "canonical size": (["--canonical-size", "0", "4"], "--canonical-size must be two positive integers"),
    "canonical size type": (["--canonical-size", "a", "b"], "invalid int value: 'a'"),
    "cuda": (["--device", "cuda"], "CUDA is not available"),
    "cpu offload on the cpu": (["--cpu-offload", "--device", "cpu"], "--cpu-offload needs an accelerator"),
    "model needs a multiple": (["--model", "tiny-random", "--height", "72"], "multiple of 16, got 72"),
    "guidance nan": (["--guidance-scale", "nan"], "--guidance-scale must be a finite number, got nan"),
    "guidance inf": (["--guidance_scale=-inf"], "--guidance-scale must be a finite number, got -inf"),
    "seed too large": (["--seed", "18446744073709551616"], "--seed 18446744073709551616 is outside what torch.Generator"),
    "seed too small": (["--seed", "1", "-9223372036854775809"], "--seed -9223372036854775809 is outside"),
    "seed + image index too large": (["--seed", "18446744073709551615", "--num-images-per-prompt", "2"],
                                     "image j of a prompt uses seed + j"),
    "seed given twice": (["--seed", "3", "--seed", "3"], "--seed 3 is given twice"),
    "out a dangling symlink": (["--out", "{tmp}/dangling"], "is a symbolic link to"),
    "out under a dangling symlink": (["--out", "{tmp}/dangling/sub"], "which does not exist"),
    "beyond pos_embed_max_size": (["--model", "tiny-random", "--height", "1600"],
                                  "--height 1600 is larger than this model accepts: at most 1536 pixels"),
    "prompt with an undecodable byte": (["--prompt", "a caf\udce9 table"], "--prompt 'a caf\\udce9 table' is not valid UTF-8"),
    "negative prompt with an undecodable byte": (["--neg", "blur\udcff"], "--neg 'blur\\udcff' is not valid UTF-8"),
    "prompts file not UTF-8": (["--prompts-file", "{tmp}/latin1.txt"], "cannot read --prompts-file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_and_writes_nothing(case, tmp_path, capsys):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args, message = BAD[case]
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "latin1.txt").write_bytes("a café\n".encode("latin-1"))
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    before = files_under(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    if "--model" not in argv:
        argv += ["--model", "tiny-random"]
    code = dump.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert files_under(tmp_path) == before


@pytest.mark.slow
def test_bad_input_in_a_subprocess_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "sd_35_stepavg_dump.py"), "--model", "nobody-here/not-a-model", "--out", "o"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("sd_35_stepavg_dump.py: error: --model"), proc.stderr
    assert os.listdir(tmp_path) == []


def test_gated_model_explains_how_to_log_in(monkeypatch, tmp_path, capsys):
    from diffusers import StableDiffusion3Pipeline

    try:
        from huggingface_hub.errors import GatedRepoError
    except ImportError:
        from huggingface_hub.utils import GatedRepoError

    def gated(*args, **kwargs):
        err = GatedRepoError.__new__(GatedRepoError)  # its __init__ wants an HTTP response
        Exception.__init__(err, "401 Client Error: access to model is restricted")
        raise err

    monkeypatch.setattr(StableDiffusion3Pipeline, "from_pretrained", gated)
    code = dump.main(["--model", "stabilityai/stable-diffusion-3.5-large", "--out", str(tmp_path / "o"), *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and "gated" in err and "huggingface-cli login" in err and "HF_TOKEN" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_several_processes_split_the_runs(tmp_path, sd3_dir):
    """Two CPU processes under torchrun (the launcher accelerate launch uses for several GPUs)."""
    out = tmp_path / "split"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "sd_35_stepavg_dump.py"), "--model", sd3_dir, "--prompt", "a cat", "--prompt", "a dog",
           "--prompt", "a barn", "--seed", "1", "2", "--out", str(out), "--no-image", *SMALL]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["run"] for r in rows] == list(range(6))
    assert [r["process"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert all(r["status"] == "done" for r in rows)
    assert not [f for f in os.listdir(out) if f.startswith(".")], "per-process part files must be cleaned up"
    assert proc.stdout.count("run(s) written") == 1, "only the main process prints the summary"


def test_default_size_is_the_models_native_size(sd3_dir, tmp_path, capsys):
    out = tmp_path / "native"
    code, cap = run_main(["--model", sd3_dir, "--steps", "1", "--max-sequence-length", "16", "--device", "cpu",
                          "--out", out], capsys)
    assert code == 0, cap.err
    pipe = load_pipeline(sd3_dir)
    native = pipe.default_sample_size * pipe.vae_scale_factor  # what diffusers itself draws by default
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["image_size"] == [native, native] and native != 1024
    with Image.open(out / meta["images"][0]) as img:
        assert img.size == (native, native)
