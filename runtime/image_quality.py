"""The quality figures the field reports: SSIM, PSNR, correlation and FRC (numpy only).

One function, :func:`quality_figures`, gives the same set everywhere (``ptycho-train``,
``ptycho-run``, the demo and the quality benchmark), so figures from different commands can
be compared. What ptychography cannot determine is removed first: the global complex
factor (phase offset and amplitude scale) and a linear phase ramp
(:mod:`runtime.metrics`).

Definitions (written down because upstream tools differ):
- **SSIM**: Wang et al. 2004, Gaussian window sigma 1.5 truncated at 3.5 sigma (11 x 11),
  K1 = 0.01, K2 = 0.03, ``data_range`` = the reference's range over the mask; the SSIM
  map is averaged over the mask pixels whose whole window lies inside the mask's bounding
  box. Matches ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
  use_sample_covariance=False)`` on full images (tests/test_image_quality.py).
- **PSNR**: 20 log10(data_range / RMSE) over the mask, data_range as for SSIM.
- **FRC**: Fourier ring correlation of the aligned complex estimate and the reference over
  the mask's bounding box, both apodised by the same 2-D Hann window; rings one frequency
  bin wide. Resolution is the first frequency where the curve falls below **1/7**, given
  as a half-period in pixels (1 / (2 f)); when it never falls below, the Nyquist limit
  (1 px half-period) is the bound. ``frc_auc`` is the area under the clipped curve over
  0 ... Nyquist, normalised to 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.metrics import _pearson, align_to_reference, remove_phase_ramp

__all__ = ["FRC_THRESHOLD", "frc_curve", "psnr", "quality_figures", "ssim"]

FRC_THRESHOLD = 1.0 / 7.0
_SIGMA, _TRUNCATE, _K1, _K2 = 1.5, 3.5, 0.01, 0.03


def _gaussian_kernel() -> np.ndarray:
    radius = int(_TRUNCATE * _SIGMA + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / _SIGMA) ** 2)
    return k / k.sum()


def _filter(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering: only windows wholly inside the image."""
    rows = np.apply_along_axis(np.convolve, 0, image, kernel, mode="valid")
    return np.apply_along_axis(np.convolve, 1, rows, kernel, mode="valid")


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice]:
    rows, cols = np.nonzero(mask)
    return slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1)


def ssim(estimate: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None,
         data_range: float | None = None) -> float:
    """Mean structural similarity of two real 2-D images over ``mask`` (see module doc)."""
    est = np.asarray(estimate, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    sel = np.ones(ref.shape, bool) if mask is None else np.asarray(mask, bool)
    box = _bounding_box(sel)
    est, ref, sel = est[box], ref[box], sel[box]
    if data_range is None:
        data_range = float(ref[sel].max() - ref[sel].min())
    kernel = _gaussian_kernel()
    pad = kernel.size // 2
    if min(ref.shape) < kernel.size:
        raise ValueError(f"SSIM needs at least {kernel.size}x{kernel.size} pixels, got "
                         f"{ref.shape}")
    mu_e, mu_r = _filter(est, kernel), _filter(ref, kernel)
    var_e = _filter(est * est, kernel) - mu_e ** 2
    var_r = _filter(ref * ref, kernel) - mu_r ** 2
    cov = _filter(est * ref, kernel) - mu_e * mu_r
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    smap = ((2 * mu_e * mu_r + c1) * (2 * cov + c2)) / \
        ((mu_e ** 2 + mu_r ** 2 + c1) * (var_e + var_r + c2))
    inner = sel[pad : sel.shape[0] - pad, pad : sel.shape[1] - pad]
    if not inner.any():
        raise ValueError("the mask holds no full SSIM window")
    return float(smap[inner].mean())


def psnr(estimate: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None,
         data_range: float | None = None) -> float:
    """20 log10(data_range / RMSE) over ``mask``; inf for an exact match."""
    est = np.asarray(estimate, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    sel = np.ones(ref.shape, bool) if mask is None else np.asarray(mask, bool)
    if data_range is None:
        data_range = float(ref[sel].max() - ref[sel].min())
    rmse = float(np.sqrt(np.mean((est[sel] - ref[sel]) ** 2)))
    if rmse == 0.0:
        return float("inf")
    return float(20.0 * np.log10(data_range / rmse)) if data_range > 0 else float("-inf")


def frc_curve(estimate: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """(frequency in cycles/pixel, FRC) of two 2-D (complex or real) images over the mask's
    bounding box, Hann-apodised; one ring per frequency bin up to Nyquist (0.5)."""
    sel = np.ones(np.shape(reference), bool) if mask is None else np.asarray(mask, bool)
    box = _bounding_box(sel)
    a = np.asarray(estimate)[box].astype(np.complex128)
    b = np.asarray(reference)[box].astype(np.complex128)
    h, w = a.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    a = (a - a.mean()) * window
    b = (b - b.mean()) * window
    fa, fb = np.fft.fftshift(np.fft.fft2(a)), np.fft.fftshift(np.fft.fft2(b))
    fy = (np.arange(h) - h // 2) / h
    fx = (np.arange(w) - w // 2) / w
    radius = np.hypot(fy[:, None], fx[None, :])
    step = 1.0 / min(h, w)
    ring = np.rint(radius / step).astype(int)
    n_rings = int(0.5 / step) + 1
    inside = ring < n_rings
    cross = np.bincount(ring[inside], (fa * np.conj(fb)).real[inside], n_rings)
    pa = np.bincount(ring[inside], (np.abs(fa) ** 2)[inside], n_rings)
    pb = np.bincount(ring[inside], (np.abs(fb) ** 2)[inside], n_rings)
    denom = np.sqrt(pa * pb)
    curve = np.divide(cross, denom, out=np.zeros(n_rings), where=denom > 0)
    return np.arange(n_rings) * step, curve


def _area(values: np.ndarray, x: np.ndarray) -> float:
    """Trapezoid rule (np.trapezoid is numpy >= 2 only)."""
    return float(np.sum((values[1:] + values[:-1]) * np.diff(x)) / 2.0)


def frc_resolution(freq: np.ndarray, curve: np.ndarray,
                   threshold: float = FRC_THRESHOLD) -> dict[str, float]:
    """First crossing below the threshold (skipping the DC ring), linearly interpolated."""
    below = np.nonzero(curve[1:] < threshold)[0]
    if below.size == 0:
        f_cut = float(freq[-1])
    else:
        i = int(below[0]) + 1
        f0, f1, c0, c1 = freq[i - 1], freq[i], curve[i - 1], curve[i]
        f_cut = float(f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0)) if c0 != c1 else float(f1)
    f_cut = max(f_cut, float(freq[1]))
    return {"frc_threshold": threshold, "frc_cutoff_cycles_per_px": f_cut,
            "frc_resolution_px": 1.0 / (2.0 * f_cut),
            "frc_auc": _area(np.clip(curve, 0, 1), freq) / float(freq[-1])}


def quality_figures(estimate: np.ndarray, reference: np.ndarray, mask: np.ndarray,
                    with_curve: bool = False) -> dict[str, Any]:
    """The one set of figures: amplitude and phase SSIM, PSNR, correlation and RMSE, the
    complex FRC and NRMSE, after removing the global factor and the phase ramp (whose
    slopes are returned too)."""
    sel = np.asarray(mask, bool)
    est, (_, gy, gx) = remove_phase_ramp(estimate, reference, sel)
    est = align_to_reference(est, reference, sel).astype(np.complex128)
    ref = np.asarray(reference).astype(np.complex128)
    ref_norm = float(np.linalg.norm(ref[sel]))
    amp_e, amp_r = np.abs(est), np.abs(ref)
    phase_r = np.angle(ref)
    # estimate phase unwrapped relative to the reference: no 2 pi jumps in the comparison
    phase_e = phase_r + np.angle(est * np.conj(ref))
    amp_range = float(amp_r[sel].max() - amp_r[sel].min())
    phase_range = float(phase_r[sel].max() - phase_r[sel].min())
    freq, curve = frc_curve(est, ref, sel)
    figures: dict[str, Any] = {
        "amplitude_ssim": ssim(amp_e, amp_r, sel, amp_range or 1.0),
        "amplitude_psnr_db": psnr(amp_e, amp_r, sel, amp_range or 1.0),
        "amplitude_corr": _pearson(amp_e[sel], amp_r[sel]),
        "amplitude_rmse": float(np.sqrt(np.mean((amp_e[sel] - amp_r[sel]) ** 2))),
        "phase_ssim": ssim(phase_e, phase_r, sel, phase_range or 1.0),
        "phase_psnr_db": psnr(phase_e, phase_r, sel, phase_range or 1.0),
        "phase_corr": _pearson(phase_e[sel], phase_r[sel]),
        "phase_rmse_rad": float(np.sqrt(np.mean((phase_e[sel] - phase_r[sel]) ** 2))),
        **frc_resolution(freq, curve),
        "complex_nrmse": float(np.linalg.norm(est[sel] - ref[sel]) / ref_norm)
        if ref_norm > 0 else float("nan"),
        "phase_ramp_y_rad_per_px": gy,
        "phase_ramp_x_rad_per_px": gx,
    }
    if with_curve:
        figures["frc_curve"] = {"cycles_per_px": freq.tolist(), "frc": curve.tolist()}
    return figures


# Pixels lit by less than this fraction of the best-lit pixel's summed probe intensity are
# poorly determined by any method; quality is scored on the rest (one rule, every command).
WELL_LIT_THRESHOLD = 0.1
WELL_LIT_RULE = f"well lit: summed |probe|^2 > {WELL_LIT_THRESHOLD} x its maximum"


def well_lit_mask(weight: np.ndarray) -> np.ndarray:
    """The scored region of a stitched object, from its summed per-pixel weights."""
    return weight > WELL_LIT_THRESHOLD * float(weight.max())


# Relative improvement over the flat object below which a channel counts as not recovered.
FLAT_MARGIN = 0.05


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    """inf / NaN (an exact match has infinite PSNR) as None: valid JSON."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
            for k, v in values.items()}


def ground_truth_report(obj: np.ndarray, truth: np.ndarray, mask: np.ndarray,
                        mask_rule: str) -> dict[str, Any]:
    """The one ground-truth section of every report (ptycho-train's quality.json,
    ptycho-run's report.json, the demo, the quality benchmark).

    ``model`` holds :func:`quality_figures` (with the FRC curve);
    ``flat_baseline`` the same for the trivial reconstruction (a flat object: the mean
    amplitude, zero phase); ``verdict`` says per channel whether the model beat it by more
    than :data:`FLAT_MARGIN` in RMSE, and ``warnings`` says so in words when it did not.
    """
    from runtime.metrics import reconstruction_errors

    sel = np.asarray(mask, bool)
    flat = np.full_like(obj, np.abs(obj[sel]).mean())

    model = _finite(quality_figures(obj, truth, sel, with_curve=True))
    baseline = _finite(quality_figures(flat, truth, sel))
    verdict, warnings = {}, []
    for channel, key, unit in (("amplitude", "amplitude_rmse", ""),
                               ("phase", "phase_rmse_rad", " rad")):
        better = model[key] < (1.0 - FLAT_MARGIN) * baseline[key]
        verdict[f"{channel}_beats_flat"] = bool(better)
        if not better:
            warnings.append(f"{channel} is no better than a flat object ({channel} RMSE "
                            f"{model[key]:.3g}{unit}, flat {baseline[key]:.3g}{unit})")
    return {
        "ground_truth": True,
        "scored_pixels": int(sel.sum()),
        "mask": mask_rule,
        "removed": "global complex factor and linear phase ramp",
        "model": model,
        "flat_baseline": baseline,
        "model_global_factor_only": _finite(reconstruction_errors(obj, truth, sel)),
        "verdict": verdict,
        "warnings": warnings,
    }


def summary_line(report: dict[str, Any]) -> str:
    """The figures a person compares, in one line, the same in every command."""
    m = report["model"]

    def show(value: Any, fmt: str) -> str:
        return "inf" if value is None else format(value, fmt)

    return (f"amplitude SSIM {show(m['amplitude_ssim'], '.3f')} PSNR "
            f"{show(m['amplitude_psnr_db'], '.1f')} dB corr {m['amplitude_corr']:.3f}; "
            f"phase SSIM {show(m['phase_ssim'], '.3f')} corr {m['phase_corr']:.3f} RMSE "
            f"{m['phase_rmse_rad']:.3f} rad (flat "
            f"{report['flat_baseline']['phase_rmse_rad']:.3f}); "
            f"FRC 1/7 resolution {m['frc_resolution_px']:.2f} px")
