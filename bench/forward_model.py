"""An independent ptychography forward model for the quality benchmark (plain numpy).

Written separately from ``ptycho_export.data.simulate`` on purpose: the model's training
data and its judge must not share code, or a convention error in one would hide in both.
Nothing here imports the project.

Conventions (the project's npz data contract, stated again here so this file stands alone):
- ``xcoords``/``ycoords`` are the **centre** of each patch in object pixels; patch pixel
  (i, j) sees object pixel (y - N/2 + i, x - N/2 + j). Positions are fractional: the object
  is sampled there by Fourier interpolation (an exact shift of the band-limited object),
  not rounded.
- Far field: ``fftshift(fft2(probe * patch))``, DC in the centre. Counts are Poisson with a
  mean total of ``photons`` per pattern on average (one global flux for the whole scan).
- ``diffraction`` holds amplitudes sqrt(counts), float64; the probe has unit total power.

Object kinds (amplitude range, phase range):
- ``natural``: two photographs from scikit-image (seed 0: camera for amplitude 0.6-1.0,
  the astronaut's grey level for phase +-0.6 rad; other seeds other pairs);
- ``smooth``: a Gaussian random field low-passed to features ~12 px;
- ``sparse``: a flat object with a few dozen discs and points of different sizes;
- ``strong-phase``: the natural pair with phase +-2.5 rad;
- ``weak-phase``: the natural pair with phase +-0.15 rad (nearly a pure amplitude object).

Two far-field models (``ScanSpec.model``):
- ``fourier``: the object on the pixel grid, moved by a Fourier shift of a window cut
  MARGIN px wider (which treats the object as band-limited to the grid), times the probe,
  and the DFT of that product (aliasing included);
- ``fine-grid``: the physical one. The object is made on a grid FINE times finer (FINE
  odd, so coarse pixel i is centred on fine pixel FINE * i); positions are rounded to
  1/FINE px, so the probe (band-limited: Fourier-upsampled) moves over a fixed object; the
  far field of the fine exit wave is computed and only the detector's N x N band is kept
  (nothing aliases). ``objectGuess`` is the fine object averaged over each coarse pixel.
  Neither refinement convention (object or probe moved on the coarse grid) is this model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

OBJECT_KINDS = ("natural", "smooth", "sparse", "strong-phase", "weak-phase")
PROBE_KINDS = ("pupil", "disc")
MODELS = ("fourier", "fine-grid")
# the fine-grid model's subdivision of a pixel (odd: coarse pixel centres on fine pixels)
FINE = 5


@dataclass(frozen=True)
class ScanSpec:
    kind: str = "natural"
    object_px: int = 192
    patch: int = 64
    step_px: float = 8.0
    jitter_px: float = 1.0
    probe_diameter_px: float = 24.0
    defocus_rad: float = 2.0  # quadratic pupil phase at the pupil edge, radians
    photons: float = 1e6  # mean counts per pattern
    seed: int = 0
    # "pupil": a defocused circular pupil imaged onto the sample (make_probe, a focused
    # spot with rings); "disc": a sharp-edged disc of the diameter in the sample plane with
    # defocus_rad of quadratic phase at its rim (make_disc_probe, a broad far field)
    probe_kind: str = "pupil"
    model: str = "fourier"  # or "fine-grid" (see the module docstring)

    def to_dict(self) -> dict:
        return asdict(self)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Area-average resize of a 2-D image to size x size (crop to square first)."""
    from skimage.transform import resize

    h, w = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top : top + side, left : left + side].astype(np.float64)
    return resize(square, (size, size), anti_aliasing=True, mode="reflect")


def _unit(image: np.ndarray) -> np.ndarray:
    lo, hi = float(image.min()), float(image.max())
    return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)


# (amplitude photograph, phase photograph) per seed, cycling: seed 0 is the pair the
# issue describes; other seeds give scans a model trained on seed 0 has never seen.
NATURAL_PAIRS = (("camera", "astronaut"), ("moon", "coffee"), ("coins", "chelsea"),
                 ("grass", "rocket"))


def _photo(name: str, size: int) -> np.ndarray:
    from skimage import color, data

    image = getattr(data, name)()
    if image.ndim == 3:
        image = color.rgb2gray(image)
    return _unit(_resize(image, size))


def _natural_pair(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    amplitude, phase = NATURAL_PAIRS[seed % len(NATURAL_PAIRS)]
    return _photo(amplitude, size), _photo(phase, size)


def _smooth_field(size: int, rng: np.random.Generator, feature_px: float,
                  fine: int = 1) -> np.ndarray:
    """Low-passed noise drawn on the coarse grid; ``fine`` > 1 samples the same
    (band-limited, periodic) field on a grid that much finer."""
    noise = rng.standard_normal((size, size))
    k = np.fft.fftfreq(size)
    kk = k[:, None] ** 2 + k[None, :] ** 2
    spectrum = np.fft.fft2(noise) * np.exp(-kk * (np.pi * feature_px) ** 2 / 2)
    return _unit(_fine_samples(spectrum, fine).real)


def _low(size: int, fine: int) -> np.ndarray:
    """Where a size-point DFT's frequencies sit in a (size * fine)-point DFT (also: the
    frequencies of a fine-grid far field that an n-pixel detector records)."""
    k = np.fft.fftfreq(size) * size
    return np.where(k >= 0, k, k + size * fine).astype(int)


def _fine_samples(spectrum: np.ndarray, fine: int) -> np.ndarray:
    """The band-limited field of a size-point ``spectrum`` sampled ``fine`` times finer
    (zero-padding; unnormalised: divide by fine^2 to keep the values)."""
    if fine == 1:
        return np.fft.ifft2(spectrum)
    size = spectrum.shape[-1]
    big = np.zeros((size * fine, size * fine), dtype=np.complex128)
    big[np.ix_(_low(size, fine), _low(size, fine))] = spectrum
    return np.fft.ifft2(big)


def _sparse_field(size: int, rng: np.random.Generator, fine: int = 1) -> np.ndarray:
    yy, xx = np.mgrid[0 : size * fine, 0 : size * fine] / fine
    field = np.zeros(yy.shape)
    for _ in range(40):
        cy, cx = rng.uniform(0, size, 2)
        radius = rng.choice([1.0, 2.0, 4.0, 8.0])
        field = np.maximum(field, ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2) * 1.0)
    return field


def make_object(kind: str, size: int, seed: int = 0, fine: int = 1) -> np.ndarray:
    """Complex (size * fine, size * fine) object of one of :data:`OBJECT_KINDS` (``fine``
    > 1: the same object on a grid that much finer, pixel i of the coarse one at fine
    pixel fine * i)."""
    rng = np.random.default_rng(seed)
    if kind in ("natural", "strong-phase", "weak-phase"):
        amp_map, phase_map = _natural_pair(size * fine, seed)
        phase_span = {"natural": 0.6, "strong-phase": 2.5, "weak-phase": 0.15}[kind]
    elif kind == "smooth":
        amp_map = _smooth_field(size, rng, 12.0, fine)
        phase_map = _smooth_field(size, rng, 12.0, fine)
        phase_span = 0.6
    elif kind == "sparse":
        amp_map, phase_map = 1.0 - _sparse_field(size, rng, fine), _sparse_field(size, rng, fine)
        phase_span = 0.6
    else:
        raise ValueError(f"unknown object kind {kind!r}; choose one of {OBJECT_KINDS}")
    amplitude = 0.6 + 0.4 * amp_map
    phase = phase_span * (2.0 * phase_map - 1.0)
    return amplitude * np.exp(1j * phase)


def make_probe(n: int, diameter_px: float, defocus_rad: float) -> np.ndarray:
    """Defocused disc: a circular pupil of the right far-field size with a quadratic phase,
    inverse-transformed to the sample plane; unit total power."""
    # a disc of diameter D in real space has a far-field Airy core ~ 2.44 n / D pixels wide;
    # take the pupil radius so the in-focus spot is about D / 4 and let defocus spread it
    k = (np.arange(n) - n // 2) / n
    kr2 = k[:, None] ** 2 + k[None, :] ** 2
    pupil_radius = 1.0 / (diameter_px / 4.0)
    pupil = (kr2 <= (pupil_radius / 2) ** 2).astype(np.complex128)
    pupil *= np.exp(1j * defocus_rad * kr2 / (pupil_radius / 2) ** 2)
    probe = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(pupil)))
    return probe / np.sqrt(np.sum(np.abs(probe) ** 2))


def make_disc_probe(n: int, diameter_px: float, defocus_rad: float) -> np.ndarray:
    """A disc of the given diameter in the sample plane, edges smoothed over ~1 px by
    supersampling, with a quadratic phase of defocus_rad at the rim; unit total power."""
    fine = 4  # subpixels per pixel for the edge
    sub = (np.arange(n * fine) + 0.5) / fine - 0.5 - n // 2
    inside = (sub[:, None] ** 2 + sub[None, :] ** 2 <= (diameter_px / 2) ** 2)
    coverage = inside.reshape(n, fine, n, fine).mean(axis=(1, 3))
    centre = np.arange(n) - n // 2
    rho2 = (centre[:, None] ** 2 + centre[None, :] ** 2) / (diameter_px / 2) ** 2
    probe = coverage * np.exp(1j * defocus_rad * rho2)
    return probe / np.sqrt(np.sum(np.abs(probe) ** 2))


def scan_positions(spec: ScanSpec, rng: np.random.Generator) -> np.ndarray:
    """(M, 2) fractional (y, x) patch centres on a jittered raster inside the object."""
    half = spec.patch / 2
    lo, hi = half + spec.jitter_px, spec.object_px - half - spec.jitter_px
    axis = np.arange(lo, hi + 1e-9, spec.step_px)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    centres = np.stack((yy.ravel(), xx.ravel()), axis=1)
    return centres + rng.uniform(-spec.jitter_px, spec.jitter_px, centres.shape)


MARGIN = 8


def fourier_patch(padded: np.ndarray, centre: np.ndarray, n: int) -> np.ndarray:
    """The n x n patch whose pixel (i, j) is obj(y - n/2 + i, x - n/2 + j), by Fourier shift
    of an integer-cut window with a margin (the margin keeps wrap-around out of the patch).
    ``padded`` is the object padded by MARGIN on every side (reflected)."""
    margin = MARGIN
    top = centre - n / 2 + margin
    base = np.floor(top).astype(int)
    frac = top - base
    rows = slice(base[0] - margin, base[0] + n + margin)
    window = padded[rows, base[1] - margin : base[1] + n + margin]
    if window.shape != (n + 2 * margin, n + 2 * margin):
        raise ValueError(f"patch at {centre} leaves the object")
    m = window.shape[0]
    k = np.fft.fftfreq(m)
    ramp = np.exp(2j * np.pi * (k[:, None] * frac[0] + k[None, :] * frac[1]))
    shifted = np.fft.ifft2(np.fft.fft2(window) * ramp)
    return shifted[margin : margin + n, margin : margin + n]


def _probe(spec: ScanSpec) -> np.ndarray:
    if spec.probe_kind not in PROBE_KINDS:
        raise ValueError(f"probe_kind must be one of {PROBE_KINDS}, got {spec.probe_kind!r}")
    make = make_probe if spec.probe_kind == "pupil" else make_disc_probe
    return make(spec.patch, spec.probe_diameter_px, spec.defocus_rad)


def _counts(intensity: np.ndarray, photons: float, rng: np.random.Generator) -> np.ndarray:
    flux = photons / intensity.sum(axis=(1, 2)).mean()
    return rng.poisson(intensity * flux).astype(np.float64)


def _fourier_intensity(spec: ScanSpec, probe: np.ndarray, positions: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    obj = make_object(spec.kind, spec.object_px, spec.seed)
    padded = np.pad(obj, MARGIN, mode="reflect")
    intensity = np.empty((len(positions), spec.patch, spec.patch))
    for m, centre in enumerate(positions):
        exit_wave = probe * fourier_patch(padded, centre, spec.patch)
        intensity[m] = np.abs(np.fft.fftshift(np.fft.fft2(exit_wave, norm="ortho"))) ** 2
    return intensity, obj


def upsample(field: np.ndarray, factor: int) -> np.ndarray:
    """Band-limited (Fourier zero-padding) upsampling that keeps the sample values: sample
    i of ``field`` is sample factor * i of the result."""
    return _fine_samples(np.fft.fft2(field), factor) * factor * factor


def _fine_grid_intensity(spec: ScanSpec, probe: np.ndarray, positions: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
    f, n = FINE, spec.patch
    fine = make_object(spec.kind, spec.object_px, spec.seed, fine=f)
    half = f // 2  # coarse pixel i averages fine pixels f*i - half .. f*i + half
    shifted = np.roll(fine, (half, half), axis=(0, 1))
    obj = shifted.reshape(spec.object_px, f, spec.object_px, f).mean(axis=(1, 3))
    fine_probe = upsample(probe, f)
    band = _low(n, f)  # the detector's band, in the n-point DFT's order
    intensity = np.empty((len(positions), n, n))
    for m, centre in enumerate(positions):
        top = np.rint((centre - n / 2) * f).astype(int)
        if top.min() < 0 or np.any(top + n * f > fine.shape[0]):
            raise ValueError(f"patch at {centre} leaves the object")
        exit_wave = fine_probe * fine[top[0] : top[0] + n * f, top[1] : top[1] + n * f]
        far = np.fft.fft2(exit_wave)[np.ix_(band, band)] / (f * f * n)
        intensity[m] = np.abs(np.fft.fftshift(far)) ** 2
    return intensity, obj


def simulate(spec: ScanSpec) -> dict[str, np.ndarray]:
    """The npz arrays of one scan (float64 diffraction amplitudes, complex128 probe/object)."""
    if spec.model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {spec.model!r}")
    rng = np.random.default_rng(spec.seed + 1)
    probe = _probe(spec)
    positions = scan_positions(spec, rng)
    if spec.model == "fine-grid":
        positions = np.rint(positions * FINE) / FINE
        intensity, obj = _fine_grid_intensity(spec, probe, positions)
    else:
        intensity, obj = _fourier_intensity(spec, probe, positions)
    return {
        "diffraction": np.sqrt(_counts(intensity, spec.photons, rng)),
        "probeGuess": probe,
        "objectGuess": obj,
        "xcoords": positions[:, 1].copy(),
        "ycoords": positions[:, 0].copy(),
    }


def save(path: str, spec: ScanSpec) -> None:
    np.savez(path, **simulate(spec))
