"""Compare a reconstructed complex object with a reference (numpy only, no torch).

Ptychography determines an object only up to a global complex factor (an overall phase
offset, and for PtychoPINN an intensity scale), so every metric here first removes the
least-squares complex scalar; otherwise a perfect reconstruction with a constant phase
offset would score badly.
"""

from __future__ import annotations

import numpy as np

__all__ = ["align_to_reference", "reconstruction_errors"]


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
    estimate: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None
) -> dict[str, float]:
    """Amplitude, phase and complex error metrics over ``mask`` after global alignment.

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
    }
