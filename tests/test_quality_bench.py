"""bench/quality.py end to end on its --quick case: files written, figures in range."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("skimage")

pytestmark = pytest.mark.slow


def test_quick_quality_bench_writes_table_json_and_frc_plot(tmp_path):
    from bench.quality import main

    assert main(["--quick", "-o", str(tmp_path), "--machine", "t"]) == 0
    results = json.loads((tmp_path / "quality-t.json").read_text())
    (case,) = results["cases"]
    model = case["quality"]["model"]
    for key in ("amplitude_ssim", "phase_ssim", "amplitude_corr", "phase_corr"):
        assert -1.0 <= model[key] <= 1.0, key
    assert model["frc_resolution_px"] >= 1.0
    assert len(model["frc_curve"]["frc"]) == len(model["frc_curve"]["cycles_per_px"]) > 5
    assert case["unseen"]["model"]["amplitude_corr"] is not None
    assert case["steps"] == 20 and case["ort_cpu_patterns_per_s"] > 0
    table = (tmp_path / "quality-t.md").read_text()
    assert "| smooth | 1e+06 | 1 | unet-tiny |" in table
    assert (tmp_path / "quality-t-frc.png").stat().st_size > 1000
    # ptycho-run --refine 30 (the bench's default) beside the network alone, and from flat
    refine = case["refine"]
    assert refine["max_iterations"] == 30 and 1 <= refine["iterations"] <= 30
    assert refine["r_factor_end"] < 0.8 * refine["r_factor_start"]
    assert refine["quality"]["model"]["phase_corr"] > model["phase_corr"]
    assert refine["flat_start"]["r_factor_end"] > 0
    assert "## With `ptycho-run --refine 30`" in table


def test_quick_warm_start_bench_writes_warm_cold_and_untrained_rows(tmp_path):
    from bench.warm_start import main

    assert main(["--quick", "-o", str(tmp_path), "--machine", "t"]) == 0
    results = json.loads((tmp_path / "warm-start-t.json").read_text())
    (case,) = results["cases"]
    starts = [row["start"] for row in case["scan_b"]]
    assert starts == ["A's model, not trained on B", "warm", "cold"]
    for row in case["scan_b"]:
        assert -1.0 <= row["amplitude_corr"] <= 1.0 and row["frc_resolution_px"] >= 1.0
    assert [row["steps"] for row in case["scan_b"]] == [0, 20, 20]
    table = (tmp_path / "warm-start-t.md").read_text()
    assert "| smooth | 1e+06 | warm | steps | 20 |" in table
    assert "own model, on A (smooth)" in table
    assert "| flat object |" in table


def test_quick_pretrained_start_chains_simulated_stages_through_bs_probe(tmp_path):
    from bench.warm_start import main

    assert main(["--quick", "--start", "pretrained-scan-probe", "-o", str(tmp_path),
                 "--machine", "t"]) == 0
    (case,) = json.loads((tmp_path / "warm-start-t.json").read_text())["cases"]
    pretraining = case["scan_a"]["pretraining"]
    assert pretraining["probe_from"] == "b.npz" and len(pretraining["stages"]) == 2
    assert case["scan_a"]["steps"] == 40  # two stages of 20
    assert [row["start"] for row in case["scan_b"]] == ["A's model, not trained on B",
                                                        "warm", "cold"]
    table = (tmp_path / "warm-start-t.md").read_text()
    assert "| pretrained-scan-probe start, on its last simulated scan |" in table
    assert "not a model of scan A" in table and "through B's own probe" in table
