"""A seeded, fast ptychography simulator that writes the data contract of ``runtime.scan``.

Why it exists: training, export and the runtime need test scans with a known ground truth,
and the simulated physics must be *exactly* the forward model the network is trained with:

- patch ``O_r = object[y - N/2 : y + N/2, x - N/2 : x + N/2]`` at integer positions
  (positions are patch **centres**, the "N/2 convention" of :mod:`runtime.scan`);
- exit wave ``psi = probe * O_r``;
- far field ``F = fftshift(fft2(psi, norm="ortho"), axes=(-2, -1))`` (DC at pixel (N/2, N/2));
- expected intensity ``|F|**2``; counts ``~ Poisson(|F|**2)``; stored amplitudes
  ``sqrt(counts)`` as float32 (raw sqrt-counts, not normalised).

The probe is scaled so that ``sum(|probe|**2) == photons_per_pattern``; with the orthonormal
FFT (Parseval) an object patch of amplitude 1 then yields exactly that many expected photons
per pattern, and absorbing features fewer.

numpy only (no torch): the base install can simulate too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from runtime.scan import ScanData, validate_scan

OBJECT_KINDS = ("lines", "smooth", "leaves")
PROBE_KINDS = ("disc", "focused")
_CHUNK = 256  # patterns per FFT batch: caps temporary memory at ~_CHUNK * N * N * 16 bytes
_MARGIN_PX = 4  # object pixels kept free around the outermost patches


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate. Defaults give a 576-pattern, N = 64 scan with ~67 % linear overlap.

    Positions are a raster grid ``grid_shape`` with spacing ``step_px`` plus uniform jitter in
    ``[-jitter_px, +jitter_px]``, then **rounded to integer object pixels**: the simulator
    only ever cuts whole-pixel patches, so its physics is exact. Sub-pixel positions are the
    runtime's (stitcher's) business, not the simulator's.
    """

    patch_size: int = 64
    """N: pattern, probe and object-patch side length (even, so N/2 is an integer)."""
    grid_shape: tuple[int, int] = (24, 24)
    """Scan positions as (rows, cols); M = rows * cols patterns in raster order."""
    step_px: float = 8.0
    """Scan step in object pixels; linear overlap = 1 - step / probe_diameter."""
    jitter_px: float = 1.0
    """Amplitude of the uniform position jitter (breaks raster-grid ambiguities)."""
    probe_diameter_px: float = 24.0
    """Diameter of the (soft-edged) illuminated disc in real space."""
    defocus: float = 5.0
    """Quadratic (defocus) phase at the disc edge, in rad: spreads the far field into a
    bright disc of radius about ``N * defocus / (pi * R)`` detector pixels (R = diameter / 2),
    lowering the dynamic range as a defocused probe does in practice."""
    photons_per_pattern: float = 1e6
    """Dose: expected counts per pattern for an object patch of amplitude 1."""
    object_kind: str = "lines"
    """"lines": blurred random line segments; "smooth": band-limited random fields;
    "leaves": a dead-leaves image (occluding discs of power-law sizes), the classic model
    of natural-image statistics (edges at every scale, a 1/f-like spectrum)."""
    max_phase: float = 2.5
    """Largest |object phase| in rad (at most pi, the model's phase-head range)."""
    min_amplitude: float = 0.5
    """Object amplitude lies in [min_amplitude, 1]; 1.0 gives a pure phase object."""
    probe_kind: str = "disc"
    """"disc": a defocused disc in the sample plane (``probe_disc``); "focused": the image
    of a defocused circular pupil (``probe_focused``), an Airy spot as lenses and zone
    plates make."""
    seed: int = 0
    """Seed of ``np.random.default_rng``-style streams; same seed, identical arrays."""

    def __post_init__(self) -> None:
        n = self.patch_size
        if not isinstance(n, int | np.integer) or n < 4 or n % 2:
            raise ValueError(f"patch_size must be an even integer >= 4, got {n!r}")
        try:
            rows, cols = (int(v) for v in self.grid_shape)
        except (TypeError, ValueError) as err:
            raise ValueError(f"grid_shape must be (rows, cols), got {self.grid_shape!r}") from err
        if rows < 1 or cols < 1:
            raise ValueError(f"grid_shape must be positive, got {self.grid_shape!r}")
        object.__setattr__(self, "grid_shape", (rows, cols))
        if not (math.isfinite(self.step_px) and self.step_px > 0):
            raise ValueError(f"step_px must be > 0, got {self.step_px!r}")
        if not (math.isfinite(self.jitter_px) and self.jitter_px >= 0):
            raise ValueError(f"jitter_px must be >= 0, got {self.jitter_px!r}")
        if not (0 < self.probe_diameter_px <= n):
            raise ValueError(
                f"probe_diameter_px must be in (0, patch_size={n}], got {self.probe_diameter_px!r}"
            )
        radius = self.probe_diameter_px / 2
        # Local phase frequency at the edge is defocus / (pi R) cycles/px: keep it < Nyquist.
        if not (0 <= self.defocus <= math.pi * radius / 2):
            raise ValueError(
                f"defocus must be in [0, pi*R/2 = {math.pi * radius / 2:.3g}] rad for a "
                f"{self.probe_diameter_px} px probe (else its phase aliases), got {self.defocus!r}"
            )
        if not (math.isfinite(self.photons_per_pattern) and self.photons_per_pattern > 0):
            raise ValueError(f"photons_per_pattern must be > 0, got {self.photons_per_pattern!r}")
        if self.object_kind not in OBJECT_KINDS:
            raise ValueError(f"object_kind must be one of {OBJECT_KINDS}, got {self.object_kind!r}")
        if self.probe_kind not in PROBE_KINDS:
            raise ValueError(f"probe_kind must be one of {PROBE_KINDS}, got {self.probe_kind!r}")
        if not (0 <= self.max_phase <= math.pi):
            raise ValueError(f"max_phase must be in [0, pi], got {self.max_phase!r}")
        if not (0 < self.min_amplitude <= 1):
            raise ValueError(f"min_amplitude must be in (0, 1], got {self.min_amplitude!r}")

    @property
    def n_patterns(self) -> int:
        return self.grid_shape[0] * self.grid_shape[1]


# --------------------------------------------------------------------------- pieces


def probe_disc(
    n: int,
    diameter_px: float,
    defocus: float,
    photons: float,
    *,
    edge_px: float = 1.0,
) -> np.ndarray:
    """A defocused disc probe on an n x n grid, complex64, ``sum(|p|^2) == photons``.

    Amplitude: a disc of ``diameter_px`` centred at pixel (n/2, n/2) with a tanh edge of
    width ``edge_px`` (a hard edge would ring over the whole detector). Phase:
    ``defocus * (r / R)**2``, the curvature of a beam away from focus, which makes the
    far field a bright disc with Fresnel fringes rather than a single sharp Airy peak.
    """
    radius = diameter_px / 2
    coords = np.arange(n, dtype=np.float64) - n // 2
    r = np.hypot(coords[:, None], coords[None, :])
    amplitude = 0.5 * (1.0 - np.tanh((r - radius) / edge_px))
    return scaled_to(amplitude * np.exp(1j * defocus * (r / radius) ** 2), photons)


def scaled_to(probe: np.ndarray, photons: float) -> np.ndarray:
    """``probe`` as complex64, scaled so that ``sum(|p|^2) == photons``."""
    probe = np.asarray(probe, dtype=np.complex128)
    return (probe * math.sqrt(photons / float(np.sum(np.abs(probe) ** 2)))).astype(
        np.complex64)


def probe_focused(n: int, diameter_px: float, defocus: float, photons: float) -> np.ndarray:
    """A focused probe on an n x n grid, complex64, ``sum(|p|^2) == photons``: the inverse
    transform of a circular pupil with ``defocus`` rad of quadratic phase at its rim.

    The pupil radius is chosen so that the Airy core's first zero falls at ``diameter_px``
    / 2 (1.22 n / (2 r_pupil) = diameter / 2): the bright spot is the probe's size, with
    faint rings beyond it, unlike the disc probe's hard support.
    """
    k = np.fft.fftfreq(n) * n  # detector pixels from DC, unshifted
    kr = np.hypot(k[:, None], k[None, :])
    pupil_radius = 1.22 * n / diameter_px
    pupil = (kr <= pupil_radius) * np.exp(1j * defocus * (kr / pupil_radius) ** 2)
    return scaled_to(np.fft.fftshift(np.fft.ifft2(pupil)), photons)  # centred at (n/2, n/2)


def grid_positions(config: SimulationConfig, rng: np.random.Generator) -> np.ndarray:
    """Integer patch centres (M, 2) float64 as (y, x), raster order, inside the object.

    The smallest centre is ``N/2 + margin``, so every patch starts at least ``margin``
    pixels inside the object.
    """
    rows, cols = config.grid_shape
    yy, xx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    base = np.stack([yy.ravel(), xx.ravel()], axis=1) * config.step_px
    jitter = rng.uniform(-config.jitter_px, config.jitter_px, size=base.shape)
    positions = np.rint(base + jitter)
    positions -= positions.min(axis=0)
    positions += config.patch_size // 2 + _MARGIN_PX
    return positions


def _gaussian_blur(field: np.ndarray, sigma_px: float) -> np.ndarray:
    """Periodic Gaussian blur via FFT (the object margin hides the wrap-around)."""
    fy = np.fft.fftfreq(field.shape[0])[:, None]
    fx = np.fft.rfftfreq(field.shape[1])[None, :]
    kernel = np.exp(-2.0 * (math.pi * sigma_px) ** 2 * (fy**2 + fx**2))
    return np.fft.irfft2(np.fft.rfft2(field) * kernel, s=field.shape)


def _line_fields(
    shape: tuple[int, int], rng: np.random.Generator, feature_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """Two fields of random blurred line segments: absorption in [0, 1], phase in [-1, 1]."""
    height, width = shape
    n_segments = max(8, (height * width) // 300)
    absorption = np.zeros(shape)
    phase = np.zeros(shape)
    centres = rng.uniform((0, 0), (height, width), size=(n_segments, 2))
    lengths = rng.uniform(0.2, 1.5, size=n_segments) * feature_px
    angles = rng.uniform(0, math.pi, size=n_segments)
    absorb_w = rng.uniform(0.3, 1.0, size=n_segments)
    phase_w = rng.uniform(-1.0, 1.0, size=n_segments)
    for k in range(n_segments):
        t = np.linspace(-0.5, 0.5, max(2, int(2 * lengths[k]) + 1)) * lengths[k]
        ys = np.rint(centres[k, 0] + t * math.sin(angles[k])).astype(np.int64)
        xs = np.rint(centres[k, 1] + t * math.cos(angles[k])).astype(np.int64)
        keep = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
        flat = np.unique(ys[keep] * width + xs[keep])  # each pixel once per segment
        absorption.flat[flat] += absorb_w[k]
        phase.flat[flat] += phase_w[k]
    absorption = _gaussian_blur(absorption, 1.0)
    phase = _gaussian_blur(phase, 1.0)
    absorption = np.clip(absorption / max(float(absorption.max()), 1e-12), 0.0, 1.0)
    phase = phase / max(float(np.abs(phase).max()), 1e-12)
    return absorption, phase


def _smooth_fields(
    shape: tuple[int, int], rng: np.random.Generator, feature_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """Two band-limited Gaussian random fields: absorption in [0, 1], phase in [-1, 1]."""
    a = _gaussian_blur(rng.standard_normal(shape), feature_px / 4)
    p = _gaussian_blur(rng.standard_normal(shape), feature_px / 4)
    absorption = (a - a.min()) / max(float(np.ptp(a)), 1e-12)
    p -= p.mean()
    phase = p / max(float(np.abs(p).max()), 1e-12)
    return absorption, phase


def _leaves_field(shape: tuple[int, int], rng: np.random.Generator,
                  feature_px: float) -> np.ndarray:
    """A dead-leaves field in [0, 1]: discs of uniform grey level dropped one over another
    until the plane is covered, radii drawn from p(r) ~ r^-3 between 1 px and 2 x feature_px
    (the scale-invariant law that gives natural images' statistics), edges blurred 0.7 px."""
    height, width = shape
    field = np.full(shape, np.nan)
    r_min, r_max = 1.0, 2.0 * feature_px
    yy, xx = np.mgrid[0:height, 0:width]
    # inverse CDF of r^-3 on [r_min, r_max]; new discs go *under* the ones already there,
    # so filling stops once every pixel is covered
    for drop in range(20000):
        u = rng.uniform()
        r = (r_min**-2 - u * (r_min**-2 - r_max**-2)) ** -0.5
        cy, cx = rng.uniform(-r, height + r), rng.uniform(-r, width + r)
        y0, y1 = max(0, int(cy - r)), min(height, int(cy + r) + 2)
        x0, x1 = max(0, int(cx - r)), min(width, int(cx + r) + 2)
        if y0 >= y1 or x0 >= x1:
            continue
        window = field[y0:y1, x0:x1]
        inside = ((yy[y0:y1, x0:x1] - cy) ** 2 + (xx[y0:y1, x0:x1] - cx) ** 2 <= r * r) \
            & np.isnan(window)
        window[inside] = rng.uniform()
        if drop % 64 == 63 and not np.isnan(field).any():
            break
    field = np.nan_to_num(field, nan=0.5)
    field = _gaussian_blur(field, 0.7)
    lo, hi = float(field.min()), float(field.max())
    return (field - lo) / (hi - lo) if hi > lo else np.zeros(shape)


def make_object(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    kind: str = "lines",
    min_amplitude: float = 0.5,
    max_phase: float = 2.5,
    feature_px: float = 24.0,
) -> np.ndarray:
    """A random complex object (complex64) with amplitude in [min_amplitude, 1] and
    |phase| <= max_phase.

    ``feature_px`` is the typical feature size: segment lengths are 0.2-1.5x it ("lines";
    the lines themselves are ~2-3 px wide, giving high-angle scattering), the random field's
    Gaussian correlation sigma is a quarter of it ("smooth"). Amplitude and phase come from
    independent fields so amplitude/phase cross-talk in a reconstruction is visible.
    """
    if kind == "lines":
        absorption, phase = _line_fields(shape, rng, feature_px)
    elif kind == "smooth":
        absorption, phase = _smooth_fields(shape, rng, feature_px)
    elif kind == "leaves":
        absorption = _leaves_field(shape, rng, feature_px)
        phase = 2.0 * _leaves_field(shape, rng, feature_px) - 1.0
    else:
        raise ValueError(f"object kind must be one of {OBJECT_KINDS}, got {kind!r}")
    amplitude = 1.0 - (1.0 - min_amplitude) * absorption
    return (amplitude * np.exp(1j * max_phase * phase)).astype(np.complex64)


def extract_patches(obj: np.ndarray, positions_px: np.ndarray, n: int) -> np.ndarray:
    """Cut (M, n, n) patches at integer centres with the N/2 convention.

    Patch pixel (i, j) is ``obj[y - n//2 + i, x - n//2 + j]``. Raises ``ValueError`` for
    non-integer positions or patches that leave the object (no silent wrap-around).
    """
    pos = np.asarray(positions_px, dtype=np.float64)
    corners = np.rint(pos).astype(np.int64) - n // 2
    if not np.array_equal(corners + n // 2, pos):
        raise ValueError("extract_patches needs integer positions (sub-pixel is the runtime's)")
    height, width = obj.shape
    if corners.size and (
        corners.min() < 0 or corners[:, 0].max() + n > height or corners[:, 1].max() + n > width
    ):
        raise ValueError(f"a {n}x{n} patch leaves the {height}x{width} object")
    offsets = np.arange(n)
    rows = corners[:, 0, None, None] + offsets[None, :, None]
    cols = corners[:, 1, None, None] + offsets[None, None, :]
    return obj[rows, cols]


def far_field(psi: np.ndarray) -> np.ndarray:
    """Centred orthonormal far field of exit waves (..., N, N): DC lands at (N/2, N/2)."""
    return np.fft.fftshift(np.fft.fft2(psi, norm="ortho"), axes=(-2, -1))


def expected_intensity(
    obj: np.ndarray, probe: np.ndarray, positions_px: np.ndarray, *, chunk: int = _CHUNK
) -> np.ndarray:
    """Noise-free diffraction intensity |F{probe * O_r}|^2, (M, N, N) float64.

    Computed in complex128 from the given (complex64) arrays, so recomputing it from a
    saved scan reproduces what the simulator drew its counts from.
    """
    n = probe.shape[-1]
    probe128 = probe.astype(np.complex128)
    pos = np.asarray(positions_px, dtype=np.float64)
    out = np.empty((pos.shape[0], n, n), dtype=np.float64)
    for start in range(0, pos.shape[0], chunk):
        patches = extract_patches(obj, pos[start : start + chunk], n).astype(np.complex128)
        out[start : start + chunk] = np.abs(far_field(probe128 * patches)) ** 2
    return out


# --------------------------------------------------------------------------- the scan


def simulate_scan(config: SimulationConfig, probe: np.ndarray | None = None) -> ScanData:
    """Simulate a full scan: object, probe, positions, Poisson-noisy amplitudes.

    Positions, object and noise draw from independent streams spawned from ``config.seed``,
    so e.g. changing the dose leaves the object and positions unchanged. ``probe``: use
    this (N, N) probe (a measured one, say), scaled to ``photons_per_pattern``, instead of
    the config's disc or focused probe.
    """
    n = config.patch_size
    pos_rng, obj_rng, noise_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(3)
    )
    positions = grid_positions(config, pos_rng)
    shape = (
        int(positions[:, 0].max()) + n // 2 + _MARGIN_PX,
        int(positions[:, 1].max()) + n // 2 + _MARGIN_PX,
    )
    obj = make_object(
        shape,
        obj_rng,
        kind=config.object_kind,
        min_amplitude=config.min_amplitude,
        max_phase=config.max_phase,
        feature_px=config.probe_diameter_px,
    )
    if probe is None:
        make_probe = probe_disc if config.probe_kind == "disc" else probe_focused
        probe = make_probe(n, config.probe_diameter_px, config.defocus,
                           config.photons_per_pattern)
    elif np.shape(probe) != (n, n):
        raise ValueError(f"probe is {np.shape(probe)}; this scan's patterns are {n}x{n}")
    else:
        probe = scaled_to(probe, config.photons_per_pattern)
    amplitudes = np.empty((positions.shape[0], n, n), dtype=np.float32)
    for start in range(0, positions.shape[0], _CHUNK):
        stop = start + _CHUNK
        intensity = expected_intensity(obj, probe, positions[start:stop])
        counts = noise_rng.poisson(intensity)
        amplitudes[start:stop] = np.sqrt(counts)
    return validate_scan(
        amplitudes,
        probe,
        positions[:, 1],
        positions[:, 0],
        object_truth=obj,
        source=f"simulated(seed={config.seed})",
    )
