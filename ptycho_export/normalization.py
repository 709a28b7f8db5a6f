"""The one definition of input and probe scaling, computed once at training time.

PtychoPINN computes its input scale over whatever subset it is reconstructing, so results
depend on the batch. Here the scale is computed once over the training scan, stored in the
bundle, and applied by the frozen graph itself: every later stage sees the same number.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Normalization:
    # network input = amplitude_scale * measured amplitude (raw sqrt-counts or pre-normalised)
    amplitude_scale: float
    # probe used by the physics = probe_scale * probeGuess
    probe_scale: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Normalization:
        """From a bundle's config; a scale that is not a finite positive number would make
        every output NaN or sign-flipped, so it is refused (ValueError) here."""
        scales = {}
        for key in ("amplitude_scale", "probe_scale"):
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not np.isfinite(value) or value <= 0:
                raise ValueError(f"normalization {key} is {value!r}; expected a finite "
                                 "number > 0")
            scales[key] = float(value)
        return cls(**scales)


def target_power(patch_size: int) -> float:
    """Mean total scaled intensity per pattern: (N/2)^2 puts pixels near unit range."""
    return (patch_size / 2.0) ** 2


def compute_normalization(amplitudes: np.ndarray, probe: np.ndarray) -> Normalization:
    """Scale inputs so the mean pattern power is (N/2)^2, and the probe to the same power.

    With sum|probe|^2 equal to the mean scaled pattern power, an object of unit mean
    intensity explains the data; the object's absolute scale is then relative to that
    (ptychography fixes it only up to a global factor anyway). Computed in float64 so a
    large scan of uint16-sized values cannot overflow or lose precision.
    """
    n = amplitudes.shape[-1]
    power = np.float64(0.0)
    count = 0
    for start in range(0, amplitudes.shape[0], 4096):
        chunk = np.asarray(amplitudes[start : start + 4096], dtype=np.float64)
        power += np.square(chunk).sum()
        count += chunk.shape[0]
    mean_power = power / max(count, 1)
    if not np.isfinite(mean_power) or mean_power <= 0:
        raise ValueError("diffraction amplitudes are all zero: cannot normalise")
    probe_power = float(np.sum(np.abs(np.asarray(probe, dtype=np.complex128)) ** 2))
    if probe_power <= 0:
        raise ValueError("probe is all zero: cannot normalise")
    target = target_power(n)
    return Normalization(
        amplitude_scale=float(np.sqrt(target / mean_power)),
        probe_scale=float(np.sqrt(target / probe_power)),
    )
