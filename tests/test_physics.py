import numpy as np
import pytest
import torch

from ptycho_export.normalization import compute_normalization, target_power
from ptycho_export.overlap import OverlapMerge
from ptycho_export.physics import FarField, poisson_nll, polar_to_re_im, shifted_dft_matrix


def _random_complex(rng, shape):
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)


@pytest.mark.parametrize("n", [16, 32, 64])
def test_far_field_matches_numpy_fft(n):
    rng = np.random.default_rng(n)
    probe = _random_complex(rng, (n, n))
    obj = _random_complex(rng, (3, 2, n, n))
    reference = np.abs(np.fft.fftshift(np.fft.fft2(probe * obj, norm="ortho"), axes=(-2, -1)))
    physics = FarField(probe)
    got = physics(torch.from_numpy(obj.real.copy()), torch.from_numpy(obj.imag.copy())).numpy()
    assert got.dtype == np.float32
    assert np.max(np.abs(got - reference)) / reference.max() < 2e-6


def test_shifted_dft_matrix_is_unitary_and_centred():
    a = shifted_dft_matrix(8)
    np.testing.assert_allclose(a @ a.conj().T, np.eye(8), atol=1e-12)
    # A constant signal lands in the centre pixel N/2 after fftshift.
    spectrum = a @ np.ones(8)
    assert np.argmax(np.abs(spectrum)) == 4


def test_parseval_holds_in_the_physics():
    rng = np.random.default_rng(1)
    probe = _random_complex(rng, (32, 32))
    obj_re, obj_im = (torch.from_numpy(rng.normal(size=(4, 1, 32, 32)).astype(np.float32))
                      for _ in range(2))
    far = FarField(probe)(obj_re, obj_im)
    wave = np.abs(probe * (obj_re.numpy() + 1j * obj_im.numpy())) ** 2
    np.testing.assert_allclose(far.square().sum((-2, -1)).numpy(), wave.sum((-2, -1)), rtol=1e-4)


def test_poisson_nll_is_zero_at_truth_and_positive_elsewhere():
    measured = torch.rand(2, 1, 8, 8) * 3
    assert abs(float(poisson_nll(measured, measured))) < 1e-5
    assert float(poisson_nll(measured * 1.1, measured)) > 1e-3
    assert float(poisson_nll(measured * 0.9, measured)) > 1e-3


def test_polar_matches_complex_exp():
    amp = torch.rand(5)
    phase = (torch.rand(5) - 0.5) * 6
    re, im = polar_to_re_im(amp, phase)
    expected = amp.to(torch.complex64) * torch.exp(1j * phase.to(torch.complex64))
    torch.testing.assert_close(re, expected.real)
    torch.testing.assert_close(im, expected.imag)


def test_normalization_targets_power_and_survives_uint16_scale_values():
    rng = np.random.default_rng(0)
    counts = rng.poisson(3000.0, size=(50, 16, 16)).astype(np.float64)  # > uint16 squares
    amplitudes = np.sqrt(counts).astype(np.float32)
    probe = _random_complex(rng, (16, 16)) * 100
    norm = compute_normalization(amplitudes, probe)
    scaled = (amplitudes.astype(np.float64) * norm.amplitude_scale) ** 2
    assert scaled.sum((-2, -1)).mean() == pytest.approx(target_power(16), rel=1e-6)
    assert np.sum(np.abs(probe * norm.probe_scale) ** 2) == pytest.approx(target_power(16), 1e-5)
    # Pre-normalised data (max < 1) gives the same network inputs: scale is relative.
    norm_small = compute_normalization(amplitudes / amplitudes.max(), probe)
    ratio = norm_small.amplitude_scale / norm.amplitude_scale
    assert ratio == pytest.approx(float(amplitudes.max()), rel=1e-5)


def test_normalization_refuses_all_zero_data():
    with pytest.raises(ValueError, match="all zero"):
        compute_normalization(np.zeros((3, 8, 8), np.float32), np.ones((8, 8), np.complex64))


def test_overlap_merge_is_identity_for_consistent_patches_at_integer_offsets():
    rng = np.random.default_rng(3)
    big = rng.normal(size=(40, 40)) + 1j * rng.normal(size=(40, 40))
    n = 16
    corners = np.array([[10, 10], [10, 14], [13, 10], [13, 14]])
    patches = np.stack([big[y:y + n, x:x + n] for y, x in corners])[None]
    centres = corners + n / 2
    offsets = torch.from_numpy((centres - centres[0])[None].astype(np.float32))
    re = torch.from_numpy(patches.real.astype(np.float32))
    im = torch.from_numpy(patches.imag.astype(np.float32))
    out_re, out_im = OverlapMerge(re.shape[-1])(re, im, offsets)
    torch.testing.assert_close(out_re, re, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_im, im, atol=1e-5, rtol=0)


def test_overlap_merge_averages_disagreeing_patches():
    n = 8
    re = torch.zeros(1, 4, n, n)
    re[0, 1] = 1.0  # one neighbour disagrees
    offsets = torch.zeros(1, 4, 2)  # all four on top of each other
    out_re, _ = OverlapMerge(n)(re, torch.zeros_like(re), offsets)
    torch.testing.assert_close(out_re, torch.full_like(re, 0.25))


def _cut(obj_fn, top_left: np.ndarray, n: int) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    return obj_fn(yy + top_left[0], xx + top_left[1])


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 0.75])
def test_overlap_merge_is_near_identity_for_consistent_patches_at_fractional_offsets(fraction):
    """Four patches of one smooth object at fractional relative offsets: re-extraction must
    give them back (bilinear resampling was off by 5-6 % of the maximum at 0.3-0.5 px)."""
    rng = np.random.default_rng(7)
    waves = [(rng.uniform(-0.06, 0.06, 2), rng.normal(), rng.uniform(0, 6)) for _ in range(6)]

    def obj(y, x):
        total = sum(a * np.exp(2j * np.pi * (k[0] * y + k[1] * x) + 1j * p) for k, a, p in waves)
        return 1.0 + 0.2 * total

    n = 32
    corners = np.array([[10.0, 10.0], [14.0 + fraction, 10.0 + fraction / 2],
                        [13.0 - fraction, 10.0], [13.0 + fraction, 14.0 - fraction]])
    patches = np.stack([_cut(obj, c, n) for c in corners])[None]
    offsets = torch.from_numpy((corners - corners[0])[None].astype(np.float32))
    re = torch.from_numpy(patches.real.astype(np.float32))
    im = torch.from_numpy(patches.imag.astype(np.float32))
    out_re, out_im = OverlapMerge(re.shape[-1])(re, im, offsets)
    error = np.abs((out_re.numpy() + 1j * out_im.numpy()) - patches) / np.abs(patches).max()
    # measured: mean 0.23-0.25 %, 2 px inside at most 1.3 % (bilinear: 0.65-0.82 %, 2.2 %)
    assert error.mean() < 3e-3, error.mean()
    assert error[..., 2:-2, 2:-2].max() < 1.5e-2


def test_matmul_fractional_shift_is_the_padded_fft_shift():
    """The shift the overlap step (and so the physics graph) does with fixed MatMul factors
    is numpy's ifft(fft(P x) * exp(-2 pi i nu f)), cropped (factors stored float32: 1e-6)."""
    from ptycho_export.overlap import SHIFT_PAD, blend_pad_matrix

    rng = np.random.default_rng(11)
    n = 16
    x = rng.normal(size=(1, 2, 2, n, n))
    frac = np.array([[[0.3, 0.75], [0.0, 0.5]]])
    merge = OverlapMerge(n).double()
    got = merge._shift(torch.from_numpy(x), torch.from_numpy(frac), +1.0).numpy()  # noqa: SLF001
    pad = blend_pad_matrix(n)
    nu = np.fft.fftfreq(n + 2 * SHIFT_PAD)
    for k in range(2):
        fy, fx = frac[0, k]
        for field in range(2):
            padded = pad @ x[0, k, field] @ pad.T
            spectrum = np.fft.fft2(padded) * np.exp(-2j * np.pi * (nu[:, None] * fy
                                                                   + nu[None, :] * fx))
            want = np.fft.ifft2(spectrum).real[SHIFT_PAD:-SHIFT_PAD, SHIFT_PAD:-SHIFT_PAD]
            np.testing.assert_allclose(got[0, k, field], want, rtol=0, atol=1e-6)
    # a whole-pixel fraction of 0 is the identity
    np.testing.assert_allclose(merge._shift(torch.from_numpy(x), torch.zeros(1, 2, 2,  # noqa: SLF001
                               dtype=torch.float64), +1.0).numpy(), x, atol=1e-6)
