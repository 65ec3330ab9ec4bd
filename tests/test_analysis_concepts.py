"""Concept maps (issue #23) on the reading side: the optional keys validated, and analysis/concepts/."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import analyse_stepavg  # noqa: E402
from attention_map_diffusers.analysis.dumpfile import load_dump  # noqa: E402
from attention_map_diffusers.contract import UserError  # noqa: E402
from synthetic_dump import concept_arrays, make_layout, random_arrays, write_dump  # noqa: E402

PROMPT = "a red cat under a blue sky"
CONCEPTS = ["cat", "sky", "background"]


def concept_run(folder, *, B=1, blocks=4, steps=3, grid=(4, 5), nan_blocks=(1,), block_maps=False, store_dtype="float16",
                arrays_edit=None, meta_edit=None, logits=None, image_size=(64, 48), seed=0):
    """A synthetic run with concept maps; returns (layout, arrays as written, metadata)."""
    layout = make_layout([PROMPT] * B, t5_len=16)
    arrays = random_arrays(layout, num_blocks=blocks, num_steps=steps, grid=grid, seed=seed)
    extra, keys = concept_arrays(B, CONCEPTS, blocks, steps, grid, seed=seed, nan_blocks=nan_blocks, block_maps=block_maps,
                                 logits=logits)
    arrays.update(extra)
    for k, v in (arrays_edit or {}).items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    keys.update(meta_edit or {})
    md = write_dump(folder, layout, arrays, meta=keys, store_dtype=store_dtype, image_size=image_size)
    return layout, arrays, md


# ---------------------------------------------------------------------------------------------
# reading


def test_dump_with_concepts_loads_them(tmp_path):
    _, arrays, _ = concept_run(tmp_path, block_maps=True, store_dtype="float32")
    d = load_dump(str(tmp_path), block_maps=True)
    c = d.concepts
    assert c is not None and c.names == tuple(CONCEPTS) and c.N == 3 * 3
    np.testing.assert_array_equal(c.sum_map, arrays["concept_sum_map"])
    assert c.blocks == (0, 2, 3) and c.steps == (0, 1, 2) and c.rule == "flux-default"
    assert c.stream_blocks() == [0, 2, 3] and np.isnan(c.step_mean[:, 1]).all()
    np.testing.assert_allclose(c.mean_map(0).sum(axis=-1), 1.0, atol=1e-5)
    assert c.block_maps.shape == (1, 4, 4, 5, 3)
    assert load_dump(str(tmp_path)).concepts.block_maps is None  # read only when asked


def test_dump_without_concepts_is_read_as_before(tmp_path):
    layout = make_layout([PROMPT], t5_len=16)
    arrays = random_arrays(layout, 3, 2, (4, 4))
    write_dump(tmp_path, layout, arrays)
    d = load_dump(str(tmp_path))
    assert d.concepts is None and d.sum_token_map.shape == (1, 4, 4, 93)
    assert analyse_stepavg.main(["--root", str(tmp_path), "--tables-only"]) == 0
    assert not (tmp_path / "analysis" / "concepts").exists()


def _bad_sums(shape):
    a = np.full(shape, 1.0 / 3, np.float32)
    a[..., 0] += 0.05  # sums to 1.05 at every pixel
    return a


@pytest.mark.parametrize("case, arrays_edit, meta_edit, message", [
    ("array missing", {"concept_N": None}, None, "lacks 'concept_N'"),
    ("metadata missing", None, {"concepts": None}, "metadata concepts=None must be a non-empty list"),
    ("empty list", None, {"concepts": []}, "must be a non-empty list"),
    ("duplicate", None, {"concepts": ["cat", "sky", "cat"]}, "names 'cat' twice"),
    ("C differs", None, {"concepts": ["cat", "sky"]}, r"concept_sum_map has shape \(1, 4, 5, 3\), expected .* = \(1, 4, 5, 2\)"),
    ("grid differs", {"concept_sum_map": np.full((1, 4, 4, 3), 3.0, np.float32)}, None, "concept_sum_map has shape"),
    ("N zero", {"concept_N": np.asarray(0)}, None, "concept_N must be one positive integer"),
    ("not finite", {"concept_sum_map": np.full((1, 4, 5, 3), np.inf, np.float32)}, None, "NaN or inf"),
    ("sums off", {"concept_sum_map": _bad_sums((1, 4, 5, 3)) * 9}, None, r"does not sum to 1 .*off by up to 0\.05"),
    ("step mean shape", {"concept_per_block_step_mean": np.full((1, 4, 2, 3), 1 / 3, np.float32)}, None,
     "concept_per_block_step_mean has shape"),
    ("step mean sums off", {"concept_per_block_step_mean": _bad_sums((1, 4, 3, 3))}, None, "concept_per_block_step_mean does not sum to 1"),
    ("all NaN", {"concept_per_block_step_mean": np.full((1, 4, 3, 3), np.nan, np.float32)}, None, "NaN for every block"),
    ("blocks out of range", None, {"concept_blocks": [0, 7]}, r"concept_blocks=\[0, 7\] must be .* \(0 to 3\)"),
    ("block without stream", None, {"concept_blocks": [0, 1]}, "lists block position 1, whose concept_per_block_step_mean is NaN"),
    ("steps", None, {"concept_steps": [3]}, "concept_steps"),
])
def test_bad_concept_keys_are_refused_with_one_line(tmp_path, capsys, case, arrays_edit, meta_edit, message):
    concept_run(tmp_path, arrays_edit=arrays_edit, meta_edit=meta_edit, store_dtype="float32")  # None deletes a key
    with pytest.raises(UserError, match=message):
        load_dump(str(tmp_path))
    code = analyse_stepavg.main(["--root", str(tmp_path), "--tables-only"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("analyse_stepavg.py: error:"), err
    assert not (tmp_path / "analysis").exists()


def test_partly_nan_block_is_refused(tmp_path):
    mean = np.full((1, 4, 3, 3), 1 / 3, np.float32)
    mean[0, 2, 1] = np.nan
    concept_run(tmp_path, arrays_edit={"concept_per_block_step_mean": mean}, meta_edit={"concept_blocks": [0]})
    with pytest.raises(UserError, match="block position 2 is partly NaN"):
        load_dump(str(tmp_path))
