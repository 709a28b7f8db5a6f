"""Per-output error statistics and tolerance checks (numpy only).

One module, fed by any two runners' outputs: the export gate, the runtime's self-check and
the parity command all call it. Phase is compared as a wrapped difference weighted by the
reference amplitude, because phase is meaningless where the object amplitude vanishes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from runtime.errors import EXIT_USAGE, PtychoError

# Defaults per precision: amplitude as max |error| / max |reference|, phase in radians
# (wrapped, amplitude-weighted). fp32 numbers follow the measured export error (~1e-7).
DEFAULT_TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"amplitude_rel_max": 1e-5, "phase_weighted_max_rad": 1e-4,
             "predicted_diffraction_rel_max": 1e-5},
    # Measured (small preset, N=32, trained 5 epochs): fp16 worst 6.7e-4 of max and 3.9e-3
    # rad weighted phase; bf16 4.8e-3 of max and 2.6e-2 rad. Limits leave ~2x headroom.
    "fp16": {"amplitude_rel_max": 5e-3, "phase_weighted_max_rad": 1e-2,
             "predicted_diffraction_rel_max": 1e-5},
    "bf16": {"amplitude_rel_max": 3e-2, "phase_weighted_max_rad": 6e-2,
             "predicted_diffraction_rel_max": 1e-5},
}

TOLERANCE_FLAGS = {"amplitude_rel_max": "--amplitude-tol",
                   "phase_weighted_max_rad": "--phase-tol",
                   "predicted_diffraction_rel_max": "--physics-tol",
                   "object_complex_rel_max": "--object-tol"}


class ToleranceError(PtychoError):
    """A tolerance that would make the gate meaningless (NaN passes every comparison)."""

    exit_code = EXIT_USAGE


def check_tolerances(overrides: dict[str, float]) -> None:
    """Positive finite values only: `x > nan` is False, so a NaN limit passed everything,
    and 0 or a negative limit fails every run."""
    for key, value in overrides.items():
        flag = TOLERANCE_FLAGS.get(key, key)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ToleranceError(f"{flag} {value!r}: give a positive number") from None
        if not (math.isfinite(number) and number > 0):
            raise ToleranceError(f"{flag} {value}: a tolerance must be a positive finite "
                                 "number (NaN would pass every comparison, 0 or less fail "
                                 "every one)")


def loosened(overrides: dict[str, float], defaults: dict[str, float]) -> dict[str, dict]:
    """The overrides looser than their defaults: {key: {"limit", "default"}}, for the
    warning printed and the record kept in the manifest / report."""
    return {key: {"limit": float(value), "default": defaults[key]}
            for key, value in overrides.items()
            if key in defaults and float(value) > defaults[key]}


@dataclass(frozen=True)
class OutputStats:
    name: str
    max_abs: float
    rel_max: float  # max_abs / max |reference|
    p99_abs: float
    mean_abs: float
    nan_count: int
    inf_count: int
    shape_ok: bool
    dtype_ok: bool
    weighted_max: float | None = None  # phase only: max |wrap(d)| * amp / max amp

    def to_dict(self) -> dict:
        return asdict(self)


def wrap_phase(delta: np.ndarray) -> np.ndarray:
    return (delta + np.pi) % (2 * np.pi) - np.pi


def output_stats(name: str, reference: np.ndarray, candidate: np.ndarray,
                 weight: np.ndarray | None = None, is_phase: bool = False) -> OutputStats:
    reference = np.asarray(reference)
    candidate = np.asarray(candidate)
    shape_ok = reference.shape == candidate.shape
    dtype_ok = candidate.dtype == np.float32
    nan_count = int(np.isnan(candidate).sum())
    inf_count = int(np.isinf(candidate).sum())
    if not shape_ok or candidate.size == 0:
        return OutputStats(name, float("inf"), float("inf"), float("inf"), float("inf"),
                           nan_count, inf_count, shape_ok, dtype_ok,
                           float("inf") if is_phase else None)
    ref64 = reference.astype(np.float64)
    diff = candidate.astype(np.float64) - ref64
    if is_phase:
        diff = wrap_phase(diff)
    diff = np.abs(np.where(np.isfinite(diff), diff, np.inf))
    scale = float(np.max(np.abs(ref64))) if ref64.size else 0.0
    max_abs = float(diff.max())
    weighted = None
    if is_phase and weight is not None:
        w = np.abs(np.asarray(weight, dtype=np.float64))
        top = float(w.max())
        weighted = float((diff * (w / top)).max()) if top > 0 else 0.0
    return OutputStats(
        name=name, max_abs=max_abs, rel_max=max_abs / scale if scale > 0 else max_abs,
        p99_abs=float(np.percentile(diff, 99)), mean_abs=float(diff.mean()),
        nan_count=nan_count, inf_count=inf_count, shape_ok=shape_ok, dtype_ok=dtype_ok,
        weighted_max=weighted)


def compare_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]
                    ) -> dict[str, OutputStats]:
    stats = {}
    for name, ref in reference.items():
        if name not in candidate:
            stats[name] = OutputStats(name, float("inf"), float("inf"), float("inf"),
                                      float("inf"), 0, 0, False, False)
            continue
        is_phase = name == "phase"
        weight = reference.get("amplitude") if is_phase else None
        stats[name] = output_stats(name, ref, candidate[name], weight, is_phase)
    return stats


def tolerance_failures(stats: dict[str, OutputStats], tolerances: dict[str, float]
                       ) -> list[str]:
    """Human-readable reasons, empty when every output is within tolerance."""
    failures = []
    for name, stat in stats.items():
        if not stat.shape_ok:
            failures.append(f"{name}: shape differs from the reference")
            continue
        if not stat.dtype_ok:
            failures.append(f"{name}: dtype is not float32")
        if stat.nan_count or stat.inf_count:
            failures.append(f"{name}: {stat.nan_count} NaN and {stat.inf_count} Inf values")
        if name == "phase":
            limit = tolerances.get("phase_weighted_max_rad", 1e-4)
            value = stat.weighted_max if stat.weighted_max is not None else stat.max_abs
            if value > limit:
                failures.append(f"phase: amplitude-weighted wrapped error {value:.3g} rad > "
                                f"{limit:.3g}")
        else:
            limit = tolerances.get(f"{name}_rel_max", 1e-5)
            if stat.rel_max > limit:
                failures.append(f"{name}: max error {stat.rel_max:.3g} of max|ref| > {limit:.3g}")
    return failures
