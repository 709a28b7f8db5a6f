"""ptycho-run on data as it arrives: counts, HDF5 in metres, other origin conventions, and
a ptychodus product out. Every path must give the same object as the amplitude npz."""

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from ptycho_export.data.simulate import SimulationConfig, simulate_scan
from runtime.ptychodus_product import read_product
from runtime.scan import save_scan

PIXEL_M = 20e-9


@pytest.fixture(scope="module")
def setup(tiny_bundle, tmp_path_factory):
    from ptycho_export.export.pipeline import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("inputs")
    export_bundle(tiny_bundle, root / "art", ExportOptions(formats=["onnx"]))
    scan = simulate_scan(SimulationConfig(patch_size=32, grid_shape=(5, 5), step_px=4,
                                          probe_diameter_px=12, defocus=3,
                                          photons_per_pattern=1e5))
    save_scan(root / "scan.npz", scan)
    return root, scan


def _run(args):
    from cli.run import app

    result = CliRunner().invoke(app, [*map(str, args), "--provider", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output + result.stderr
    return result


def _object(folder):
    with np.load(folder / "object.npz", allow_pickle=False) as f:
        return f["object"], f["origin_px"]


def test_uint16_counts_npz_equals_the_amplitude_run(setup, tmp_path):
    root, scan = setup
    counts = np.rint(scan.amplitudes.astype(np.float64) ** 2).astype(np.uint16)
    assert counts.max() > 255  # a uint16 square of these would overflow
    np.savez(tmp_path / "counts.npz", diffraction=counts, probeGuess=scan.probe,
             xcoords=scan.positions_px[:, 1], ycoords=scan.positions_px[:, 0])
    _run([root / "art", root / "scan.npz", "-o", tmp_path / "amp"])
    out = _run([root / "art", tmp_path / "counts.npz", "-o", tmp_path / "cnt",
                "--data-kind", "counts"])
    assert "data_kind" not in out.stderr
    np.testing.assert_array_equal(_object(tmp_path / "amp")[0], _object(tmp_path / "cnt")[0])


def test_hdf5_counts_in_metres_with_a_ptychodus_product(setup, tmp_path):
    root, scan = setup
    counts = np.rint(scan.amplitudes.astype(np.float64) ** 2).astype(np.uint16)
    with h5py.File(tmp_path / "scan.h5", "w") as h5:
        h5["entry/data/data"] = counts
        h5["entry/x_m"] = scan.positions_px[:, 1] * PIXEL_M + 1e-6
        h5["entry/y_m"] = scan.positions_px[:, 0] * PIXEL_M - 2e-6
        h5["entry/probe"] = scan.probe
    _run([root / "art", root / "scan.npz", "-o", tmp_path / "amp"])
    _run([root / "art", tmp_path / "scan.h5", "-o", tmp_path / "h5", "--data-kind", "counts",
          "--hdf5-x", "/entry/x_m", "--hdf5-y", "/entry/y_m", "--hdf5-probe", "/entry/probe",
          "--position-units", "m", "--pixel-size-m", PIXEL_M, "--energy-ev", 8000,
          "--distance-m", 2.0, "--ptychodus-product", tmp_path / "h5" / "product.h5"])
    reference, _ = _object(tmp_path / "amp")
    obj, _ = _object(tmp_path / "h5")
    np.testing.assert_allclose(obj, reference, atol=1e-6)
    product = read_product(tmp_path / "h5" / "product.h5")
    np.testing.assert_allclose(product.object.reshape(obj.shape), obj, atol=0)
    assert product.object_geometry.pixel_width_m == pytest.approx(PIXEL_M)
    # Positions come back in the file's metres (ptychodus's patch-centre convention).
    with h5py.File(tmp_path / "scan.h5") as h5:
        np.testing.assert_allclose(product.positions_x_m, h5["entry/x_m"][()], atol=1e-12)
        np.testing.assert_allclose(product.positions_y_m, h5["entry/y_m"][()], atol=1e-12)


def test_corner_convention_positions_give_the_same_object(setup, tmp_path):
    root, scan = setup
    corner = scan.positions_px - scan.patch_size / 2
    np.savez(tmp_path / "corner.npz", diffraction=scan.amplitudes, probeGuess=scan.probe,
             xcoords=corner[:, 1], ycoords=corner[:, 0])
    _run([root / "art", root / "scan.npz", "-o", tmp_path / "amp"])
    _run([root / "art", tmp_path / "corner.npz", "-o", tmp_path / "corner",
          "--origin-convention", "corner"])
    np.testing.assert_array_equal(_object(tmp_path / "amp")[0], _object(tmp_path / "corner")[0])
    np.testing.assert_array_equal(_object(tmp_path / "amp")[1], _object(tmp_path / "corner")[1])


def test_product_without_pixel_size_is_refused_before_any_work(setup, tmp_path):
    from cli.run import app

    root, _ = setup
    result = CliRunner().invoke(app, [str(root / "art"), str(root / "scan.npz"), "-o",
                                      str(tmp_path / "out"), "--ptychodus-product",
                                      str(tmp_path / "p.h5"), "--provider", "cpu"])
    assert result.exit_code == 2
    assert "pixel size" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "p.h5").exists()


def test_hdf5_without_data_kind_is_a_usage_error(setup, tmp_path):
    from cli.run import app

    root, scan = setup
    with h5py.File(tmp_path / "s.h5", "w") as h5:
        h5["entry/data/data"] = scan.amplitudes
    result = CliRunner().invoke(app, [str(root / "art"), str(tmp_path / "s.h5"), "-o",
                                      str(tmp_path / "out"), "--provider", "cpu"])
    assert result.exit_code == 2
    assert "--data-kind" in result.stderr
