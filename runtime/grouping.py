"""Group scan positions into samples of C = gridsize^2 neighbouring patterns.

Shared by training (torch side) and the runtime, so both build exactly the same groups.
"""

from __future__ import annotations

import numpy as np


def group_neighbours(positions_px: np.ndarray, gridsize: int, chunk: int = 1024) -> np.ndarray:
    """(G, C) pattern indices: each pattern anchors one group with its C-1 nearest neighbours.

    gridsize 1 gives the identity grouping. Ties are broken by index, so the result is
    deterministic. Distances are computed in chunks of anchors to keep memory at
    chunk x M floats.
    """
    positions = np.asarray(positions_px, dtype=np.float64)
    m = positions.shape[0]
    c = gridsize * gridsize
    if gridsize == 1:
        return np.arange(m, dtype=np.int64)[:, None]
    if m < c:
        raise ValueError(f"gridsize {gridsize} needs at least {c} scan positions, got {m}")
    groups = np.empty((m, c), dtype=np.int64)
    for start in range(0, m, chunk):
        anchors = positions[start : start + chunk]
        d2 = np.square(anchors[:, None, :] - positions[None, :, :]).sum(-1)
        rows = np.arange(anchors.shape[0])
        d2[rows, start + rows] = -1.0  # the anchor itself always comes first
        nearest = np.argsort(d2, axis=1, kind="stable")[:, :c]
        groups[start : start + anchors.shape[0]] = nearest
    return groups


def group_offsets(positions_px: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(G, C, 2) float32 offsets (y, x) of each pattern from its group's anchor (channel 0).

    Relative to the anchor rather than the centroid: integer scan positions then give
    integer offsets, for which the bilinear overlap merge is exact.
    """
    members = np.asarray(positions_px, dtype=np.float64)[groups]
    return (members - members[:, :1]).astype(np.float32)
