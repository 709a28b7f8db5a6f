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


# --------------------------------------------------------------------------- phase ramp


def _ramp(shape: tuple[int, int], a: float, gy: float, gx: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    return np.exp(1j * (a + gy * yy + gx * xx))


@pytest.mark.parametrize(("a", "gy", "gx"), [(0.4, 0.05, -0.03), (2.9, -0.35, 0.6)])
def test_phase_ramp_is_removed(a: float, gy: float, gx: float) -> None:
    """truth * exp(i (a + gy y + gx x)) * 0.8: ~0 error with the ramp removed, large without.
    The second ramp wraps many times across the image (0.6 rad/px over 40 px = 24 rad)."""
    ref = _ref(shape=(48, 40))
    est = (ref * _ramp(ref.shape, a, gy, gx) * 0.8).astype(np.complex64)
    plain = reconstruction_errors(est, ref)
    fixed = reconstruction_errors(est, ref, remove_ramp=True)
    assert plain["phase_rmse_rad"] > 0.5 and plain["complex_nrmse"] > 0.5
    assert fixed["phase_rmse_rad"] < 1e-5
    assert fixed["complex_nrmse"] < 1e-5 and fixed["amplitude_psnr_db"] > 90
    assert fixed["phase_ramp_y_rad_per_px"] == pytest.approx(gy, abs=1e-6)
    assert fixed["phase_ramp_x_rad_per_px"] == pytest.approx(gx, abs=1e-6)
    assert set(plain) == KEYS
    assert set(fixed) == KEYS | {"phase_ramp_y_rad_per_px", "phase_ramp_x_rad_per_px"}


def test_phase_ramp_fit_on_a_mask_with_noise() -> None:
    """Fitted on the mask only (garbage outside it), with phase noise: the slopes come back
    to within the noise's least-squares uncertainty, and the corrected estimate scores the
    noise alone."""
    from runtime.metrics import fit_phase_ramp, remove_phase_ramp

    rng = np.random.default_rng(3)
    ref = _ref(seed=4, shape=(64, 64))
    noise = rng.normal(0.0, 0.1, ref.shape)
    est = ref * _ramp(ref.shape, -1.0, 0.12, 0.2) * np.exp(1j * noise)
    mask = np.zeros(ref.shape, bool)
    mask[8:56, 10:50] = True
    est[~mask] = rng.normal(size=(~mask).sum()) * 5  # must not disturb the fit
    a, gy, gx = fit_phase_ramp(est, ref, mask)
    assert gy == pytest.approx(0.12, abs=2e-3) and gx == pytest.approx(0.2, abs=2e-3)
    corrected, plane = remove_phase_ramp(est, ref, mask)
    assert plane == (a, gy, gx) and corrected.shape == est.shape
    errors = reconstruction_errors(est, ref, mask, remove_ramp=True)
    assert errors["phase_rmse_rad"] == pytest.approx(0.1, rel=0.1)
    assert reconstruction_errors(est, ref, mask)["phase_rmse_rad"] > 1.0


def test_no_ramp_gives_a_zero_fit() -> None:
    from runtime.metrics import fit_phase_ramp

    ref = _ref(seed=5)
    a, gy, gx = fit_phase_ramp(ref * np.exp(0.7j), ref)
    assert a == pytest.approx(0.7, abs=1e-9)
    assert abs(gy) < 1e-9 and abs(gx) < 1e-9
