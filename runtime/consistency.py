"""Data consistency: each reconstructed patch checked against its own measurement.

The physics graph an export carries (`physics.onnx`: object patch x probe -> far field ->
|.|, in the data's units) predicts the diffraction amplitude of every patch the model
returned. Per pattern, against the measured amplitude a = sqrt(counts) and the predicted
amplitude p:

- amplitude R-factor  R = sum |a - p| / sum a   (0: perfect; ~1: unrelated)
- Poisson deviance per pixel, in counts:
  D = 2 / N^2 * sum [ y log(y / lam) - (y - lam) ],  y = a^2, lam = p^2
  (0 for a perfect prediction of the counts; 1 per pixel is the noise level itself).

Outliers: R above median + k * MAD (k recorded), a robust rule that a handful of bad
patterns cannot move. Pure numpy, float64 arithmetic, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

OUTLIER_MADS = 5.0
MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution, in standard deviations
LAMBDA_FLOOR = 1e-12  # counts; keeps log(y / lam) finite where the prediction is dark


def pattern_figures(measured: np.ndarray, predicted: np.ndarray) -> dict[str, np.ndarray]:
    """(R-factor, deviance per pixel) per pattern of (B, C, N, N) amplitudes, flattened to
    B*C patterns in batch-major order."""
    a = np.asarray(measured, dtype=np.float64).reshape(-1, *measured.shape[-2:])
    p = np.asarray(predicted, dtype=np.float64).reshape(-1, *predicted.shape[-2:])
    if a.shape != p.shape:
        raise ValueError(f"measured {a.shape} and predicted {p.shape} differ")
    total = a.sum(axis=(1, 2))
    r_factor = np.abs(a - p).sum(axis=(1, 2)) / np.where(total > 0, total, np.nan)
    y, lam = a * a, np.maximum(p * p, LAMBDA_FLOOR)
    log_term = np.where(y > 0, y * np.log(np.where(y > 0, y, 1.0) / lam), 0.0)
    deviance = 2.0 * (log_term - (y - lam)).mean(axis=(1, 2))
    return {"r_factor": r_factor, "deviance_per_pixel": deviance}


def robust_outliers(values: np.ndarray, k: float = OUTLIER_MADS) -> tuple[np.ndarray, float]:
    """(indices above median + k * 1.4826 * MAD, that threshold); NaN values are ignored."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(0, dtype=np.int64), float("nan")
    median = float(np.median(finite))
    mad = float(np.median(np.abs(finite - median))) * MAD_TO_SIGMA
    threshold = median + k * mad
    return np.flatnonzero(np.isfinite(values) & (values > threshold)), threshold


def distribution(values: np.ndarray) -> dict[str, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"median": float("nan"), "p95": float("nan"), "max": float("nan")}
    return {"median": float(np.median(finite)), "p95": float(np.percentile(finite, 95)),
            "max": float(finite.max())}


@dataclass
class ConsistencyAccumulator:
    """Collects the per-pattern figures batch by batch (patterns in scan order)."""

    k: float = OUTLIER_MADS
    parts: dict[str, list[np.ndarray]] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, measured: np.ndarray, predicted: np.ndarray) -> None:
        for name, values in pattern_figures(measured, predicted).items():
            self.parts.setdefault(name, []).append(values)

    def values(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts) for name, parts in self.parts.items()}

    def report(self, positions_px: np.ndarray | None = None) -> dict[str, Any]:
        values = self.values()
        r = values["r_factor"]
        outliers, threshold = robust_outliers(r, self.k)
        listed = [{"pattern": int(i), "r_factor": float(r[i]),
                   **({"position_px": [float(v) for v in positions_px[i]]}
                      if positions_px is not None else {})} for i in outliers[:100]]
        return {
            "patterns": int(r.size),
            "r_factor": distribution(r),
            "deviance_per_pixel": distribution(values["deviance_per_pixel"]),
            "summed_deviance_per_pixel": float(np.nansum(values["deviance_per_pixel"])),
            "outlier_rule": f"R-factor > median + {self.k:g} x 1.4826 x MAD",
            "outlier_threshold": threshold,
            "outliers": len(outliers), "outlier_patterns": listed,
            "seconds": round(self.seconds, 4),
        }


def summary_line(report: dict[str, Any]) -> str:
    r = report["r_factor"]
    return (f"data consistency: median R-factor {r['median']:.3f} (p95 {r['p95']:.3f}), "
            f"deviance {report['deviance_per_pixel']['median']:.3g} per pixel; "
            f"{report['outliers']} outlier pattern(s) ({report['outlier_rule']})")


# A probe whose shape differs from the training probe's by more than this (1 - normalised
# overlap) is reported: the physics graph predicts with the training probe, so the residual
# then measures the probe mismatch as much as the reconstruction.
PROBE_MISMATCH_WARN = 0.05


def probe_difference(scan_probe: np.ndarray, trained_probe: np.ndarray) -> dict[str, Any]:
    """How the scan's probe differs from the one the model was trained with.

    ``mismatch`` = 1 - |<p_scan, p_train>| / (||p_scan|| ||p_train||): 0 for the same probe
    up to a global phase and scale, 1 for orthogonal ones. ``power_ratio`` = total power of
    the scan's probe over the training probe's (the model's input scale absorbs a flux
    change; a probe of another shape it cannot)."""
    a = np.asarray(scan_probe, np.complex128)
    b = np.asarray(trained_probe, np.complex128)
    if a.shape != b.shape:
        return {"status": "not compared", "reason": f"probe shapes {a.shape} and {b.shape}"}
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return {"status": "not compared", "reason": "a probe is all zeros"}
    mismatch = float(1.0 - abs(np.vdot(b, a)) / (na * nb))
    return {"mismatch": max(mismatch, 0.0), "power_ratio": float((na / nb) ** 2),
            "differs": bool(mismatch > PROBE_MISMATCH_WARN),
            "rule": f"differs when 1 - normalised overlap > {PROBE_MISMATCH_WARN:g}"}
