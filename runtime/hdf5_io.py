"""Read a scan from HDF5 (h5py) into a validated :class:`runtime.scan.ScanData`.

Raw beamline files hold detector frames (P, H, W), usually integer counts, next to scan
positions (often in metres) and maybe a probe; every facility names its datasets
differently, so the paths are given explicitly (:func:`read_scan_hdf5`). ptychodus's own
batch input (an assembled ``diffraction.h5`` plus a product file with positions, probe
and metadata) has a fixed layout and its own loader (:func:`load_ptychodus_inputs`).

The frames are never read whole: each block of ``chunk`` frames is read as one HDF5
hyperslab restricted to the centre-crop window (``ds[a:b, r0:r1, c0:c1]``: only those
bytes leave the disk), bad pixels are zeroed, and the block is converted (integers ->
float64, ``sqrt`` for counts, float32; ``runtime.detector``) into one preallocated float32
(M, N, N) array, so peak memory is that array plus one block. The result goes through
``runtime.scan.validate_scan`` (already float32 and C-contiguous: not copied).

Cropping the far field to N pixels coarsens the object pixel (``lambda z / (N d)``), so a
probe given at the full frame size is resampled with it: the same centre crop applied to
the probe's spectrum (:func:`resample_probe`).

Compressed detector data (Eiger bitshuffle/LZ4) needs the ``hdf5plugin`` package; it is
imported when installed, and a missing filter is reported as such.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime import memory
from runtime.detector import (
    DATA_KINDS,
    crop_window,
    frames_to_amplitudes,
    kind_warning,
    looks_like,
    marker_warning,
)
from runtime.errors import DataError, EnvironmentProblem
from runtime.geometry import (
    ORIGINS,
    PixelFrame,
    origin_offset_px,
    pixel_frame_px,
    positions_m_to_px,
    scan_frame,
)
from runtime.ptychodus_product import read_product
from runtime.scan import ScanData, validate_scan

__all__ = ["DEFAULT_CHUNK", "DEFAULT_DIFFRACTION", "HDF5Scan", "load_ptychodus_inputs",
           "load_scan_hdf5", "read_scan_hdf5", "resample_probe"]

DEFAULT_DIFFRACTION = "/entry/data/data"  # NeXus / Dectris master-file layout
DEFAULT_CHUNK = 1024
POSITION_UNITS = ("px", "m")
# ptychodus's assembled diffraction file (api/io.py DiffractionFileKeys).
PTYCHODUS_PATTERNS, PTYCHODUS_INDEXES, PTYCHODUS_BAD_PIXELS = "patterns", "indexes", \
    "bad_pixels"


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as err:  # pragma: no cover - h5py is a base dependency
        raise EnvironmentProblem("reading HDF5 needs h5py: pip install h5py") from err
    with contextlib.suppress(ImportError):
        import hdf5plugin  # noqa: F401  (registers Eiger/bitshuffle/LZ4 filters)
    return h5py


@dataclass(frozen=True, eq=False)
class HDF5Scan:
    """A scan read from HDF5 plus what the run report and a ptychodus product need."""

    scan: ScanData
    kind: str  # data kind the frames were declared as (counts | amplitude)
    looks_like: str  # what the first frames look like (counts | amplitude | unknown)
    frame: PixelFrame | None  # object pixels <-> metres (None: no pixel size known)
    positions_m: tuple[np.ndarray, np.ndarray] | None  # (x_m, y_m) as read, metres input
    origin: str  # position convention of the file
    units: str  # px | m
    frame_shape: tuple[int, int]  # detector frame (H, W) before cropping
    crop: tuple[int, int] | None  # (first row/col, n) when cropped, else None
    chunk: int
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    indexes: np.ndarray | None = None  # (M,) pattern indexes (ptychodus input)
    product_in: Any = None  # runtime.ptychodus_product.ProductData (ptychodus input)

    def report(self) -> dict[str, Any]:
        """The facts for report.json's ``data`` section."""
        return {"format": "ptychodus" if self.product_in is not None else "hdf5",
                "data_kind": self.kind, "looks_like": self.looks_like,
                "position_units": self.units, "origin_convention": self.origin,
                "detector_frame": list(self.frame_shape),
                "crop": None if self.crop is None else {"first": self.crop[0],
                                                        "size": self.crop[1]},
                "chunk_frames": self.chunk,
                "pixel_size_m": None if self.frame is None else
                [self.frame.pixel_height_m, self.frame.pixel_width_m],
                "notes": list(self.notes)}


def _fail(source: str, path: str, problem: str) -> DataError:
    return DataError(f"{source}: dataset '{path}' {problem}")


def _entries(h5: Any) -> str:
    names: list[str] = []
    h5.visit(lambda name: names.append("/" + name) if len(names) < 12 else True)
    return ", ".join(names) if names else "none"


def _open(source: str, h5py: Any) -> Any:
    try:
        return h5py.File(source, "r")
    except FileNotFoundError as err:
        raise DataError(f"{source}: file not found") from err
    except OSError as err:
        raise DataError(f"{source}: not a readable HDF5 file "
                        f"({' '.join(str(err).split())})") from err


def _dataset(h5: Any, path: str, source: str, h5py: Any) -> Any:
    try:
        obj = h5.get(path)
    except (KeyError, OSError, ValueError) as err:  # broken external/soft links
        raise _fail(source, path, f"cannot be opened ({' '.join(str(err).split())})") from err
    if obj is None:
        raise _fail(source, path, f"is missing; entries in the file: {_entries(h5)}")
    if not isinstance(obj, h5py.Dataset):
        raise _fail(source, path, "is a group, not a dataset")
    return obj


def _read(ds: Any, sel: Any, source: str, path: str) -> np.ndarray:
    try:
        return ds[sel]
    except OSError as err:
        text = " ".join(str(err).split())
        hint = (" (a compression filter is missing: pip install hdf5plugin)"
                if "filter" in text.lower() else "")
        raise _fail(source, path, f"cannot be read{hint} ({text})") from err


def _vector(h5: Any, path: str, m: int, source: str, h5py: Any, what: str = "positions"
            ) -> np.ndarray:
    ds = _dataset(h5, path, source, h5py)
    shape = tuple(ds.shape)
    if len(shape) == 2 and 1 in shape:
        shape = (shape[0] * shape[1],)
    if len(shape) != 1:
        raise _fail(source, path, f"has shape {tuple(ds.shape)}; expected (M,) {what}")
    if shape[0] != m:
        raise _fail(source, path, f"has {shape[0]} {what} but the diffraction data has "
                                  f"{m} frames; there must be one per frame")
    if ds.dtype.kind not in "iuf":
        raise _fail(source, path, f"has dtype {ds.dtype}; expected real numbers")
    values = np.asarray(_read(ds, (), source, path), dtype=np.float64).reshape(m)
    bad = ~np.isfinite(values)
    if np.any(bad):
        raise _fail(source, path, f"has {int(bad.sum())} NaN/Inf values (first at frame "
                                  f"{int(np.argmax(bad))}); {what} must be finite")
    return values


def _single_mode(arr: np.ndarray, source: str, path: str) -> np.ndarray:
    """(N, N) from a probe stored with leading singleton mode axes."""
    shape = tuple(arr.shape)
    if len(shape) < 2 or any(s != 1 for s in shape[:-2]):
        raise _fail(source, path, f"has shape {shape}; expected (N, N) (one probe mode; "
                                  "ptychodus's (modes..., N, N) only with single modes)")
    return np.asarray(arr).reshape(shape[-2:])


def resample_probe(probe: Any, n: int) -> np.ndarray:
    """The probe at the object pixel of an n x n crop of its H x H far field.

    Centre-cropping the far field to n pixels (``runtime.detector.crop_window``) coarsens
    the real-space pixel by H/n over the same field of view; the probe follows by the same
    crop of its own spectrum (fft2 -> fftshift -> crop -> ifftshift -> ifft2), scaled by
    (n/H)^2 so the probe keeps its pointwise amplitude. A feature at pixel x (measured
    from pixel 0) lands at x * n/H; the centre H/2 lands at n/2.
    """
    probe = np.asarray(probe)
    h = probe.shape[-1]
    if probe.shape != (h, h):
        raise DataError(f"probe must be square (N, N), got {probe.shape}")
    if n == h:
        return np.ascontiguousarray(probe, dtype=np.complex64)
    window = crop_window(h, h, n, "probe", key="probe")
    spectrum = np.fft.fftshift(np.fft.fft2(probe.astype(np.complex128)))
    small = np.fft.ifft2(np.fft.ifftshift(spectrum[window, window])) * (n / h) ** 2
    return np.ascontiguousarray(small, dtype=np.complex64)


def _probe_for(arr: np.ndarray, n: int, h: int, source: str, path: str,
               notes: list[str]) -> np.ndarray:
    if arr.shape == (n, n):
        return arr
    if arr.shape == (h, h) and n < h:
        notes.append(f"probe resampled from {h}x{h} to {n}x{n} with the pattern crop "
                     "(object pixel x" + f"{h / n:g})")
        return resample_probe(arr, n)
    cropped = f" (cropped from {h}x{h})" if n != h else ""
    raise _fail(source, path, f"has shape {arr.shape} but the patterns are {n}x{n}{cropped}; "
                              "the probe must match the pattern size (and its pixel size)")


def _bad_pixel_mask(h5: Any, path: str, shape: tuple[int, int], window: slice, source: str,
                    h5py: Any) -> np.ndarray:
    ds = _dataset(h5, path, source, h5py)
    if tuple(ds.shape) != shape:
        raise _fail(source, path, f"has shape {tuple(ds.shape)} but the frames are "
                                  f"{shape[0]}x{shape[1]}")
    return np.asarray(_read(ds, (), source, path)).astype(bool)[window, window]


def _check_fits(total: int, n: int, source: str, path: str) -> None:
    """The float32 amplitudes a dataset's declared shape asks for must fit in memory: a
    chunked, compressed dataset can declare 10^7 frames in a 160 MB file."""
    need = total * n * n * 4
    free = memory.mem_available_bytes()
    if free is not None and need > free:
        raise _fail(source, path, f"declares {total} frames of {n}x{n}: {need / (1 << 30):.1f} "
                                  f"GiB of float32 amplitudes, more than the "
                                  f"{free / (1 << 30):.1f} GiB available (MemAvailable); "
                                  "check the file, or select fewer frames")


def _read_frames(ds: Any, rows: np.ndarray | None, window: slice, kind: str, chunk: int,
                 mask: np.ndarray | None, source: str, path: str
                 ) -> tuple[np.ndarray, str, list[str]]:
    """Chunked hyperslab reads -> (amplitudes (M, n, n) float32, looks_like, warnings)."""
    total = int(ds.shape[0]) if rows is None else len(rows)
    n = window.stop - window.start
    _check_fits(total, n, source, path)
    amplitudes = np.empty((total, n, n), dtype=np.float32)
    verdict, warnings = "unknown", []
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        # A contiguous run of frames is a plain slice; a selection (ptychodus index
        # matching) is an increasing index list, which h5py reads as one selection.
        if rows is None:
            sel: Any = slice(start, stop)
        else:
            part = rows[start:stop]
            contiguous = part[-1] - part[0] == len(part) - 1
            sel = slice(int(part[0]), int(part[-1]) + 1) if contiguous else part.tolist()
        block = _read(ds, (sel, window, window), source, path)
        if start == 0:
            verdict = looks_like(block)
            warnings = [text for text in (kind_warning(block, kind, source, key=path),
                                          marker_warning(block, source, key=path)) if text]
        if mask is not None:
            block[:, mask] = 0
        first = start if rows is None else int(rows[start])
        amplitudes[start:stop] = frames_to_amplitudes(block, kind, source, key=path,
                                                      start=first)
        del block
    return amplitudes, verdict, warnings


def _frames_dataset(h5: Any, path: str, source: str, h5py: Any) -> tuple[Any, int, int, int]:
    ds = _dataset(h5, path, source, h5py)
    if ds.dtype.kind == "c":
        raise _fail(source, path, f"is complex ({ds.dtype}); detector frames must be real "
                                  "counts or amplitudes")
    if ds.dtype.kind not in "iuf":
        raise _fail(source, path, f"has dtype {ds.dtype}; expected integer counts or float "
                                  "values")
    if ds.ndim != 3:
        raise _fail(source, path, f"has rank {ds.ndim} (shape {ds.shape}); expected frames "
                                  "(M, H, W)")
    m, h, w = (int(v) for v in ds.shape)
    if m == 0:
        raise _fail(source, path, f"is empty (shape {ds.shape}): no frames")
    return ds, m, h, w


def _check_options(kind: str, chunk: Any, units: str = "px", origin: str = "centre") -> int:
    if kind not in DATA_KINDS:
        raise DataError(f"data kind must be one of {', '.join(DATA_KINDS)}, got {kind!r}")
    if units not in POSITION_UNITS:
        raise DataError(f"position units must be one of {', '.join(POSITION_UNITS)}, "
                        f"got {units!r}")
    if origin not in ORIGINS:
        raise DataError(f"origin convention must be one of {', '.join(ORIGINS)}, "
                        f"got {origin!r}")
    if isinstance(chunk, bool) or int(chunk) != chunk or chunk < 1:
        raise DataError(f"chunk must be a positive integer, got {chunk!r}")
    return int(chunk)


def load_scan_hdf5(path: str | os.PathLike[str], *, kind: str,
                   diffraction: str = DEFAULT_DIFFRACTION, x: str, y: str,
                   probe: str | None = None, bad_pixels: str | None = None,
                   units: str = "px", pixel_m: Any = None, origin: str = "centre",
                   crop_to: int | None = None, chunk: int = DEFAULT_CHUNK) -> HDF5Scan:
    """Read frames, positions and probe from one HDF5 file; see :func:`read_scan_hdf5`."""
    source = os.fspath(path)
    chunk = _check_options(kind, chunk, units, origin)
    if units == "m" and pixel_m is None:
        raise DataError(f"{source}: positions in metres need the object pixel size "
                        "(pixel_m: --pixel-size-m, or --energy-ev/--distance-m/"
                        "--detector-pixel-m)")
    h5py = _h5py()
    notes: list[str] = []
    with _open(source, h5py) as h5:
        ds, m, h, w = _frames_dataset(h5, diffraction, source, h5py)
        window = crop_window(h, w, h if crop_to is None else crop_to, source, key=diffraction)
        n = window.stop - window.start
        mask = None
        if bad_pixels is not None:
            mask = _bad_pixel_mask(h5, bad_pixels, (h, w), window, source, h5py)
            notes.append(f"{int(mask.sum())} bad pixels set to 0")
        amplitudes, verdict, warnings = _read_frames(ds, None, window, kind, chunk, mask,
                                                     source, diffraction)
        xs = _vector(h5, x, m, source, h5py)
        ys = _vector(h5, y, m, source, h5py)
        if probe is None:
            probe_arr = np.ones((n, n), dtype=np.complex64)
            notes.append("no probe dataset given: uniform probe (flat stitching weights)")
        else:
            ds_probe = _dataset(h5, probe, source, h5py)
            if ds_probe.dtype.kind not in "iufc":
                raise _fail(source, probe, f"has dtype {ds_probe.dtype}; expected a complex "
                                           "probe")
            probe_arr = _probe_for(_single_mode(_read(ds_probe, (), source, probe), source,
                                                probe), n, h, source, probe, notes)
    positions_m = None
    if units == "m":
        frame = scan_frame(xs, ys, pixel_m, n=n, origin=origin)
        pos = positions_m_to_px(xs, ys, pixel_m, n=n, origin=origin, frame=frame)
        positions_m = (xs, ys)
    else:
        off = origin_offset_px(origin, n)
        pos = np.stack([ys + off, xs + off], axis=1)
        frame = None if pixel_m is None else pixel_frame_px(pixel_m)
    scan = validate_scan(amplitudes, probe_arr, pos[:, 1], pos[:, 0], source=source)
    crop = None if n == h else (window.start, n)
    return HDF5Scan(scan=scan, kind=kind, looks_like=verdict, frame=frame,
                    positions_m=positions_m, origin=origin, units=units, frame_shape=(h, w),
                    crop=crop, chunk=chunk, warnings=warnings, notes=notes)


def read_scan_hdf5(path: str | os.PathLike[str], *, kind: str,
                   diffraction: str = DEFAULT_DIFFRACTION, x: str, y: str,
                   probe: str | None = None, bad_pixels: str | None = None,
                   units: str = "px", pixel_m: Any = None, origin: str = "centre",
                   crop_to: int | None = None, chunk: int = DEFAULT_CHUNK) -> ScanData:
    """Read a scan from HDF5, chunk by chunk, into a validated :class:`ScanData`.

    Args:
        path: the HDF5 file.
        kind: ``"counts"`` (frames are photon counts: amplitudes = sqrt) or
            ``"amplitude"`` (already sqrt(counts)); no default on purpose.
        diffraction: dataset path of the (M, H, W) frames (any integer or float dtype).
        x, y: dataset paths of the (M,) scan positions (column, row direction).
        probe: dataset path of the complex probe, (N, N) or (H, H) (then resampled with
            the crop, :func:`resample_probe`); leading singleton mode axes are dropped.
            ``None``: a uniform probe (flat stitching weights).
        bad_pixels: dataset path of an (H, W) mask (True = bad); those pixels become 0.
        units: ``"px"`` (object pixels, the file's own frame) or ``"m"`` (metres; needs
            ``pixel_m``; the frame puts the lowest patch corner at pixel 0).
        pixel_m: object pixel size in metres **for the cropped N** (one value or
            (height, width)); see ``runtime.geometry.object_pixel_size_m``.
        origin: convention of the file's positions: ``"centre"`` (N/2, ours and
            ptychodus's), ``"corner"`` (top-left pixel) or ``"centre-half"`` ((N-1)/2).
        crop_to: centre-crop the frames to this N (DC kept at N//2); ``None``: no crop
            (frames must then be square).
        chunk: frames read and converted per step (bounds the temporary memory).

    Raises:
        DataError: naming the file and dataset path: missing path, group instead of
            dataset, wrong rank, non-square or too-small frames, negative / non-finite
            values, position count mismatch, probe shape mismatch.
    """
    return load_scan_hdf5(path, kind=kind, diffraction=diffraction, x=x, y=y, probe=probe,
                          bad_pixels=bad_pixels, units=units, pixel_m=pixel_m, origin=origin,
                          crop_to=crop_to, chunk=chunk).scan


def load_ptychodus_inputs(diffraction: str | os.PathLike[str],
                          product: str | os.PathLike[str], *, kind: str = "counts",
                          crop_to: int | None = None, chunk: int = DEFAULT_CHUNK) -> HDF5Scan:
    """Read ptychodus's batch input: assembled ``diffraction.h5`` + a product file.

    ``diffraction``: ptychodus's assembled file (``patterns`` (P, H, W) in the detector's
    native dtype, i.e. raw counts after ptychodus's crop/bin; ``indexes`` (P,);
    ``bad_pixels`` (H, W), optional). ``product``: the input product (``input/product.h5``
    in ptychodus 1.7, ``product-in.h5`` before; ``.npz`` too) with positions (metres,
    patch centres), probe, pixel size and metadata.

    Frames are matched to positions by index (exact matches only; ptychodus 1.7 also
    interpolates positions for unmatched indexes and averages duplicates, which is
    refused here). The object pixel is the product's probe pixel, scaled by H/N when the
    patterns are cropped further to the model's N; the probe is resampled likewise.
    Bad pixels are set to 0 (ptychodus 1.7 inpaints them for its PtychoPINN backend).
    """
    chunk = _check_options(kind, chunk)
    prod = read_product(product)
    psource = os.fspath(product)
    source = os.fspath(diffraction)
    h5py = _h5py()
    notes: list[str] = []
    pos_idx = prod.indexes
    if len(np.unique(pos_idx)) != len(pos_idx):
        raise DataError(f"{psource}: 'probe_position_indexes' has duplicates; average them "
                        "in ptychodus first")
    with _open(source, h5py) as h5:
        ds, m, h, w = _frames_dataset(h5, PTYCHODUS_PATTERNS, source, h5py)
        idx_ds = _dataset(h5, PTYCHODUS_INDEXES, source, h5py)
        pat_idx = _vector(h5, PTYCHODUS_INDEXES, m, source, h5py, "indexes")
        if idx_ds.dtype.kind not in "iu" and np.any(pat_idx != np.rint(pat_idx)):
            raise _fail(source, PTYCHODUS_INDEXES, "holds non-integer values")
        pat_idx = pat_idx.astype(np.int64)
        if len(np.unique(pat_idx)) != m:
            raise _fail(source, PTYCHODUS_INDEXES, "has duplicates")
        rows = np.flatnonzero(np.isin(pat_idx, pos_idx))  # increasing file rows
        if len(rows) == 0:
            raise DataError(f"{source}: no pattern index matches a position index of "
                            f"{psource} (patterns {pat_idx.min()}..{pat_idx.max()}, "
                            f"positions {pos_idx.min()}..{pos_idx.max()})")
        if len(rows) < m or len(rows) < len(pos_idx):
            notes.append(f"{len(rows)} frames matched by index ({m} patterns, "
                         f"{len(pos_idx)} positions)")
        window = crop_window(h, w, h if crop_to is None else crop_to, source,
                             key=PTYCHODUS_PATTERNS)
        n = window.stop - window.start
        mask = None
        if PTYCHODUS_BAD_PIXELS in h5:
            mask = _bad_pixel_mask(h5, PTYCHODUS_BAD_PIXELS, (h, w), window, source, h5py)
            notes.append(f"{int(mask.sum())} bad pixels set to 0")
        selection = None if len(rows) == m else rows
        amplitudes, verdict, warnings = _read_frames(ds, selection, window, kind, chunk,
                                                     mask, source, PTYCHODUS_PATTERNS)
    indexes = pat_idx[rows]
    order = {int(i): k for k, i in enumerate(pos_idx.tolist())}
    take = np.array([order[int(i)] for i in indexes.tolist()], dtype=np.int64)
    xs, ys = prod.positions_x_m[take], prod.positions_y_m[take]
    ph, pw = prod.probe_pixel_m
    if prod.probe_mode0.shape != (h, w):
        raise DataError(f"{psource}: probe is {prod.probe_mode0.shape[0]}x"
                        f"{prod.probe_mode0.shape[1]} but {source} has {h}x{w} patterns")
    pixel = (ph * h / n, pw * h / n)
    probe_arr = _probe_for(np.asarray(prod.probe_mode0), n, h, psource, "probe", notes)
    frame = scan_frame(xs, ys, pixel, n=n, origin="centre")
    pos = positions_m_to_px(xs, ys, pixel, n=n, origin="centre", frame=frame)
    scan = validate_scan(amplitudes, probe_arr, pos[:, 1], pos[:, 0], source=source)
    return HDF5Scan(scan=scan, kind=kind, looks_like=verdict, frame=frame,
                    positions_m=(xs, ys), origin="centre", units="m", frame_shape=(h, w),
                    crop=None if n == h else (window.start, n), chunk=chunk,
                    warnings=warnings, notes=notes, indexes=indexes, product_in=prod)
