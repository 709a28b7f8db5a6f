"""runtime.hdf5_io: chunked HDF5 reading of raw counts into a validated ScanData."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

from runtime.detector import center_crop  # noqa: E402
from runtime.errors import DataError  # noqa: E402
from runtime.geometry import (  # noqa: E402
    ObjectGeometry,
    positions_m_to_px,
    scan_frame,
)
from runtime.hdf5_io import (  # noqa: E402
    load_ptychodus_inputs,
    load_scan_hdf5,
    read_scan_hdf5,
    resample_probe,
)
from runtime.ptychodus_product import write_product  # noqa: E402

M, H = 11, 12
DATA = "/entry/data/data"
PATHS = {"x": "/entry/positions/x", "y": "/entry/positions/y"}


def _frames(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frames = rng.poisson(30.0, size=(M, H, H)).astype(np.uint16)
    frames[:, H // 2, H // 2] = 40000  # DC: squares and sums of these wrap in uint16
    frames[3, 2, 2] = 300
    frames[7, 5, 9] = 65000
    return frames


def _probe(n: int) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n] - n / 2
    return np.exp(-(yy**2 + xx**2) / n - 0.1j * xx).astype(np.complex64)


def _write(path: Path, frames: np.ndarray | None = None, *, x=None, y=None, probe_n: int = H,
           chunks: bool = True) -> Path:
    frames = _frames() if frames is None else frames
    m = frames.shape[0]
    with h5py.File(path, "w") as h5:
        h5.create_dataset(DATA, data=frames,
                          chunks=(1, *frames.shape[1:]) if chunks and frames.ndim == 3 else None)
        h5.create_dataset(PATHS["x"], data=np.arange(m, dtype=np.float64) * 2.5
                          if x is None else x)
        h5.create_dataset(PATHS["y"], data=np.arange(m, dtype=np.float64) % 4 * 3.0
                          if y is None else y)
        h5.create_dataset("/entry/probe", data=_probe(probe_n)[None, None])
        h5.create_dataset("/entry/probe_small", data=_probe(8))
    return path


@pytest.fixture
def scan_file(tmp_path: Path) -> Path:
    return _write(tmp_path / "scan.h5")


def test_uint16_counts_equal_float64_reference(scan_file):
    frames = _frames()
    scan = read_scan_hdf5(scan_file, kind="counts", probe="/entry/probe", **PATHS)
    ref = np.sqrt(frames.astype(np.float64)).astype(np.float32)
    assert scan.amplitudes.dtype == np.float32 and scan.amplitudes.flags.c_contiguous
    np.testing.assert_array_equal(scan.amplitudes, ref)
    assert scan.patch_size == H and scan.n_patterns == M
    np.testing.assert_array_equal(scan.probe, _probe(H))
    np.testing.assert_array_equal(scan.positions_px[:, 1], np.arange(M) * 2.5)
    assert scan.source == str(scan_file)


def test_chunk_size_does_not_change_the_result(scan_file):
    a = read_scan_hdf5(scan_file, kind="counts", chunk=3, **PATHS)
    b = read_scan_hdf5(scan_file, kind="counts", chunk=1024, **PATHS)
    c = read_scan_hdf5(scan_file, kind="counts", chunk=1, **PATHS)
    np.testing.assert_array_equal(a.amplitudes, b.amplitudes)
    np.testing.assert_array_equal(a.amplitudes, c.amplitudes)


def test_frames_are_read_in_hyperslabs_never_whole(scan_file, monkeypatch):
    reads: list[tuple[str, object]] = []
    original = h5py.Dataset.__getitem__

    def spy(self, args, *rest, **kw):
        reads.append((self.name, args))
        return original(self, args, *rest, **kw)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    read_scan_hdf5(scan_file, kind="counts", chunk=3, crop_to=8, probe="/entry/probe_small",
                   **PATHS)
    frame_reads = [args for name, args in reads if name == DATA]
    assert len(frame_reads) == -(-M // 3)  # one hyperslab per chunk
    first = H // 2 - 4
    for k, args in enumerate(frame_reads):
        assert isinstance(args, tuple) and len(args) == 3  # never ds[()] or ds[...]
        frames_sel, rows, cols = args
        assert frames_sel == slice(3 * k, min(3 * k + 3, M))
        assert rows == cols == slice(first, first + 8)  # only the crop window is read


def test_crop_to_model_size(scan_file):
    scan = read_scan_hdf5(scan_file, kind="counts", crop_to=8, probe="/entry/probe_small",
                          chunk=4, **PATHS)
    ref = center_crop(np.sqrt(_frames().astype(np.float64)).astype(np.float32), 8)
    np.testing.assert_array_equal(scan.amplitudes, ref)
    assert scan.amplitudes[0].argmax() == np.ravel_multi_index((4, 4), (8, 8))  # DC at N/2


def test_positions_in_metres_and_conventions(tmp_path):
    pixel = 2e-8
    x_m = -1e-6 + np.arange(M) * 3 * pixel
    y_m = 4e-7 + (np.arange(M) % 3) * 5 * pixel
    path = _write(tmp_path / "m.h5", x=x_m, y=y_m)
    res = load_scan_hdf5(path, kind="counts", units="m", pixel_m=pixel, origin="corner",
                         **PATHS)
    expect = positions_m_to_px(x_m, y_m, pixel, n=H, origin="corner")
    np.testing.assert_array_equal(res.scan.positions_px, expect)
    assert res.frame == scan_frame(x_m, y_m, pixel, n=H, origin="corner")
    assert res.positions_m is not None
    np.testing.assert_array_equal(res.positions_m[0], x_m)
    assert res.report()["position_units"] == "m"
    # Pixel positions: the convention is a shift by N/2 (corner) or 1/2 (centre-half).
    px = load_scan_hdf5(path, kind="counts", origin="corner", **PATHS)
    np.testing.assert_array_equal(px.scan.positions_px[:, 1], x_m + H / 2)
    half = read_scan_hdf5(path, kind="counts", origin="centre-half", **PATHS)
    np.testing.assert_array_equal(half.positions_px[:, 0], y_m + 0.5)
    assert px.frame is None and px.notes  # no pixel size; uniform probe noted


def test_kind_warning_and_report(tmp_path):
    amp = (np.sqrt(_frames().astype(np.float64)) / 300.0).astype(np.float32)
    path = _write(tmp_path / "amp.h5", amp)
    res = load_scan_hdf5(path, kind="counts", **PATHS)
    assert res.looks_like == "amplitude"
    assert len(res.warnings) == 1 and str(path) in res.warnings[0]
    assert "--data-kind amplitude" in res.warnings[0]
    ok = load_scan_hdf5(path, kind="amplitude", **PATHS)
    assert ok.warnings == [] and ok.report()["data_kind"] == "amplitude"
    np.testing.assert_array_equal(ok.scan.amplitudes, amp)


def test_negative_counts_name_global_pattern(tmp_path):
    frames = _frames().astype(np.int32)
    frames[9, 0, 0] = -1
    path = _write(tmp_path / "neg.h5", frames)
    with pytest.raises(DataError, match=r"neg\.h5: dataset '/entry/data/data' has 1 negative"
                                        r".*pattern 9"):
        read_scan_hdf5(path, kind="counts", chunk=4, **PATHS)


def test_missing_and_malformed_datasets(tmp_path, scan_file):
    with pytest.raises(DataError, match=r"scan\.h5: dataset '/entry/nope' is missing"):
        read_scan_hdf5(scan_file, kind="counts", diffraction="/entry/nope", **PATHS)
    with pytest.raises(DataError, match=r"dataset '/entry/data' is a group"):
        read_scan_hdf5(scan_file, kind="counts", diffraction="/entry/data", **PATHS)
    with pytest.raises(DataError, match=r"dataset '/entry/positions/q' is missing"):
        read_scan_hdf5(scan_file, kind="counts", x="/entry/positions/q", y=PATHS["y"])
    flat = _write(tmp_path / "flat.h5", _frames()[0])
    with pytest.raises(DataError, match=r"flat\.h5: dataset '/entry/data/data' has rank 2"):
        read_scan_hdf5(flat, kind="counts", **PATHS)
    wide = _write(tmp_path / "wide.h5", np.zeros((M, 12, 16), np.uint16))
    with pytest.raises(DataError, match="non-square frames 12x16"):
        read_scan_hdf5(wide, kind="counts", **PATHS)
    with pytest.raises(DataError, match="smaller than the model's 16x16"):
        read_scan_hdf5(scan_file, kind="counts", crop_to=16, **PATHS)
    short = _write(tmp_path / "short.h5", x=np.zeros(M - 1))
    with pytest.raises(DataError, match=r"'/entry/positions/x' has 10 positions but .* 11"):
        read_scan_hdf5(short, kind="counts", **PATHS)
    with pytest.raises(DataError, match=r"'/entry/probe_small' has shape \(8, 8\) but the "
                                        r"patterns are 6x6 \(cropped from 12x12\)"):
        read_scan_hdf5(scan_file, kind="counts", crop_to=6, probe="/entry/probe_small",
                       **PATHS)


def test_file_and_option_errors(tmp_path, scan_file):
    with pytest.raises(DataError, match="file not found"):
        read_scan_hdf5(tmp_path / "none.h5", kind="counts", **PATHS)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(DataError, match="not a readable HDF5 file"):
        read_scan_hdf5(junk, kind="counts", **PATHS)
    with pytest.raises(DataError, match="need the object pixel size"):
        read_scan_hdf5(scan_file, kind="counts", units="m", **PATHS)
    with pytest.raises(DataError, match="data kind"):
        read_scan_hdf5(scan_file, kind="intensity", **PATHS)
    with pytest.raises(DataError, match="origin convention"):
        read_scan_hdf5(scan_file, kind="counts", origin="middle", **PATHS)
    with pytest.raises(DataError, match="chunk"):
        read_scan_hdf5(scan_file, kind="counts", chunk=0, **PATHS)


# --------------------------------------------------------------------------- probe resampling


def test_resample_probe_follows_the_pattern_crop():
    h, n, sigma = 32, 16, 3.0
    yy, xx = np.mgrid[0:h, 0:h] - h / 2
    probe = np.exp(-(yy**2 + xx**2) / (2 * sigma**2)).astype(np.complex64)
    small = resample_probe(probe, n)
    assert small.shape == (n, n) and small.dtype == np.complex64
    assert np.unravel_index(np.argmax(np.abs(small)), small.shape) == (n // 2, n // 2)
    y2, x2 = np.mgrid[0:n, 0:n] - n / 2
    expect = np.exp(-(y2**2 + x2**2) / (2 * (sigma * n / h) ** 2))
    np.testing.assert_allclose(np.abs(small), expect, atol=2e-3)  # same field of view
    np.testing.assert_array_equal(resample_probe(probe, h), probe)


def test_full_size_probe_is_resampled_with_crop(scan_file):
    res = load_scan_hdf5(scan_file, kind="counts", crop_to=8, probe="/entry/probe", **PATHS)
    np.testing.assert_array_equal(res.scan.probe, resample_probe(_probe(H), 8))
    assert any("resampled from 12x12 to 8x8" in note for note in res.notes)


def test_bad_pixels_are_zeroed(tmp_path):
    path = _write(tmp_path / "bad.h5")
    mask = np.zeros((H, H), bool)
    mask[1, 2] = mask[H // 2, H // 2] = True
    with h5py.File(path, "a") as h5:
        h5.create_dataset("/entry/mask", data=mask)
    res = load_scan_hdf5(path, kind="counts", bad_pixels="/entry/mask", chunk=4, **PATHS)
    ref = np.sqrt(_frames().astype(np.float64)).astype(np.float32)
    ref[:, mask] = 0
    np.testing.assert_array_equal(res.scan.amplitudes, ref)
    assert "2 bad pixels set to 0" in res.notes


# --------------------------------------------------------------------------- ptychodus input


def _ptychodus_input(tmp_path: Path, *, pattern_indexes, position_indexes, h: int = H):
    """diffraction.h5 (ptychodus's assembled layout) + product.h5 with positions."""
    rng = np.random.default_rng(5)
    m = len(pattern_indexes)
    frames = rng.poisson(20.0, size=(m, h, h)).astype(np.uint16)
    frames[:, h // 2, h // 2] = 50000
    bad = np.zeros((h, h), bool)
    bad[0, 0] = True
    diffraction = tmp_path / "diffraction.h5"
    with h5py.File(diffraction, "w") as h5:
        h5.create_dataset("patterns", data=frames, compression="lzf")
        h5.create_dataset("indexes", data=np.asarray(pattern_indexes))
        h5.create_dataset("bad_pixels", data=bad)
        h5["patterns"].attrs["detector_pixel_width_m"] = 75e-6
        h5["patterns"].attrs["detector_pixel_height_m"] = 75e-6
    k = len(position_indexes)
    pixel = 1e-8
    x_m = 1e-6 + np.arange(k) * 3 * pixel
    y_m = -2e-6 + (np.arange(k) % 2) * 4 * pixel
    product = write_product(
        tmp_path / "product.h5", obj=np.ones((40, 40), np.complex64),
        object_geometry=ObjectGeometry(pixel_width_m=pixel, pixel_height_m=pixel,
                                       center_x_m=0.0, center_y_m=0.0),
        probe=_probe(h), probe_pixel_m=pixel, positions_x_m=x_m, positions_y_m=y_m,
        indexes=position_indexes, name="in", metadata={"detector_object_distance_m": 2.0,
                                                       "probe_energy_eV": 9000.0})
    return diffraction, product, frames, bad, x_m, y_m, pixel


def test_ptychodus_batch_input_matches_indexes(tmp_path):
    diffraction, product, frames, bad, x_m, y_m, pixel = _ptychodus_input(
        tmp_path, pattern_indexes=[4, 5, 6, 7, 8, 9], position_indexes=[9, 7, 5, 4, 100])
    res = load_ptychodus_inputs(diffraction, product, chunk=2)
    # File rows with a matching position, in file order: indexes 4, 5, 7, 9.
    np.testing.assert_array_equal(res.indexes, [4, 5, 7, 9])
    ref = np.sqrt(frames[[0, 1, 3, 5]].astype(np.float64)).astype(np.float32)
    ref[:, bad] = 0
    np.testing.assert_array_equal(res.scan.amplitudes, ref)
    take = [3, 2, 1, 0]  # position rows of indexes 4, 5, 7, 9
    np.testing.assert_array_equal(res.positions_m[0], x_m[take])
    expect = positions_m_to_px(x_m[take], y_m[take], pixel, n=H)
    np.testing.assert_array_equal(res.scan.positions_px, expect)
    assert res.product_in.metadata["probe_energy_eV"] == 9000.0
    assert res.report()["format"] == "ptychodus"
    assert any("4 frames matched" in note for note in res.notes)


def test_ptychodus_batch_input_crop_scales_pixel(tmp_path):
    diffraction, product, *_ = _ptychodus_input(tmp_path, pattern_indexes=list(range(5)),
                                                position_indexes=list(range(5)))
    res = load_ptychodus_inputs(diffraction, product, crop_to=6)
    assert res.scan.patch_size == 6
    assert res.frame.pixel_width_m == pytest.approx(1e-8 * H / 6)
    np.testing.assert_array_equal(res.scan.probe, resample_probe(_probe(H), 6))


def test_ptychodus_batch_input_refusals(tmp_path):
    diffraction, product, *_ = _ptychodus_input(tmp_path, pattern_indexes=[1, 2, 3],
                                                position_indexes=[7, 8])
    with pytest.raises(DataError, match="no pattern index matches"):
        load_ptychodus_inputs(diffraction, product)
    other = tmp_path / "dup"
    other.mkdir()
    diffraction, product, *_ = _ptychodus_input(other, pattern_indexes=[1, 1, 2],
                                                position_indexes=[1, 2])
    with pytest.raises(DataError, match="'indexes' has duplicates"):
        load_ptychodus_inputs(diffraction, product)
