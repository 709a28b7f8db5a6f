"""runtime.ptychodus_product: write a product, read it back with an independent reader.

The readers below are written from the format description (ptychodus
plugins/h5_product_file.py and npz_product_file.py, docs/ptychodus.md), with h5py and
np.load only: nothing from the writer module is used to read, so a layout mistake in the
writer cannot cancel out. They also apply the checks ptychodus's classes make on load
(complex object of 2 or 3 dims, layers == len(layer spacing) + 1, complex probe of 2-4
dims, one index and x/y per position).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

from runtime.errors import DataError  # noqa: E402
from runtime.geometry import ObjectGeometry, PixelFrame  # noqa: E402
from runtime.ptychodus_product import read_product, write_product  # noqa: E402

# Both spellings of the two fields ptychodus 1.7 renamed (older readers need the first).
RENAMED = {"probe_energy_eV": "photon_energy_eV",
           "mass_attenuation_m2_kg": "mass_attenuation_m2_per_kg"}
ROOT_ATTRS = {"name", "comments", "detector_object_distance_m", "probe_energy_eV",
              "probe_photon_count", "exposure_time_s", "mass_attenuation_m2_kg",
              "tomography_angle_deg", "photon_energy_eV", "mass_attenuation_m2_per_kg"}
H5_DATASETS = {"probe_position_indexes", "probe_position_x_m", "probe_position_y_m", "probe",
               "object", "object_layer_spacing_m", "loss_epochs", "loss_values"}
NPZ_KEYS = ROOT_ATTRS | {"probe_position_indexes", "probe_position_x_m", "probe_position_y_m",
                         "probe", "probe_pixel_width_m", "probe_pixel_height_m", "object",
                         "object_center_x_m", "object_center_y_m", "object_pixel_width_m",
                         "object_pixel_height_m", "object_layer_spacing_m", "loss_epochs",
                         "loss_values"}


# --------------------------------------------------------------------------- independent readers


def _ptychodus_checks(p: dict) -> None:
    obj, probe = p["object"], p["probe"]
    assert np.iscomplexobj(obj) and obj.ndim in (2, 3)  # Object.__init__
    layers = 1 if obj.ndim == 2 else obj.shape[0]
    assert layers == len(p["object_layer_spacing_m"]) + 1
    assert np.iscomplexobj(probe) and probe.ndim in (2, 3, 4)  # ProbeSequence.__init__
    m = len(p["probe_position_indexes"])
    assert len(p["probe_position_x_m"]) == m == len(p["probe_position_y_m"])
    assert len(p["loss_epochs"]) == len(p["loss_values"])


def read_h5_product(path: Path) -> dict:
    with h5py.File(path, "r") as h5:
        assert set(h5.attrs) == ROOT_ATTRS
        assert set(h5.keys()) == H5_DATASETS
        out = {k: h5.attrs[k] for k in ROOT_ATTRS}
        out["name"], out["comments"] = str(out["name"]), str(out["comments"])
        for key in H5_DATASETS:
            out[key] = h5[key][()]
        assert set(h5["probe"].attrs) == {"pixel_width_m", "pixel_height_m"}
        assert set(h5["object"].attrs) == {"center_x_m", "center_y_m", "pixel_width_m",
                                           "pixel_height_m"}
        out["probe_pixel_width_m"] = h5["probe"].attrs["pixel_width_m"]
        out["probe_pixel_height_m"] = h5["probe"].attrs["pixel_height_m"]
        for attr in ("center_x_m", "center_y_m", "pixel_width_m", "pixel_height_m"):
            out[f"object_{attr}"] = h5["object"].attrs[attr]
    _ptychodus_checks(out)
    return out


def read_npz_product(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as npz:  # pickled members would raise here
        assert set(npz.files) == NPZ_KEYS
        out = {k: npz[k] for k in NPZ_KEYS}
    out["name"], out["comments"] = str(out["name"]), str(out["comments"])
    _ptychodus_checks(out)
    return out


READERS = {".h5": read_h5_product, ".npz": read_npz_product}


# --------------------------------------------------------------------------- fixtures


def _fields(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    obj = (rng.random((20, 30)) * np.exp(1j * rng.uniform(-3, 3, (20, 30)))).astype(
        np.complex64)
    probe = (rng.random((8, 8)) + 1j * rng.random((8, 8))).astype(np.complex64)
    return {
        "obj": obj,
        "object_geometry": ObjectGeometry(pixel_width_m=1.25e-8, pixel_height_m=1.5e-8,
                                          center_x_m=-2.5e-7, center_y_m=3.75e-7),
        "probe": probe,
        "probe_pixel_m": (1.5e-8, 1.25e-8),
        "positions_x_m": rng.uniform(-1e-6, 1e-6, 6),
        "positions_y_m": rng.uniform(-1e-6, 1e-6, 6),
        "indexes": np.arange(10, 16),
        "name": "scan 042 (ptycho-run)",
        "comments": "model abc123; données ünïcode",
        "metadata": {"detector_object_distance_m": 1.9, "probe_energy_eV": 8800.0,
                     "probe_photon_count": 1.5e9, "exposure_time_s": 0.002,
                     "mass_attenuation_m2_kg": 12.5, "tomography_angle_deg": 30.0},
        "loss_epochs": [0, 1, 2],
        "loss_values": [3.0, 2.0, 1.5],
    }


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
def test_round_trip_every_field(tmp_path, suffix):
    f = _fields()
    path = write_product(tmp_path / f"product-out{suffix}", **f)
    assert path == tmp_path / f"product-out{suffix}"
    p = READERS[suffix](path)

    assert p["name"] == f["name"] and p["comments"] == f["comments"]
    for key, value in f["metadata"].items():
        assert float(p[key]) == value and np.asarray(p[key]).dtype == np.float64
    for old, new in RENAMED.items():
        assert float(p[new]) == float(p[old]) and np.asarray(p[new]).dtype == np.float64
    np.testing.assert_array_equal(p["probe_position_indexes"], f["indexes"])
    assert p["probe_position_indexes"].dtype == np.int64
    np.testing.assert_array_equal(p["probe_position_x_m"], f["positions_x_m"])
    np.testing.assert_array_equal(p["probe_position_y_m"], f["positions_y_m"])
    assert p["probe"].shape == (1, 8, 8) and p["probe"].dtype == np.complex64
    np.testing.assert_array_equal(p["probe"][0], f["probe"])
    assert float(p["probe_pixel_height_m"]) == 1.5e-8
    assert float(p["probe_pixel_width_m"]) == 1.25e-8
    assert p["object"].shape == (1, 20, 30) and p["object"].dtype == np.complex64
    np.testing.assert_array_equal(p["object"][0], f["obj"])
    g = f["object_geometry"]
    assert float(p["object_center_x_m"]) == g.center_x_m
    assert float(p["object_center_y_m"]) == g.center_y_m
    assert float(p["object_pixel_width_m"]) == g.pixel_width_m
    assert float(p["object_pixel_height_m"]) == g.pixel_height_m
    assert p["object_layer_spacing_m"].shape == (0,)
    np.testing.assert_array_equal(p["loss_epochs"], [0, 1, 2])
    np.testing.assert_array_equal(p["loss_values"], [3.0, 2.0, 1.5])
    assert not [q for q in tmp_path.iterdir() if q.name.endswith(".tmp")]


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
def test_defaults_optional_metadata_indexes_losses(tmp_path, suffix):
    f = _fields(1)
    f.pop("indexes")
    f.pop("loss_epochs")
    f.pop("loss_values")
    f["obj"] = np.abs(f["obj"])  # a real object is promoted: ptychodus needs complex
    f["probe_pixel_m"] = 1.5e-8
    f["metadata"] = {"detector_object_distance_m": 1.0, "probe_energy_eV": 1e4}
    p = READERS[suffix](write_product(tmp_path / f"p{suffix}", **f))
    np.testing.assert_array_equal(p["probe_position_indexes"], np.arange(6))
    assert p["loss_epochs"].shape == (0,) and p["loss_values"].shape == (0,)
    for key in ("probe_photon_count", "exposure_time_s", "mass_attenuation_m2_kg",
                "tomography_angle_deg"):
        assert float(p[key]) == 0.0
    assert np.iscomplexobj(p["object"])
    assert float(p["probe_pixel_width_m"]) == float(p["probe_pixel_height_m"]) == 1.5e-8


def test_stitched_object_geometry_places_patches_for_ptychodus(tmp_path):
    """End to end: positions in metres + from_stitched centre, read back by the independent
    reader, mapped with ptychodus's formula, give back every patch."""
    n, pixel = 8, 1.25e-8
    rng = np.random.default_rng(3)
    obj = (rng.random((24, 28)) + 1j * rng.random((24, 28))).astype(np.complex64)
    centres = np.array([[4, 4], [4, 12], [10, 20], [16, 8], [20, 24]], dtype=np.float64)
    frame = PixelFrame(pixel_height_m=pixel, pixel_width_m=pixel, origin_y_m=-3e-7,
                       origin_x_m=5e-7)
    x_m = frame.origin_x_m + centres[:, 1] * pixel
    y_m = frame.origin_y_m + centres[:, 0] * pixel
    origin_px = (0, 0)
    geometry = ObjectGeometry.from_stitched(origin_px, obj.shape, frame)
    f = _fields()
    f.update(obj=obj, object_geometry=geometry, positions_x_m=x_m, positions_y_m=y_m,
             indexes=None, probe_pixel_m=pixel)
    p = read_h5_product(write_product(tmp_path / "product-out.h5", **f))
    arr = p["object"][0]
    h, w = arr.shape
    for k in range(len(centres)):
        lx = (p["probe_position_x_m"][k] - p["object_center_x_m"]) / p["object_pixel_width_m"]
        ly = (p["probe_position_y_m"][k] - p["object_center_y_m"]) / p["object_pixel_height_m"]
        ly, lx = round(ly + h / 2), round(lx + w / 2)
        cy, cx = (int(v) for v in centres[k])
        np.testing.assert_array_equal(arr[ly - n // 2: ly + n // 2, lx - n // 2: lx + n // 2],
                                      obj[cy - n // 2: cy + n // 2, cx - n // 2: cx + n // 2])


# --------------------------------------------------------------------------- safety


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
def test_failed_write_leaves_previous_file_and_no_temp(tmp_path, monkeypatch, suffix):
    target = tmp_path / f"product-out{suffix}"
    target.write_bytes(b"previous")
    import runtime.ptychodus_product as mod

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    if suffix == ".h5":  # fail half-way through: the temp file exists, partly written
        real = h5py.Group.create_dataset

        def create(self, name, *a, **k):
            if name == "object":
                boom()
            return real(self, name, *a, **k)

        monkeypatch.setattr(h5py.Group, "create_dataset", create)
    else:
        monkeypatch.setattr(mod, "_npz_arrays", boom)
    with pytest.raises(DataError, match="cannot write ptychodus product"):
        write_product(target, **_fields())
    assert target.read_bytes() == b"previous"
    assert sorted(q.name for q in tmp_path.iterdir()) == [target.name]


def test_announced_to_the_folder_watcher_without_changing_bytes(tmp_path, monkeypatch):
    """After the rename the file is truncated to its own size: an IN_MODIFY for watchdog's
    'modified' event (ptychodus ignores 'moved' and 'attrib'); the bytes stay the same."""
    calls: list[tuple[Path, int]] = []
    real = os.truncate
    monkeypatch.setattr(os, "truncate", lambda p, n: (calls.append((Path(p), n)), real(p, n)))
    path = write_product(tmp_path / "product.h5", **_fields())
    assert calls == [(path, path.stat().st_size)]
    read_h5_product(path)  # still a complete, valid product
    calls.clear()
    write_product(tmp_path / "quiet.npz", touch=False, **_fields())
    assert calls == []


@pytest.mark.parametrize(("change", "match"), [
    ({"metadata": {"probe_energy_eV": 1e4}}, "needs detector_object_distance_m"),
    ({"metadata": {"detector_object_distance_m": 1.0, "probe_energy_eV": 1e4,
                   "energy": 3}}, "unknown keys energy"),
    ({"obj": np.full((4, 4), np.nan, np.complex64)}, "object has NaN"),
    ({"obj": np.ones((2, 4, 4), np.complex64)}, "2 layers"),
    ({"probe": np.ones(8, np.complex64)}, "probe has shape"),
    ({"positions_y_m": np.zeros(5)}, "positions_y_m has 5 entries, expected 6"),
    ({"indexes": [1, 1, 2, 3, 4, 5]}, "unique"),
    ({"loss_values": None}, "both loss_epochs and loss_values"),
    ({"probe_pixel_m": -1.0}, "probe_pixel_m must be a finite number > 0"),
    ({"object_geometry": (1, 2, 3, 4)}, "ObjectGeometry"),
])
def test_invalid_fields_refused(tmp_path, change, match):
    f = _fields()
    f.update(change)
    with pytest.raises(DataError, match=match):
        write_product(tmp_path / "p.h5", **f)
    assert list(tmp_path.iterdir()) == []


def test_new_metadata_names_accepted(tmp_path):
    f = _fields()
    f["metadata"] = {"detector_object_distance_m": 1.0, "photon_energy_eV": 9000.0,
                     "mass_attenuation_m2_per_kg": 4.0}
    p = read_npz_product(write_product(tmp_path / "p.npz", **f))
    assert float(p["probe_energy_eV"]) == float(p["photon_energy_eV"]) == 9000.0
    assert float(p["mass_attenuation_m2_kg"]) == 4.0
    f["metadata"]["probe_energy_eV"] = 8000.0
    with pytest.raises(DataError, match="different values"):
        write_product(tmp_path / "q.npz", **f)


def test_unknown_suffix_refused(tmp_path):
    with pytest.raises(DataError, match=r"\*\.h5, \*\.hdf5 or \*\.npz"):
        write_product(tmp_path / "p.mat", **_fields())


# --------------------------------------------------------------------------- read_product


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
def test_read_product_reads_what_write_product_wrote(tmp_path, suffix):
    f = _fields()
    prod = read_product(write_product(tmp_path / f"p{suffix}", **f))
    assert prod.name == f["name"] and prod.comments == f["comments"]
    assert prod.metadata == f["metadata"]
    np.testing.assert_array_equal(prod.indexes, f["indexes"])
    np.testing.assert_array_equal(prod.positions_x_m, f["positions_x_m"])
    np.testing.assert_array_equal(prod.probe_mode0, f["probe"])
    assert prod.probe_pixel_m == (1.5e-8, 1.25e-8)
    assert prod.object_geometry == f["object_geometry"]
    np.testing.assert_array_equal(prod.object[0], f["obj"])
    np.testing.assert_array_equal(prod.loss_values, f["loss_values"])


def test_read_product_other_versions_spellings(tmp_path):
    """A 1.7-style file (renamed fields, 4-D probe, no probe pixel attributes, no losses)
    and an old-style NPZ ('costs' instead of loss_values/epochs)."""
    path = tmp_path / "new.h5"
    with h5py.File(path, "w") as h5:
        h5.attrs["detector_object_distance_m"] = 1.5
        h5.attrs["photon_energy_eV"] = 7000.0
        h5.attrs["mass_attenuation_m2_per_kg"] = 2.0
        h5.attrs["far_field"] = True
        h5.create_dataset("probe_position_indexes", data=[0, 1])
        h5.create_dataset("probe_position_x_m", data=[0.0, 1e-7])
        h5.create_dataset("probe_position_y_m", data=[0.0, 0.0])
        h5.create_dataset("probe", data=np.ones((1, 1, 4, 4), np.complex64))
        obj = h5.create_dataset("object", data=np.ones((1, 6, 6), np.complex128))
        obj.attrs.update({"center_x_m": 0.0, "center_y_m": 0.0, "pixel_width_m": 2e-8,
                          "pixel_height_m": 3e-8})
    prod = read_product(path)
    assert prod.name == "Unnamed"
    assert prod.metadata["probe_energy_eV"] == 7000.0
    assert prod.metadata["mass_attenuation_m2_kg"] == 2.0
    assert prod.metadata["exposure_time_s"] == 0.0
    assert prod.probe_mode0.shape == (4, 4) and prod.probe_pixel_m == (3e-8, 2e-8)
    assert prod.loss_values.shape == (0,)
    old = tmp_path / "old.npz"
    np.savez(old, name=np.str_("legacy"), comments=np.str_(""),
             detector_object_distance_m=1.0, probe_energy_eV=8000.0, exposure_time_s=1.0,
             probe_position_indexes=[3], probe_position_x_m=[0.0], probe_position_y_m=[0.0],
             probe=np.ones((4, 4), np.complex64), probe_pixel_width_m=1e-8,
             probe_pixel_height_m=1e-8, object=np.ones((6, 6), np.complex64),
             object_center_x_m=0.0, object_center_y_m=0.0, object_pixel_width_m=1e-8,
             object_pixel_height_m=1e-8, object_layer_spacing_m=np.zeros(0),
             costs=[5.0, 4.0])
    prod = read_product(old)
    assert prod.name == "legacy" and prod.metadata["probe_energy_eV"] == 8000.0
    np.testing.assert_array_equal(prod.loss_epochs, [0, 1])
    np.testing.assert_array_equal(prod.loss_values, [5.0, 4.0])


def test_read_product_refusals(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_product(tmp_path / "none.h5")
    path = tmp_path / "empty.h5"
    with h5py.File(path, "w") as h5:
        h5.attrs["detector_object_distance_m"] = 1.0
    with pytest.raises(DataError, match="'object' is missing; it is not a ptychodus"):
        read_product(path)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"nope")
    with pytest.raises(DataError, match="not a readable ptychodus product"):
        read_product(junk)
