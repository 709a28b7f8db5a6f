"""Stitch reconstructed patches into one object image (numpy only, no torch).

Convention (the project's data contract): ``positions_px`` is an (M, 2) float array of
(y, x) scan positions in object pixels, each the CENTRE of its patch. For an N x N patch
(N even), patch pixel (i, j) covers object pixel (y - N/2 + i, x - N/2 + j): a patch at
larger x lands further right (+x, not -x; some upstream stitchers flip this, so the tests
pin it against a known object).

Placement is at INTEGER pixels: positions are rounded with ``np.rint`` (round half to
even, so 2.5 -> 2 and 3.5 -> 4). Sub-pixel placement (a batched Fourier shift of each
patch before the same slice-add loop, with the border trimmed against wrap ringing, see
docs/measurements.md section 7) is a later task; it is deliberately not stubbed here.

Speed: the accumulation is a plain Python loop of contiguous slice-adds
``canvas[y:y+n, x:x+n] += w * p``. On the measured machine this beat flat-index scatter
(``np.bincount`` 6x slower, ``np.add.at`` 20x slower) because it streams no index arrays
and each 64x64 block stays in cache. Per-patch arithmetic (crop, weighting) is vectorised
over chunks of ``chunk`` patches so a memory-mapped stack of 100k patches is never
copied whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.errors import DataError

__all__ = ["StitchedObject", "crop_to", "stitch_patches", "to_complex"]


@dataclass(frozen=True)
class StitchedObject:
    """A stitched object cropped to the scanned area.

    ``origin_px`` is the object-pixel (y, x) of ``obj[0, 0]`` in the same frame as the scan
    positions, so ground truth can be cropped identically (see :func:`crop_to`).
    """

    obj: np.ndarray  # (H, W) complex64, overlap-weighted average; 0 where unvisited
    weight: np.ndarray  # (H, W) float32, summed per-pixel weights
    mask: np.ndarray  # (H, W) bool, True where weight > threshold (visited)
    origin_px: tuple[int, int]


def to_complex(amplitude: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Combine amplitude and phase (radians) into complex64, the stitcher's input form."""
    amplitude = np.asarray(amplitude, dtype=np.float32)
    phase = np.asarray(phase, dtype=np.float32)
    if amplitude.shape != phase.shape:
        raise DataError(
            f"amplitude shape {amplitude.shape} does not match phase shape {phase.shape}"
        )
    out = np.empty(amplitude.shape, dtype=np.complex64)
    out.real = amplitude * np.cos(phase)
    out.imag = amplitude * np.sin(phase)
    return out


def _corners(positions_px: np.ndarray, m: int, n_patch: int, crop: int) -> np.ndarray:
    """Integer top-left object pixel of each cropped patch, (M, 2) int64."""
    pos = np.asarray(positions_px)
    if pos.shape != (m, 2):
        raise DataError(f"positions_px must have shape ({m}, 2) (y, x), got {pos.shape}")
    if not np.issubdtype(pos.dtype, np.number) or np.iscomplexobj(pos):
        raise DataError(f"positions_px must be real numbers, got dtype {pos.dtype}")
    pos = pos.astype(np.float64)
    if not np.all(np.isfinite(pos)):
        raise DataError("positions_px contains NaN or infinite values")
    return np.rint(pos).astype(np.int64) - (n_patch // 2) + crop


def stitch_patches(
    patches: np.ndarray,
    positions_px: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    crop: int = 0,
    chunk: int = 4096,
    threshold: float = 0.0,
) -> StitchedObject:
    """Place patches at their (rounded) scan positions and average them where they overlap.

    Args:
        patches: (M, N, N) complex patches (complex64 preferred; a np.memmap is fine).
        positions_px: (M, 2) float (y, x) patch centres in object pixels (N/2 convention).
        weights: optional (N, N) non-negative per-pixel weight, e.g. |probe|^2 so that
            pixels the probe barely lit count less; default uniform ones.
        crop: pixels trimmed from each patch border before placing (PtychoPINN keeps only
            the central part, where the network's output is most reliable).
        chunk: patches processed per vectorised step; bounds the temporary memory.
        threshold: a pixel counts as visited where its summed weight exceeds this.

    Returns:
        StitchedObject whose canvas is exactly the bounding box of the placed (cropped)
        patches; ``obj = sum(w * patch) / sum(w)`` where visited, 0 elsewhere.
    """
    if not hasattr(patches, "shape") or not hasattr(patches, "dtype"):
        patches = np.asarray(patches)
    if len(patches.shape) != 3 or patches.shape[1] != patches.shape[2]:
        raise DataError(f"patches must have shape (M, N, N), got {tuple(patches.shape)}")
    m, n_patch = int(patches.shape[0]), int(patches.shape[1])
    if m == 0:
        raise DataError("no patches to stitch (M = 0)")
    if n_patch % 2:
        raise DataError(f"patch size N must be even for the N/2 convention, got {n_patch}")
    if not np.issubdtype(patches.dtype, np.number):
        raise DataError(f"patches must be numeric, got dtype {patches.dtype}")
    if int(crop) != crop or not 0 <= crop < n_patch // 2:
        raise DataError(f"crop must be an integer in [0, {n_patch // 2}), got {crop}")
    crop = int(crop)
    if int(chunk) != chunk or chunk < 1:
        raise DataError(f"chunk must be a positive integer, got {chunk}")
    chunk = int(chunk)

    n = n_patch - 2 * crop
    corners = _corners(positions_px, m, n_patch, crop)

    # Multiply in the patches' own precision: complex64 stays complex64 (half the memory).
    real_dtype = np.float64 if patches.dtype in (np.complex128, np.float64) else np.float32
    w: np.ndarray | None = None
    if weights is not None:
        w_full = np.asarray(weights)
        if w_full.shape != (n_patch, n_patch):
            raise DataError(f"weights must have shape ({n_patch}, {n_patch}), got {w_full.shape}")
        if np.iscomplexobj(w_full) or not np.issubdtype(w_full.dtype, np.number):
            raise DataError(f"weights must be real, got dtype {w_full.dtype}")
        if not np.all(np.isfinite(w_full)) or np.any(w_full < 0):
            raise DataError("weights must be finite and non-negative")
        w = np.ascontiguousarray(w_full[crop : n_patch - crop, crop : n_patch - crop], real_dtype)

    origin = corners.min(axis=0)
    height, width = (corners.max(axis=0) - origin + n).tolist()
    local = (corners - origin).tolist()  # plain ints: cheaper slicing in the hot loop

    # Accumulate in double precision: tens of overlapping float32 adds would otherwise cost
    # a few ulps, and the canvas (not the patch stack) is the only large array kept.
    canvas = np.zeros((height, width), dtype=np.complex128)
    wsum = np.zeros((height, width), dtype=np.float64)
    one = 1.0 if w is None else w

    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        block = np.asarray(patches[start:stop, crop : n_patch - crop, crop : n_patch - crop])
        if w is not None:
            block = block * w
        for k, (y, x) in enumerate(local[start:stop]):
            canvas[y : y + n, x : x + n] += block[k]
            wsum[y : y + n, x : x + n] += one

    mask = wsum > threshold
    obj = np.zeros((height, width), dtype=np.complex64)
    np.divide(canvas, wsum, out=obj, where=mask, casting="same_kind")
    return StitchedObject(
        obj=obj,
        weight=wsum.astype(np.float32),
        mask=mask,
        origin_px=(int(origin[0]), int(origin[1])),
    )


def crop_to(obj_full: np.ndarray, stitched: StitchedObject) -> np.ndarray:
    """Cut the region of a full object (e.g. ground truth) that matches ``stitched``.

    ``obj_full[..., 0, 0]`` is object pixel (0, 0), the frame the scan positions use.
    Raises DataError if the stitched canvas reaches outside ``obj_full``: silently padding
    would make a comparison look better or worse than it is.
    """
    obj_full = np.asarray(obj_full)
    if obj_full.ndim < 2:
        raise DataError(f"obj_full must be at least 2-D, got shape {obj_full.shape}")
    oy, ox = stitched.origin_px
    h, w = stitched.obj.shape
    full_h, full_w = obj_full.shape[-2:]
    if oy < 0 or ox < 0 or oy + h > full_h or ox + w > full_w:
        raise DataError(
            f"stitched region rows {oy}..{oy + h}, cols {ox}..{ox + w} lies outside the "
            f"{full_h}x{full_w} object"
        )
    return obj_full[..., oy : oy + h, ox : ox + w]
