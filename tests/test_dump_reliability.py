"""The dump command under faults: resume, kills, full disks, bad input, and special tokens typed in a prompt."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import analyse_stepavg
import sd_35_stepavg_dump as dump
from attention_map_diffusers.contract import prompt_tokens
from conftest import CLIP_BPE, ROOT

SMALL = ["--steps", "2", "--height", "64", "--width", "64", "--max-sequence-length", "16", "--device", "cpu"]


def run_main(args):
    return dump.main([str(a) for a in args])


def messages(err: str) -> list[str]:
    """The lines of stderr that are messages (not a progress bar's redraws)."""
    lines = (ln.replace("\x1b[A", "") for ln in err.splitlines())
    return [ln for ln in lines if ln.strip() and "%|" not in ln]


def one_line(err: str) -> str:
    lines = messages(err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def snapshot(folder):
    """Every file under ``folder`` with its size and modification time."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(d, f)
            st = os.lstat(p)
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns)
    return out


def no_model(monkeypatch):
    """Make loading a model fail the test: what follows must be decided before the model loads."""
    import attention_map_diffusers.dump.cli as cli

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "load_pipeline", refuse)


def read_words(folder, encoder):
    """(word, mass) rows of an analysis' words_summary.csv."""
    with open(os.path.join(folder, encoder, "tables", "words_summary.csv"), newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))[1:]
    return [(r[0], float(r[1])) for r in rows]


# ---------------------------------------------------------------------------------------------
# Bad input refused before the model loads


def test_bad_input_refused_before_the_model_loads(sd3_dir, tmp_path, monkeypatch, capsys):
    """Sizes beyond the model's pos_embed_max_size, read from a local folder's config."""
    no_model(monkeypatch)
    before = snapshot(tmp_path)
    # the tiny test model: pos_embed_max_size 96 patches of 2, VAE factor 2 -> at most 384 pixels
    assert run_main(["--model", sd3_dir, "--out", tmp_path / "o", *SMALL, "--width", "400"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "--width 400 is larger than this model accepts: at most 384 pixels" in line
    assert snapshot(tmp_path) == before


def test_repeated_seed_flags_add_up():
    parser = dump.build_parser()
    assert parser.parse_args(["--seed", "1", "--seed", "2"]).seed == [1, 2]
    assert parser.parse_args(["--seed", "1", "2", "--seed", "3"]).seed == [1, 2, 3]
    assert parser.parse_args(["--skip-guidance-layers", "7", "--skip-guidance-layers", "8"]).skip_guidance_layers == [7, 8]
    from attention_map_diffusers.dump.cli import _seeds
    from attention_map_diffusers.dump.runs import plan_runs

    assert _seeds(parser.parse_args([])) == [42]
    runs = plan_runs(["a cat"], _seeds(parser.parse_args(["--seed", "1", "--seed", "2"])), 1)
    assert [(r.seed, r.folder) for r in runs] == [(1, "0000-a-cat-s1"), (2, "0001-a-cat-s2")]


def test_prompts_file_with_a_byte_order_mark(tmp_path):
    from attention_map_diffusers.dump.runs import read_prompts_file

    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa cat\r\n# note\r\na dog\r\n".encode("utf-8"))
    assert read_prompts_file(str(path)) == ["a cat", "a dog"]
    path.write_bytes("\ufeff# only a comment\n".encode("utf-8"))
    assert read_prompts_file(str(path)) == []


@pytest.mark.slow
def test_undecodable_prompt_byte_in_a_subprocess(tmp_path):
    """A byte the shell cannot decode reaches Python as a lone surrogate: one line, exit 2."""
    proc = subprocess.run(
        [sys.executable, os.fsencode(ROOT / "sd_35_stepavg_dump.py"), b"--model", b"tiny-random", b"--prompt",
         b"a caf\xe9 table", b"--out", b"o"],
        capture_output=True, cwd=tmp_path, timeout=300, env=dict(os.environ, LC_ALL="C.UTF-8", PYTHONUTF8="1"),
    )
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    assert one_line(err).startswith("sd_35_stepavg_dump.py: error: --prompt") and "not valid UTF-8" in err
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Special tokens typed in a prompt

LITERAL = "a cat <|endoftext|> dog </s> barn <pad> tree <unk> owl on a café"


def _special_positions(tokens, special, offsets, which):
    return [(t, s, o) for t, s, o in zip(tokens, special, offsets) if t in which]


def _check_literal_specials(meta):
    tokens, special, offsets = meta["tokens"][0], meta["special_mask"][0], meta["token_offsets_clip"][0]
    assert special[0] == 1 and special[-1] == 1
    middle = [(s, o) for j, (t, s, o) in enumerate(zip(tokens, special, offsets)) if t == "<|endoftext|>" and 0 < j < len(tokens) - 1]
    assert middle == [(1, None)], "the typed <|endoftext|> is CLIP's special id"
    assert sum(special) == 3
    t5, sp5, off5 = meta["tokens_t5"][0], meta["special_mask_t5"][0], meta["token_offsets_t5"][0]
    typed = _special_positions(t5[:-1], sp5, off5, {"</s>", "<pad>", "<unk>"})
    assert [t for t, s, o in typed if s == 1 and o is None] == ["</s>", "<pad>", "<unk>"]
    # the é of café is unknown to the tiny T5 vocabulary: its <unk> stays part of the word
    assert [t for t, s, o in typed if s == 0] == ["<unk>"]


def _words(folder, encoder):
    return [w.lower() for w, _ in read_words(folder, encoder)]


def test_special_tokens_typed_in_a_prompt_belong_to_no_word(sd3_dir, tmp_path, capsys):
    out = tmp_path / "typed"
    assert run_main(["--model", sd3_dir, "--prompt", LITERAL, "--out", out, "--no-image", *SMALL,
                     "--max-sequence-length", 64]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    _check_literal_specials(meta)
    assert analyse_stepavg.main(["--root", str(out), "--tables-only", "--out", str(tmp_path / "a")]) == 0
    clip, t5 = _words(tmp_path / "a", "clip"), _words(tmp_path / "a", "t5")
    assert "endoftext" not in clip
    assert clip == ["a", "cat", "dog", "s", "barn", "pad", "tree", "unk", "owl", "on", "a", "café"]  # text to CLIP
    assert t5 == ["a", "cat", "endoftext", "dog", "barn", "tree", "owl", "on", "a", "café"]  # text to T5
    for enc in ("clip", "t5"):
        assert sum(m for _, m in read_words(tmp_path / "a", enc)) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.skipif(not CLIP_BPE.exists(), reason="needs ../shared/data/clip_bpe_simple_vocab_16e6.txt.gz")
def test_special_tokens_with_the_real_clip_vocabulary():
    from attention_map_diffusers.models.tiny import build_clip_tokenizer

    tok = build_clip_tokenizer(CLIP_BPE)
    t = prompt_tokens(tok, "a photo of <|endoftext|> a cat <|startoftext|>", 77)
    assert t.tokens == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "<|endoftext|>", "a</w>", "cat</w>",
                        "<|startoftext|>", "<|endoftext|>"]
    assert t.special == [1, 0, 0, 0, 1, 0, 0, 1, 1]
    assert [o is None for o in t.offsets] == [bool(s) for s in t.special]
    # "</s>", "<pad>" and "<unk>" are plain text to CLIP
    t = prompt_tokens(tok, "a </s> <pad> <unk>", 77)
    assert sum(t.special) == 2 and "<unk>" not in t.tokens


def test_original_format_view_gives_the_same_words(sd3_dir, tmp_path, capsys):
    """Without offsets and special masks (the original tool's view) the analysis finds specials by
    their strings; with --t5-tokenizer it tokenises T5 itself. Both must give the same words."""
    prompt = "a cat <|endoftext|> dog </s> barn <pad> tree"
    out = tmp_path / "fmt2"
    assert run_main(["--model", sd3_dir, "--prompt", prompt, "--out", out, "--no-image", *SMALL,
                     "--max-sequence-length", 64]) == 0
    assert analyse_stepavg.main(["--root", str(out), "--tables-only", "--out", str(tmp_path / "a2")]) == 0
    reference = {enc: read_words(tmp_path / "a2", enc) for enc in ("clip", "t5")}
    assert [w for w, _ in reference["clip"]] == ["a", "cat", "dog", "s", "barn", "pad", "tree"]
    assert [w for w, _ in reference["t5"]] == ["a", "cat", "endoftext", "dog", "barn", "tree"]

    def view(name, drop, t5_tokenizer=None):
        folder = tmp_path / name
        shutil.copytree(out, folder)
        meta = json.loads((folder / "metadata.json").read_text())
        for key in drop:
            meta.pop(key)
        (folder / "metadata.json").write_text(json.dumps(meta))
        extra = ["--t5-tokenizer", t5_tokenizer] if t5_tokenizer else []
        assert analyse_stepavg.main(["--root", str(folder), "--tables-only", "--out", str(tmp_path / f"a-{name}"), *extra]) == 0
        return {enc: read_words(tmp_path / f"a-{name}", enc) for enc in ("clip", "t5")}

    bare = view("bare", ["special_mask", "special_mask_t5", "token_offsets_clip", "token_offsets_t5"])
    retokenised = view("t5tok", ["tokens_t5", "special_mask_t5", "token_offsets_t5"], os.path.join(sd3_dir, "tokenizer_3"))
    for got in (bare, retokenised):
        for enc in ("clip", "t5"):
            assert [w.lower() for w, _ in got[enc]] == [w for w, _ in reference[enc]], enc
            np.testing.assert_allclose([m for _, m in got[enc]], [m for _, m in reference[enc]], rtol=1e-6)
