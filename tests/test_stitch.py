"""Stitching: orientation, exactness, weighting, masks, chunking, memmap input."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import DataError
from runtime.stitch import StitchedObject, crop_to, stitch_patches, to_complex

N = 16


def _object(h: int = 80, w: int = 96, seed: int = 0) -> np.ndarray:
    """Asymmetric complex object: random amplitude and phase, so any flip shows up."""
    rng = np.random.default_rng(seed)
    amp = 0.5 + rng.random((h, w))
    phase = rng.uniform(-np.pi, np.pi, (h, w))
    return to_complex(amp, phase)


def _cut(obj: np.ndarray, positions: np.ndarray, n: int = N) -> np.ndarray:
    """Patches by the N/2 convention: patch (i, j) = obj[y - n/2 + i, x - n/2 + j]."""
    out = np.empty((len(positions), n, n), dtype=np.complex64)
    for k, (y, x) in enumerate(np.rint(positions).astype(int)):
        out[k] = obj[y - n // 2 : y + n // 2, x - n // 2 : x + n // 2]
    return out


def _grid(y0: int, y1: int, x0: int, x1: int, step: int) -> np.ndarray:
    yy, xx = np.meshgrid(np.arange(y0, y1, step), np.arange(x0, x1, step), indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float64)


def test_reproduces_object_and_orientation() -> None:
    obj = _object()
    pos = _grid(10, 70, 12, 85, 5)
    s = stitch_patches(_cut(obj, pos), pos)
    assert isinstance(s, StitchedObject)
    assert s.obj.dtype == np.complex64 and s.weight.dtype == np.float32 and s.mask.dtype == bool
    # Canvas is exactly the union of patches: first centre - N/2 .. last centre + N/2.
    assert s.origin_px == (10 - N // 2, 12 - N // 2)
    assert s.obj.shape == (65 - 10 + N, 82 - 12 + N)
    assert s.mask.all()
    ref = crop_to(obj, s)
    np.testing.assert_array_equal(ref, obj[2 : 2 + s.obj.shape[0], 4 : 4 + s.obj.shape[1]])
    assert np.max(np.abs(s.obj - ref)) < 1e-6


def test_single_patch_lands_at_plus_x() -> None:
    patch = np.zeros((1, N, N), dtype=np.complex64)
    patch[0, 0, N - 1] = 1.0  # top-right pixel of the patch
    s = stitch_patches(patch, np.array([[30.0, 50.0]]))
    assert s.origin_px == (30 - N // 2, 50 - N // 2)
    full = np.zeros((100, 100), dtype=np.complex64)
    full[s.origin_px[0] : s.origin_px[0] + N, s.origin_px[1] : s.origin_px[1] + N] = s.obj
    assert full[30 - N // 2, 50 - N // 2 + N - 1] == 1.0


@pytest.mark.parametrize("weighted", [False, True])
def test_weights_exact_for_consistent_patches(weighted: bool) -> None:
    obj = _object(seed=1)
    pos = _grid(9, 70, 9, 86, 3)
    g = np.exp(-((np.arange(N) - N / 2 + 0.5) ** 2) / 20.0)
    probe_intensity = np.outer(g, g) if weighted else None
    s = stitch_patches(_cut(obj, pos), pos, weights=probe_intensity)
    assert np.max(np.abs(s.obj - crop_to(obj, s))) < 1e-6


def test_weighted_average_of_disagreeing_patches() -> None:
    patches = np.stack([np.full((N, N), 1.0 + 0j), np.full((N, N), 3.0 + 1j)]).astype(np.complex64)
    pos = np.array([[20.0, 20.0], [20.0, 24.0]])
    w = np.ones((N, N))
    w[:, : N // 2] = 2.0  # left half counts double
    s = stitch_patches(patches, pos, weights=w)
    # Object pixel (20, 24): patch 0 column 12 (w = 1), patch 1 column 8 (w = 1).
    # Object pixel (20, 20): patch 0 column 8 (w = 1), patch 1 column 4 (w = 2).
    oy, ox = s.origin_px
    assert s.obj[20 - oy, 24 - ox] == pytest.approx((1.0 + (3 + 1j)) / 2)
    assert s.obj[20 - oy, 20 - ox] == pytest.approx((1.0 * 1 + 2 * (3 + 1j)) / 3)
    assert s.weight[20 - oy, 20 - ox] == 3.0
    # Only patch 0 covers object column 12; only patch 1 covers column 31.
    assert s.obj[20 - oy, 12 - ox] == pytest.approx(1.0)
    assert s.obj[20 - oy, 31 - ox] == pytest.approx(3 + 1j)


def test_mask_false_in_scan_hole() -> None:
    obj = _object(seed=2)
    pos = _grid(8, 73, 8, 89, 8)
    centre = np.array([40.0, 48.0])
    keep = np.abs(pos - centre).max(axis=1) > 20  # drop a block of positions: a hole
    pos = pos[keep]
    s = stitch_patches(_cut(obj, pos), pos)
    oy, ox = s.origin_px
    hy, hx = 40 - oy, 48 - ox
    assert not s.mask[hy, hx]
    assert s.obj[hy, hx] == 0 and s.weight[hy, hx] == 0
    assert s.mask.sum() < s.mask.size
    np.testing.assert_array_equal(s.mask, s.weight > 0)
    assert np.max(np.abs(s.obj - crop_to(obj, s))[s.mask]) < 1e-6


def test_crop_trims_patch_borders() -> None:
    obj = _object(seed=3)
    pos = _grid(10, 70, 10, 86, 4)
    patches = _cut(obj, pos)
    patches[:, :3, :] = 99.0  # garbage on the borders must never reach the canvas
    patches[:, -3:, :] = 99.0
    patches[:, :, :3] = 99.0
    patches[:, :, -3:] = 99.0
    s = stitch_patches(patches, pos, crop=3)
    assert s.origin_px == (10 - N // 2 + 3, 10 - N // 2 + 3)
    assert s.obj.shape == (66 - 10 + N - 6, 82 - 10 + N - 6)
    assert np.max(np.abs(s.obj - crop_to(obj, s))) < 1e-6
    assert s.weight.sum() == len(pos) * (N - 6) ** 2


def test_chunk_size_bit_identical() -> None:
    rng = np.random.default_rng(4)
    m = 37
    patches = (rng.standard_normal((m, N, N)) + 1j * rng.standard_normal((m, N, N))).astype(
        np.complex64
    )
    pos = rng.uniform(0, 40, (m, 2))
    w = rng.random((N, N))
    a = stitch_patches(patches, pos, weights=w, chunk=1)
    b = stitch_patches(patches, pos, weights=w, chunk=4096)
    c = stitch_patches(patches, pos, weights=w, chunk=5)
    for other in (b, c):
        assert other.origin_px == a.origin_px
        assert np.array_equal(a.obj, other.obj)
        assert np.array_equal(a.weight, other.weight)
        assert np.array_equal(a.mask, other.mask)


def test_total_weight_conserved() -> None:
    rng = np.random.default_rng(5)
    m = 50
    patches = np.ones((m, N, N), dtype=np.complex64)
    pos = rng.uniform(-5, 60, (m, 2))
    w = rng.random((N, N)).astype(np.float32)
    s = stitch_patches(patches, pos, weights=w)
    assert s.weight.sum(dtype=np.float64) == pytest.approx(m * w.sum(dtype=np.float64), rel=1e-6)
    s1 = stitch_patches(patches, pos)
    assert s1.weight.sum(dtype=np.float64) == m * N * N


def test_memmap_input(tmp_path) -> None:
    obj = _object(seed=6)
    pos = _grid(10, 70, 10, 86, 6)
    patches = _cut(obj, pos)
    mm = np.lib.format.open_memmap(
        tmp_path / "patches.npy", mode="w+", dtype=np.complex64, shape=patches.shape
    )
    mm[:] = patches
    mm.flush()
    ro = np.load(tmp_path / "patches.npy", mmap_mode="r")
    s = stitch_patches(ro, pos, chunk=7, weights=np.ones((N, N)))
    ref = stitch_patches(patches, pos)
    assert np.array_equal(s.obj, ref.obj)
    assert np.max(np.abs(s.obj - crop_to(obj, s))) < 1e-6


def test_negative_and_float_positions() -> None:
    obj = _object(seed=7)
    shift = np.array([40, 50])  # object pixel (0, 0) sits at full[40, 50]
    pos_full = _grid(10, 70, 10, 86, 5)
    patches = _cut(obj, pos_full)
    pos = pos_full - shift  # many negative, all exactly .0
    assert (pos < 0).any() and pos.dtype == np.float64
    s = stitch_patches(patches, pos)
    assert s.origin_px == (10 - 40 - N // 2, 10 - 50 - N // 2)
    sy, sx = s.origin_px[0] + 40, s.origin_px[1] + 50
    ref = obj[sy : sy + s.obj.shape[0], sx : sx + s.obj.shape[1]]
    assert np.max(np.abs(s.obj - ref)) < 1e-6
    # Rounding: +-0.3 px jitter lands on the same pixels.
    jitter = np.random.default_rng(8).uniform(-0.3, 0.3, pos.shape)
    s2 = stitch_patches(patches, pos + jitter)
    assert s2.origin_px == s.origin_px and np.array_equal(s2.obj, s.obj)


def test_crop_to_outside_raises() -> None:
    s = stitch_patches(np.ones((1, N, N), np.complex64), np.array([[3.0, 30.0]]))
    with pytest.raises(DataError):
        crop_to(np.zeros((64, 64)), s)


@pytest.mark.parametrize(
    ("patches", "pos", "kwargs"),
    [
        (np.ones((2, N, N), np.complex64), np.zeros((3, 2)), {}),
        (np.ones((2, N, N + 1), np.complex64), np.zeros((2, 2)), {}),
        (np.ones((2, 15, 15), np.complex64), np.zeros((2, 2)), {}),
        (np.ones((0, N, N), np.complex64), np.zeros((0, 2)), {}),
        (np.ones((1, N, N), np.complex64), np.array([[np.nan, 0.0]]), {}),
        (np.ones((1, N, N), np.complex64), np.zeros((1, 2)), {"crop": N // 2}),
        (np.ones((1, N, N), np.complex64), np.zeros((1, 2)), {"chunk": 0}),
        (np.ones((1, N, N), np.complex64), np.zeros((1, 2)), {"weights": -np.ones((N, N))}),
        (np.ones((1, N, N), np.complex64), np.zeros((1, 2)), {"weights": np.ones((N, 2))}),
    ],
)
def test_bad_input_raises_data_error(patches, pos, kwargs) -> None:
    with pytest.raises(DataError):
        stitch_patches(patches, pos, **kwargs)
