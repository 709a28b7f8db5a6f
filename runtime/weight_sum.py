"""The stitcher's weight sum, ``sum_k w(r - c_k)``, as one convolution (numpy only).

Every patch placed at a whole pixel carries the same (n, n) weight map ``w`` (uniform
ones, or |probe|^2), so the per-pixel weight sum over M patches is the 2-D convolution of
a hit-count image (how many patch corners sit on each pixel) with ``w``. Doing that with
float64 FFTs, in row bands spread over a few threads (numpy's FFTs release the GIL),
takes the M slice-adds of the weight map off the stitcher's single-threaded critical
path: for 10k 64x64 patches on a 2-core machine, ~18 ms on two threads (~33 ms on one),
started in the background while the patches are still arriving, against ~33 ms of
slice-adds on the main thread (bench/runtime_bench.py has the whole-stitch numbers).

Precision: exact to about 1e-15 of the peak (the float32 slice-adds it replaces erred by
up to ~(K-1) 2^-24 relative, K patches deep). Two rules keep FFT round-off from showing:

- weights below :data:`ZERO_FRACTION` of the largest are taken as exactly 0
  (:func:`clean_weights`), so every non-zero sum is at least ``ZERO_FRACTION * max(w)``;
- sums below half of that, or below :data:`NOISE_FRACTION` of the largest sum nearby
  (FFT round-off grows with it), are set to exactly 0, so unvisited pixels stay 0 (never
  a 1e-16 of noise that would count as visited): a pixel lit that faintly counts as
  unvisited. A map of whole numbers (uniform weights: hit counts) is rounded, so counts
  come out exact.

The result depends only on the corners, never on how they were batched or on the
number of threads (bands are added in order).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from runtime.errors import DataError

__all__ = ["ZERO_FRACTION", "clean_weights", "placed_weight_sum"]

# Weights below this fraction of the largest weight count as 0 (see the module docstring).
ZERO_FRACTION = 1e-12
# Sums below this fraction of the largest sum in their band are FFT noise, taken as 0.
NOISE_FRACTION = 1e-13
# Output rows per FFT band at most: bounds the temporary memory (a band of 512 rows of a
# 4k-wide canvas is ~20 MB of float64 and as much complex spectrum) and gives threads work.
BAND_ROWS = 512
MAX_WORKERS = 4
MIN_BANDS = 4  # work for up to 4 threads even on a small canvas


def clean_weights(weights: np.ndarray) -> np.ndarray:
    """float64 copy of ``weights`` with entries below ``ZERO_FRACTION * max`` set to 0."""
    w = np.array(weights, dtype=np.float64)
    peak = float(w.max(initial=0.0))
    w[w < ZERO_FRACTION * peak] = 0.0
    return w


def _fast_size(n: int) -> int:
    """Smallest m >= n with no prime factor above 5 (pocketfft is fastest there)."""
    m = n
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def placed_weight_sum(corners: np.ndarray, weights: np.ndarray, shape: tuple[int, int], *,
                      dtype: type = np.float64, workers: int | None = None,
                      band_rows: int = BAND_ROWS) -> np.ndarray:
    """(H, W) map of ``weights`` (n0, n1) added at every (y, x) corner.

    Equal (up to the module's stated round-off) to a loop of
    ``out[y:y+n0, x:x+n1] += weights``; ``weights`` should come from
    :func:`clean_weights`. Corners must keep the footprint inside ``shape``. The FFTs
    run in float64 whatever ``dtype``; a float32 output only halves the memory (the
    stitcher's float32 canvas rounds to that anyway).
    """
    corners = np.asarray(corners, dtype=np.int64).reshape(-1, 2)
    w = np.asarray(weights, dtype=np.float64)
    n0, n1 = w.shape
    height, width = int(shape[0]), int(shape[1])
    out = np.zeros((height, width), dtype)
    peak = float(w.max(initial=0.0))
    if len(corners) == 0 or peak <= 0.0:
        return out
    hits_h, hits_w = height - n0 + 1, width - n1 + 1
    ys, xs = corners[:, 0], corners[:, 1]
    if ys.min() < 0 or xs.min() < 0 or ys.max() >= hits_h or xs.max() >= hits_w:
        raise DataError(f"weight footprints at the given corners leave the {height}x{width} "
                        "canvas")
    workers = workers or min(MAX_WORKERS, os.cpu_count() or 1)
    # The bands follow from the shape alone (never from ``workers``), so every machine
    # gets the same FFT sizes and the same bits.
    bands = min(hits_h, max(MIN_BANDS, math.ceil(hits_h / max(1, band_rows))))
    step = math.ceil(hits_h / bands)
    rows, cols = _fast_size(step + n0 - 1), _fast_size(width)
    # w's spectrum: its n0 rows along x first, then the zero-padded columns (half the
    # work of a full rfft2 of the padded map).
    spectrum = np.fft.fft(np.fft.rfft(w, cols, axis=1), rows, axis=0)
    whole = bool(np.array_equal(w, np.rint(w)))
    order = np.argsort(ys, kind="stable")
    ys, xs = ys[order], xs[order]

    def band(r0: int) -> tuple[int, np.ndarray | None]:
        lo, hi = np.searchsorted(ys, [r0, r0 + step])
        if lo == hi:
            return r0, None
        hits = np.zeros(rows * cols, np.float64)
        np.add.at(hits, (ys[lo:hi] - r0) * cols + xs[lo:hi], 1.0)
        product = np.fft.rfft2(hits.reshape(rows, cols))
        product *= spectrum
        filtered = np.fft.irfft2(product, (rows, cols))
        r1 = min(r0 + step, hits_h)
        block = filtered[: r1 - r0 + n0 - 1, :width]
        # FFT round-off (~1e-16 of the band's largest sum) is not a weight: exactly 0.
        floor = max(0.5 * ZERO_FRACTION * peak, NOISE_FRACTION * float(block.max()))
        block[block < floor] = 0.0
        if whole:
            np.rint(block, out=block)  # whole-number weights (hit counts): exact
        return r0, block

    starts = range(0, hits_h, step)
    if workers > 1 and len(starts) > 1:
        with ThreadPoolExecutor(min(workers, len(starts)),
                                thread_name_prefix="weight-sum") as pool:
            blocks = list(pool.map(band, starts))
    else:
        blocks = [band(r0) for r0 in starts]
    for r0, block in blocks:  # in band order: the same sum whatever the thread count
        if block is not None:
            out[r0 : r0 + len(block)] += block
    return out
