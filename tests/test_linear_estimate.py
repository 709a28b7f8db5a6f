"""bench.linear_estimate: the network's first layer scored as a reconstruction, by probe."""

import dataclasses

import pytest

pytest.importorskip("skimage")
pytest.importorskip("torch")

from bench.common import QUICK_SCAN  # noqa: E402
from bench.forward_model import save  # noqa: E402
from bench.linear_estimate import score_estimates  # noqa: E402


@pytest.mark.parametrize("probe_kind", ["pupil", "disc"])
def test_the_dark_field_phase_only_scrambles_a_focused_probes_estimate(tmp_path, probe_kind):
    path = tmp_path / "scan.npz"
    save(str(path), dataclasses.replace(QUICK_SCAN, kind="natural", probe_kind=probe_kind))
    row = score_estimates(path)
    every, bright = row["all"], row["bright_field_only"]
    assert 0.0 < row["r50_px"] < row["r80_px"] < 32
    if probe_kind == "pupil":
        # the pupil's far field lights 9 % of this 32-px detector (2 % at N = 64); the
        # phase the front end gives the rest is that of numerical zeros (measured here:
        # amp SSIM 0.21 against 0.37; 0.11 against 0.44 at N = 64)
        assert row["bright_fraction"] < 0.15
        assert bright["amplitude_ssim"] > every["amplitude_ssim"] + 0.1
        assert bright["amplitude_corr"] > every["amplitude_corr"]
    else:  # a disc lights nearly all of it: leaving out the rest changes nothing
        assert row["bright_fraction"] > 0.5
        assert bright["amplitude_ssim"] == pytest.approx(every["amplitude_ssim"], abs=0.01)
