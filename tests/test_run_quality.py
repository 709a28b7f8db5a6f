"""ptycho-run's ground-truth quality block (runtime.run.quality_report), without torch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.run import quality_report
from runtime.stitch import StitchedObject


def _truth(shape: tuple[int, int] = (90, 100), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    amp = 0.5 + rng.random(shape)
    phase = rng.uniform(-2.5, 2.5, shape)
    return (amp * np.exp(1j * phase)).astype(np.complex64)


def _stitched(obj: np.ndarray, origin: tuple[int, int]) -> StitchedObject:
    weight = np.ones(obj.shape, np.float32)
    return StitchedObject(obj=obj.astype(np.complex64), weight=weight, mask=weight > 0,
                          origin_px=origin)


def test_ramp_and_global_factor_are_not_counted() -> None:
    truth = _truth()
    oy, ox, h, w = 7, 11, 60, 70
    yy, xx = np.mgrid[0:h, 0:w]
    est = truth[oy:oy + h, ox:ox + w] * 0.8 * np.exp(1j * (1.1 + 0.07 * xx - 0.2 * yy))
    mask = np.ones((h, w), bool)
    mask[:5] = False
    report = quality_report(_stitched(est, (oy, ox)), mask, truth)
    json.dumps(report, allow_nan=False)  # valid JSON: no inf / NaN
    assert report["ground_truth"] is True and report["scored_pixels"] == mask.sum()
    model = report["model"]
    assert model["phase_rmse_rad"] < 1e-5 and model["complex_nrmse"] < 1e-5
    assert model["phase_ramp_x_rad_per_px"] == pytest.approx(0.07, abs=1e-5)
    assert model["phase_ramp_y_rad_per_px"] == pytest.approx(-0.2, abs=1e-5)
    assert report["model_global_factor_only"]["phase_rmse_rad"] > 0.5
    assert report["flat_baseline"]["phase_rmse_rad"] > 0.5


def test_no_truth_and_truth_too_small() -> None:
    est = _truth((20, 20))
    mask = np.ones(est.shape, bool)
    assert quality_report(_stitched(est, (0, 0)), mask, None) == {"ground_truth": False}
    small = quality_report(_stitched(est, (5, 5)), mask, _truth((22, 22)))
    assert small["ground_truth"] is True and "outside" in small["error"]
