"""Smoke tests: each benchmark runs at a toy size and writes its JSON keys (no timing asserts)."""

from __future__ import annotations

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_bench_capture_toy(tmp_path, capsys):
    import bench_capture

    out = tmp_path / "capture.json"
    assert bench_capture.main(["--preset", "toy", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("ratio_capture_vs_stock", "ratio_fallback_vs_stock", "ratio_fullmatrix_vs_capture",
                "capture_state_bytes", "capture_state_bytes_sd35_large_1024_50",
                "fullmatrix_host_bytes_sd35_large_1024_50"):
        assert res[key] > 0, key
    assert res["capture_output_identical_to_stock"] is True
    # the computed sizes follow from the shapes: (64*64*333*4 + 2*38*50*333*2 + 50*4) and 50*38*2*38*4096*333*2
    assert res["capture_state_bytes_sd35_large_1024_50"] == 64 * 64 * 333 * 4 + 2 * 38 * 50 * 333 * 2 + 200
    assert res["capture_state_bytes_sd35_large_1024_50"] <= 8 * 2**20
    assert res["fullmatrix_host_bytes_sd35_large_1024_50"] == 50 * 38 * 2 * 38 * 4096 * 333 * 2
    assert "capture / stock" in capsys.readouterr().out


def test_bench_analysis_small(tmp_path):
    import bench_analysis

    out = tmp_path / "analysis.json"
    assert bench_analysis.main(["--size", "small", "--repeats", "1", "--modes", "with_plots,tables_only", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["seconds_with_plots"] > 0 and res["seconds_tables_only"] > 0
