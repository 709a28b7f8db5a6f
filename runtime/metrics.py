"""Compare a reconstructed complex object with a reference (numpy only, no torch).

Ptychography determines an object only up to a global complex factor (an overall phase
offset, and for PtychoPINN an intensity scale), so every metric here first removes the
least-squares complex scalar; otherwise a perfect reconstruction with a constant phase
offset would score badly. It also leaves a linear phase ramp undetermined (a ramp in the
object is a shift of every diffraction pattern, which a small probe-position or
detector-centre error produces): ``remove_ramp=True`` takes out the best-fitting plane
a + gy*y + gx*x as well (:func:`fit_phase_ramp`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["align_to_reference", "fit_phase_ramp", "reconstruction_errors", "remove_phase_ramp"]


def _select(
    estimate: np.ndarray, reference: np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate shapes and return (estimate, reference, boolean mask) as arrays."""
    est = np.asarray(estimate)
    ref = np.asarray(reference)
    if est.shape != ref.shape:
        raise ValueError(f"estimate shape {est.shape} does not match reference {ref.shape}")
    if mask is None:
        sel = np.ones(est.shape, dtype=bool)
    else:
        sel = np.asarray(mask, dtype=bool)
        if sel.shape != est.shape:
            raise ValueError(f"mask shape {sel.shape} does not match estimate {est.shape}")
    if not sel.any():
        raise ValueError("mask selects no pixels")
    return est, ref, sel


def align_to_reference(
    estimate: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None
) -> np.ndarray:
    """Return ``c * estimate`` with the complex scalar c that best fits ``reference``.

    c = sum(conj(est) * ref) / sum(|est|^2) over ``mask`` (least squares), which removes
    both the global phase offset and the global amplitude scale. An all-zero estimate is
    returned unchanged (there is no factor to fit).
    """
    est, ref, sel = _select(estimate, reference, mask)
    e = est[sel].astype(np.complex128)
    r = ref[sel].astype(np.complex128)
    denom = float(np.sum(np.abs(e) ** 2))
    if denom == 0.0:
        return est.astype(np.result_type(est.dtype, np.complex64))
    c = np.sum(np.conj(e) * r) / denom
    out_dtype = np.result_type(est.dtype, ref.dtype, np.complex64)
    return (est.astype(np.complex128) * c).astype(out_dtype)


def _slope(z: np.ndarray, sel: np.ndarray, axis: int) -> float:
    """Phase step per pixel along ``axis``: the angle of sum z[k+1] conj(z[k]) over
    neighbouring pairs that are both selected (2pi wraps cancel in each product)."""
    head = [slice(None)] * 2
    tail = [slice(None)] * 2
    head[axis], tail[axis] = slice(1, None), slice(None, -1)
    pairs = sel[tuple(head)] & sel[tuple(tail)]
    total = np.sum((z[tuple(head)] * np.conj(z[tuple(tail)]))[pairs])
    return float(np.angle(total)) if total != 0 else 0.0


def fit_phase_ramp(
    estimate: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None
) -> tuple[float, float, float]:
    """(a, gy, gx): the plane a + gy*y + gx*x (radians; y, x array indices) that best fits
    the phase difference angle(est * conj(ref)) over ``mask``. 2-D arrays only.

    Robust to wrapping without unwrapping anything:

    1. Coarse slopes from neighbour phase differences: gx = angle(sum over horizontally
       adjacent selected pairs of d[y, x+1] conj(d[y, x])), d = est * conj(ref), likewise
       gy. Each product holds only the local step of the difference, so a ramp that wraps
       many times across the image is found as long as it moves < pi per pixel. The
       products carry |est| |ref| as weight: dark pixels, whose phase is noise, count less.
    2. Offset a: the circular mean of the difference after the coarse ramp.
    3. Refinement: the remaining wrapped residual is small, so a plain (unweighted) least-
       squares plane through it, added to the coarse one, gives the final fit; this is the
       same unweighted per-pixel phase error that ``phase_rmse_rad`` measures.
    """
    est, ref, sel = _select(estimate, reference, mask)
    if est.ndim != 2:
        raise ValueError(f"phase ramp fit needs 2-D images, got shape {est.shape}")
    d = est.astype(np.complex128) * np.conj(ref.astype(np.complex128))
    gy, gx = _slope(d, sel, 0), _slope(d, sel, 1)
    yy, xx = np.nonzero(sel)
    yc, xc = float(yy.mean()), float(xx.mean())  # centred coordinates: a well-posed fit
    dy, dx = yy - yc, xx - xc
    values = d[sel] * np.exp(-1j * (gy * dy + gx * dx))
    a = float(np.angle(np.sum(values))) if np.any(values != 0) else 0.0
    residual = np.angle(values * np.exp(-1j * a))
    design = np.stack([np.ones_like(dy), dy, dx], axis=1)
    (da, dgy, dgx), *_ = np.linalg.lstsq(design, residual, rcond=None)
    a, gy, gx = a + float(da), gy + float(dgy), gx + float(dgx)
    # Back to a plane about array index (0, 0), wrapped into (-pi, pi].
    a0 = float(np.angle(np.exp(1j * (a - gy * yc - gx * xc))))
    return a0, gy, gx


def remove_phase_ramp(
    estimate: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``estimate * exp(-i (a + gy*y + gx*x))`` with the plane of :func:`fit_phase_ramp`
    (applied to every pixel, fitted on ``mask``), and the plane (a, gy, gx)."""
    a, gy, gx = fit_phase_ramp(estimate, reference, mask)
    est = np.asarray(estimate)
    h, w = est.shape
    plane = a + gy * np.arange(h, dtype=np.float64)[:, None] + gx * np.arange(w)[None, :]
    out = est.astype(np.complex128) * np.exp(-1j * plane)
    return out.astype(np.result_type(est.dtype, np.complex64)), (a, gy, gx)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant (no linear relation to measure,
    and NaN would make the JSON reports invalid)."""
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt(np.sum(a * a) * np.sum(b * b))
    if denom == 0.0:
        return 0.0
    return float(np.sum(a * b) / denom)


def reconstruction_errors(
    estimate: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None,
    remove_ramp: bool = False,
) -> dict[str, float]:
    """Amplitude, phase and complex error metrics over ``mask`` after global alignment.

    ``remove_ramp``: first take a linear phase ramp out of the estimate
    (:func:`remove_phase_ramp`, fitted on ``mask``); the result then also holds the
    removed slopes ``phase_ramp_y_rad_per_px`` and ``phase_ramp_x_rad_per_px``. Amplitude
    metrics do not change; phase and complex ones no longer count the ramp.

    Keys (all plain floats):
      - ``amplitude_psnr_db``: 20 log10(max |ref| / amplitude_rmse); inf when exact.
      - ``amplitude_rmse``, ``amplitude_corr`` (Pearson) of |c * est| against |ref|.
      - ``phase_rmse_rad``: RMS of the wrapped phase difference angle(est * conj(ref)),
        after subtracting its circular mean (the global phase offset), so a reference
        near +pi and an estimate near -pi count as close.
      - ``phase_corr``: Pearson of phase(ref) + that wrapped difference against phase(ref),
        i.e. the estimate's phase unwrapped relative to the reference (no 2pi jumps).
      - ``complex_nrmse``: ||c * est - ref|| / ||ref|| (c from :func:`align_to_reference`).
    """
    est, ref, sel = _select(estimate, reference, mask)
    ramp: dict[str, float] = {}
    if remove_ramp:
        est, (_, gy, gx) = remove_phase_ramp(est, ref, sel)
        ramp = {"phase_ramp_y_rad_per_px": gy, "phase_ramp_x_rad_per_px": gx}
    aligned = align_to_reference(est, ref, sel)[sel].astype(np.complex128)
    r = ref[sel].astype(np.complex128)

    amp_est = np.abs(aligned)
    amp_ref = np.abs(r)
    amp_rmse = float(np.sqrt(np.mean((amp_est - amp_ref) ** 2)))
    peak = float(amp_ref.max())
    if amp_rmse == 0.0:
        psnr = float("inf")
    elif peak == 0.0:
        psnr = float("-inf")
    else:
        psnr = float(20.0 * np.log10(peak / amp_rmse))

    # Wrapped difference in (-pi, pi]; the circular mean is the global phase offset.
    diff = np.angle(est[sel].astype(np.complex128) * np.conj(r))
    offset = np.angle(np.mean(np.exp(1j * diff)))
    diff = np.angle(np.exp(1j * (diff - offset)))
    phase_ref = np.angle(r)

    ref_norm = float(np.linalg.norm(r))
    nrmse = float(np.linalg.norm(aligned - r) / ref_norm) if ref_norm > 0 else float("nan")

    return {
        "amplitude_psnr_db": psnr,
        "amplitude_rmse": amp_rmse,
        "amplitude_corr": _pearson(amp_est, amp_ref),
        "phase_rmse_rad": float(np.sqrt(np.mean(diff**2))),
        "phase_corr": _pearson(phase_ref + diff, phase_ref),
        "complex_nrmse": nrmse,
        **ramp,
    }
