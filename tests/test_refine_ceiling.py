"""bench/refine_ceiling.py: what the sub-pixel shift model costs the refinement."""

from __future__ import annotations

import json

import pytest

from bench.refine_ceiling import main


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ceiling")
    assert main(["--quick", "--kinds", "sparse", "--doses", "1e8", "--iterations", "20",
                 "-o", str(out), "--machine", "test"]) == 0
    table = (out / "refine-ceiling-test.md").read_text()
    assert "| fourier | sparse | 1e+08 |" in table and "| fine-grid | sparse | 1e+08 |" in table
    return {c["model"]: c for c in json.loads((out / "refine-ceiling-test.json").read_text())[
        "cases"]}


def test_on_scans_made_by_an_object_shift_only_the_object_shift_reaches_the_truth(results):
    """Sharp discs at fractional positions, near noise-free: the probe-shift model aliases
    them differently from the scan's own model and stops far from the truth."""
    case = results["fourier"]
    assert case["object"]["amplitude_ssim"] > 0.97
    assert case["probe"]["amplitude_ssim"] < 0.85
    assert case["object"]["r_factor_at_truth"] < 0.5 * case["probe"]["r_factor_at_truth"]


def test_on_physical_scans_neither_model_reaches_the_truth(results):
    """The fine-grid scans are neither refinement's model: both stop short of the truth
    (SSIM < 0.95) and far above the noise, the object shift with the lower misfit."""
    case = results["fine-grid"]
    for shift in ("object", "probe"):
        assert 0.8 < case[shift]["amplitude_ssim"] < 0.95
        assert case[shift]["r_factor_end"] > 0.02
    assert case["object"]["r_factor_end"] < case["probe"]["r_factor_end"]


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        main(["--kinds", "nope", "-o", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--iterations", "0", "-o", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--models", "exact", "-o", str(tmp_path)])
