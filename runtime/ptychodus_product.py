"""Write a reconstruction as a ptychodus product (``.h5`` or ``.npz``), no ptychodus needed.

Layout (ptychodus ``plugins/h5_product_file.py`` / ``npz_product_file.py``, and
``api/io.py save_product`` in newer versions; docs/ptychodus.md):

HDF5 (``*.h5``, ``*.hdf5``)
    root attributes ``name``, ``comments`` (str), ``detector_object_distance_m``,
    ``probe_energy_eV`` and ``photon_energy_eV``, ``probe_photon_count``,
    ``exposure_time_s``, ``mass_attenuation_m2_kg`` and ``mass_attenuation_m2_per_kg``,
    ``tomography_angle_deg`` (float64; both spellings of the two fields ptychodus 1.7
    renamed, so every reader version finds its name);
    datasets ``probe_position_indexes`` (M,) int64, ``probe_position_x_m``,
    ``probe_position_y_m`` (M,) float64; ``probe`` (1, N, N) complex with attributes
    ``pixel_width_m``, ``pixel_height_m``; ``object`` (1, H, W) complex with attributes
    ``center_x_m``, ``center_y_m``, ``pixel_width_m``, ``pixel_height_m``;
    ``object_layer_spacing_m`` (0,) float64; ``loss_epochs`` (K,) int64, ``loss_values``
    (K,) float64.
NPZ (``*.npz``, ``np.savez``, uncompressed, no pickled objects)
    the same values under flat keys: the root attributes as 0-d arrays, then
    ``probe_position_indexes``, ``probe_position_x_m``, ``probe_position_y_m``, ``probe``,
    ``probe_pixel_width_m``, ``probe_pixel_height_m``, ``object``, ``object_center_x_m``,
    ``object_center_y_m``, ``object_pixel_width_m``, ``object_pixel_height_m``,
    ``object_layer_spacing_m``, ``loss_epochs``, ``loss_values``.

Shapes: ptychodus's readers promote a 2-D object to (1, H, W) and need
``len(object_layer_spacing_m) == layers - 1``, so we store the object as one layer
(1, H, W) with an empty spacing, exactly what ptychodus itself writes. The probe is stored
(1, N, N) (one incoherent mode): the current ``ProbeSequence`` reader accepts 2-, 3- and
4-D arrays, and older readers (``Probe``: 2- or 3-D only) reject the 4-D form ptychodus
now writes, so 3-D is the shape every version reads. Both must be complex
(``Object.__init__`` raises ``TypeError`` otherwise); real input is promoted to complex64.

Positions are ptychodus's: metres of the patch **centre**, mapped onto the object by
``x_px = (x_m - center_x_m) / pixel_width_m + W/2`` (``runtime.geometry``).

Writes are atomic (temporary file in the target folder, fsync, ``os.replace``), then the
file is "announced": ptychodus's folder watcher reacts only to *created* and *modified*
events, and a rename inside the watched tree is a *moved* event it ignores; truncating
the finished file to its own size yields a *modified* event on the final name
(:func:`_announce`, docs/ptychodus.md).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.atomic import write_atomic, written_atomic
from runtime.errors import DataError, EnvironmentProblem
from runtime.geometry import ObjectGeometry

__all__ = ["H5_SUFFIXES", "METADATA_KEYS", "NPZ_SUFFIXES", "REQUIRED_METADATA",
           "ProductData", "product_format", "read_product", "write_product"]

H5_SUFFIXES = (".h5", ".hdf5")
NPZ_SUFFIXES = (".npz",)
REQUIRED_METADATA = ("detector_object_distance_m", "probe_energy_eV")
# Optional metadata and the value ptychodus itself assumes when a file lacks it.
OPTIONAL_METADATA = {"probe_photon_count": 0.0, "exposure_time_s": 0.0,
                     "mass_attenuation_m2_kg": 0.0, "tomography_angle_deg": 0.0}
METADATA_KEYS = REQUIRED_METADATA + tuple(OPTIONAL_METADATA)
# ptychodus 1.7 renamed two fields (its H5 reader still accepts the old energy name, its
# NPZ reader does not; older readers know only the old names). Both spellings are
# written; either is accepted as input.
RENAMED = {"probe_energy_eV": "photon_energy_eV",
           "mass_attenuation_m2_kg": "mass_attenuation_m2_per_kg"}


def product_format(path: str | os.PathLike[str]) -> str:
    """``"h5"`` or ``"npz"`` from the file name; DataError for anything else."""
    suffix = Path(os.fspath(path)).suffix.lower()
    if suffix in H5_SUFFIXES:
        return "h5"
    if suffix in NPZ_SUFFIXES:
        return "npz"
    raise DataError(f"{os.fspath(path)}: a ptychodus product must be named *.h5, *.hdf5 "
                    "or *.npz")


def _finite(value: Any, name: str, *, positive: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise DataError(f"product {name} must be a number, got {value!r}") from err
    if not math.isfinite(v) or (positive and v <= 0):
        raise DataError(f"product {name} must be a finite number{' > 0' if positive else ''}"
                        f", got {value!r}")
    return v


def _pixel_pair(pixel_m: Any, name: str) -> tuple[float, float]:
    """(height_m, width_m) from one size or a (height, width) pair."""
    if np.ndim(pixel_m) == 1:
        if len(pixel_m) != 2:
            raise DataError(f"product {name} must be one size or (height, width)")
        return (_finite(pixel_m[0], f"{name} height", positive=True),
                _finite(pixel_m[1], f"{name} width", positive=True))
    v = _finite(pixel_m, name, positive=True)
    return v, v


def _complex_array(value: Any, name: str, ndim: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "iufc":
        raise DataError(f"product {name} has dtype {arr.dtype}; expected complex values")
    if arr.ndim not in ndim:
        raise DataError(f"product {name} has shape {arr.shape}; expected "
                        f"{' or '.join(f'{d}-D' for d in ndim)}")
    if arr.size == 0:
        raise DataError(f"product {name} is empty (shape {arr.shape})")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"product {name} has NaN/Inf values")
    if arr.dtype.kind != "c":
        arr = arr.astype(np.complex64)
    return np.ascontiguousarray(arr)


def _vector(value: Any, name: str, m: int | None, dtype: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise DataError(f"product {name} must be 1-D, got shape {arr.shape}")
    if m is not None and arr.shape[0] != m:
        raise DataError(f"product {name} has {arr.shape[0]} entries, expected {m}")
    if arr.dtype.kind not in "iuf":
        raise DataError(f"product {name} has dtype {arr.dtype}; expected real numbers")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"product {name} has NaN/Inf values")
    if np.dtype(dtype).kind == "i" and arr.dtype.kind == "f" and np.any(arr != np.rint(arr)):
        raise DataError(f"product {name} must hold whole numbers")
    return np.ascontiguousarray(arr, dtype=dtype)


def _metadata(metadata: Mapping[str, Any]) -> dict[str, float]:
    """The metadata under every name some ptychodus version reads (both spellings)."""
    unknown = sorted(set(metadata) - set(METADATA_KEYS) - set(RENAMED.values()))
    if unknown:
        raise DataError(f"product metadata has unknown keys {', '.join(unknown)}; known: "
                        f"{', '.join(METADATA_KEYS)}")
    metadata = dict(metadata)
    for old, new in RENAMED.items():
        if metadata.get(new) is not None:
            if metadata.get(old) is not None and float(metadata[old]) != float(metadata[new]):
                raise DataError(f"product metadata gives {old} and {new} different values")
            metadata[old] = metadata.pop(new)
    missing = [k for k in REQUIRED_METADATA if metadata.get(k) is None]
    if missing:
        raise DataError(f"product metadata needs {', '.join(missing)} (ptychodus cannot "
                        "read a product without them)")
    out = {k: _finite(metadata[k], k, positive=True) for k in REQUIRED_METADATA}
    for key, default in OPTIONAL_METADATA.items():
        value = metadata.get(key)
        out[key] = default if value is None else _finite(value, key)
    for old, new in RENAMED.items():
        out[new] = out[old]
    return out


def _contents(*, obj: Any, object_geometry: ObjectGeometry, probe: Any, probe_pixel_m: Any,
              positions_x_m: Any, positions_y_m: Any, indexes: Any, name: str, comments: str,
              metadata: Mapping[str, Any], loss_epochs: Any, loss_values: Any
              ) -> dict[str, Any]:
    """Checked values of every field, keyed by their HDF5 names."""
    if not isinstance(object_geometry, ObjectGeometry):
        raise DataError("product object_geometry must be a runtime.geometry.ObjectGeometry")
    obj_arr = _complex_array(obj, "object", (2, 3))
    if obj_arr.ndim == 3 and obj_arr.shape[0] != 1:
        raise DataError(f"product object has {obj_arr.shape[0]} layers; only single-layer "
                        "objects are written")
    probe_arr = _complex_array(probe, "probe", (2, 3))
    x = _vector(positions_x_m, "positions_x_m", None, np.float64)
    m = x.shape[0]
    y = _vector(positions_y_m, "positions_y_m", m, np.float64)
    idx = (np.arange(m, dtype=np.int64) if indexes is None
           else _vector(indexes, "indexes", m, np.int64))
    if len(np.unique(idx)) != m:
        raise DataError("product indexes must be unique (ptychodus matches them to the "
                        "diffraction pattern indexes)")
    if (loss_epochs is None) != (loss_values is None):
        raise DataError("give both loss_epochs and loss_values, or neither")
    epochs = (np.zeros(0, np.int64) if loss_epochs is None
              else _vector(loss_epochs, "loss_epochs", None, np.int64))
    values = (np.zeros(0, np.float64) if loss_values is None
              else _vector(loss_values, "loss_values", epochs.shape[0], np.float64))
    ph, pw = _pixel_pair(probe_pixel_m, "probe_pixel_m")
    return {
        "name": str(name), "comments": str(comments), "metadata": _metadata(metadata),
        "indexes": idx, "x": x, "y": y,
        "probe": probe_arr.reshape((1, *probe_arr.shape[-2:])) if probe_arr.ndim == 2
        else probe_arr,
        "probe_pixel": (ph, pw),
        "object": obj_arr.reshape((1, *obj_arr.shape[-2:])),
        "geometry": object_geometry,
        "epochs": epochs, "values": values,
    }


def _write_h5(fh_path: Path, c: dict[str, Any]) -> None:
    try:
        import h5py
    except ImportError as err:  # pragma: no cover - h5py is a base dependency
        raise EnvironmentProblem("writing an .h5 product needs h5py: pip install h5py") \
            from err
    with h5py.File(fh_path, "w") as h5:
        h5.attrs["name"] = c["name"]
        h5.attrs["comments"] = c["comments"]
        for key, value in c["metadata"].items():
            h5.attrs[key] = np.float64(value)
        h5.create_dataset("probe_position_indexes", data=c["indexes"])
        h5.create_dataset("probe_position_x_m", data=c["x"])
        h5.create_dataset("probe_position_y_m", data=c["y"])
        probe = h5.create_dataset("probe", data=c["probe"])
        probe.attrs["pixel_width_m"] = np.float64(c["probe_pixel"][1])
        probe.attrs["pixel_height_m"] = np.float64(c["probe_pixel"][0])
        geometry: ObjectGeometry = c["geometry"]
        obj = h5.create_dataset("object", data=c["object"])
        obj.attrs["center_x_m"] = np.float64(geometry.center_x_m)
        obj.attrs["center_y_m"] = np.float64(geometry.center_y_m)
        obj.attrs["pixel_width_m"] = np.float64(geometry.pixel_width_m)
        obj.attrs["pixel_height_m"] = np.float64(geometry.pixel_height_m)
        h5.create_dataset("object_layer_spacing_m", data=np.zeros(0, np.float64))
        h5.create_dataset("loss_epochs", data=c["epochs"])
        h5.create_dataset("loss_values", data=c["values"])


def _npz_arrays(c: dict[str, Any]) -> dict[str, np.ndarray]:
    geometry: ObjectGeometry = c["geometry"]
    arrays: dict[str, np.ndarray] = {"name": np.asarray(c["name"], dtype=np.str_),
                                     "comments": np.asarray(c["comments"], dtype=np.str_)}
    arrays.update({k: np.float64(v) for k, v in c["metadata"].items()})
    arrays.update({
        "probe_position_indexes": c["indexes"],
        "probe_position_x_m": c["x"],
        "probe_position_y_m": c["y"],
        "probe": c["probe"],
        "probe_pixel_width_m": np.float64(c["probe_pixel"][1]),
        "probe_pixel_height_m": np.float64(c["probe_pixel"][0]),
        "object": c["object"],
        "object_center_x_m": np.float64(geometry.center_x_m),
        "object_center_y_m": np.float64(geometry.center_y_m),
        "object_pixel_width_m": np.float64(geometry.pixel_width_m),
        "object_pixel_height_m": np.float64(geometry.pixel_height_m),
        "object_layer_spacing_m": np.zeros(0, np.float64),
        "loss_epochs": c["epochs"],
        "loss_values": c["values"],
    })
    return {k: np.asarray(v) for k, v in arrays.items()}


def write_product(path: str | os.PathLike[str], *, obj: Any, object_geometry: ObjectGeometry,
                  probe: Any, probe_pixel_m: Any, positions_x_m: Any, positions_y_m: Any,
                  indexes: Any = None, name: str = "", comments: str = "",
                  metadata: Mapping[str, Any], loss_epochs: Any = None,
                  loss_values: Any = None, touch: bool = True) -> Path:
    """Write a ptychodus product to ``path`` (format from the suffix), atomically.

    Args:
        obj: (H, W) complex object (or (1, H, W)); real input is promoted to complex64.
        object_geometry: pixel size and centre in metres
            (``runtime.geometry.ObjectGeometry.from_stitched``).
        probe: (N, N) complex probe (or (modes, N, N)).
        probe_pixel_m: probe pixel size, one value or (height, width) (= object pixel).
        positions_x_m, positions_y_m: (M,) patch centres in metres (ptychodus convention).
        indexes: (M,) unique ints matched to the diffraction pattern indexes by ptychodus;
            default 0..M-1 (the order of the frames).
        name, comments: free text.
        metadata: ``detector_object_distance_m`` and ``probe_energy_eV`` (required);
            ``probe_photon_count``, ``exposure_time_s``, ``mass_attenuation_m2_kg``,
            ``tomography_angle_deg`` (optional, 0 when absent, as ptychodus assumes).
        loss_epochs, loss_values: optional training curve (ptychodus shows it).
        touch: announce the finished file to a folder watcher (a same-size truncate after
            the rename, so a watching ptychodus sees a *modified* event on the final name).

    Returns the path written. Raises DataError on invalid fields or when the file cannot
    be written (any previous file at ``path`` is left intact then).
    """
    target = Path(os.fspath(path))
    fmt = product_format(target)
    c = _contents(obj=obj, object_geometry=object_geometry, probe=probe,
                  probe_pixel_m=probe_pixel_m, positions_x_m=positions_x_m,
                  positions_y_m=positions_y_m, indexes=indexes, name=name, comments=comments,
                  metadata=metadata, loss_epochs=loss_epochs, loss_values=loss_values)
    # The temporary name never matches a watcher's pattern (product-out.h5, *.h5, ...).
    try:
        if fmt == "h5":
            with written_atomic(target, durable=True, make_parents=False) as tmp:
                _write_h5(tmp, c)
        else:
            with write_atomic(target, durable=True, make_parents=False) as fh:
                np.savez(fh, **_npz_arrays(c))
    except OSError as err:
        raise DataError(f"{target}: cannot write ptychodus product "
                        f"({err.strerror or err})") from err
    if touch:
        _announce(target)
    return target


def _announce(target: Path) -> None:
    """Make a folder watcher see a *modified* event on ``target`` itself.

    The rename above reaches inotify as a move (``.tmp`` -> name), which ptychodus's
    handler ignores, and watchdog (>= 5) reports a timestamp change (``os.utime``) as an
    ``attrib`` event, which it ignores too. Truncating the file to its own size changes no
    byte but is reported as ``IN_MODIFY``, i.e. watchdog's ``modified`` event, which
    ptychodus handles (checked against ptychodus 1.7.0 + watchdog 7.1.0).
    """
    with contextlib.suppress(OSError):  # best effort: the product itself is complete
        os.truncate(target, os.stat(target).st_size)


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True, eq=False)
class ProductData:
    """What a ptychodus product holds, as read by :func:`read_product`."""

    name: str
    comments: str
    metadata: dict[str, float]  # METADATA_KEYS (old spellings), defaults filled in
    indexes: np.ndarray  # (M,) int64
    positions_x_m: np.ndarray  # (M,) float64, patch centres
    positions_y_m: np.ndarray
    probe: np.ndarray  # complex, as stored (2-, 3- or 4-D)
    probe_pixel_m: tuple[float, float]  # (height, width)
    object: np.ndarray  # complex, as stored (2- or 3-D)
    object_geometry: ObjectGeometry
    loss_epochs: np.ndarray
    loss_values: np.ndarray

    @property
    def probe_mode0(self) -> np.ndarray:
        """The first coherent, first incoherent probe mode (N, N) (``get_probe_no_opr``)."""
        return self.probe.reshape((-1, *self.probe.shape[-2:]))[0]


def _scalar(get: Any, keys: tuple[str, ...], source: str, default: float | None) -> float:
    for key in keys:
        value = get(key)
        if value is not None:
            try:
                return float(np.asarray(value))
            except (TypeError, ValueError) as err:
                raise DataError(f"{source}: '{key}' is not a number") from err
    if default is None:
        raise DataError(f"{source}: '{keys[0]}' is missing; it is not a ptychodus product")
    return default


def read_product(path: str | os.PathLike[str]) -> ProductData:
    """Read a ptychodus product (``.h5``/``.hdf5`` or ``.npz``), any version's spelling.

    Tolerant like ptychodus's readers: optional metadata default to 0, the renamed fields
    are found under either name, probe pixel sizes fall back to the object's, losses to
    ``costs`` or nothing. Used to take positions, probe and metadata from ptychodus's
    batch input (``input/product.h5`` or ``product-in.h5``).
    """
    source = os.fspath(path)
    fmt = product_format(source)
    if not os.path.exists(source):
        raise DataError(f"{source}: file not found")
    try:
        if fmt == "h5":
            return _read_h5_product(source)
        with np.load(source, allow_pickle=False) as npz:
            return _read_npz_product(npz, source)
    except (OSError, ValueError, KeyError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{source}: not a readable ptychodus product "
                        f"({type(err).__name__}: {' '.join(str(err).split())})") from err


def _metadata_from(get: Any, source: str) -> dict[str, float]:
    meta = {
        "detector_object_distance_m": _scalar(get, ("detector_object_distance_m",), source,
                                              None),
        "probe_energy_eV": _scalar(get, ("photon_energy_eV", "probe_energy_eV"), source, None),
        "probe_photon_count": _scalar(get, ("probe_photon_count",), source, 0.0),
        "exposure_time_s": _scalar(get, ("exposure_time_s",), source, 0.0),
        "mass_attenuation_m2_kg": _scalar(get, ("mass_attenuation_m2_per_kg",
                                                "mass_attenuation_m2_kg"), source, 0.0),
        "tomography_angle_deg": _scalar(get, ("tomography_angle_deg",), source, 0.0),
    }
    return meta


def _text(value: Any, default: str) -> str:
    if value is None:
        return default
    value = value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _assemble(source: str, get: Any, arrays: dict[str, Any], probe_px: tuple[Any, Any],
              obj_attrs: dict[str, Any]) -> ProductData:
    def need(key: str) -> Any:
        if arrays.get(key) is None:
            raise DataError(f"{source}: '{key}' is missing; it is not a ptychodus product")
        return arrays[key]

    obj = np.asarray(need("object"))
    probe = np.asarray(need("probe"))
    if not np.iscomplexobj(obj) or obj.ndim not in (2, 3):
        raise DataError(f"{source}: 'object' must be complex (H, W) or (L, H, W), got "
                        f"{obj.dtype} {obj.shape}")
    if not np.iscomplexobj(probe) or probe.ndim not in (2, 3, 4):
        raise DataError(f"{source}: 'probe' must be complex with 2 to 4 dims, got "
                        f"{probe.dtype} {probe.shape}")
    geometry = ObjectGeometry(
        pixel_width_m=_scalar(obj_attrs.get, ("pixel_width_m",), source, None),
        pixel_height_m=_scalar(obj_attrs.get, ("pixel_height_m",), source, None),
        center_x_m=_scalar(obj_attrs.get, ("center_x_m",), source, None),
        center_y_m=_scalar(obj_attrs.get, ("center_y_m",), source, None))
    ph = geometry.pixel_height_m if probe_px[0] is None else float(np.asarray(probe_px[0]))
    pw = geometry.pixel_width_m if probe_px[1] is None else float(np.asarray(probe_px[1]))
    x = _vector(need("probe_position_x_m"), "probe_position_x_m", None, np.float64)
    y = _vector(need("probe_position_y_m"), "probe_position_y_m", x.shape[0], np.float64)
    idx = _vector(need("probe_position_indexes"), "probe_position_indexes", x.shape[0],
                  np.int64)
    values = arrays.get("loss_values")
    if values is None:
        values = arrays.get("costs")
    values = np.zeros(0) if values is None else np.asarray(values, dtype=np.float64).ravel()
    epochs = arrays.get("loss_epochs")
    epochs = (np.arange(len(values)) if epochs is None
              else np.asarray(epochs).astype(np.int64).ravel())
    return ProductData(
        name=_text(get("name"), "Unnamed"), comments=_text(get("comments"), ""),
        metadata=_metadata_from(get, source), indexes=idx, positions_x_m=x,
        positions_y_m=y, probe=probe, probe_pixel_m=(ph, pw), object=obj,
        object_geometry=geometry, loss_epochs=epochs, loss_values=values)


def _read_h5_product(source: str) -> ProductData:
    try:
        import h5py
    except ImportError as err:  # pragma: no cover - h5py is a base dependency
        raise EnvironmentProblem("reading an .h5 product needs h5py: pip install h5py") \
            from err
    with h5py.File(source, "r") as h5:
        def dataset(key: str) -> Any:
            obj = h5.get(key)
            return obj[()] if isinstance(obj, h5py.Dataset) else None

        keys = ("object", "probe", "probe_position_x_m", "probe_position_y_m",
                "probe_position_indexes", "loss_values", "costs", "loss_epochs")
        arrays = {k: dataset(k) for k in keys}
        probe = h5.get("probe")
        obj = h5.get("object")
        probe_px = ((probe.attrs.get("pixel_height_m"), probe.attrs.get("pixel_width_m"))
                    if probe is not None else (None, None))
        obj_attrs = dict(obj.attrs) if obj is not None else {}
        attrs = dict(h5.attrs)
    return _assemble(source, attrs.get, arrays, probe_px, obj_attrs)


def _read_npz_product(npz: Any, source: str) -> ProductData:
    files = set(npz.files)

    def get(key: str) -> Any:
        return npz[key] if key in files else None

    keys = ("object", "probe", "probe_position_x_m", "probe_position_y_m",
            "probe_position_indexes", "loss_values", "costs", "loss_epochs")
    arrays = {k: get(k) for k in keys}
    obj_attrs = {k: get(f"object_{k}") for k in ("pixel_width_m", "pixel_height_m",
                                                  "center_x_m", "center_y_m")}
    obj_attrs = {k: v for k, v in obj_attrs.items() if v is not None}
    return _assemble(source, get, arrays,
                     (get("probe_pixel_height_m"), get("probe_pixel_width_m")), obj_attrs)
