"""SSIM, PSNR and FRC: checked against scikit-image and against cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.image_quality import frc_curve, frc_resolution, psnr, quality_figures, ssim

skmetrics = pytest.importorskip("skimage.metrics")


def _pair(seed: int = 0, noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.random((60, 70))
    return a, a + noise * rng.standard_normal(a.shape)


@pytest.mark.parametrize("noise", [0.01, 0.1, 0.5])
def test_ssim_matches_scikit_image(noise: float) -> None:
    ref, est = _pair(noise=noise)
    theirs = skmetrics.structural_similarity(ref, est, gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False, data_range=1.0)
    assert ssim(est, ref, data_range=1.0) == pytest.approx(theirs, abs=1e-12)


def test_psnr_matches_scikit_image() -> None:
    ref, est = _pair()
    theirs = skmetrics.peak_signal_noise_ratio(ref, est, data_range=1.0)
    assert psnr(est, ref, data_range=1.0) == pytest.approx(theirs, abs=1e-10)


def test_ssim_mask_scores_only_the_masked_region() -> None:
    ref, est = _pair(noise=0.02)
    est[:, 40:] = 0.0  # ruin the right part
    mask = np.zeros(ref.shape, bool)
    mask[5:55, 5:35] = True
    inside = skmetrics.structural_similarity(ref[5:55, 5:35], est[5:55, 5:35], sigma=1.5,
                                             gaussian_weights=True, data_range=1.0,
                                             use_sample_covariance=False)
    assert ssim(est, ref, mask, data_range=1.0) == pytest.approx(inside, abs=1e-12)
    assert ssim(est, ref, data_range=1.0) < inside - 0.2


def test_frc_of_identical_images_is_one_and_of_independent_noise_near_zero() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((96, 96)) + 1j * rng.standard_normal((96, 96))
    freq, same = frc_curve(a, a)
    assert np.allclose(same[1:], 1.0)
    assert freq[-1] == pytest.approx(0.5)
    _, other = frc_curve(a, rng.standard_normal((96, 96)))
    assert np.abs(other[5:]).mean() < 0.1


def test_frc_resolution_of_a_low_passed_copy() -> None:
    """A copy keeping only frequencies below 0.2 cycles/px, with independent noise above,
    must be resolved at about 1 / (2 * 0.2) = 2.5 px."""
    rng = np.random.default_rng(2)
    n = 128
    truth = rng.standard_normal((n, n))
    k = np.fft.fftfreq(n)
    low = np.hypot(k[:, None], k[None, :]) < 0.2
    est = np.fft.ifft2(np.fft.fft2(truth) * low + np.fft.fft2(rng.standard_normal((n, n))) * ~low)
    result = frc_resolution(*frc_curve(est.real, truth))
    assert result["frc_resolution_px"] == pytest.approx(2.5, rel=0.1)
    assert 0.3 < result["frc_auc"] < 0.5


def test_quality_figures_ignore_global_factor_and_phase_ramp() -> None:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:80, 0:80]
    truth = (0.6 + 0.4 * rng.random((80, 80))) * np.exp(1j * 0.5 * rng.random((80, 80)))
    est = 1.7 * truth * np.exp(1j * (0.9 + 0.03 * yy - 0.02 * xx))
    mask = np.zeros(truth.shape, bool)
    mask[10:70, 10:70] = True
    q = quality_figures(est, truth, mask)
    for key in ("amplitude_ssim", "phase_ssim", "amplitude_corr", "phase_corr"):
        assert q[key] == pytest.approx(1.0, abs=1e-9), key
    assert q["frc_resolution_px"] == pytest.approx(1.0)
    low, high = (quality_figures(truth + s * rng.standard_normal(truth.shape), truth, mask)
                 for s in (0.02, 0.08))
    assert 0.5 < high["amplitude_ssim"] < low["amplitude_ssim"] < 0.99
    # four times the noise: 20 log10(4) = 12 dB less
    assert low["amplitude_psnr_db"] - high["amplitude_psnr_db"] == pytest.approx(12.0, abs=1.0)
