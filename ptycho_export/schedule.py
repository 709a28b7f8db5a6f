"""Learning-rate schedules shared by the network's training and the object solve."""

from __future__ import annotations

import math


def cosine_decay(progress: float, floor: float) -> float:
    """Learning-rate factor at ``progress`` (0 to 1, clipped): 1 falling to ``floor`` on a
    half cosine."""
    progress = min(max(progress, 0.0), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
