"""Open a scan without reading its diffraction stack into memory (numpy only, no torch).

``np.load`` ignores ``mmap_mode`` for ``.npz`` archives, yet an archive written by
``np.savez`` (and by :func:`runtime.scan.save_scan`) stores its members uncompressed
(ZIP_STORED): each member's ``.npy`` bytes lie in the file as they are. :func:`memmap_npz_member`
finds where (the member's local zip header: ``header_offset + 30 + name length + extra
length``, then the ``.npy`` header) and ``np.memmap``'s the array read-only.

:func:`open_scan` is :func:`runtime.scan.load_scan` with that one difference: when the
amplitudes member is a stored, native float32, C-ordered (M, N, N) array, ``amplitudes``
is a read-only ``np.memmap`` and the contract's checks on it (finite, non-negative) run
chunk by chunk with the same messages; anything else (compressed, float64, Fortran order,
odd shapes, damaged archives) falls back to :func:`~runtime.scan.load_scan` itself, which
reads the array and reports any problem exactly as before. The small keys (probe,
positions, object, scan index) are checked by the contract's own functions either way.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import zipfile
import zlib
from typing import Any

import numpy as np

# The contract's own key names and per-key checks: one definition of what a valid scan is.
from runtime.scan import (
    AMPLITUDE_KEY,
    LEGACY_AMPLITUDE_KEY,
    OBJECT_KEY,
    PROBE_KEY,
    SCAN_INDEX_KEY,
    X_KEY,
    Y_KEY,
    ScanData,
    _check_coords,
    _check_object,
    _check_probe,
    _check_scan_index,
    _fail,
    _first_index,
    _read_key,
    load_scan,
    read_npy_header,
)

__all__ = ["CHECK_CHUNK_BYTES", "check_amplitudes_chunked", "memmap_npz_member", "open_scan"]

# Bytes of amplitudes checked per step; the checks' one temporary is a quarter of this.
CHECK_CHUNK_BYTES = 8 << 20
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # zip local file header, 30 bytes
_LOCAL_MAGIC = b"PK\x03\x04"


def memmap_npz_member(path: str | os.PathLike[str], key: str) -> np.memmap | None:
    """Member ``key`` of an ``.npz`` as a read-only np.memmap, or None where it cannot be.

    Only a member stored uncompressed and unencrypted, whose local header names it as the
    central directory does and whose ``.npy`` header (format 1.0 or 2.0) names a
    native-endian float32, C-ordered array whose bytes exactly fill the member, is mapped;
    None means "read it the ordinary way" (also for a missing member or a file that is not
    a zip archive: the ordinary reader reports those).
    """
    found = _mapped_member(path, key)
    return None if found is None else found[0]


def _mapped_member(path: str | os.PathLike[str], key: str
                   ) -> tuple[np.memmap, tuple[int, int]] | None:
    """(memmap, (crc32 of the member's .npy header, the member's recorded crc32)): the
    zip reader checks every member's CRC, so the mapped path checks it too, as it reads
    the data chunk by chunk (:func:`check_amplitudes_chunked`)."""
    source = os.fspath(path)
    try:
        with zipfile.ZipFile(source) as archive:
            info = archive.getinfo(f"{key}.npy")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError):
        return None
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return None
    try:
        with open(source, "rb") as handle:
            handle.seek(info.header_offset)
            raw = handle.read(_LOCAL_HEADER.size)
            if len(raw) != _LOCAL_HEADER.size:
                return None
            fields = _LOCAL_HEADER.unpack(raw)
            if fields[0] != _LOCAL_MAGIC or fields[9] != len(info.orig_filename.encode()) \
                    or handle.read(fields[9]) != info.orig_filename.encode():
                return None  # the zip reader refuses such an archive: let it say why
            start = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
            handle.seek(start)
            parsed = read_npy_header(handle)
            if parsed is None:
                return None
            shape, fortran, dtype = parsed
            offset = handle.tell()
            handle.seek(start)
            header_crc = zlib.crc32(handle.read(offset - start))
    except Exception:  # noqa: BLE001 - any oddity: load_scan reads it and says what it is
        return None
    if dtype != np.dtype(np.float32) or fortran or len(shape) != 3 or 0 in shape:
        return None
    nbytes = math.prod(shape) * dtype.itemsize
    if offset - start + nbytes != info.file_size or offset + nbytes > os.path.getsize(source):
        return None
    try:
        mapped = np.memmap(source, dtype=np.float32, mode="r", offset=offset,
                           shape=tuple(shape))
    except (OSError, ValueError):
        return None
    return mapped, (header_crc, info.CRC)


def check_amplitudes_chunked(amplitudes: np.ndarray, source: str, key: str,
                             chunk_bytes: int = CHECK_CHUNK_BYTES,
                             crc: tuple[int, int] | None = None) -> None:
    """The contract's finite and non-negative checks on (M, N, N) float32 amplitudes, a
    block of patterns at a time, with :func:`runtime.scan.load_scan`'s messages (counts
    and first pattern over the whole stack). ``crc`` = (crc32 so far, expected crc32 of
    the whole member): the data's crc32 is accumulated on the way and a mismatch is
    refused as the zip reader refuses it (a damaged or edited file)."""
    m = int(amplitudes.shape[0])
    per_pattern = max(1, math.prod(amplitudes.shape[1:]) * amplitudes.dtype.itemsize)
    step = max(1, chunk_bytes // per_pattern)
    n_bad = n_neg = 0
    first_bad = first_neg = -1
    lowest = math.inf
    running = None if crc is None else crc[0]
    for start in range(0, m, step):
        block = np.asarray(amplitudes[start : start + step])
        if running is not None:
            running = zlib.crc32(np.ascontiguousarray(block), running)
        flags = np.isfinite(block)
        np.logical_not(flags, out=flags)
        count = int(np.count_nonzero(flags))
        if count:
            n_bad += count
            first_bad = first_bad if first_bad >= 0 else start + _first_index(flags)
        np.less(block, 0, out=flags)
        count = int(np.count_nonzero(flags))
        if count:
            n_neg += count
            first_neg = first_neg if first_neg >= 0 else start + _first_index(flags)
            lowest = min(lowest, float(block[flags].min()))
    if crc is not None and running != crc[1]:
        raise _fail(source, key, f"cannot be read (BadZipFile: Bad CRC-32 for file "
                                 f"'{key}.npy')")
    if n_bad:
        raise _fail(source, key, f"has {n_bad} NaN/Inf values (first at pattern {first_bad}); "
                                 "amplitudes must be finite")
    if n_neg:
        raise _fail(source, key, f"has {n_neg} negative values (min {lowest:.4g}, first at "
                                 f"pattern {first_neg}); amplitudes sqrt(counts) must be >= 0")


def _small_keys(source: str, amp_key: str) -> dict[str, Any] | None:
    """Probe, positions and optional keys (None: let load_scan open and report)."""
    try:
        npz = np.load(source, allow_pickle=False)
    except Exception:  # load_scan opens it again and says what is wrong
        return None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        return None
    with npz:
        present = list(npz.files)
        for key in (PROBE_KEY, X_KEY, Y_KEY):
            if key not in present:
                raise _fail(source, key, f"is missing; keys present: {', '.join(present)}")
        arrays = {key: _read_key(npz, key, source) for key in (PROBE_KEY, X_KEY, Y_KEY)}
        for key in (OBJECT_KEY, SCAN_INDEX_KEY):
            arrays[key] = _read_key(npz, key, source) if key in present else None
    return arrays


def _member_names(source: str) -> list[str]:
    with contextlib.suppress(OSError, ValueError, EOFError, zipfile.BadZipFile), \
            zipfile.ZipFile(source) as archive:
        return archive.namelist()
    return []


def open_scan(path: str | os.PathLike[str], *, chunk_bytes: int = CHECK_CHUNK_BYTES
              ) -> ScanData:
    """:func:`runtime.scan.load_scan`, but with the amplitudes memory-mapped where the
    archive stores them uncompressed as float32 (``isinstance(scan.amplitudes,
    np.memmap)`` tells); same validation, same errors, other files read as before."""
    source = os.fspath(path)
    amp_key, found = AMPLITUDE_KEY, _mapped_member(source, AMPLITUDE_KEY)
    if found is None and f"{AMPLITUDE_KEY}.npy" not in _member_names(source):
        amp_key = LEGACY_AMPLITUDE_KEY
        found = _mapped_member(source, amp_key)
    if found is None or found[0].shape[1] != found[0].shape[2]:
        return load_scan(source)
    amplitudes, crc = found
    arrays = _small_keys(source, amp_key)
    if arrays is None:
        return load_scan(source)
    check_amplitudes_chunked(amplitudes, source, amp_key, chunk_bytes, crc)
    m, n = int(amplitudes.shape[0]), int(amplitudes.shape[-1])
    probe = _check_probe(arrays[PROBE_KEY], n, source, PROBE_KEY)
    x = _check_coords(arrays[X_KEY], m, amp_key, source, X_KEY)
    y = _check_coords(arrays[Y_KEY], m, amp_key, source, Y_KEY)
    obj = arrays[OBJECT_KEY]
    obj = None if obj is None else _check_object(obj, source, OBJECT_KEY)
    idx = arrays[SCAN_INDEX_KEY]
    idx = None if idx is None else _check_scan_index(idx, m, amp_key, source, SCAN_INDEX_KEY)
    return ScanData(amplitudes=amplitudes, probe=probe,
                    positions_px=np.ascontiguousarray(np.stack([y, x], axis=1)),
                    object_truth=obj, scan_index=idx, source=source)
