"""What `ptycho-run` reads (npz, HDF5, a ptychodus batch folder) and the ptychodus product
it can write: the glue between the readers and `run_scan`, kept out of the run loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.detector import frames_to_amplitudes, kind_warning
from runtime.errors import DataError, PtychoError
from runtime.geometry import (
    ORIGINS,
    ObjectGeometry,
    object_pixel_size_m,
    pixel_frame_px,
    positions_px_to_m,
    to_centre_px,
)
from runtime.scan import ScanData, validate_scan
from runtime.scan_stream import open_scan

HDF5_SUFFIXES = (".h5", ".hdf5", ".nxs", ".cxi")
DATA_KINDS = ("counts", "amplitude")


class InputUsageError(PtychoError):
    exit_code = 2


@dataclass(frozen=True)
class InputOptions:
    data_kind: str | None = None  # None: amplitude for npz, counts for a ptychodus folder
    hdf5_diffraction: str = "/entry/data/data"
    hdf5_x: str | None = None
    hdf5_y: str | None = None
    hdf5_probe: str | None = None
    hdf5_bad_pixels: str | None = None
    position_units: str = "px"
    origin_convention: str = "centre"
    pixel_size_m: float | None = None
    energy_ev: float | None = None
    distance_m: float | None = None
    detector_pixel_m: float | None = None
    ptychodus_product: Path | None = None

    def object_pixel_m(self, n: int) -> float | None:
        """Given directly, or λz / (N · detector pixel) from energy, distance and pixel."""
        if self.pixel_size_m is not None:
            return self.pixel_size_m
        if None not in (self.energy_ev, self.distance_m, self.detector_pixel_m):
            size = object_pixel_size_m(energy_eV=self.energy_ev, distance_m=self.distance_m,
                                       n=n, detector_pixel_m=self.detector_pixel_m)
            return float(np.mean(size)) if np.ndim(size) else float(size)
        return None


@dataclass
class LoadedInput:
    scan: ScanData
    kind: str
    warnings: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    frame: Any = None  # runtime.geometry.PixelFrame when positions can be given in metres
    indexes: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _check(options: InputOptions) -> None:
    if options.data_kind is not None and options.data_kind not in DATA_KINDS:
        raise InputUsageError(f"--data-kind {options.data_kind!r}: choose counts or amplitude")
    if options.origin_convention not in ORIGINS:
        raise InputUsageError(f"--origin-convention {options.origin_convention!r}: choose "
                              f"one of {', '.join(ORIGINS)}")
    if options.position_units not in ("px", "m"):
        raise InputUsageError(f"--position-units {options.position_units!r}: px or m")


def _npz_counts(path: Path) -> ScanData:
    """An npz whose `diffraction` holds counts: converted to float before the sqrt."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            key = "diffraction" if "diffraction" in npz.files else "diff3d"
            if key not in npz.files:
                raise DataError(f"{path}: key 'diffraction' is missing (keys present: "
                                f"{', '.join(npz.files) or 'none'})")
            frames = frames_to_amplitudes(npz[key], "counts", str(path))
            extra = {k: npz[k] for k in ("objectGuess", "scan_index") if k in npz.files}
            return validate_scan(frames, npz["probeGuess"], npz["xcoords"], npz["ycoords"],
                                 extra.get("objectGuess"), extra.get("scan_index"),
                                 source=str(path))
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{path}: cannot read as a counts npz ({err})") from None


def open_input(data_path: Path, options: InputOptions, patch_size: int) -> LoadedInput:
    """Read the scan in whichever form it came, to the float32 amplitudes the graph takes."""
    from runtime.hdf5_io import load_ptychodus_inputs, load_scan_hdf5

    _check(options)
    if data_path.is_dir():
        product_in = next((data_path / name for name in ("product.h5", "product-in.h5",
                                                         "product-in.npz")
                           if (data_path / name).is_file()), None)
        if product_in is None or not (data_path / "diffraction.h5").is_file():
            raise DataError(f"{data_path}: a ptychodus input folder needs diffraction.h5 and "
                            "product.h5 (or product-in.h5)")
        loaded = load_ptychodus_inputs(data_path / "diffraction.h5", product_in,
                                       kind=options.data_kind or "counts", crop_to=patch_size)
        return LoadedInput(loaded.scan, loaded.kind, list(loaded.warnings), loaded.report(),
                           loaded.frame, loaded.indexes,
                           dict(getattr(loaded.product_in, "metadata", {}) or {}))
    if data_path.suffix.lower() in HDF5_SUFFIXES:
        if options.data_kind is None:
            raise InputUsageError(f"{data_path}: say what the HDF5 frames hold with "
                                  "--data-kind counts|amplitude")
        if options.hdf5_x is None or options.hdf5_y is None:
            raise InputUsageError(f"{data_path}: give the position datasets with --hdf5-x "
                                  "and --hdf5-y")
        loaded = load_scan_hdf5(data_path, kind=options.data_kind,
                                diffraction=options.hdf5_diffraction, x=options.hdf5_x,
                                y=options.hdf5_y, probe=options.hdf5_probe,
                                bad_pixels=options.hdf5_bad_pixels,
                                units=options.position_units,
                                pixel_m=options.object_pixel_m(patch_size),
                                origin=options.origin_convention, crop_to=patch_size)
        return LoadedInput(loaded.scan, loaded.kind, list(loaded.warnings), loaded.report(),
                           loaded.frame)
    kind = options.data_kind or "amplitude"
    scan = _npz_counts(data_path) if kind == "counts" else open_scan(data_path)
    if options.origin_convention != "centre":
        scan = dataclasses.replace(scan, positions_px=to_centre_px(
            scan.positions_px, options.origin_convention, scan.patch_size))
    warnings = []
    warning = kind_warning(scan.amplitudes[: min(8, scan.n_patterns)], kind, str(data_path))
    if warning and kind == "amplitude":
        warnings.append(warning)
    pixel = options.object_pixel_m(patch_size)
    return LoadedInput(scan, kind, warnings,
                       {"format": "npz", "data_kind": kind,
                        "origin_convention": options.origin_convention,
                        "pixel_size_m": pixel},
                       pixel_frame_px(pixel) if pixel is not None else None)


def check_product_options(options: InputOptions, loaded: LoadedInput) -> None:
    """Before any work: a product needs the pixel size (metres) and the beam metadata."""
    if options.ptychodus_product is None:
        return
    from runtime.ptychodus_product import product_format

    product_format(options.ptychodus_product)
    if loaded.frame is None:
        raise InputUsageError("--ptychodus-product needs the object pixel size: give "
                              "--pixel-size-m, or --energy-ev, --distance-m and "
                              "--detector-pixel-m")
    if not loaded.metadata and None in (options.energy_ev, options.distance_m):
        raise InputUsageError("--ptychodus-product needs --energy-ev and --distance-m "
                              "(ptychodus stores them with the product)")


def write_ptychodus_product(options: InputOptions, loaded: LoadedInput, stitched: Any,
                            data_path: Path, model_sha256: str) -> Path | None:
    if options.ptychodus_product is None:
        return None
    from runtime.ptychodus_product import write_product

    frame = loaded.frame
    scan = loaded.scan
    geometry = ObjectGeometry.from_stitched(stitched.origin_px, stitched.obj.shape, frame)
    x_m, y_m = positions_px_to_m(scan.positions_px, frame, n=scan.patch_size)
    metadata = loaded.metadata or {"detector_object_distance_m": options.distance_m,
                                   "probe_energy_eV": options.energy_ev}
    return write_product(
        options.ptychodus_product, obj=stitched.obj, object_geometry=geometry,
        probe=scan.probe, probe_pixel_m=(frame.pixel_height_m, frame.pixel_width_m),
        positions_x_m=x_m, positions_y_m=y_m, indexes=loaded.indexes,
        name=Path(data_path).stem,
        comments=f"ptycho-run model sha256 {model_sha256[:12]}, data kind {loaded.kind}",
        metadata=metadata)
