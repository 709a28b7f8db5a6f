"""The scan data contract: read, check and write PtychoPINN-layout ``.npz`` files.

This module is the one boundary that checks user arrays (dtype, shape, finiteness); code
downstream of a :class:`ScanData` trusts it and never re-converts. It is numpy-only on
purpose: the base (torch-free) install reads scans with it.

Layout (PtychoPINN npz):

- ``diffraction`` (M, N, N): measured diffraction **amplitudes** = sqrt(counts), raw or
  normalised (max < 1); legacy key ``diff3d`` is read when ``diffraction`` is absent.
- ``probeGuess`` (N, N) complex probe.
- ``xcoords``, ``ycoords`` (M,) scan positions in object pixels.
- optional ``objectGuess`` (H, W) complex ground truth, optional ``scan_index`` (M,) int.

Position convention ("N/2 convention"): a position is the **centre** of its patch, in object
pixels with the origin at the object array's corner; patch pixel (i, j) covers object pixel
(y - N/2 + i, x - N/2 + j).
"""

from __future__ import annotations

import math
import os
import tokenize
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.atomic import write_atomic
from runtime.errors import ENVIRONMENT_ERRNOS, DataError, EnvironmentProblem, PtychoError

AMPLITUDE_KEY = "diffraction"
LEGACY_AMPLITUDE_KEY = "diff3d"
PROBE_KEY = "probeGuess"
X_KEY = "xcoords"
Y_KEY = "ycoords"
OBJECT_KEY = "objectGuess"
SCAN_INDEX_KEY = "scan_index"

# Errors raised by np.load / NpzFile.__getitem__ on corrupt, truncated or pickled content
# (RuntimeError: an encrypted member; NotImplementedError: an unknown compression method;
# MemoryError: a forged header that _check_member_size did not get to see; SyntaxError and
# TokenError: numpy parses the .npy header text with Python's tokenizer).
_READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError,
                RuntimeError, NotImplementedError, MemoryError, SyntaxError,
                tokenize.TokenError)


@dataclass(frozen=True, eq=False)
class ScanData:
    """A validated scan: dtypes are final (float32 / complex64 / float64 positions).

    Build it with :func:`validate_scan` or :func:`load_scan`; the constructor itself does not
    check anything. ``eq=False`` because element-wise array equality has no single truth value.
    """

    amplitudes: np.ndarray  # (M, N, N) float32, C-contiguous, >= 0, finite
    probe: np.ndarray  # (N, N) complex64
    positions_px: np.ndarray  # (M, 2) float64, columns (y, x): patch centres in object pixels
    object_truth: np.ndarray | None = None  # (H, W) complex64
    scan_index: np.ndarray | None = None  # (M,) int64
    source: str = ""  # file name (or "<memory>"), for messages

    @property
    def n_patterns(self) -> int:
        """Number of diffraction patterns M."""
        return int(self.amplitudes.shape[0])

    @property
    def patch_size(self) -> int:
        """Pattern (and probe, and object patch) side length N."""
        return int(self.amplitudes.shape[-1])


# --------------------------------------------------------------------------- validation


def _describe(err: BaseException) -> str:
    """An exception as one line (DataError messages are single lines)."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def _fail(source: str, key: str, problem: str) -> DataError:
    return DataError(f"{source}: key '{key}' {problem}")


def _as_array(value: Any, source: str, key: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as err:  # ragged lists and the like
        raise _fail(source, key, f"is not a regular numeric array ({_describe(err)})") from err
    if arr.dtype.kind in "OSUVMm":
        raise _fail(source, key, f"has non-numeric dtype {arr.dtype}; a numeric array is required")
    return arr


def _first_index(mask: np.ndarray) -> int:
    """Leading-axis index of the first True entry of ``mask`` (which has at least one)."""
    return int(np.unravel_index(int(np.argmax(mask)), mask.shape)[0])


def _check_finite(arr: np.ndarray, source: str, key: str, what: str, unit: str) -> None:
    bad = ~np.isfinite(arr)
    n_bad = int(np.count_nonzero(bad))
    if n_bad:
        first = _first_index(bad) if arr.ndim else 0
        raise _fail(
            source,
            key,
            f"has {n_bad} NaN/Inf values (first at {unit} {first}); {what} must be finite",
        )


def _narrow(arr: np.ndarray, dtype: Any, source: str, key: str, unit: str) -> np.ndarray:
    """Convert finite ``arr`` to ``dtype``; values that overflow it are refused (a float64
    1e39 is finite, but inf as complex64)."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(arr, dtype=dtype)
    overflow = ~np.isfinite(out)  # the input is finite: anything else overflowed here
    n_over = int(np.count_nonzero(overflow))
    if n_over:
        raise _fail(source, key, f"has {n_over} values beyond the {np.dtype(dtype)} range "
                                 f"(first at {unit} {_first_index(overflow)})")
    return out


def _check_amplitudes(raw: Any, source: str, key: str) -> np.ndarray:
    arr = _as_array(raw, source, key)
    kind = arr.dtype.kind
    if kind in "iu":
        raise _fail(
            source,
            key,
            f"has integer dtype {arr.dtype}: these look like photon counts, but the contract "
            "wants amplitudes; store np.sqrt(counts).astype(np.float32)",
        )
    if kind == "c":
        raise _fail(
            source,
            key,
            f"is complex ({arr.dtype}); measured diffraction must be real amplitudes "
            "sqrt(counts), not a complex far field",
        )
    if kind != "f":
        raise _fail(source, key, f"has dtype {arr.dtype}; expected float amplitudes")
    if arr.ndim != 3:
        raise _fail(
            source,
            key,
            f"has rank {arr.ndim} (shape {arr.shape}); expected (M, N, N) "
            "(a single pattern must be shaped (1, N, N))",
        )
    m, n_rows, n_cols = arr.shape
    if n_rows != n_cols:
        raise _fail(source, key, f"has non-square patterns {n_rows}x{n_cols}; expected N x N")
    if m == 0:
        raise _fail(source, key, f"is empty (shape {arr.shape}): the scan has no patterns")
    if n_rows == 0:
        raise _fail(source, key, f"has empty 0x0 patterns (shape {arr.shape})")
    _check_finite(arr, source, key, "amplitudes", "pattern")
    # The one and only float conversion on the way in (overflow is reported below, not
    # warned about: a RuntimeWarning would be a second stderr line).
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.dtype.itemsize > 4:
        overflow = ~np.isfinite(out)
        n_over = int(np.count_nonzero(overflow))
        if n_over:
            raise _fail(
                source,
                key,
                f"has {n_over} values beyond the float32 range (first at pattern "
                f"{_first_index(overflow)}); amplitudes must fit float32",
            )
    negative = out < 0
    n_neg = int(np.count_nonzero(negative))
    if n_neg:
        raise _fail(
            source,
            key,
            f"has {n_neg} negative values (min {float(out.min()):.4g}, first at pattern "
            f"{_first_index(negative)}); amplitudes sqrt(counts) must be >= 0",
        )
    return out


def _check_probe(raw: Any, n: int, source: str, key: str) -> np.ndarray:
    arr = _as_array(raw, source, key)
    if arr.dtype.kind not in "iufc":
        raise _fail(source, key, f"has dtype {arr.dtype}; expected a complex probe")
    if arr.ndim != 2:
        raise _fail(source, key, f"has rank {arr.ndim} (shape {arr.shape}); expected (N, N)")
    if arr.shape != (n, n):
        raise _fail(
            source,
            key,
            f"has shape {arr.shape} but the diffraction patterns are {n}x{n}; "
            "the probe must match the pattern shape",
        )
    _check_finite(arr, source, key, "the probe", "row")
    # A real probe is physically fine (flat phase): convert silently.
    out = _narrow(arr, np.complex64, source, key, "row")
    if not np.any(out):
        raise _fail(source, key, "is all zeros; the probe must illuminate something")
    return out


def _check_one_per_pattern(arr: np.ndarray, m: int, amp_key: str, source: str, key: str,
                           what: str) -> None:
    """A per-pattern vector: rank 1, one ``what`` (position, index) per pattern."""
    if arr.ndim != 1:
        raise _fail(source, key, f"has rank {arr.ndim} (shape {arr.shape}); expected (M,)")
    if arr.shape[0] != m:
        plural = "entries" if what == "index" else f"{what}s"
        raise _fail(source, key, f"has {arr.shape[0]} {plural} but '{amp_key}' has {m} "
                                 f"patterns; there must be one {what} per pattern")


def _check_coords(raw: Any, m: int, amp_key: str, source: str, key: str) -> np.ndarray:
    arr = _as_array(raw, source, key)
    if arr.dtype.kind not in "iuf":
        raise _fail(source, key, f"has dtype {arr.dtype}; expected real positions in pixels")
    _check_one_per_pattern(arr, m, amp_key, source, key, "position")
    out = arr.astype(np.float64)
    _check_finite(out, source, key, "positions", "pattern")
    return out


def _check_object(raw: Any, source: str, key: str) -> np.ndarray:
    arr = _as_array(raw, source, key)
    if arr.dtype.kind not in "iufc":
        raise _fail(source, key, f"has dtype {arr.dtype}; expected a complex object")
    if arr.ndim != 2:
        raise _fail(source, key, f"has rank {arr.ndim} (shape {arr.shape}); expected (H, W)")
    if arr.size == 0:
        raise _fail(source, key, f"is empty (shape {arr.shape})")
    _check_finite(arr, source, key, "the object", "row")
    return _narrow(arr, np.complex64, source, key, "row")


def _check_scan_index(raw: Any, m: int, amp_key: str, source: str, key: str) -> np.ndarray:
    arr = _as_array(raw, source, key)
    _check_one_per_pattern(arr, m, amp_key, source, key, "index")
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    # Integral floats (e.g. written by MATLAB) are fine; anything else is not an index.
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        return arr.astype(np.int64)
    raise _fail(source, key, f"has dtype {arr.dtype} with non-integer values; expected ints")


def _build(
    amplitudes: Any,
    probe: Any,
    xcoords: Any,
    ycoords: Any,
    object_truth: Any,
    scan_index: Any,
    *,
    source: str,
    amp_key: str,
) -> ScanData:
    amp = _check_amplitudes(amplitudes, source, amp_key)
    m, n = amp.shape[0], amp.shape[-1]
    probe_arr = _check_probe(probe, n, source, PROBE_KEY)
    x = _check_coords(xcoords, m, amp_key, source, X_KEY)
    y = _check_coords(ycoords, m, amp_key, source, Y_KEY)
    positions = np.ascontiguousarray(np.stack([y, x], axis=1))
    obj = None if object_truth is None else _check_object(object_truth, source, OBJECT_KEY)
    idx = None
    if scan_index is not None:
        idx = _check_scan_index(scan_index, m, amp_key, source, SCAN_INDEX_KEY)
    return ScanData(
        amplitudes=amp,
        probe=probe_arr,
        positions_px=positions,
        object_truth=obj,
        scan_index=idx,
        source=source,
    )


def validate_scan(
    amplitudes: Any,
    probe: Any,
    xcoords: Any,
    ycoords: Any,
    object_truth: Any = None,
    scan_index: Any = None,
    *,
    source: str = "<memory>",
) -> ScanData:
    """Check in-memory arrays against the contract and convert them once.

    Float amplitudes (float16/32/64) become float32; a real probe becomes complex64;
    positions become an (M, 2) float64 array of (y, x) patch centres. Any violation raises
    :class:`DataError` with a one-line message naming ``source``, the key and the problem.
    Inputs that already have the final dtype and layout are not copied.
    """
    return _build(
        amplitudes,
        probe,
        xcoords,
        ycoords,
        object_truth,
        scan_index,
        source=source,
        amp_key=AMPLITUDE_KEY,
    )


# --------------------------------------------------------------------------- file I/O


def read_npy_header(handle: Any) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """(shape, fortran_order, dtype) from an open .npy stream positioned at its start,
    leaving it at the first data byte; None for a format version numpy may add later."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(handle)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(handle)
    return None


def _check_member_size(npz: Any, key: str, source: str) -> None:
    """Refuse a member whose .npy header declares more data than the member holds, before
    numpy allocates the declared size (a forged 10**12-pattern header would otherwise
    raise MemoryError, or reserve terabytes). Anything unreadable here is left to numpy,
    which reports it."""
    try:
        archive = npz.zip
        info = archive.getinfo(f"{key}.npy")
        with archive.open(info) as handle:
            parsed = read_npy_header(handle)
            if parsed is None:
                return
            shape, _, dtype = parsed
            header = handle.tell()
    except Exception:  # noqa: BLE001 - numpy's own read below reports what is wrong
        return
    if dtype.hasobject:
        return  # refused as pickled data by np.load itself
    declared = math.prod(shape) * dtype.itemsize
    if declared > info.file_size - header:
        raise _fail(source, key, f"declares shape {tuple(shape)} of {dtype} ({declared:,} "
                                 f"bytes) but holds {max(info.file_size - header, 0):,} bytes; "
                                 "the file is truncated or its header is forged")


def _read_key(npz: Any, key: str, source: str) -> np.ndarray:
    _check_member_size(npz, key, source)
    try:
        return npz[key]
    except _READ_ERRORS as err:
        if isinstance(err, ValueError) and "pickle" in str(err).lower():
            raise _fail(
                source,
                key,
                "holds Python objects (pickled data); refusing to unpickle — "
                "store a plain numeric array",
            ) from err
        raise _fail(source, key, f"cannot be read ({_describe(err)})") from err


def load_scan(path: str | os.PathLike[str]) -> ScanData:
    """Read and validate a PtychoPINN-layout ``.npz`` scan file.

    Always ``allow_pickle=False``: object arrays are refused with a :class:`DataError`,
    never unpickled. Only contract keys are read; extra keys (e.g. ``Y``) are ignored.
    """
    source = os.fspath(path)
    try:
        npz = np.load(source, allow_pickle=False)
    except FileNotFoundError as err:
        raise DataError(f"{source}: file not found") from err
    except OSError as err:
        raise DataError(f"{source}: cannot open ({err.strerror or err})") from err
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        if isinstance(err, ValueError) and "pickle" in str(err).lower():
            # numpy's text suggests loading "unsafely"; we never do, so don't suggest it.
            raise DataError(
                f"{source}: not a readable .npz archive (it looks like pickled data, "
                "which is never loaded)"
            ) from err
        raise DataError(f"{source}: not a readable .npz archive ({_describe(err)})") from err
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(
            f"{source}: is a single .npy array, expected an .npz archive with keys "
            f"'{AMPLITUDE_KEY}', '{PROBE_KEY}', '{X_KEY}', '{Y_KEY}'"
        )
    with npz:
        present = list(npz.files)
        if AMPLITUDE_KEY in present:
            amp_key = AMPLITUDE_KEY
        elif LEGACY_AMPLITUDE_KEY in present:
            amp_key = LEGACY_AMPLITUDE_KEY
        else:
            amp_key = AMPLITUDE_KEY
        for key in (amp_key, PROBE_KEY, X_KEY, Y_KEY):
            if key not in present:
                extra = f" (or legacy '{LEGACY_AMPLITUDE_KEY}')" if key == AMPLITUDE_KEY else ""
                raise _fail(
                    source,
                    key,
                    f"is missing{extra}; keys present: {', '.join(present) or 'none'}",
                )
        arrays = {key: _read_key(npz, key, source) for key in (amp_key, PROBE_KEY, X_KEY, Y_KEY)}
        for key in (OBJECT_KEY, SCAN_INDEX_KEY):
            arrays[key] = _read_key(npz, key, source) if key in present else None
    return _build(
        arrays[amp_key],
        arrays[PROBE_KEY],
        arrays[X_KEY],
        arrays[Y_KEY],
        arrays[OBJECT_KEY],
        arrays[SCAN_INDEX_KEY],
        source=source,
        amp_key=amp_key,
    )


def _scan_arrays(scan: ScanData) -> dict[str, np.ndarray]:
    positions = np.asarray(scan.positions_px, dtype=np.float64)
    arrays = {
        AMPLITUDE_KEY: np.ascontiguousarray(scan.amplitudes, dtype=np.float32),
        PROBE_KEY: np.ascontiguousarray(scan.probe, dtype=np.complex64),
        X_KEY: np.ascontiguousarray(positions[:, 1]),
        Y_KEY: np.ascontiguousarray(positions[:, 0]),
    }
    if scan.object_truth is not None:
        arrays[OBJECT_KEY] = np.ascontiguousarray(scan.object_truth, dtype=np.complex64)
    if scan.scan_index is not None:
        arrays[SCAN_INDEX_KEY] = np.ascontiguousarray(scan.scan_index, dtype=np.int64)
    return arrays


def save_scan(path: str | os.PathLike[str], scan: ScanData) -> None:
    """Write ``scan`` to ``path`` with the canonical keys, atomically.

    The archive is written to a temporary file in the target directory and moved into place
    with ``os.replace``, so a reader never sees a half-written file and a failure leaves any
    previous file intact. The name is used as given (no ``.npz`` is appended).
    """
    target = Path(os.fspath(path))
    arrays = _scan_arrays(scan)
    try:  # a missing folder is the user's to make: an error, not created here
        with write_atomic(target, durable=True, make_parents=False) as fh:
            np.savez(fh, **arrays)
    except OSError as err:
        raise _write_error(target, err) from err


def _write_error(target: Path, err: OSError) -> PtychoError:
    """Disk full or not writable is the machine's problem (exit 4); a missing folder or a
    name that is a folder is the command line's (exit 3)."""
    if err.errno in ENVIRONMENT_ERRNOS:
        return EnvironmentProblem(f"{target}: cannot write scan file ({err.strerror or err}); "
                                  "free some space or choose a writable folder; any previous "
                                  "file is intact")
    return DataError(f"{target}: cannot write scan file ({err.strerror or err})")
