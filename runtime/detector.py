"""Raw detector frames -> the amplitudes the model was trained on (numpy only, no torch).

A beamline hands over **counts**: integer photon counts (often ``uint16``, ptychodus passes
the detector's native dtype), shape (P, H, W), DC in the middle of each frame. The model
wants **amplitudes** ``sqrt(counts)`` as float32 (``runtime.scan``'s contract). Three traps
sit between the two, each recorded upstream as a silent failure:

- *Integer arithmetic.* Squaring, summing or scaling ``uint16`` counts in their own dtype
  wraps modulo 65536 (PtychoPINN NORMALIZE-DATA-UINT16-001: inputs dimmed 44x, no error).
  :func:`frames_to_amplitudes` casts integers to float64 **before any arithmetic**.
- *Wrong kind.* Counts fed where amplitudes are expected (or the reverse) run without error
  and give a wrong object (PtychoPINN DATA-001). The kind is therefore an explicit choice
  (``kind="counts" | "amplitude"``) and :func:`kind_warning` says when the values look like
  the other kind.
- *Size / centring.* The model has a fixed N; frames are centre-cropped to it with DC kept
  at the centre pixel (:func:`center_crop`).

Centring convention: DC sits at pixel ``(H // 2, W // 2)``, where ``np.fft.fftshift`` puts
it (and where ptychodus's processed patterns have it). :func:`crop_window` keeps the n x n
window ``[H//2 - n//2, H//2 - n//2 + n)``, so DC lands at ``(n // 2, n // 2)`` of the crop,
again the fftshift position for an n x n array: 128 -> 64 keeps rows 32..95, DC 64 -> 32;
65 -> 64 keeps rows 0..63, DC 32 -> 32.

Everything here works on whatever slice it is given, so a caller can stream a large file
chunk by chunk (``runtime.hdf5_io``): ``start`` shifts pattern numbers in messages so they
still name the pattern in the whole file.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from runtime.errors import DataError

__all__ = [
    "COUNTS_MIN_MAX",
    "DATA_KINDS",
    "center_crop",
    "crop_window",
    "frames_to_amplitudes",
    "kind_warning",
    "looks_like",
    "marker_warning",
]

DataKind = Literal["counts", "amplitude"]
DATA_KINDS: tuple[str, ...] = ("counts", "amplitude")
# Integer-valued data whose maximum exceeds this are called counts. Below it the values
# are too small to tell low-count frames from (rare) integer amplitudes.
COUNTS_MIN_MAX = 50.0
# Frames looked at by looks_like(): enough to see the peak, cheap on a 100k-frame file.
SAMPLE_FRAMES = 8
# Raw amplitudes are sqrt(integer counts): their squares are integers up to float32
# rounding (relative 2 * 2**-24). Tested only where a^2 <= this, so the tolerance stays
# far below 0.5 and a scaled amplitude cannot pass by accident.
_SQUARE_TEST_MAX = 1.0e4
_SQUARE_TOL_REL = 8.0 * 2.0**-24


def _where(source: str, key: str) -> str:
    return f"{source}: dataset '{key}'" if key.startswith("/") else f"{source}: key '{key}'"


def _first_pattern(mask: np.ndarray, start: int) -> int:
    """Pattern number (in the whole file) of the first True entry of ``mask``."""
    flat = int(np.argmax(mask))
    if mask.ndim < 3:
        return start
    return start + int(np.unravel_index(flat, mask.shape)[0])


def _check_kind(kind: str) -> None:
    if kind not in DATA_KINDS:
        raise DataError(f"data kind must be one of {', '.join(DATA_KINDS)}, got {kind!r}")


def frames_to_amplitudes(frames: Any, kind: DataKind, source: str = "<memory>", *,
                         key: str = "diffraction", start: int = 0) -> np.ndarray:
    """Convert detector frames of the given ``kind`` to float32 amplitudes, C-contiguous.

    Args:
        frames: array (any shape, usually (B, H, W)) of counts or amplitudes; integer
            dtypes are cast to float64 before any arithmetic (no wrap-around is possible).
        kind: ``"counts"`` (photon counts: the result is ``sqrt(counts)``) or
            ``"amplitude"`` (already ``sqrt(counts)``, raw or normalised: only cast).
        source, key: file and dataset/key named in error messages.
        start: index of ``frames[0]`` in the whole file, so messages name the right pattern.

    Raises:
        DataError: non-numeric or complex data, NaN/Inf, negative values (counts or
            amplitudes cannot be negative: detectors that mark bad pixels with -1 need
            those masked first), or values beyond the float32 range.
    """
    _check_kind(kind)
    arr = np.asarray(frames)
    where = _where(source, key)
    if arr.dtype.kind == "c":
        raise DataError(f"{where} is complex ({arr.dtype}); detector frames must be real "
                        "counts or amplitudes")
    if arr.dtype.kind not in "iuf":
        raise DataError(f"{where} has dtype {arr.dtype}; expected integer counts or float "
                        "values")
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=np.float32)
    # The one cast, before any arithmetic: integers and float16/32 become float64.
    x = arr.astype(np.float64)
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(x)
        n_bad = int(np.count_nonzero(bad))
        if n_bad:
            raise DataError(f"{where} has {n_bad} NaN/Inf values (first at pattern "
                            f"{_first_pattern(bad, start)}); frames must be finite")
    negative = x < 0
    n_neg = int(np.count_nonzero(negative))
    if n_neg:
        what = "photon counts" if kind == "counts" else "amplitudes sqrt(counts)"
        raise DataError(
            f"{where} has {n_neg} negative values (min {float(x.min()):.6g}, first at "
            f"pattern {_first_pattern(negative, start)}); {what} must be >= 0 (mask "
            "detector gaps / bad-pixel markers such as -1 before reconstructing)")
    if kind == "counts":
        np.sqrt(x, out=x)
    with np.errstate(over="ignore"):  # reported just below, as a DataError
        out = np.ascontiguousarray(x, dtype=np.float32)
    if arr.dtype.itemsize > 4:  # only 64-bit inputs can exceed the float32 range
        over = ~np.isfinite(out)
        n_over = int(np.count_nonzero(over))
        if n_over:
            raise DataError(f"{where} has {n_over} values beyond the float32 range (first "
                            f"at pattern {_first_pattern(over, start)})")
    return out


# --------------------------------------------------------------------------- kind heuristics


def _sample(frames: Any, max_frames: int = SAMPLE_FRAMES) -> np.ndarray:
    """The first ``max_frames`` frames (or everything for a single 2-D frame)."""
    shape = getattr(frames, "shape", None)
    if shape is not None and len(shape) >= 3:
        return np.asarray(frames[:max_frames])
    return np.asarray(frames)


def _classify(sample: np.ndarray) -> tuple[str, str]:
    """(verdict, reason) for a numeric sample; verdict is counts | amplitude | unknown."""
    if sample.dtype.kind not in "iuf" or sample.size == 0:
        return "unknown", "no numeric values to look at"
    x = sample.astype(np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return "unknown", "no finite values"
    lo, hi = float(x.min()), float(x.max())
    if lo < 0:
        return "unknown", f"negative values (min {lo:.4g})"
    if hi == 0:
        return "unknown", "all zeros"
    integral = sample.dtype.kind in "iu" or bool(np.all(x == np.rint(x)))
    if integral:
        if hi > COUNTS_MIN_MAX:
            dtype = f"{sample.dtype} " if sample.dtype.kind in "iu" else ""
            return "counts", f"{dtype}integer values up to {hi:.6g}"
        return "unknown", f"integer values, but max {hi:.4g} is too small to tell"
    if hi <= 1.0:
        return "amplitude", f"non-integer values with max {hi:.4g} <= 1 (normalised)"
    # Non-integer values above 1: raw amplitudes sqrt(counts) have (near-)integer squares.
    fractional = x[(x != np.rint(x)) & (x * x <= _SQUARE_TEST_MAX)]
    if fractional.size >= 8:
        sq = fractional * fractional
        if bool(np.all(np.abs(sq - np.rint(sq)) <= _SQUARE_TOL_REL * sq + 1e-9)):
            return "amplitude", (f"non-integer values whose squares are whole numbers "
                                 f"(sqrt of counts), max {hi:.6g}")
    return "unknown", f"non-integer values up to {hi:.6g} (scaled or processed data)"


def looks_like(frames: Any) -> str:
    """Guess what a stack of frames holds, from its first few frames.

    Returns ``"counts"`` (integer dtype or integer-valued floats with max > 50),
    ``"amplitude"`` (non-integer with max <= 1, i.e. normalised amplitudes; or non-integer
    values whose squares are whole numbers, i.e. raw ``sqrt(counts)``) or ``"unknown"``
    (too few counts to tell, dark-subtracted / flat-fielded floats, scaled amplitudes,
    negative values). Only a guess: it feeds :func:`kind_warning`, never a decision.
    """
    return _classify(_sample(frames))[0]


def kind_warning(frames: Any, kind: DataKind, source: str, *,
                 key: str = "diffraction") -> str | None:
    """One-line warning when ``frames`` look like the other kind than ``kind``, else None."""
    _check_kind(kind)
    verdict, reason = _classify(_sample(frames))
    if verdict == "unknown" or verdict == kind:
        return None
    other = verdict
    if kind == "amplitude":
        consequence = ("they would reach the model without the square root, far too "
                       "bright and with the wrong contrast")
    else:
        consequence = ("the square root would be taken twice, compressing the pattern "
                       "towards flat")
    return (f"{_where(source, key)} looks like {other} ({reason}) but --data-kind {kind} "
            f"was given: {consequence}; pass --data-kind {other} if that is what it holds")


def marker_warning(frames: Any, source: str, *, key: str = "diffraction") -> str | None:
    """Warn when integer frames hold pixels at the dtype's maximum (gap/mask markers).

    Many detectors write ``2**bits - 1`` into module gaps and dead pixels (an Eiger's
    ``uint32`` gaps read 4294967295); taken as counts they become amplitudes of 65536 that
    dominate any normalisation. Looks at the same sample as :func:`looks_like`.
    """
    sample = _sample(frames)
    if sample.dtype.kind not in "iu" or sample.size == 0:
        return None
    top = np.iinfo(sample.dtype).max
    n_top = int(np.count_nonzero(sample == top))
    if not n_top:
        return None
    frac = n_top / sample.size
    return (f"{_where(source, key)}: {n_top} pixels ({frac:.2%} of the first "
            f"{min(len(sample), SAMPLE_FRAMES) if sample.ndim >= 3 else 1} frame(s)) equal "
            f"{top}, the {sample.dtype} maximum: detector gap / bad-pixel markers? They are "
            "treated as real counts; mask them before reconstructing")


# --------------------------------------------------------------------------- cropping


def crop_window(height: int, width: int, n: int, source: str = "<memory>", *,
                key: str = "diffraction") -> slice:
    """The slice, along both axes, that centre-crops H x W frames to n x n (DC kept).

    Refuses non-square frames (a non-square detector region has different pixel sizes
    along the two axes in object space; crop it square upstream) and frames smaller
    than n (padding would invent data). See the module docstring for the convention.
    """
    where = _where(source, key)
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise DataError(f"crop size must be a positive integer, got {n!r}")
    n = int(n)
    if height != width:
        raise DataError(f"{where} has non-square frames {height}x{width}; the model needs "
                        "N x N patterns (select a square detector region)")
    if height < n:
        raise DataError(f"{where} has {height}x{width} frames, smaller than the model's "
                        f"{n}x{n}; refusing to pad")
    first = height // 2 - n // 2
    return slice(first, first + n)


def center_crop(frames: Any, n: int, source: str = "<memory>", *,
                key: str = "diffraction") -> Any:
    """Centre-crop the last two axes of ``frames`` to n x n, DC (H//2, W//2) -> (n//2, n//2).

    Returns a view (plain slicing) of whatever was given, so it costs nothing on a chunk
    and works on any array-like with numpy slicing; frames already n x n come back as is.
    """
    shape = getattr(frames, "shape", None)
    if shape is None:
        frames = np.asarray(frames)
        shape = frames.shape
    if len(shape) < 2:
        raise DataError(f"{_where(source, key)} has shape {tuple(shape)}; expected frames "
                        "(..., H, W)")
    window = crop_window(int(shape[-2]), int(shape[-1]), n, source, key=key)
    if window.start == 0 and window.stop == shape[-1]:
        return frames
    return frames[..., window, window]
