"""The FFT weight sum against the slice-add loop it replaces."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import DataError
from runtime.stitch import StitchAccumulator, stitch_patches
from runtime.weight_sum import ZERO_FRACTION, clean_weights, placed_weight_sum


def _loop(corners: np.ndarray, w: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape)
    n0, n1 = w.shape
    for y, x in corners.tolist():
        out[y : y + n0, x : x + n1] += w
    return out


def _scan(count: int, n: int, seed: int) -> tuple[np.ndarray, tuple[int, int]]:
    rng = np.random.default_rng(seed)
    corners = rng.integers(0, 90, (count, 2))
    return corners, (90 + n - 1 + 5, 90 + n - 1)  # 5 spare rows nobody reaches


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_the_slice_add_loop(dtype: type) -> None:
    corners, shape = _scan(400, 24, 0)
    w = clean_weights(np.random.default_rng(1).random((24, 20)))
    ref = _loop(corners, w, shape)
    out = placed_weight_sum(corners, w, shape, dtype=dtype)
    assert out.dtype == dtype and out.shape == shape
    tol = 1e-13 if dtype == np.float64 else 2 * 2.0**-24
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * ref.max())
    # Unreached pixels are exactly 0, not FFT noise.
    assert np.all(out[ref == 0] == 0) and np.all(out[ref > 0] > 0)
    assert np.all(out[-5:] == 0)


def test_uniform_weights_give_exact_counts() -> None:
    corners, shape = _scan(1000, 16, 2)
    counts = placed_weight_sum(corners, np.ones((16, 16)), shape)
    np.testing.assert_array_equal(counts, _loop(corners, np.ones((16, 16)), shape))
    assert counts.max() > 10


def test_same_bits_whatever_the_threads_or_the_order() -> None:
    corners, shape = _scan(700, 32, 3)
    w = clean_weights(np.random.default_rng(4).random((32, 32)))
    one = placed_weight_sum(corners, w, shape, workers=1)
    for workers in (2, 3, 8):
        np.testing.assert_array_equal(placed_weight_sum(corners, w, shape, workers=workers),
                                      one)
    shuffled = corners[np.random.default_rng(5).permutation(len(corners))]
    np.testing.assert_array_equal(placed_weight_sum(shuffled, w, shape), one)


def test_band_edges_and_tiny_canvases() -> None:
    """Footprints crossing every band boundary, and canvases a few rows high."""
    w = clean_weights(np.random.default_rng(6).random((8, 8)))
    for rows in (8, 9, 11, 40):
        corners = np.stack(np.meshgrid(np.arange(rows - 7), np.arange(0, 20, 3),
                                       indexing="ij"), -1).reshape(-1, 2)
        shape = (rows, 27)
        np.testing.assert_allclose(placed_weight_sum(corners, w, shape, band_rows=3),
                                   _loop(corners, w, shape), rtol=1e-13, atol=1e-13)


def test_faint_weights_and_empty_input() -> None:
    w = np.ones((4, 4))
    w[0, 0] = 1e-14  # below ZERO_FRACTION of the peak: counts as 0
    cleaned = clean_weights(w)
    assert cleaned[0, 0] == 0 and cleaned[1, 1] == 1 and w[0, 0] == 1e-14
    assert cleaned[0, 0] < ZERO_FRACTION
    out = placed_weight_sum(np.array([[2, 3]]), cleaned, (8, 8))
    assert out[2, 3] == 0 and out[2, 4] == 1 and out.sum() == 15
    assert not placed_weight_sum(np.zeros((0, 2), np.int64), w, (8, 8)).any()
    assert not placed_weight_sum(np.array([[0, 0]]), np.zeros((4, 4)), (8, 8)).any()


def test_corners_outside_the_canvas_are_refused() -> None:
    with pytest.raises(DataError, match="leave the 8x8 canvas"):
        placed_weight_sum(np.array([[5, 0]]), np.ones((4, 4)), (8, 8))
    with pytest.raises(DataError, match="leave"):
        placed_weight_sum(np.array([[0, -1]]), np.ones((4, 4)), (8, 8))


def test_accumulator_checks_the_planned_corners() -> None:
    """The weight sum computed in the background from the planned positions is used only
    when the patches added sit exactly there (any order); otherwise it is recomputed."""
    rng = np.random.default_rng(7)
    n, m = 16, 120
    pos = rng.integers(10, 70, (m, 2)).astype(float)
    patches = (rng.standard_normal((m, n, n)) + 1j * rng.standard_normal((m, n, n))).astype(
        np.complex64)
    w = rng.random((n, n))
    ref = stitch_patches(patches, pos, weights=w)

    order = rng.permutation(m)
    acc = StitchAccumulator(pos, n, weights=w)
    acc.add(patches[order], pos[order])
    shuffled = acc.result()
    np.testing.assert_array_equal(shuffled.weight, ref.weight)
    np.testing.assert_allclose(shuffled.obj, ref.obj, rtol=1e-5, atol=1e-6)

    half = StitchAccumulator(pos, n, weights=w)  # only half of the plan arrives
    half.add(patches[: m // 2], pos[: m // 2])
    got = half.result()
    expected = _loop(np.rint(pos[: m // 2]).astype(int) - n // 2 - np.asarray(
        half.origin_px), clean_weights(w), half.shape)
    np.testing.assert_allclose(got.weight, expected, rtol=1e-6, atol=1e-6 * expected.max())
    np.testing.assert_array_equal(got.mask, expected > 0)
