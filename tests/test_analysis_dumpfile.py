"""Loading dumps: format 2, the original tool's format, per-block maps."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import analyse_stepavg  # noqa: E402
from attention_map_diffusers.analysis.dumpfile import format_ranges, load_dump  # noqa: E402
from synthetic_dump import make_layout, random_arrays, write_dump  # noqa: E402

PROMPT = "A rusty bicycle in front of a barn"


def test_format2_loads_as_float32_in_denoising_order(tmp_path):
    layout = make_layout([PROMPT], t5_len=16)
    arrays = random_arrays(layout, num_blocks=3, num_steps=4, grid=(4, 5))
    write_dump(tmp_path, layout, arrays)
    d = load_dump(str(tmp_path))
    assert d.format_version == 2 and d.sum_token_map.dtype == np.float32 and d.step_mean.dtype == np.float32
    assert d.sum_token_map.shape == (1, 4, 5, 93) and d.N == 12
    np.testing.assert_allclose(d.step_mean, arrays["per_block_step_token_mean"].astype(np.float16), rtol=0)
    assert d.timesteps[0] > d.timesteps[-1]
    assert d.encoders["clip"].span == (0, 77) and d.encoders["t5"].span == (77, 93)
    assert d.encoders["t5"].offsets is not None and d.block_ids == [0, 1, 2]
    assert d.images == [os.path.join(str(tmp_path), "images", "seed42-64x64-idx0.png")]
    np.testing.assert_allclose(d.avg_map, d.sum_token_map / 12)


def test_original_dump_is_flipped_and_broadcast(tmp_path):
    # two images of one prompt; the original tool stored the prompt once and one flat token list
    layout = make_layout([PROMPT, PROMPT], t5_len=16)
    arrays = random_arrays(layout, num_blocks=2, num_steps=5, grid=(4, 4))
    write_dump(tmp_path, layout, arrays, original=True, meta={"prompt": PROMPT, "tokens": layout.clip[0].tokens, "special_mask": layout.clip[0].special})
    d = load_dump(str(tmp_path))
    assert d.format_version == 1 and d.prompts == [PROMPT, PROMPT]
    np.testing.assert_array_equal(d.step_mean, arrays["per_block_step_token_mean"].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(d.timesteps, arrays["timesteps"])
    assert "t5" not in d.encoders and any("--t5-tokenizer" in n for n in (x.text for x in d.notes))
    assert d.encoders["clip"].tokens[1] == layout.clip[0].tokens and d.encoders["clip"].offsets is None
    assert [os.path.basename(p) for p in d.images] == ["seed42-64x64-idx0.png", "seed42-64x64-idx1.png"]


def test_original_dump_without_special_mask_infers_specials(tmp_path):
    layout = make_layout([PROMPT], t5_len=16)
    write_dump(tmp_path, layout, random_arrays(layout, 2, 2, (4, 4)), original=True, meta={"special_mask": None})
    d = load_dump(str(tmp_path))
    sp = d.encoders["clip"].special[0]
    assert sp[0] and sp[-1] and len(sp) == 77 and not any(sp[1:9])


def test_per_block_maps_restrict_heatmaps(tmp_path, capsys):
    layout = make_layout([PROMPT], t5_len=16)
    arrays = random_arrays(layout, num_blocks=3, num_steps=2, grid=(4, 4))
    pbm = np.full((1, 3, 4, 4, layout.T), 0.01, dtype=np.float32)
    barn = layout.positions("clip", 0, "barn")
    pbm[0, 1, :, :, :] = 0.0
    pbm[0, 1, :, :, barn] = 1.0  # in block 1, "barn" gets all of CLIP's word attention
    arrays["per_block_token_map"] = pbm
    arrays["sum_token_map"] = pbm.sum(axis=1)
    write_dump(tmp_path / "run", layout, arrays, store_dtype="float32")
    out = tmp_path / "run" / "analysis"
    assert analyse_stepavg.main(["--root", str(tmp_path / "run"), "--tables-only", "--blocks", "1", "--encoders", "clip"]) == 0
    last = (out / "clip" / "tables" / "words_summary.csv").read_text().splitlines()[-1].split(",")
    assert last[0] == "barn" and float(last[1]) == pytest.approx(1.0, abs=1e-6)
    # all blocks: per pixel, barn has 1 + 2 * 0.01 and each of the 7 other words 0.01 in blocks 0 and 2
    assert analyse_stepavg.main(["--root", str(tmp_path / "run"), "--tables-only", "--encoders", "clip"]) == 0
    mass = float((out / "clip" / "tables" / "words_summary.csv").read_text().splitlines()[-1].split(",")[1])
    assert mass == pytest.approx((1.0 + 0.02) / (1.0 + 0.02 + 7 * 0.02), rel=1e-5)


def test_blocks_without_per_block_maps_note(tmp_path, capsys):
    layout = make_layout([PROMPT], t5_len=16)
    write_dump(tmp_path / "run", layout, random_arrays(layout, 3, 2, (4, 4)))
    assert analyse_stepavg.main(["--root", str(tmp_path / "run"), "--tables-only", "--blocks", "1"]) == 0
    assert "heatmaps average all blocks" in capsys.readouterr().err


def test_format_ranges():
    assert format_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert format_ranges([]) == ""
