"""bench/refine_ceiling.py: what the sub-pixel shift convention costs the refinement."""

from __future__ import annotations

import json

import pytest

from bench.common import QUICK_SCAN
from bench.forward_model import ScanSpec
from bench.refine_ceiling import convention_mismatch, main


def test_object_shift_is_closer_to_the_band_exact_far_field():
    """On sharp discs, shifting the probe aliases more than shifting the object."""
    spec = ScanSpec(**{**QUICK_SCAN.to_dict(), "kind": "sparse"})
    mismatch = convention_mismatch(spec, patterns=12)
    assert mismatch["r_object_shift_vs_exact"] < 0.7 * mismatch["r_probe_shift_vs_exact"]
    assert mismatch["r_probe_shift_vs_exact"] > 0.01


def test_whole_pixel_positions_remove_the_ceiling(tmp_path):
    """Near noise-free, the truth is a fixed point only where both conventions agree."""
    assert main(["--quick", "--kinds", "sparse", "--doses", "1e8", "--iterations", "20",
                 "-o", str(tmp_path), "--machine", "test"]) == 0
    results = json.loads((tmp_path / "refine-ceiling-test.json").read_text())
    case = results["cases"][0]
    assert case["whole_pixel"]["amplitude_ssim"] > 0.99
    assert case["fractional"]["amplitude_ssim"] < 0.9
    assert case["whole_pixel"]["r_factor_at_truth"] < 0.1 * case["fractional"][
        "r_factor_at_truth"]
    assert "| sparse | 1e+08 |" in (tmp_path / "refine-ceiling-test.md").read_text()


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        main(["--kinds", "nope", "-o", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--iterations", "0", "-o", str(tmp_path)])
