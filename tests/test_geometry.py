"""runtime.geometry: pixel size, origin conventions (each tested against a known object),
metres <-> pixels, and the object centre ptychodus reads."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import DataError
from runtime.geometry import (
    HC_EV_M,
    ORIGINS,
    ObjectGeometry,
    PixelFrame,
    energy_ev_to_wavelength_m,
    from_centre_px,
    object_pixel_size_m,
    origin_offset_px,
    pixel_frame_px,
    positions_m_to_px,
    positions_px_to_m,
    scan_frame,
    to_centre_px,
)
from runtime.stitch import crop_to, stitch_patches

N = 8


def _truth(h: int = 40, w: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((h, w)) * np.exp(1j * rng.uniform(-3, 3, (h, w)))).astype(np.complex64)


def _corners() -> np.ndarray:
    """(M, 2) integer (y, x) top-left corners: a 5 px grid (overlap) plus an offset."""
    ys, xs = np.meshgrid(np.arange(3, 29, 5), np.arange(2, 37, 5), indexing="ij")
    return np.stack([ys.ravel(), xs.ravel()], axis=1)


def _cut(obj: np.ndarray, corners: np.ndarray) -> np.ndarray:
    return np.stack([obj[y:y + N, x:x + N] for y, x in corners.tolist()])


def _positions_in(convention: str, corners: np.ndarray) -> np.ndarray:
    """How a tool of each convention would write the positions of these patches."""
    return corners + {"centre": N / 2, "corner": 0.0, "centre-half": (N - 1) / 2}[convention]


# --------------------------------------------------------------------------- pixel size


def test_wavelength_and_pixel_size():
    assert abs(HC_EV_M - 1.2398419843320026e-06) <= 1e-15 * HC_EV_M
    assert energy_ev_to_wavelength_m(10_000) == pytest.approx(1.2398419843e-10, rel=1e-10)
    px = object_pixel_size_m(wavelength_m=1e-10, distance_m=2.0, n=64, detector_pixel_m=75e-6)
    assert px == pytest.approx(1e-10 * 2.0 / (64 * 75e-6), rel=1e-15)
    by_energy = object_pixel_size_m(energy_eV=HC_EV_M / 1e-10, distance_m=2.0, n=64,
                                    detector_pixel_m=75e-6)
    assert by_energy == pytest.approx(px, rel=1e-14)
    # Cropping 128 -> 64 doubles the object pixel.
    assert object_pixel_size_m(wavelength_m=1e-10, distance_m=2.0, n=128,
                               detector_pixel_m=75e-6) == pytest.approx(px / 2, rel=1e-15)
    ph, pw = object_pixel_size_m(wavelength_m=1e-10, distance_m=2.0, n=64,
                                 detector_pixel_m=(75e-6, 150e-6))
    assert ph == pytest.approx(px) and pw == pytest.approx(px / 2)


@pytest.mark.parametrize("kwargs", [
    {"distance_m": 1.0, "n": 64, "detector_pixel_m": 75e-6},  # neither
    {"distance_m": 1.0, "n": 64, "detector_pixel_m": 75e-6, "energy_eV": 1e4,
     "wavelength_m": 1e-10},  # both
    {"distance_m": -1.0, "n": 64, "detector_pixel_m": 75e-6, "energy_eV": 1e4},
    {"distance_m": 1.0, "n": 0, "detector_pixel_m": 75e-6, "energy_eV": 1e4},
    {"distance_m": 1.0, "n": 64, "detector_pixel_m": float("nan"), "energy_eV": 1e4},
])
def test_pixel_size_refusals(kwargs):
    with pytest.raises(DataError):
        object_pixel_size_m(**kwargs)


# --------------------------------------------------------------------------- conventions


def test_offsets():
    assert origin_offset_px("centre", N) == 0
    assert origin_offset_px("corner", N) == N / 2
    assert origin_offset_px("centre-half", N) == 0.5
    with pytest.raises(DataError, match="origin convention"):
        origin_offset_px("center", N)
    pos = np.array([[1.5, 2.0]])
    for origin in ORIGINS:
        np.testing.assert_array_equal(from_centre_px(to_centre_px(pos, origin, N), origin, N),
                                      pos)


@pytest.mark.parametrize("convention", ORIGINS)
def test_each_convention_in_pixels_stitches_back_the_truth(convention):
    obj = _truth()
    corners = _corners()
    patches = _cut(obj, corners)
    written = _positions_in(convention, corners)
    centres = to_centre_px(written, convention, N)
    assert np.array_equal(centres, corners + N / 2)  # whole pixels: no sub-pixel path
    stitched = stitch_patches(patches, centres, subpixel="none")
    assert stitched.mask.all()
    assert stitched.origin_px == tuple(int(v) for v in corners.min(axis=0))
    np.testing.assert_array_equal(stitched.obj, crop_to(obj, stitched))


@pytest.mark.parametrize("convention", ["corner", "centre-half"])
def test_wrong_convention_misplaces_the_object(convention):
    obj = _truth()
    corners = _corners()
    written = _positions_in(convention, corners)
    # Read as if they were our centres: the patches land N/2 (or 1/2 -> rounded) off.
    stitched = stitch_patches(_cut(obj, corners), np.rint(written), subpixel="none")
    truth_origin = tuple(int(v) for v in corners.min(axis=0))
    assert (stitched.origin_px != truth_origin
            or not np.array_equal(stitched.obj, crop_to(obj, stitched)))


def _ptychodus_local_px(geometry: ObjectGeometry, x_m, y_m, shape) -> np.ndarray:
    """ptychodus api/object.py map_coordinates_probe_to_object, written out here."""
    h, w = shape
    return np.stack([(np.asarray(y_m) - geometry.center_y_m) / geometry.pixel_height_m + h / 2,
                     (np.asarray(x_m) - geometry.center_x_m) / geometry.pixel_width_m + w / 2],
                    axis=1)


@pytest.mark.parametrize("convention", ORIGINS)
def test_each_convention_in_metres_round_trips_through_ptychodus_mapping(convention):
    obj = _truth()
    corners = _corners()
    patches = _cut(obj, corners)
    pixel = object_pixel_size_m(energy_eV=8800.0, distance_m=1.9, n=N,
                                detector_pixel_m=75e-6)
    offset_m = np.array([-3.217e-6, 5.113e-6])  # scan centred anywhere in metres
    written_px = _positions_in(convention, corners)
    y_m = written_px[:, 0] * pixel + offset_m[0]
    x_m = written_px[:, 1] * pixel + offset_m[1]

    frame = scan_frame(x_m, y_m, pixel, n=N, origin=convention)
    centres = positions_m_to_px(x_m, y_m, pixel, n=N, origin=convention, frame=frame)
    # Lowest patch corner at object pixel 0, centres on whole pixels (snapped float noise).
    np.testing.assert_array_equal(centres, corners - corners.min(axis=0) + N / 2)
    np.testing.assert_array_equal(centres,
                                  positions_m_to_px(x_m, y_m, pixel, n=N, origin=convention))

    stitched = stitch_patches(patches, centres, subpixel="none")
    assert stitched.origin_px == (0, 0)
    cy, cx = corners.min(axis=0)
    h, w = stitched.obj.shape
    np.testing.assert_array_equal(stitched.obj, obj[cy:cy + h, cx:cx + w])

    # Inverse: back to the file's metres, and to ptychodus's centre metres.
    back_x, back_y = positions_px_to_m(centres, frame, n=N, origin=convention)
    np.testing.assert_allclose(back_x, x_m, rtol=0, atol=1e-6 * pixel)
    np.testing.assert_allclose(back_y, y_m, rtol=0, atol=1e-6 * pixel)
    centre_x, centre_y = positions_px_to_m(centres, frame, n=N, origin="centre")
    off = origin_offset_px(convention, N) * pixel
    np.testing.assert_allclose(centre_x, x_m + off, rtol=0, atol=1e-6 * pixel)

    # ptychodus places each patch at (x_m - center)/pixel + W/2: exactly where it was cut.
    geometry = ObjectGeometry.from_stitched(stitched.origin_px, stitched.obj.shape, frame)
    local = _ptychodus_local_px(geometry, centre_x, centre_y, stitched.obj.shape)
    np.testing.assert_allclose(local, centres, rtol=0, atol=1e-6)
    np.testing.assert_allclose(geometry.positions_to_local_px(centre_x, centre_y,
                                                              stitched.obj.shape), local)
    for k, (ly, lx) in enumerate(np.rint(local).astype(int).tolist()):
        np.testing.assert_array_equal(
            stitched.obj[ly - N // 2: ly + N // 2, lx - N // 2: lx + N // 2], patches[k])


def test_object_geometry_centre_simple_case():
    frame = PixelFrame(pixel_height_m=2e-8, pixel_width_m=1e-8, origin_y_m=1e-6,
                       origin_x_m=-1e-6)
    g = ObjectGeometry.from_stitched((3, 4), (10, 20), frame)
    assert g.center_x_m == pytest.approx(-1e-6 + 1e-8 * (4 + 10))
    assert g.center_y_m == pytest.approx(1e-6 + 2e-8 * (3 + 5))
    assert (g.pixel_width_m, g.pixel_height_m) == (1e-8, 2e-8)
    with pytest.raises(DataError):
        ObjectGeometry(pixel_width_m=0.0, pixel_height_m=1.0, center_x_m=0, center_y_m=0)


def test_pixel_frame_for_pixel_positions():
    frame = pixel_frame_px(5e-9)
    x, y = positions_px_to_m(np.array([[4.0, 6.0]]), frame, n=N)
    assert (x[0], y[0]) == (pytest.approx(30e-9), pytest.approx(20e-9))


def test_snap_only_removes_float_noise():
    pixel = 1e-8
    x = np.array([0.0, 1.0 + 1e-10, 2.25]) * pixel
    y = np.zeros(3)
    pos = positions_m_to_px(x, y, pixel, n=N)
    np.testing.assert_allclose(pos[:, 1], [4.0, 5.0, 6.25], rtol=0, atol=1e-12)
    assert pos[1, 1] == 5.0
    raw = positions_m_to_px(x, y, pixel, n=N, snap_px=0.0)
    assert raw[1, 1] != 5.0


def test_position_refusals():
    with pytest.raises(DataError, match="equal length"):
        positions_m_to_px([0.0, 1.0], [0.0], 1e-8, n=N)
    with pytest.raises(DataError, match="NaN"):
        positions_m_to_px([0.0, np.nan], [0.0, 0.0], 1e-8, n=N)
    with pytest.raises(DataError, match="M = 0"):
        scan_frame([], [], 1e-8, n=N)
    frame = scan_frame([0.0], [0.0], 1e-8, n=N)
    with pytest.raises(DataError, match="disagrees"):
        positions_m_to_px([0.0], [0.0], 2e-8, n=N, frame=frame)
