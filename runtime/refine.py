"""The network's stitched object refined through the scan's own measurements (numpy, no torch).

Why: one diffraction pattern does not hold its patch (the far-field phase is lost, and with
a focused probe most of the detector is dark field that only phase retrieval can use); the
scan does, through the overlap of neighbouring spots. The network gives a good start in one
pass; a few tens of iterations of the classic overlap-consistent update then take the object
to what the data determine. On the quality benchmark's natural scan at 1e6 photons (2-core
AMD EPYC): the network alone, amplitude SSIM 0.45; 20 iterations from it, 0.874; from a
flat start the same 20 iterations give 0.763, and 50 give 0.868 (the second table of
``python -m bench.quality``, docs/quality.md).

The update is the parallel form of the error-reduction step of ptychography, i.e. gradient
descent on the amplitude misfit with the illumination as preconditioner. Per pattern j, with
A_j the linear map from the object to its exit wave (the probe times the object under it):

    psi_j  = A_j O,   psi'_j = F^-1[ a_j F(psi_j) / |F(psi_j)| ]   (measured modulus in)
    O     += tau sum_j A_j^H (psi'_j - psi_j) / (sum_j |P_j|^2 + ALPHA max sum_j |P_j|^2)

summed over the whole scan before the object moves (so the result does not depend on the
order the patterns are read in, and the stack can be streamed from disk), with Nesterov
momentum and an adaptive restart (the velocity is dropped whenever the misfit rises; two
rises running halve tau). ALPHA keeps the pixels lit only by the probes' tails from moving
on their tiny, noisy updates. tau is 1 / (the largest eigenvalue of the preconditioned
curvature sum_j A_j^H A_j), by power iteration: the largest stable step with momentum. A
sequential (ePIE-like) variant with eight updates per pass was measured as well: it is
faster at first, but it fits the noise of the last batch and stops at amplitude SSIM 0.82
where the parallel update reaches 0.885, at the data's noise floor (R 0.031).

Units: the network's object and the scan's probe need not be in the measured amplitudes'
units, so one global factor (least squares between predicted and measured amplitudes at the
start) scales the probe before the first step.

Fractional positions (``RefineOptions.shift``). "object" (the default): A_j cuts a window
MARGIN px wider than the patch at whole pixels, Fourier-shifts it by the fraction, crops
it and multiplies by the probe. "probe": each pattern's probe is Fourier-shifted by its
fraction and the object cut at whole pixels, as in the training's object solve. For a
product band-limited to the pixel grid the two give the same far field; for content near
Nyquist (sharp edges, steep phase) they alias differently. ``python -m bench.refine_ceiling``
measures both from the true object: on scans made by an object shift the probe shift stops
at amplitude SSIM 0.56-0.69 (sparse, strong phase) where the object shift reaches 0.99; on
physical scans (a 5x finer object, only the detector band kept) neither is the model, the
object shift fits the data better (lower R) and the two score within 0.02 SSIM. The object
shift costs about 3x the time: its near-Nyquist modes in dimly lit pixels raise the
curvature to ~1.3 (ALPHA 0.5), where the probe shift's is exactly 1 / (1 + ALPHA).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import fft as scipy_fft

from runtime.consistency import distribution

# illumination (summed |probe|^2 relative to its peak) at which a pixel's step is halved
ALPHA = 0.5
MOMENTUM = 0.8
# patterns per chunk: bounds the working arrays (a few (B, N + 2 MARGIN, ...) complex stacks)
CHUNK = 256
# the object window is cut this many pixels wider on every side before its fractional
# shift, so the shift's circular wrap-around stays out of the patch
MARGIN = 8
# power iterations for the step size (the estimate approaches the largest eigenvalue from
# below; momentum tolerates the few per cent it falls short)
POWER_ITERATIONS = 12
# scipy.fft threads (-1: all cores); numpy.fft is 3-5x slower on complex64 stacks
FFT_WORKERS = -1
# the probe-shift form keeps its shifted probes between iterations while they fit in this
PROBE_CACHE_BYTES = 256 * 2**20
# measured amplitudes are divided by the prediction's modulus, floored here (data units)
MODULUS_FLOOR = 1e-6


def pattern_corners(positions_px: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(whole-pixel top-left corners (M, 2) int64, fractional parts (M, 2)) of each pattern's
    patch; positions are patch centres, patch pixel (i, j) = object pixel
    (y - n/2 + i, x - n/2 + j)."""
    top = np.asarray(positions_px, dtype=np.float64) - n / 2.0
    base = np.floor(top)
    return base.astype(np.int64), top - base


def shifted_probes(probe: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """(M, n, n) complex64: probe(r - f_m) for each fractional part f_m (Fourier shift; the
    probe is compact, so the circular shift is harmless)."""
    n = probe.shape[-1]
    k = np.fft.fftfreq(n)
    spectrum = np.fft.fft2(np.asarray(probe, dtype=np.complex128))
    out = np.empty((len(frac), n, n), dtype=np.complex64)
    for start in range(0, len(frac), 512):
        f = frac[start : start + 512]
        ramp = np.exp(-2j * np.pi * (k[None, :, None] * f[:, 0, None, None]
                                      + k[None, None, :] * f[:, 1, None, None]))
        out[start : start + len(f)] = np.fft.ifft2(spectrum[None] * ramp)
    return out


# converged: the whole-scan R-factor fell by less than this fraction over WINDOW iterations
TOLERANCE = 1e-3
WINDOW = 5


@dataclass(frozen=True)
class RefineOptions:
    """``iterations`` is the most that run; the refinement stops earlier once it has
    converged (the R-factor fell by less than ``tolerance`` of itself over the last
    ``window`` iterations; ``tolerance`` 0 runs them all)."""

    iterations: int
    alpha: float = ALPHA
    momentum: float = MOMENTUM
    tolerance: float = TOLERANCE
    window: int = WINDOW
    # what a fractional position moves: "object" (Fourier-shifted object windows, the
    # closer fit) or "probe" (Fourier-shifted probes, about 3x faster)
    shift: str = "object"

    def check(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) \
                or self.iterations < 0:
            raise ValueError(f"iterations must be an integer >= 0, got {self.iterations!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not self.alpha > 0.0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.tolerance < 1.0:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) \
                or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")
        if self.shift not in GEOMETRIES:
            raise ValueError(f"shift must be one of {sorted(GEOMETRIES)}, got {self.shift!r}")

    def converged(self, history: list[float]) -> bool:
        """True once the last ``window`` iterations lowered the best R-factor by less than
        ``tolerance`` of it (``history``: R before each iteration, then the latest)."""
        k = len(history) - 1  # iterations run
        if self.tolerance <= 0.0 or k < self.window:
            return False
        before = min(history[: k - self.window + 1])
        return min(history[k - self.window + 1 :]) > before * (1.0 - self.tolerance)


@dataclass
class Refined:
    """The refined canvas (same shape and frame as the start) and how the fit went."""

    obj: np.ndarray  # (H, W) complex64
    scale: float  # the factor the probe was scaled by to the measured amplitudes' units
    r_factor: list[float]  # global amplitude R-factor before each iteration, then after all
    pattern_r_start: np.ndarray  # (M,) per-pattern R-factor of the start
    pattern_r_end: np.ndarray  # (M,) per-pattern R-factor of the result
    restarts: int
    seconds: float
    options: RefineOptions
    eigenvalue: float  # largest eigenvalue of the preconditioned curvature (power iteration)
    step_size: float  # the step the last iteration took (1 / eigenvalue, halved on trouble)
    halvings: int  # times the step was halved because the misfit rose twice running

    @property
    def iterations(self) -> int:
        """Iterations run (fewer than asked when it converged first)."""
        return len(self.r_factor) - 1

    @property
    def stopped(self) -> str:
        if self.iterations < self.options.iterations:
            return (f"converged: the R-factor fell by less than {self.options.tolerance:.1%} "
                    f"over the last {self.options.window} iterations")
        return "ran the iterations asked"


def _fft2(a: np.ndarray, norm: str | None = None) -> np.ndarray:
    return scipy_fft.fft2(a, norm=norm, workers=FFT_WORKERS)


def _ifft2(a: np.ndarray, norm: str | None = None) -> np.ndarray:
    return scipy_fft.ifft2(a, norm=norm, workers=FFT_WORKERS)


class _Geometry:
    """Where each pattern's patch lies on the padded canvas, and the linear map A_j from the
    canvas to pattern j's exit wave (with its adjoint); subclasses choose what the
    fractional part of the position moves."""

    diagonal = False  # A^H A is diagonal (then its largest eigenvalue is exact)

    def __init__(self, probe: np.ndarray, positions_px: np.ndarray, origin_px: tuple[int, int],
                 pad: int) -> None:
        self.n = int(probe.shape[-1])
        base, self.frac = pattern_corners(positions_px, self.n)
        self.corner = base - np.asarray(origin_px, dtype=np.int64) + pad
        self.probe = np.asarray(probe, dtype=np.complex64)
        self.m = len(self.corner)
        self.reach = 0  # pixels beyond the patch on every side that A_j reads

    def rescale(self, scale: float) -> None:
        """Put the probe into the measured amplitudes' units."""
        self.probe = self.probe * np.float32(scale)

    def chunks(self) -> Iterator[tuple[int, int]]:
        for start in range(0, self.m, CHUNK):
            yield start, min(start + CHUNK, self.m)

    def _cuts(self, canvas: np.ndarray, start: int, stop: int, size: int) -> np.ndarray:
        corner = self.corner[start:stop] - (size - self.n) // 2
        return sliding_window_view(canvas, (size, size))[corner[:, 0], corner[:, 1]]

    def _add(self, canvas: np.ndarray, values: np.ndarray, start: int) -> None:
        size = values.shape[-1]
        corner = self.corner[start : start + len(values)] - (size - self.n) // 2
        for (y, x), v in zip(corner, values, strict=True):
            canvas[y : y + size, x : x + size] += v

    def exit_waves(self, canvas: np.ndarray, start: int, stop: int) -> np.ndarray:
        """(B, n, n) complex64: A_j applied to the canvas for patterns start..stop."""
        raise NotImplementedError

    def scatter(self, canvas: np.ndarray, residual: np.ndarray, start: int) -> None:
        """canvas += sum_j A_j^H residual_j."""
        raise NotImplementedError

    def illumination(self, shape: tuple[int, int]) -> np.ndarray:
        """Summed |probe|^2 over the patterns (the preconditioner's weight)."""
        lit = np.zeros(shape, dtype=np.float32)
        power = (self.probe.real ** 2 + self.probe.imag ** 2).astype(np.float32)
        n = self.n
        for y, x in self.corner:
            lit[y : y + n, x : x + n] += power
        return lit

    def normal(self, v: np.ndarray) -> np.ndarray:
        """A^H A v: the misfit's curvature (the linear part of one update)."""
        out = np.zeros_like(v)
        for start, stop in self.chunks():
            self.scatter(out, self.exit_waves(v, start, stop), start)
        return out


class _ObjectShift(_Geometry):
    """The object moves: a window MARGIN px wider on every side of the patch, cut at whole
    pixels, Fourier-shifted by the fractional position and cropped, times the probe."""

    def __init__(self, probe: np.ndarray, positions_px: np.ndarray, origin_px: tuple[int, int],
                 pad: int) -> None:
        super().__init__(probe, positions_px, origin_px, pad)
        self.whole_pixel = not np.any(self.frac)
        self.diagonal = self.whole_pixel
        self.reach = 0 if self.whole_pixel else MARGIN
        k = np.fft.fftfreq(self.n + 2 * MARGIN)
        ramp = [np.exp(2j * np.pi * k[None, :] * self.frac[:, axis, None]).astype(np.complex64)
                for axis in (0, 1)]
        self._ramp_y, self._ramp_x = ramp

    def _ramps(self, start: int, stop: int) -> np.ndarray:
        return self._ramp_y[start:stop, :, None] * self._ramp_x[start:stop, None, :]

    def patches(self, canvas: np.ndarray, start: int, stop: int) -> np.ndarray:
        """(B, n, n): object pixel (y + f_y + i, x + f_x + j) for each pattern."""
        n = self.n
        if self.whole_pixel:
            return self._cuts(canvas, start, stop, n)
        windows = self._cuts(canvas, start, stop, n + 2 * MARGIN)
        shifted = _ifft2(_fft2(windows) * self._ramps(start, stop))
        return shifted[:, MARGIN : MARGIN + n, MARGIN : MARGIN + n]

    def exit_waves(self, canvas: np.ndarray, start: int, stop: int) -> np.ndarray:
        return self.probe * self.patches(canvas, start, stop)

    def scatter(self, canvas: np.ndarray, residual: np.ndarray, start: int) -> None:
        values = np.conj(self.probe) * residual
        if self.whole_pixel:
            self._add(canvas, values, start)
            return
        n, w = self.n, self.n + 2 * MARGIN
        padded = np.zeros((len(values), w, w), dtype=np.complex64)
        padded[:, MARGIN : MARGIN + n, MARGIN : MARGIN + n] = values
        ramps = self._ramps(start, start + len(values))
        self._add(canvas, _ifft2(_fft2(padded) * np.conj(ramps)), start)


class _ProbeShift(_Geometry):
    """The probe moves: each pattern's probe Fourier-shifted by its fraction (cached while
    small, else rebuilt per chunk), times the object cut at whole pixels."""

    diagonal = True

    def __init__(self, probe: np.ndarray, positions_px: np.ndarray, origin_px: tuple[int, int],
                 pad: int) -> None:
        super().__init__(probe, positions_px, origin_px, pad)
        cache = self.m * self.n * self.n * 8 <= PROBE_CACHE_BYTES
        self._probes = shifted_probes(self.probe, self.frac) if cache else None
        self._scale = np.float32(1.0)

    def rescale(self, scale: float) -> None:
        self._scale = np.float32(scale)
        if self._probes is not None:
            self._probes *= self._scale

    def probes(self, start: int, stop: int) -> np.ndarray:
        if self._probes is not None:
            return self._probes[start:stop]
        return shifted_probes(self.probe, self.frac[start:stop]) * self._scale

    def exit_waves(self, canvas: np.ndarray, start: int, stop: int) -> np.ndarray:
        return self.probes(start, stop) * self._cuts(canvas, start, stop, self.n)

    def scatter(self, canvas: np.ndarray, residual: np.ndarray, start: int) -> None:
        probes = self.probes(start, start + len(residual))
        self._add(canvas, np.conj(probes) * residual, start)

    def illumination(self, shape: tuple[int, int]) -> np.ndarray:
        lit = np.zeros(shape, dtype=np.float32)
        for start, stop in self.chunks():
            p = self.probes(start, stop)
            self._add(lit, (p.real ** 2 + p.imag ** 2).astype(np.float32), start)
        return lit


GEOMETRIES = {"object": _ObjectShift, "probe": _ProbeShift}


def largest_step_eigenvalue(geometry: _Geometry, inverse: np.ndarray, lit: np.ndarray,
                            iterations: int = POWER_ITERATIONS) -> float:
    """The largest eigenvalue of the preconditioned curvature inverse * A^H A, by power
    iteration from a fixed random start (where A^H A is diagonal, i.e. the illumination
    ``lit``: exactly max(inverse * lit))."""
    if geometry.diagonal:
        return float((inverse * lit).max())
    rng = np.random.default_rng(0)
    v = (rng.standard_normal(inverse.shape)
         + 1j * rng.standard_normal(inverse.shape)).astype(np.complex64)
    v /= np.linalg.norm(v)
    value = 0.0
    for _ in range(iterations):
        u = inverse * geometry.normal(v)
        value = float(np.linalg.norm(u))
        if not value > 0.0:
            return 0.0
        v = u / value
    return value


def _measured(amplitudes: Any, start: int, stop: int) -> np.ndarray:
    """Measured amplitudes with the zero frequency moved to (0, 0), as an unshifted FFT
    gives it (the scan stores them centred)."""
    return np.fft.ifftshift(np.asarray(amplitudes[start:stop], dtype=np.float32),
                            axes=(-2, -1))


def _start_canvas(obj: np.ndarray, weight: np.ndarray, pad: int) -> np.ndarray:
    """The stitched object with its unvisited pixels and a margin of ``pad`` filled with
    its weighted mean value: every pattern's whole window then exists."""
    obj = np.asarray(obj, dtype=np.complex64)
    w = np.asarray(weight, dtype=np.float64)
    fill = complex((obj * w).sum() / w.sum()) if w.sum() > 0 else 1.0
    canvas = np.where(w > 0, obj, np.complex64(fill)).astype(np.complex64)
    return np.pad(canvas, pad, mode="constant", constant_values=np.complex64(fill))


def _fit_scale(geometry: _Geometry, canvas: np.ndarray, amplitudes: Any) -> float:
    """The least-squares factor between the start's predicted and the measured amplitudes."""
    cross = power = 0.0
    for start, stop in geometry.chunks():
        far = np.abs(_fft2(geometry.exit_waves(canvas, start, stop), norm="ortho"))
        cross += float((far * _measured(amplitudes, start, stop)).sum(dtype=np.float64))
        power += float((far * far).sum(dtype=np.float64))
    if not power > 0.0:
        raise ValueError("the start object predicts no diffracted light at all")
    if not cross > 0.0:
        raise ValueError("the measured amplitudes hold no light the start predicts")
    return cross / power


def refine_object(obj: np.ndarray, weight: np.ndarray, origin_px: tuple[int, int],
                  amplitudes: Any, probe: np.ndarray, positions_px: np.ndarray,
                  options: RefineOptions) -> Refined:
    """Refine the stitched ``obj`` (H, W; ``weight`` > 0 where visited, ``origin_px`` the
    object pixel of obj[0, 0] in the positions' frame) through the measured ``amplitudes``
    (M, N, N, centred, may be a memory map), for at most ``options.iterations`` iterations
    (see :class:`RefineOptions` for the stop).

    Returns the refined canvas in the same frame (0 where the start was unvisited)."""
    options.check()
    started = time.perf_counter()
    n = int(probe.shape[-1])
    pad = n
    geometry = GEOMETRIES[options.shift](probe, positions_px, origin_px, pad)
    canvas = _start_canvas(obj, weight, pad)
    reach = geometry.reach
    if (geometry.corner.min() < reach
            or np.any(geometry.corner.max(axis=0) + n + reach > np.array(canvas.shape))):
        raise ValueError("a pattern's window lies outside the stitched canvas and its margin")
    scale = _fit_scale(geometry, canvas, amplitudes)
    geometry.rescale(scale)
    lit = geometry.illumination(canvas.shape)
    inverse = (1.0 / (lit + options.alpha * lit.max())).astype(np.float32)
    eigenvalue = largest_step_eigenvalue(geometry, inverse, lit)
    step_size = 1.0 / eigenvalue if eigenvalue > 0.0 else 1.0
    velocity = np.zeros_like(canvas)
    history: list[float] = []
    pattern_r = np.zeros(geometry.m)
    pattern_r_start = pattern_r
    restarts = halvings = 0
    for iteration in range(options.iterations + 1):
        update = np.zeros_like(canvas)
        misfit = total = 0.0
        for start, stop in geometry.chunks():
            psi = geometry.exit_waves(canvas, start, stop)
            far = _fft2(psi, norm="ortho")
            modulus = np.abs(far)
            measured = _measured(amplitudes, start, stop)
            error = np.abs(measured - modulus).sum(axis=(1, 2), dtype=np.float64)
            light = measured.sum(axis=(1, 2), dtype=np.float64)
            pattern_r[start:stop] = error / np.where(light > 0, light, np.nan)
            misfit += float(error.sum())
            total += float(light.sum())
            if iteration < options.iterations:
                target = far * (measured / np.maximum(modulus, MODULUS_FLOOR))
                residual = (_ifft2(target, norm="ortho") - psi).astype(np.complex64)
                geometry.scatter(update, residual, start)
        history.append(misfit / total if total > 0 else float("nan"))
        if iteration == 0:
            pattern_r_start = pattern_r.copy()
        if iteration == options.iterations or options.converged(history):
            break
        if len(history) > 1 and history[-1] > history[-2]:
            velocity[:] = 0  # adaptive restart: momentum overshot
            restarts += 1
            if len(history) > 2 and history[-2] > history[-3]:
                step_size *= 0.5  # it rose twice running, once without momentum: too long
                halvings += 1
        step = (step_size * inverse) * update
        velocity = options.momentum * velocity + step
        canvas += step + options.momentum * velocity
    out = canvas[pad:-pad, pad:-pad].copy()
    out[np.asarray(weight) <= 0] = 0
    return Refined(obj=out, scale=scale, r_factor=history,
                   pattern_r_start=pattern_r_start, pattern_r_end=pattern_r.copy(),
                   restarts=restarts, seconds=time.perf_counter() - started, options=options,
                   eigenvalue=eigenvalue, step_size=step_size, halvings=halvings)


def refine_report(refined: Refined) -> dict[str, Any]:
    """report.json's ``refine`` section: the settings, the misfit before and after, and its
    curve (the R-factor is runtime.consistency's, sum |a - p| / sum a)."""
    options = refined.options
    return {
        "iterations": refined.iterations,
        "max_iterations": options.iterations,
        "stopped": refined.stopped,
        "tolerance": options.tolerance, "window": options.window,
        "method": "parallel error-reduction update (amplitude misfit, illumination-"
                  "preconditioned, step 1 / largest eigenvalue), Nesterov momentum with "
                  "adaptive restart",
        "momentum": options.momentum, "alpha": options.alpha, "shift": options.shift,
        "restarts": refined.restarts,
        "eigenvalue": round(refined.eigenvalue, 6), "step_size": round(refined.step_size, 6),
        "step_halvings": refined.halvings,
        "probe_scale": refined.scale,
        "r_factor": {"start": refined.r_factor[0], "end": refined.r_factor[-1],
                     "curve": [round(r, 6) for r in refined.r_factor]},
        "pattern_r_factor": {"start": distribution(refined.pattern_r_start),
                             "end": distribution(refined.pattern_r_end)},
        "seconds": round(refined.seconds, 4),
        "start": "the network's stitched object",
    }
