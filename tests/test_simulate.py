"""The simulator: exact forward physics, Poisson statistics, dose, geometry, determinism."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from ptycho_export.data import (
    ScanData,
    SimulationConfig,
    load_scan,
    save_scan,
    simulate_scan,
)
from ptycho_export.data.simulate import (
    expected_intensity,
    extract_patches,
    far_field,
    make_object,
    probe_disc,
    probe_focused,
)

SMALL = SimulationConfig(
    patch_size=32,
    grid_shape=(6, 6),
    step_px=4.0,
    jitter_px=1.0,
    probe_diameter_px=12.0,
    defocus=3.0,
    photons_per_pattern=1e5,
    seed=3,
)


@pytest.fixture(scope="module")
def scan() -> ScanData:
    return simulate_scan(SMALL)


def _counts(scan: ScanData) -> np.ndarray:
    counts = scan.amplitudes.astype(np.float64) ** 2
    rounded = np.rint(counts)
    assert np.max(np.abs(counts - rounded)) < 1e-2  # amplitudes are sqrt of integers
    return rounded


def _independent_intensity(scan: ScanData, k: int) -> np.ndarray:
    """|F{probe * O_r}|^2 for pattern k by slicing and an explicit DFT matrix (no np.fft)."""
    assert scan.object_truth is not None
    n = scan.patch_size
    y, x = (int(v) for v in scan.positions_px[k])
    patch = scan.object_truth[y - n // 2 : y + n // 2, x - n // 2 : x + n // 2]
    psi = scan.probe.astype(np.complex128) * patch.astype(np.complex128)
    idx = np.arange(n)
    dft = np.exp(-2j * np.pi * np.outer(idx, idx) / n) / math.sqrt(n)
    field = dft @ psi @ dft.T
    field = np.roll(field, (n // 2, n // 2), axis=(0, 1))  # fftshift for even n
    return np.abs(field) ** 2


def test_contract_dtypes_and_shapes(scan: ScanData) -> None:
    m, n = SMALL.n_patterns, SMALL.patch_size
    assert scan.amplitudes.shape == (m, n, n) and scan.amplitudes.dtype == np.float32
    assert scan.probe.shape == (n, n) and scan.probe.dtype == np.complex64
    assert scan.positions_px.shape == (m, 2) and scan.positions_px.dtype == np.float64
    assert scan.object_truth is not None and scan.object_truth.dtype == np.complex64


def test_physics_matches_independent_computation(scan: ScanData) -> None:
    assert scan.object_truth is not None
    expected = expected_intensity(scan.object_truth, scan.probe, scan.positions_px)
    for k in (0, 17, SMALL.n_patterns - 1):
        ref = _independent_intensity(scan, k)
        np.testing.assert_allclose(expected[k], ref, rtol=1e-9, atol=1e-9 * ref.max())


def test_counts_are_poisson_around_expected_intensity(scan: ScanData) -> None:
    assert scan.object_truth is not None
    intensity = expected_intensity(scan.object_truth, scan.probe, scan.positions_px)
    counts = _counts(scan)
    bright = intensity > 30  # Gaussian regime of the Poisson distribution
    assert bright.sum() > 5000
    z = (counts[bright] - intensity[bright]) / np.sqrt(intensity[bright])
    assert abs(z.mean()) < 0.05
    assert 0.9 < z.var() < 1.1  # dispersion index ~ 1: Poisson, not Gaussian or scaled
    # where nothing is expected, nothing is counted
    assert np.all(counts[intensity < 1e-12] == 0)


def test_dose_of_a_pure_phase_object(scan: ScanData) -> None:
    cfg = dataclasses.replace(SMALL, min_amplitude=1.0)
    phase_scan = simulate_scan(cfg)
    assert phase_scan.object_truth is not None
    np.testing.assert_allclose(np.abs(phase_scan.object_truth), 1.0, atol=1e-6)
    intensity = expected_intensity(
        phase_scan.object_truth, phase_scan.probe, phase_scan.positions_px
    )
    np.testing.assert_allclose(intensity.sum(axis=(1, 2)), cfg.photons_per_pattern, rtol=1e-5)
    totals = _counts(phase_scan).sum(axis=(1, 2))
    sigma = math.sqrt(cfg.photons_per_pattern)
    assert np.all(np.abs(totals - cfg.photons_per_pattern) < 5 * sigma)
    assert abs(totals.mean() - cfg.photons_per_pattern) < 5 * sigma / math.sqrt(totals.size)
    # an absorbing object receives fewer photons
    assert _counts(scan).sum(axis=(1, 2)).mean() < cfg.photons_per_pattern


def test_parseval_and_centred_dc() -> None:
    rng = np.random.default_rng(0)
    psi = rng.normal(size=(3, 16, 16)) + 1j * rng.normal(size=(3, 16, 16))
    field = far_field(psi)
    np.testing.assert_allclose(
        np.sum(np.abs(field) ** 2, axis=(1, 2)), np.sum(np.abs(psi) ** 2, axis=(1, 2))
    )
    flat = far_field(np.ones((16, 16)))
    assert np.unravel_index(np.argmax(np.abs(flat)), flat.shape) == (8, 8)


def test_probe_is_realistic_and_scaled(scan: ScanData) -> None:
    amp = np.abs(scan.probe)
    assert amp.std() / amp.mean() > 0.3  # a localised spot, not a flat field
    np.testing.assert_allclose(np.sum(amp.astype(np.float64) ** 2), 1e5, rtol=1e-5)
    assert np.unravel_index(np.argmax(amp), amp.shape)[0] in range(10, 22)
    lit = amp > 0.5 * amp.max()
    assert np.ptp(np.angle(scan.probe[lit])) > 1.0  # defocus phase structure
    assert probe_disc(32, 12.0, 3.0, 1e5).dtype == np.complex64


def test_patches_lie_inside_object(scan: ScanData) -> None:
    assert scan.object_truth is not None
    n = scan.patch_size
    pos = scan.positions_px
    assert np.array_equal(pos, np.rint(pos))  # integer positions by design
    height, width = scan.object_truth.shape
    assert pos.min() - n // 2 >= 0
    assert pos[:, 0].max() + n // 2 <= height and pos[:, 1].max() + n // 2 <= width
    # the object is "just big enough": a small margin on every side
    assert pos.min() - n // 2 <= 8
    assert height - (pos[:, 0].max() + n // 2) <= 8
    patches = extract_patches(scan.object_truth, pos, n)
    assert patches.shape == (SMALL.n_patterns, n, n)
    with pytest.raises(ValueError):
        extract_patches(scan.object_truth, pos + 0.5, n)
    with pytest.raises(ValueError):
        extract_patches(scan.object_truth, pos + [height, 0], n)


def test_raster_with_bounded_jitter(scan: ScanData) -> None:
    rows, cols = SMALL.grid_shape
    pos = scan.positions_px.reshape(rows, cols, 2)
    steps_x = np.diff(pos[:, :, 1], axis=1)
    steps_y = np.diff(pos[:, :, 0], axis=0)
    bound = SMALL.step_px + 2 * SMALL.jitter_px + 1  # +1: rounding
    for steps in (steps_x, steps_y):
        assert np.all(steps >= SMALL.step_px - 2 * SMALL.jitter_px - 1)
        assert np.all(steps <= bound)


def test_seed_determinism(scan: ScanData) -> None:
    again = simulate_scan(SMALL)
    for name in ("amplitudes", "probe", "positions_px", "object_truth"):
        assert np.array_equal(getattr(scan, name), getattr(again, name)), name
    other = simulate_scan(dataclasses.replace(SMALL, seed=4))
    assert not np.array_equal(scan.amplitudes, other.amplitudes)
    assert not np.array_equal(scan.object_truth, other.object_truth)


def test_dose_change_keeps_object_and_positions(scan: ScanData) -> None:
    dim = simulate_scan(dataclasses.replace(SMALL, photons_per_pattern=1e3))
    assert np.array_equal(dim.object_truth, scan.object_truth)
    assert np.array_equal(dim.positions_px, scan.positions_px)


@pytest.mark.parametrize("kind", ["lines", "smooth"])
def test_object_ranges(kind: str) -> None:
    obj = make_object((64, 80), np.random.default_rng(0), kind=kind, max_phase=2.0)
    assert obj.shape == (64, 80) and obj.dtype == np.complex64
    amp = np.abs(obj)
    assert amp.min() >= 0.5 - 1e-6 and amp.max() <= 1 + 1e-6
    assert np.abs(np.angle(obj)).max() <= 2.0 + 1e-5
    assert amp.std() > 0.01 and np.angle(obj).std() > 0.05  # not blank


def test_dead_leaves_object_has_edges_at_every_scale() -> None:
    rng = np.random.default_rng(5)
    obj = make_object((128, 128), rng, kind="leaves", min_amplitude=0.4, max_phase=1.0,
                      feature_px=16.0)
    amp, phase = np.abs(obj), np.angle(obj)
    assert amp.min() >= 0.4 - 1e-6 and amp.max() <= 1 + 1e-6
    assert np.abs(phase).max() <= 1.0 + 1e-5
    # sharp edges: heavy-tailed neighbour steps (measured: 99th percentile 0.20, 8x the
    # median; a smooth field of the same feature size: 0.045, 4x)
    steps = np.abs(np.diff(amp, axis=1)).ravel()
    assert np.quantile(steps, 0.99) > 0.1 and np.quantile(steps, 0.99) > 5 * np.median(steps)
    # a power-law spectrum, not one feature size: power falls ~f^-2.3 over a decade
    # (a smooth field: 10^-12.5)
    power = np.abs(np.fft.fft2(amp - amp.mean())) ** 2
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(128), np.fft.fftfreq(128), indexing="ij"))
    low, high = power[(f > 0.02) & (f < 0.04)].mean(), power[(f > 0.2) & (f < 0.4)].mean()
    slope = math.log(high / low) / math.log(10.0)
    assert -4.0 < slope < -1.5
    again = make_object((128, 128), np.random.default_rng(5), kind="leaves",
                        min_amplitude=0.4, max_phase=1.0, feature_px=16.0)
    np.testing.assert_array_equal(obj, again)


def test_focused_probe_is_an_airy_spot_of_the_asked_size() -> None:
    n, diameter = 64, 24.0
    probe = probe_focused(n, diameter, 0.0, 1e6)
    assert probe.dtype == np.complex64
    np.testing.assert_allclose(np.sum(np.abs(probe.astype(np.complex128)) ** 2), 1e6,
                               rtol=1e-5)
    intensity = np.abs(probe[n // 2]) ** 2  # the row through the centre
    assert np.argmax(intensity) == n // 2
    # first dark ring at about half the diameter; most power inside the first ring
    first_zero = n // 2 + int(np.argmax(np.diff(intensity[n // 2:]) > 0))
    assert abs((first_zero - n // 2) - diameter / 2) <= 1.5
    r = np.hypot(*np.meshgrid(np.arange(n) - n // 2, np.arange(n) - n // 2, indexing="ij"))
    inside = np.sum(np.abs(probe[r <= diameter / 2]) ** 2) / 1e6
    assert 0.75 < inside < 0.95
    # its far field is the pupil: nothing beyond the pupil radius
    far = np.abs(np.fft.fft2(probe.astype(np.complex128)))
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(n) * n, np.fft.fftfreq(n) * n, indexing="ij"))
    assert far[k > 1.22 * n / diameter + 0.01].max() < 1e-3 * far.max()
    scan = simulate_scan(dataclasses.replace(SMALL, probe_kind="focused"))
    np.testing.assert_allclose(np.abs(scan.probe), np.abs(probe_focused(32, 12.0, 3.0, 1e5)),
                               rtol=1e-5, atol=1e-3)


def test_smooth_scan_runs() -> None:
    smooth = simulate_scan(dataclasses.replace(SMALL, object_kind="smooth", grid_shape=(2, 3)))
    assert smooth.n_patterns == 6


def test_simulated_scan_round_trips(tmp_path: Path, scan: ScanData) -> None:
    path = tmp_path / "sim.npz"
    save_scan(path, scan)
    loaded = load_scan(path)
    for name in ("amplitudes", "probe", "positions_px", "object_truth"):
        assert np.array_equal(getattr(scan, name), getattr(loaded, name)), name


@pytest.mark.parametrize(
    "change",
    [
        {"patch_size": 33},
        {"grid_shape": (0, 3)},
        {"step_px": 0.0},
        {"jitter_px": -1.0},
        {"probe_diameter_px": 40.0},
        {"defocus": 50.0},
        {"photons_per_pattern": 0.0},
        {"object_kind": "cat"},
        {"probe_kind": "gaussian"},
        {"max_phase": 4.0},
        {"min_amplitude": 0.0},
    ],
    ids=str,
)
def test_bad_config_is_rejected(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(SMALL, **change)
