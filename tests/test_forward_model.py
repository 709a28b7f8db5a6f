"""The benchmark's independent forward model: its conventions, checked from first principles."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("skimage")
from bench.forward_model import (  # noqa: E402
    MARGIN,
    OBJECT_KINDS,
    ScanSpec,
    fourier_patch,
    make_disc_probe,
    make_object,
    make_probe,
    simulate,
)


def test_fourier_patch_at_integer_positions_is_plain_indexing() -> None:
    obj = make_object("smooth", 96, seed=1)
    padded = np.pad(obj, MARGIN, mode="reflect")
    patch = fourier_patch(padded, np.array([40.0, 50.0]), 32)
    # centre (40, 50), N = 32: pixel (i, j) is obj(40 - 16 + i, 50 - 16 + j)
    assert np.allclose(patch, obj[24:56, 34:66], atol=1e-12)


def test_fourier_patch_half_pixel_is_between_its_neighbours() -> None:
    yy, xx = np.mgrid[0:96, 0:96]
    # a plane wave periodic in the 48-px window (32 + 2 * MARGIN): the Fourier shift is exact
    obj = np.exp(1j * 2 * np.pi * (3 * yy + 5 * xx) / 48)
    padded = np.pad(obj, MARGIN, mode="wrap")
    patch = fourier_patch(padded, np.array([40.5, 50.25]), 32)
    expected = np.exp(1j * 2 * np.pi * (3 * (yy[:32, :32] + 24.5) + 5 * (xx[:32, :32] + 34.25))
                      / 48)
    assert np.allclose(patch, expected, atol=1e-9)


def test_probe_has_unit_power_and_fits_the_patch() -> None:
    probe = make_probe(64, 24.0, 2.0)
    assert np.sum(np.abs(probe) ** 2) == pytest.approx(1.0)
    r = np.hypot(*(np.mgrid[0:64, 0:64] - 32))
    assert np.sum(np.abs(probe[r < 24]) ** 2) > 0.9


def test_disc_probe_is_a_sharp_disc_with_a_broad_far_field() -> None:
    disc, pupil = make_disc_probe(64, 24.0, 5.0), make_probe(64, 24.0, 2.0)
    assert np.sum(np.abs(disc) ** 2) == pytest.approx(1.0)
    r = np.hypot(*(np.mgrid[0:64, 0:64] - 32))
    amplitude = np.abs(disc)
    assert amplitude[r < 11].std() < 1e-9 and amplitude[r > 13].max() == 0.0
    # the rim phase is the defocus
    assert np.angle(disc[32, 32 + 11]) == pytest.approx(5.0 * (11 / 12) ** 2 - 2 * np.pi)

    def lit(probe: np.ndarray) -> float:  # detector fraction above 1e-3 of the far field's peak
        far = np.abs(np.fft.fft2(probe))
        return float((far >= 1e-3 * far.max()).mean())

    assert lit(pupil) < 0.03 and lit(disc) > 0.5
    with pytest.raises(ValueError, match="probe_kind"):
        simulate(ScanSpec(object_px=64, patch=32, probe_kind="gauss"))


@pytest.mark.parametrize("kind", OBJECT_KINDS)
def test_objects_have_the_stated_ranges(kind: str) -> None:
    obj = make_object(kind, 64)
    assert np.abs(obj).min() >= 0.6 - 1e-9 and np.abs(obj).max() <= 1.0 + 1e-9
    span = {"strong-phase": 2.5, "weak-phase": 0.15}.get(kind, 0.6)
    assert np.abs(np.angle(obj)).max() <= span + 1e-9


def test_scan_is_float64_fractional_and_has_the_dose() -> None:
    spec = ScanSpec(kind="smooth", object_px=96, patch=32, step_px=8, photons=1e5)
    scan = simulate(spec)
    assert scan["diffraction"].dtype == np.float64
    assert np.any(np.abs(scan["xcoords"] - np.round(scan["xcoords"])) > 0.1)
    counts = np.square(scan["diffraction"]).sum(axis=(1, 2))
    assert counts.mean() == pytest.approx(1e5, rel=0.01)
    # counts are integers: amplitudes are square roots of whole numbers
    assert np.allclose(np.square(scan["diffraction"]), np.round(np.square(scan["diffraction"])))
    # the far field is centred on DC at pixel N/2, where fftshift puts it
    mean_pattern = np.square(scan["diffraction"]).mean(axis=0)
    yy, xx = np.mgrid[0:32, 0:32]
    centroid = [float((c * mean_pattern).sum() / mean_pattern.sum()) for c in (yy, xx)]
    assert centroid == pytest.approx([16.0, 16.0], abs=0.5)
