"""Metrics: global complex factor removed, noise detected, phase wrap handled."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.metrics import align_to_reference, reconstruction_errors

KEYS = {
    "amplitude_psnr_db",
    "amplitude_rmse",
    "amplitude_corr",
    "phase_rmse_rad",
    "phase_corr",
    "complex_nrmse",
}


def _ref(seed: int = 0, shape: tuple[int, int] = (48, 40)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    amp = 0.5 + rng.random(shape)
    phase = rng.uniform(-2.0, 2.0, shape)
    return (amp * np.exp(1j * phase)).astype(np.complex64)


def test_alignment_removes_global_factor() -> None:
    ref = _ref()
    est = (ref / (0.7 * np.exp(1.3j))).astype(np.complex64)
    aligned = align_to_reference(est, ref)
    assert np.max(np.abs(aligned - ref)) < 1e-5
    m = reconstruction_errors(0.7 * np.exp(1.3j) * ref, ref)
    assert set(m) == KEYS and all(isinstance(v, float) for v in m.values())
    assert m["phase_rmse_rad"] < 1e-5
    assert m["amplitude_corr"] == pytest.approx(1.0, abs=1e-6)
    assert m["phase_corr"] == pytest.approx(1.0, abs=1e-6)
    assert m["complex_nrmse"] < 1e-5
    assert m["amplitude_rmse"] < 1e-5
    assert m["amplitude_psnr_db"] > 90


def test_noise_scores_worse() -> None:
    ref = _ref(1)
    rng = np.random.default_rng(2)
    noise = rng.standard_normal(ref.shape) + 1j * rng.standard_normal(ref.shape)
    slight = reconstruction_errors(ref + 0.02 * noise, ref)
    heavy = reconstruction_errors(ref + 0.3 * noise, ref)
    assert heavy["amplitude_psnr_db"] < slight["amplitude_psnr_db"]
    assert heavy["amplitude_rmse"] > slight["amplitude_rmse"]
    assert heavy["amplitude_corr"] < slight["amplitude_corr"]
    assert heavy["phase_rmse_rad"] > slight["phase_rmse_rad"]
    assert heavy["phase_corr"] < slight["phase_corr"]
    assert heavy["complex_nrmse"] > slight["complex_nrmse"]


def test_phase_wrap_is_small_error() -> None:
    rng = np.random.default_rng(3)
    shape = (32, 32)
    ref_phase = np.pi - rng.uniform(0.0, 0.05, shape)  # just below +pi
    est_phase = -np.pi + rng.uniform(0.0, 0.05, shape)  # just above -pi
    ref = np.exp(1j * ref_phase)
    est = np.exp(1j * est_phase)
    m = reconstruction_errors(est, ref)
    assert m["phase_rmse_rad"] < 0.1
    assert abs(np.angle(np.exp(1j * (est_phase - ref_phase)))).max() < 0.1


def test_mask_restricts_pixels() -> None:
    ref = _ref(4)
    est = ref.copy()
    mask = np.zeros(ref.shape, dtype=bool)
    mask[10:30, 5:25] = True
    est[~mask] = 0  # garbage outside the mask must not count
    m = reconstruction_errors(est, ref, mask)
    assert m["complex_nrmse"] < 1e-6 and m["phase_rmse_rad"] < 1e-6
    with pytest.raises(ValueError):
        reconstruction_errors(est, ref, np.zeros(ref.shape, dtype=bool))
    with pytest.raises(ValueError):
        reconstruction_errors(est[:5], ref)
