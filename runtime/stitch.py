"""Stitch reconstructed patches into one object image (numpy only, no torch).

Convention (the project's data contract): ``positions_px`` is an (M, 2) float array of
(y, x) scan positions in object pixels, each the CENTRE of its patch. For an N x N patch
(N even), patch pixel (i, j) covers object pixel (y - N/2 + i, x - N/2 + j): a patch at
larger x lands further right (+x, not -x; some upstream stitchers flip this, so the tests
pin it against a known object). A non-integer position means the patch's pixel (i, j) sits
at the continuous object coordinate (y - N/2 + i, x - N/2 + j).

Placement (``subpixel``):

- ``"none"``: positions are rounded with ``np.rint`` (round half to even, so 2.5 -> 2 and
  3.5 -> 4) and each patch is added at that integer pixel: up to 0.5 px misplacement.
- ``"fourier"``: each patch is resampled onto the integer grid by its fractional offset
  ``f = pos - rint(pos)`` (in [-0.5, 0.5]), ``p'(i) = p(i - f)``, with batched FFT phase
  ramps ``exp(-2 pi i nu f)`` applied axis by axis (together: the outer-product ramp of a
  2-D Fourier shift), then added at ``rint(pos)``. The shift is circular: a patch's edge
  wraps round to its other side ("wrap ringing"). Two things keep that out: per axis the
  straight line through the first and last sample is taken out before the FFT and shifted
  analytically (so the wrapped residual has no jump; 6x lower error than shifting the
  raw patch), and ``crop`` defaults to :data:`FOURIER_TRIM` pixels, cutting the border
  where what is left of the ringing sits (docs/measurements.md section 7). Only patches
  with a fractional offset are transformed. The ``weights`` map is placed at the rounded
  position, unshifted: it is a confidence map, and every value it weights has already
  been moved onto that pixel.
- ``"bilinear"``: each patch pixel is splatted onto the 2 x 2 integer pixels around its
  true position with the bilinear weights ``(1-f)``/``f`` per axis (``f = pos - floor(pos)``
  in [0, 1)), giving an (n+1) x (n+1) footprint at ``floor(pos)``. The weight map is
  splatted identically, so ``sum(w * patch) / sum(w)`` stays a proper weighted average
  (a constant object comes back exactly). Less accurate than Fourier (the splat blurs like
  a 1-px tent) but about twice as fast.

For integer positions all three give bit-identical results, given the same ``crop``.

Speed: the numerator is a plain Python loop of contiguous slice-adds ``canvas[y:y+n,
x:x+n] += w * p``. On the measured machines this beat flat-index scatter
(``np.bincount`` 6x slower, ``np.add.at`` 20x slower), a fancy-indexed
gather/add/scatter through a sliding-window view (3x slower), a canvas with rows
interleaved in groups of 8 (fewer, longer rows per add: 10 % slower) and splitting the
adds over two threads (each small add hands the GIL back and forth faster than a
sleeping thread wakes up: 30 % slower), because it streams no index arrays and each
64x64 block stays in cache. Per-patch arithmetic (crop, weighting, shifting) is
vectorised over chunks of ``chunk`` patches into a few reused buffers, so a
memory-mapped stack of 100k patches is never copied whole and no per-patch temporaries
are made; with ``prefetch`` helper threads prepare the next chunks (large numpy calls
and FFTs, which release the GIL) while chunk j is placed: one for whole-pixel placement,
one per core (up to 8) for the sub-pixel modes, whose FFTs outweigh the slice-adds 20 to
1. The denominator, the weight sum, is no per-patch loop at all: every whole-pixel patch
carries the same weight map, so the sum is one convolution of the patch corners with it
(runtime/weight_sum.py: float64 FFTs in row bands, on threads, GIL released). It depends
on the positions alone, so with ``prefetch`` it starts in the background as soon as the
canvas is planned, and :meth:`StitchAccumulator.result` takes it if the patches added
sit exactly at the planned corners (in any order), else computes it then. Bilinear
patches with a fractional offset splat their own weights and still add them one by one.

Precision: the canvas accumulates in single precision by default (complex64 values;
``accumulate="float64"`` gives complex128). The slice-adds are memory-bound, so halving
the bytes nearly halves their time. Error: each pixel is a sequential float32 sum of K
weighted terms, bounded by (K-1) u sum|terms| (u = 2^-24 = 6e-8; K = 49: 2.9e-6) and
typically ~sqrt(K) u; the weight sum is exact to ~1e-15 before its rounding to float32
(runtime/weight_sum.py, which also says why weights below 1e-12 of the peak count as 0).
Measured against the float64 canvas for overlapping patches cut from one object,
Gaussian weights (tests/test_stitch.py ``test_float32_accumulation_error``): K = 49: max
|difference| 4.0e-7 of max |object| (per pixel at most 4.4e-7 relative, rms 7e-8); K =
64: 4.0e-7 (4.8e-7 and 7.2e-7 while the weight sum was float32 too). That is far inside
the 1e-5 parity budget. Patches are added in the order given, so any batching, chunking
or prefetching gives a bit-identical result in either precision.

Timing (10k 64x64 complex64 patches, Gaussian |probe|^2-like weights, integer placement,
2-core VMs, best of 7, python -m bench.runtime_bench): 0.22 s before (complex128
canvas, a temporary per chunk); 0.146 s with the float32 canvas and reused weighting
buffers; 0.107-0.122 s (Xeon, two runs) with the next chunk prepared in a helper thread
(``prefetch``); on an EPYC VM 0.117 s for that, 0.076-0.086 s with the weight sum as a
background convolution and 4 MB chunks. Per patch, without threads: about 3.5 us to read
and weight the input (memory bandwidth), ~5 us for the complex64 slice-add (the
weight-sum slice-add it no longer does was another ~3.3 us); the convolution takes
~33 ms on one thread, ~18 ms on two.

:class:`StitchAccumulator` takes patches batch by batch (the runtime never holds all M
patches); :func:`stitch_patches` is the one-call form.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.errors import DataError
from runtime.weight_sum import clean_weights, placed_weight_sum

__all__ = [
    "FOURIER_TRIM",
    "SUBPIXEL_METHODS",
    "StitchAccumulator",
    "StitchedObject",
    "crop_to",
    "default_subpixel",
    "has_fractional_positions",
    "stitch_patches",
    "to_complex",
]

SUBPIXEL_METHODS = ("none", "fourier", "bilinear")
# Default border trim (px) for subpixel="fourier", against what is left of the wrap-round
# ringing after endpoint detrending. Measured in tests/test_stitch.py (band-limited object,
# |obj| <= 1, max 0.08 cycles/px; N = 32, 7 px grid, +-2 px jitter): interior rms error
# 1.0e-3 untrimmed, 3.9e-4 at 2 px, 3.5e-4 at 3 px (without the detrending: 5.9e-3,
# 2.3e-3, 2.2e-3); rounding to whole pixels ("none"): 6.5e-3. 2 px keeps most of a patch.
FOURIER_TRIM = 2
# Patches per vectorised step. Sub-pixel modes: blocks that stay in a core's cache, since
# every core prepares chunks (10k 64x64 patches, fractional positions, 2-core EPYC, two
# helper threads: fourier 0.86 s at 8, 0.64-0.69 s at 16-24, 0.73 s at 32, 0.85 s at 64;
# bilinear 0.52 s at 8, 0.34 s at 24-32, 0.38 s at 64; with one helper thread fourier
# took 1.1 s at 64). Integer placement: chunks of CHUNK_BYTES (128 patches of
# 64x64 complex64), large enough that handing each chunk to the prefetch thread costs
# little, small enough that two of them and the canvas stay in cache (10k 64x64, best
# of 9 on a 2-core EPYC: 0.076 s at 96, 0.081 s at 128, 0.079 s at 192, 0.083 s at 256;
# the Xeon before the weight-sum change: 0.126 s at 64, 0.107 s at 256, 0.119 s at 512).
DEFAULT_CHUNK = {"fourier": 24, "bilinear": 32}
CHUNK_BYTES = 4 << 20
MAX_PREPARE_WORKERS = 8
ACCUMULATE = {"float32": (np.complex64, np.float32), "float64": (np.complex128, np.float64)}


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


def _positions(positions_px: Any, m: int | None = None) -> np.ndarray:
    """Checked (M, 2) float64 positions."""
    pos = np.asarray(positions_px)
    if pos.ndim != 2 or pos.shape[1] != 2 or (m is not None and pos.shape[0] != m):
        want = f"({m}, 2)" if m is not None else "(M, 2)"
        raise DataError(f"positions_px must have shape {want} (y, x), got {pos.shape}")
    if not np.issubdtype(pos.dtype, np.number) or np.iscomplexobj(pos):
        raise DataError(f"positions_px must be real numbers, got dtype {pos.dtype}")
    pos = pos.astype(np.float64)
    if not np.all(np.isfinite(pos)):
        raise DataError("positions_px contains NaN or infinite values")
    return pos


def has_fractional_positions(positions_px: Any) -> bool:
    """True if any position is not a whole pixel (so sub-pixel placement changes anything)."""
    pos = _positions(positions_px)
    return bool(np.any(pos != np.rint(pos)))


def default_subpixel(positions_px: Any) -> str:
    """``"fourier"`` when any position is fractional, else ``"none"`` (identical result)."""
    return "fourier" if has_fractional_positions(positions_px) else "none"


def _placement(pos: np.ndarray, n_patch: int, crop: int, subpixel: str
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(corner, frac, extent): integer top-left object pixel of each cropped patch's
    footprint, its fractional offset, and the footprint's size holding non-zero weight."""
    n = n_patch - 2 * crop
    base = np.floor(pos) if subpixel == "bilinear" else np.rint(pos)
    frac = pos - base
    corner = base.astype(np.int64) - (n_patch // 2) + crop
    extent = np.full(pos.shape, n, dtype=np.int64)
    if subpixel == "bilinear":
        extent += frac != 0  # the extra row / column only holds weight when f > 0
    return corner, frac, extent


class StitchAccumulator:
    """Overlap-weighted stitching, fed batch by batch; the canvas is the only large array.

    The canvas is planned from all scan positions up front (``positions_px``, the (M, 2)
    (y, x) patch centres, N/2 convention: see the module docstring); :meth:`add` then takes
    patches with their positions in any number of calls, and :meth:`result` divides.
    Adding the same patches in any batching gives a bit-identical result.

    Args:
        positions_px: (M, 2) positions of every patch that will be added (plans the canvas).
        n_patch: patch side N (even).
        weights: optional (N, N) non-negative per-pixel weight, e.g. |probe|^2 so that
            pixels the probe barely lit count less; default uniform ones.
        crop: pixels trimmed from each patch border before placing (PtychoPINN keeps only
            the central part). ``None``: :data:`FOURIER_TRIM` for ``"fourier"`` (against
            wrap ringing), 0 otherwise.
        subpixel: ``"none"`` | ``"fourier"`` | ``"bilinear"`` (module docstring).
        chunk: patches per vectorised step; bounds the temporary memory. ``None``: a
            per-method default (:data:`DEFAULT_CHUNK`; integer placement: :data:`CHUNK_BYTES`).
        accumulate: ``"float32"`` (default: complex64 canvas, float32 weight sum) or
            ``"float64"`` (complex128 / float64: the reference; twice the memory and about
            twice the time). See the module docstring for the error of float32.
        prefetch: prepare the next chunks (crop, weighting, sub-pixel shift) in helper
            threads while the current one is placed, and start the weight sum for the
            planned positions in the background; the result is bit-identical either
            way. Off: everything on the calling thread (the weight sum's FFT bands may
            still use a few threads in :meth:`result`).
    """

    def __init__(self, positions_px: Any, n_patch: int, *, weights: Any = None,
                 crop: int | None = None, subpixel: str = "none",
                 chunk: int | None = None, accumulate: str = "float32",
                 prefetch: bool = True) -> None:
        if subpixel not in SUBPIXEL_METHODS:
            raise DataError(f"subpixel must be one of {', '.join(SUBPIXEL_METHODS)}, "
                            f"got {subpixel!r}")
        if int(n_patch) != n_patch or n_patch < 2 or n_patch % 2:
            raise DataError(f"patch size N must be even for the N/2 convention, got {n_patch}")
        n_patch = int(n_patch)
        if crop is None:
            crop = min(FOURIER_TRIM, n_patch // 2 - 1) if subpixel == "fourier" else 0
        if int(crop) != crop or not 0 <= crop < n_patch // 2:
            raise DataError(f"crop must be an integer in [0, {n_patch // 2}), got {crop}")
        if accumulate not in ACCUMULATE:
            raise DataError(f"accumulate must be one of {', '.join(ACCUMULATE)}, "
                            f"got {accumulate!r}")
        if chunk is None:
            chunk = DEFAULT_CHUNK.get(subpixel) or max(16, CHUNK_BYTES // (8 * n_patch**2))
        if int(chunk) != chunk or chunk < 1:
            raise DataError(f"chunk must be a positive integer, got {chunk}")
        pos = _positions(positions_px)
        if len(pos) == 0:
            raise DataError("no patches to stitch (M = 0)")

        self.n_patch, self.crop, self.subpixel, self.chunk = n_patch, int(crop), subpixel, \
            int(chunk)
        self.n = n_patch - 2 * self.crop
        self.count = 0
        self.accumulate = accumulate
        self._cdtype, self._rdtype = ACCUMULATE[accumulate]
        self.prefetch = bool(prefetch)
        # Helper threads preparing chunks. Whole-pixel placement only weights a chunk
        # (memory-bound, ~3.5 us a patch), so one keeps up with the slice-adds; a
        # sub-pixel shift is ~100 us of FFTs a patch, so every core gets a share.
        self.prepare_workers = (1 if subpixel == "none"
                                else max(1, min(MAX_PREPARE_WORKERS, os.cpu_count() or 1)))
        # Reused weighted chunks: one per chunk in flight, plus the one being placed.
        self._buffers: list[np.ndarray | None] = [None] * (self.prepare_workers + 1)

        self._w64: np.ndarray | None = None
        self._w32: np.ndarray | None = None
        if weights is not None:
            w_full = np.asarray(weights)
            if w_full.shape != (n_patch, n_patch):
                raise DataError(f"weights must have shape ({n_patch}, {n_patch}), "
                                f"got {w_full.shape}")
            if np.iscomplexobj(w_full) or not np.issubdtype(w_full.dtype, np.number):
                raise DataError(f"weights must be real, got dtype {w_full.dtype}")
            if not np.all(np.isfinite(w_full)) or np.any(w_full < 0):
                raise DataError("weights must be finite and non-negative")
            c = self.crop
            trimmed = clean_weights(w_full[c : n_patch - c, c : n_patch - c])
            self._w64 = np.ascontiguousarray(trimmed, np.float64)
            self._w32 = np.ascontiguousarray(trimmed, np.float32)
        # Corners where the plain weight map lands (every patch, except bilinear patches
        # with a fractional offset); result() turns them into the weight sum in one
        # convolution (runtime/weight_sum.py) instead of a slice-add per patch.
        self._corners: list[np.ndarray] = []

        corner, frac, extent = _placement(pos, n_patch, self.crop, subpixel)
        origin = corner.min(axis=0)
        self.origin_px = (int(origin[0]), int(origin[1]))
        self.shape = tuple(int(v) for v in (corner + extent).max(axis=0) - origin)
        # One spare row/column: a bilinear footprint is always (n+1)^2, even where its last
        # row holds only zero weight (f = 0); result() cuts the spare off again.
        pad = 1 if subpixel == "bilinear" else 0
        # Single precision by default: see "Precision" in the module docstring.
        self._canvas = np.zeros((self.shape[0] + pad, self.shape[1] + pad), self._cdtype)
        # Only bilinear splats weights that differ per patch; allocated on first use.
        self._wsum: np.ndarray | None = None
        # The weight sum depends on the positions alone, all known now: with prefetch it
        # is computed in the background while patches arrive, and result() uses it if the
        # corners added turn out to be the planned ones (any order, any batching).
        planned = corner - origin
        if subpixel == "bilinear":
            planned = planned[~np.any(frac != 0, axis=1)]
        self._planned_corners = planned
        self._planned_sum: Future[np.ndarray] | None = None
        if self.prefetch:
            starter = ThreadPoolExecutor(1, thread_name_prefix="stitch-weight-sum")
            self._planned_sum = starter.submit(placed_weight_sum, planned,
                                               self._plain_weights(), self.shape,
                                               dtype=self._rdtype)
            starter.shutdown(wait=False)

    @property
    def nbytes(self) -> int:
        """Bytes held by the canvas (and the bilinear weight canvas, once allocated)."""
        return self._canvas.nbytes + (0 if self._wsum is None else self._wsum.nbytes)

    # ------------------------------------------------------------------- adding

    def add(self, patches: Any, positions_px: Any) -> None:
        """Add (B, N, N) patches at their (B, 2) positions (inside the planned canvas)."""
        if not hasattr(patches, "shape") or not hasattr(patches, "dtype"):
            patches = np.asarray(patches)
        shape = tuple(patches.shape)
        if len(shape) != 3 or shape[1:] != (self.n_patch, self.n_patch):
            raise DataError(f"patches must have shape (B, {self.n_patch}, {self.n_patch}), "
                            f"got {shape}")
        if not np.issubdtype(patches.dtype, np.number):
            raise DataError(f"patches must be numeric, got dtype {patches.dtype}")
        b = shape[0]
        pos = _positions(positions_px, b)
        if b == 0:
            return
        corner, frac, _ = _placement(pos, self.n_patch, self.crop, self.subpixel)
        local = corner - np.asarray(self.origin_px)
        size = self.n + (1 if self.subpixel == "bilinear" else 0)
        if np.any(local < 0) or np.any(local + size > np.asarray(self._canvas.shape)):
            raise DataError("patch positions lie outside the canvas planned from the "
                            "positions given to StitchAccumulator")
        if self.subpixel == "bilinear":
            splatted = np.any(frac != 0, axis=1)
            self._corners.append(local[~splatted])
            if np.any(splatted) and self._wsum is None:
                self._wsum = np.zeros(self._canvas.shape, self._rdtype)
        else:
            self._corners.append(local)
        # Arithmetic in the canvas's precision: float64 on a float32 canvas would only be
        # rounded again when added; on a float64 canvas (the reference) all of it is double.
        double = self._rdtype == np.float64
        w = self._w64 if double else self._w32
        starts = list(range(0, b, self.chunk))

        workers = self.prepare_workers
        slots = workers + 1  # chunks in flight, plus the one being placed

        def prepare(j: int) -> tuple[int, tuple[np.ndarray, Any]]:
            """Chunk j's vectorised work (trim, shift, weight, splat); no canvas access."""
            start = starts[j]
            stop = min(start + self.chunk, b)
            return start, self._prepare(patches[start:stop], frac[start:stop], w, double,
                                        slot=j % slots)

        if self.prefetch and len(starts) > 1:
            # The next chunks are prepared in helper threads while chunk j is placed: the
            # big vectorised numpy calls and FFTs there release the GIL, the slice-adds
            # here need little of a core. Placement stays in patch order: bit-identical
            # results whatever the number of helpers.
            with ThreadPoolExecutor(workers, thread_name_prefix="stitch-prepare") as pool:
                pending = deque(pool.submit(prepare, j)
                                for j in range(min(workers, len(starts))))
                for j in range(len(starts)):
                    start, prepared = pending.popleft().result()
                    if j + workers < len(starts):
                        pending.append(pool.submit(prepare, j + workers))
                    stop = start + len(prepared[0])
                    self._place(prepared, local[start:stop], frac[start:stop])
        else:
            for j in range(len(starts)):
                start, prepared = prepare(j)
                stop = start + len(prepared[0])
                self._place(prepared, local[start:stop], frac[start:stop])
        self.count += b

    def _plain_weights(self) -> np.ndarray:
        """The (n, n) float64 weight map every whole-pixel placement carries."""
        return self._w64 if self._w64 is not None else np.ones((self.n, self.n))

    def _trim(self, block: Any) -> np.ndarray:
        c, n_patch = self.crop, self.n_patch
        return np.asarray(block[:, c : n_patch - c, c : n_patch - c])

    def _weighted(self, block: np.ndarray, w: np.ndarray, slot: int) -> np.ndarray:
        """``block * w`` in the canvas dtype, into a buffer reused across chunks (no
        per-chunk allocation; one per chunk in flight plus the one being placed)."""
        b = len(block)
        buffer = self._buffers[slot]
        if buffer is None or len(buffer) < b:
            buffer = np.empty((max(b, self.chunk), *block.shape[1:]), self._cdtype)
            self._buffers[slot] = buffer
        out = buffer[:b]
        np.multiply(block, w, out=out, dtype=self._cdtype, casting="same_kind")
        return out

    def _prepare(self, block: Any, frac: np.ndarray, w: np.ndarray | None, double: bool,
                 slot: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(values, splat weights): values (B, m, m) ready to add; for bilinear also the
        (B, m, m) splatted weights (else None: the weight sum is done in result())."""
        if self.subpixel == "bilinear":
            return self._splat_bilinear(block, frac, w, double)
        if self.subpixel == "fourier":
            block = self._fourier_shift(block, frac, double)
        block = self._trim(block)
        if w is None:
            return block, None
        return self._weighted(block, w, slot), None

    def _place(self, prepared: tuple[np.ndarray, np.ndarray | None], local: np.ndarray,
               frac: np.ndarray) -> None:
        """The slice-adds, in patch order (plain ints: cheap slicing; ``np.add`` into the
        view, so no write-back through __setitem__)."""
        values, weights = prepared
        m = values.shape[-1]
        canvas, add = self._canvas, np.add
        for (y, x), value in zip(local.tolist(), values, strict=True):
            view = canvas[y : y + m, x : x + m]
            add(view, value, out=view)
        if weights is None:
            return
        # Bilinear: only patches with a fractional offset have weights that differ from
        # the plain map (those with none went to self._corners in add()).
        wsum = self._wsum
        for k in np.flatnonzero(np.any(frac != 0, axis=1)).tolist():
            y, x = int(local[k, 0]), int(local[k, 1])
            view = wsum[y : y + m, x : x + m]
            add(view, weights[k], out=view)
    def _fourier_shift(self, block: Any, frac: np.ndarray, double: bool) -> np.ndarray:
        """Resample each patch onto the integer grid, p'(i) = p(i - f), axis by axis.

        Per axis, the straight line through the patch's first and last sample is taken out
        (and shifted analytically), so the circular FFT shift sees a residual that is zero
        at both ends: no jump where the patch wraps round, hence far less ringing
        (interior rms error 6x lower than shifting the raw patch, tests/test_stitch.py).
        The phase ramp per axis is the 1-D exponential exp(-2 pi i nu f); applied to both
        axes it is the outer-product ramp of a plain 2-D Fourier shift.
        """
        block = np.asarray(block)
        moved = np.flatnonzero(np.any(frac != 0, axis=1))
        if len(moved) == 0:
            return block
        cdtype = np.complex128 if double else np.complex64
        out = block.astype(cdtype)  # a copy: the caller's patches are never modified
        out[moved] = self._shift_axis(self._shift_axis(out[moved], frac[moved, 0], 1),
                                      frac[moved, 1], 2)
        return out

    def _shift_axis(self, x: np.ndarray, f: np.ndarray, axis: int) -> np.ndarray:
        n = self.n_patch
        rdtype = np.float64 if x.dtype == np.complex128 else np.float32
        shape = [1, 1, 1]
        shape[axis] = n
        t = (np.arange(n, dtype=np.float64) / (n - 1)).astype(rdtype).reshape(shape)
        first = x[:, :1, :] if axis == 1 else x[:, :, :1]
        slope = (x[:, -1:, :] if axis == 1 else x[:, :, -1:]) - first
        line = slope * t
        line += first
        spectrum = np.fft.fft(x - line, axis=axis)
        ramp = np.exp(-2j * np.pi * f[:, None] * np.fft.fftfreq(n)).astype(x.dtype)
        spectrum *= ramp[:, :, None] if axis == 1 else ramp[:, None, :]
        out = np.fft.ifft(spectrum, axis=axis)
        line -= slope * (f / (n - 1)).astype(rdtype)[:, None, None]
        out += line
        return out

    def _splat_bilinear(self, block: Any, frac: np.ndarray, w: np.ndarray | None,
                        double: bool) -> tuple[np.ndarray, np.ndarray]:
        n = self.n
        rdtype = np.float64 if double else np.float32
        block = self._trim(block)
        if w is not None:
            block = block * w
        fy = frac[:, 0, None, None].astype(rdtype)
        fx = frac[:, 1, None, None].astype(rdtype)
        wmap = np.ones((n, n), rdtype) if w is None else w

        def splat(values: np.ndarray) -> np.ndarray:
            # Separable: rows first ((n+1) x n), then columns ((n+1) x (n+1)).
            rows = np.zeros((values.shape[0], n + 1, n), np.result_type(values, rdtype))
            rows[:, :n] = (1 - fy) * values
            rows[:, 1:] += fy * values
            out = np.zeros((values.shape[0], n + 1, n + 1), rows.dtype)
            out[:, :, :n] = (1 - fx) * rows
            out[:, :, 1:] += fx * rows
            return out

        return splat(block), splat(np.broadcast_to(wmap, block.shape))

    # ------------------------------------------------------------------- result

    def result(self, threshold: float = 0.0) -> StitchedObject:
        """``obj = sum(w * patch) / sum(w)`` where the summed weight exceeds ``threshold``,
        0 elsewhere; the canvas is exactly the bounding box of the placed footprints."""
        h, w = self.shape
        corners = (np.concatenate(self._corners) if self._corners
                   else np.zeros((0, 2), np.int64))
        if self._planned_sum is not None and _same_corners(corners, self._planned_corners):
            total = self._planned_sum.result()
            # Handed out below as the result's weight map: a later result() recomputes.
            self._planned_sum = None
        else:
            total = placed_weight_sum(corners, self._plain_weights(), self.shape,
                                      dtype=self._rdtype)
        # Whole-pixel footprints lie inside the unpadded box (same FFT sizes as without
        # bilinear: bit-identical for integer positions).
        wsum = total if self._wsum is None else total + self._wsum[:h, :w]
        canvas = self._canvas[:h, :w]
        mask = wsum > threshold
        obj = np.zeros((h, w), dtype=np.complex64)
        np.divide(canvas, wsum, out=obj, where=mask, casting="same_kind")
        # ``wsum`` is a fresh array (no copy of a 4k x 4k map: page faults cost ~0.1 s).
        return StitchedObject(obj=obj, weight=wsum.astype(np.float32, copy=False), mask=mask,
                              origin_px=self.origin_px)


def _same_corners(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two (K, 2) corner lists hold the same corners, in any order."""
    if a.shape != b.shape:
        return False
    if np.array_equal(a, b):
        return True
    return bool(np.array_equal(a[np.lexsort(a.T[::-1])], b[np.lexsort(b.T[::-1])]))


def stitch_patches(
    patches: np.ndarray,
    positions_px: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    crop: int | None = None,
    chunk: int | None = None,
    threshold: float = 0.0,
    subpixel: str = "none",
    accumulate: str = "float32",
) -> StitchedObject:
    """Place patches at their scan positions and average them where they overlap.

    Args:
        patches: (M, N, N) complex patches (complex64 preferred; a np.memmap is fine).
        positions_px: (M, 2) float (y, x) patch CENTRES in object pixels: patch pixel
            (i, j) sits at object pixel (y - N/2 + i, x - N/2 + j).
        weights: optional (N, N) non-negative per-pixel weight, e.g. |probe|^2.
        crop: pixels trimmed from each patch border before placing; ``None`` means
            :data:`FOURIER_TRIM` for ``subpixel="fourier"`` and 0 otherwise.
        chunk: patches processed per vectorised step; bounds the temporary memory.
        threshold: a pixel counts as visited where its summed weight exceeds this.
        subpixel: ``"none"`` (round to whole pixels), ``"fourier"`` (FFT phase-ramp shift
            of the fractional offset) or ``"bilinear"`` (4-pixel splat); see the module
            docstring. All three agree exactly for integer positions.
        accumulate: canvas precision, ``"float32"`` (default) or ``"float64"``; see the
            module docstring for the measured difference.

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
    pos = _positions(positions_px, m)
    acc = StitchAccumulator(pos, n_patch, weights=weights, crop=crop, subpixel=subpixel,
                            chunk=chunk, accumulate=accumulate)
    acc.add(patches, pos)
    return acc.result(threshold)


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
