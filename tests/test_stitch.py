"""Stitching: orientation, exactness, weighting, masks, chunking, memmap input."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import DataError
from runtime.stitch import (
    FOURIER_TRIM,
    SUBPIXEL_METHODS,
    StitchAccumulator,
    StitchedObject,
    crop_to,
    default_subpixel,
    stitch_patches,
    to_complex,
)

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


# --------------------------------------------------------------------------- sub-pixel

NS = 32  # sub-pixel tests: patch size


def _waves(fmax: float = 0.08, k: int = 24, seed: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """A band-limited complex object as k plane waves (|frequency| <= fmax cycles/px) with
    |obj| <= 1: it can be sampled exactly at any continuous coordinate."""
    rng = np.random.default_rng(seed)
    freqs = rng.uniform(-fmax, fmax, (k, 2))
    amps = rng.standard_normal(k) + 1j * rng.standard_normal(k)
    return freqs, amps / np.abs(amps).sum()


def _sample(waves: tuple[np.ndarray, np.ndarray], ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """(B, len(ys[0]), len(xs[0])) samples at rows ys[b] x columns xs[b] (continuous)."""
    freqs, amps = waves
    ey = np.exp(2j * np.pi * freqs[None, :, 0, None] * ys[:, None, :])
    ex = np.exp(2j * np.pi * freqs[None, :, 1, None] * xs[:, None, :])
    return np.einsum("k,bki,bkj->bij", amps, ey, ex)


def _cut_exact(waves: tuple[np.ndarray, np.ndarray], pos: np.ndarray, n: int = NS) -> np.ndarray:
    """Patches sampled exactly at their sub-pixel positions (N/2 convention)."""
    off = np.arange(n) - n // 2
    return _sample(waves, pos[:, :1] + off, pos[:, 1:] + off).astype(np.complex64)


def _truth(waves: tuple[np.ndarray, np.ndarray], s: StitchedObject) -> np.ndarray:
    (oy, ox), (h, w) = s.origin_px, s.obj.shape
    rows, cols = np.arange(h, dtype=float)[None], np.arange(w, dtype=float)[None]
    return _sample(waves, oy + rows, ox + cols)[0]


def _jittered(seed: int = 1, step: float = 7.0, jitter: float = 2.0) -> np.ndarray:
    pos = _grid(40, 150, 40, 150, int(step))
    return pos + np.random.default_rng(seed).uniform(-jitter, jitter, pos.shape)


def _interior_error(s: StitchedObject, waves: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """rms and max |error| more than one patch width inside the canvas edge."""
    err = np.abs(s.obj - _truth(waves, s))[NS:-NS, NS:-NS]
    return float(np.sqrt(np.mean(err**2))), float(err.max())


@pytest.fixture(scope="module")
def subpixel_scan() -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray]:
    waves = _waves()
    pos = _jittered()
    return waves, pos, _cut_exact(waves, pos)


def test_subpixel_accuracy_on_a_band_limited_object(subpixel_scan) -> None:
    """Measured (N = 32, 256 positions on a 7 px grid, +-2 px jitter, |obj| <= 1, max
    frequency 0.08 cycles/px): interior rms / max error none 6.5e-3 / 2.7e-2, fourier (trim
    2) 3.9e-4 / 1.8e-3, bilinear 4.2e-3 / 1.2e-2. Bounds below leave 1.5-2x headroom."""
    waves, pos, patches = subpixel_scan
    rms = {}
    for method in SUBPIXEL_METHODS:
        s = stitch_patches(patches, pos, subpixel=method)
        rms[method], worst = _interior_error(s, waves)
        assert s.mask[NS:-NS, NS:-NS].all()
        if method == "fourier":
            assert rms[method] < 6e-4 and worst < 3e-3, (rms, worst)
        if method == "bilinear":
            assert rms[method] < 8e-3 and worst < 2e-2, (rms, worst)
    assert rms["fourier"] < rms["none"] / 10
    assert rms["bilinear"] < rms["none"]


def test_fourier_trim_and_detrend_help(subpixel_scan) -> None:
    waves, pos, patches = subpixel_scan
    untrimmed, _ = _interior_error(stitch_patches(patches, pos, subpixel="fourier", crop=0),
                                   waves)
    trimmed, _ = _interior_error(stitch_patches(patches, pos, subpixel="fourier"), waves)
    assert trimmed < untrimmed / 2  # measured 3.9e-4 vs 1.0e-3


def test_fourier_with_probe_weights(subpixel_scan) -> None:
    waves, pos, patches = subpixel_scan
    g = np.exp(-((np.arange(NS) - NS / 2 + 0.5) ** 2) / (2 * (NS / 4) ** 2))
    s = stitch_patches(patches, pos, subpixel="fourier", weights=np.outer(g, g))
    rms, worst = _interior_error(s, waves)
    assert rms < 6e-4 and worst < 3e-3  # measured 3.1e-4 / 1.0e-3


def test_fourier_reproduces_a_linear_object_exactly() -> None:
    """Endpoint detrending shifts a plane exactly: only float32 rounding is left."""
    pos = _jittered(seed=3, step=9.0)
    off = np.arange(NS) - NS // 2

    def plane(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return (0.3 + 0.2j) + (0.004 - 0.003j) * y + (0.002 + 0.005j) * x

    ys, xs = pos[:, 0, None, None] + off[:, None], pos[:, 1, None, None] + off[None, :]
    patches = plane(ys, xs).astype(np.complex64)
    s = stitch_patches(patches, pos, subpixel="fourier", crop=0)
    (oy, ox), (h, w) = s.origin_px, s.obj.shape
    truth = plane(oy + np.arange(h)[:, None], ox + np.arange(w)[None, :])
    assert np.max(np.abs(s.obj - truth)[s.mask]) < 2e-6


@pytest.mark.parametrize("method", ["fourier", "bilinear"])
def test_constant_object_is_exact_with_weights(method: str) -> None:
    pos = _jittered(seed=4)
    patches = np.full((len(pos), NS, NS), 0.7 - 0.2j, dtype=np.complex64)
    w = np.random.default_rng(5).random((NS, NS)) + 0.05
    s = stitch_patches(patches, pos, subpixel=method, weights=w)
    assert s.mask.mean() > 0.9
    np.testing.assert_allclose(s.obj[s.mask], 0.7 - 0.2j, rtol=0, atol=1e-6)


def test_bilinear_splats_weights_like_values() -> None:
    """One patch at a half-pixel offset: the footprint is (N+1)^2 and the weight map moves
    with the values, so sum(w) is conserved and a constant patch stays constant."""
    patch = np.ones((1, NS, NS), dtype=np.complex64)
    w = np.random.default_rng(6).random((NS, NS))
    s = stitch_patches(patch, np.array([[30.5, 40.25]]), subpixel="bilinear", weights=w)
    assert s.obj.shape == (NS + 1, NS + 1)
    assert s.origin_px == (30 - NS // 2, 40 - NS // 2)
    assert s.weight.sum(dtype=np.float64) == pytest.approx(w.sum(), rel=1e-6)
    np.testing.assert_allclose(s.obj[s.mask], 1.0, atol=1e-6)
    # Row 0 only gets (1 - 0.5) of the first row's weight; column 0 gets (1 - 0.25).
    assert s.weight[0, 0] == pytest.approx(0.5 * 0.75 * w[0, 0], rel=1e-6)


@pytest.mark.parametrize("method", ["fourier", "bilinear"])
@pytest.mark.parametrize("crop", [0, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_integer_positions_identical_to_none(method: str, crop: int, weighted: bool) -> None:
    obj = _object(seed=9)
    pos = _grid(10, 70, 10, 86, 5)
    patches = _cut(obj, pos)
    w = np.random.default_rng(10).random((N, N)) if weighted else None
    ref = stitch_patches(patches, pos, weights=w, crop=crop)
    s = stitch_patches(patches, pos, weights=w, crop=crop, subpixel=method)
    assert s.origin_px == ref.origin_px
    assert np.array_equal(s.obj, ref.obj)
    assert np.array_equal(s.weight, ref.weight)
    assert np.array_equal(s.mask, ref.mask)


def test_fourier_default_trim() -> None:
    pos = _jittered()
    s = stitch_patches(np.ones((len(pos), NS, NS), np.complex64), pos, subpixel="fourier")
    r = np.rint(pos).astype(int)
    assert s.origin_px == tuple((r.min(axis=0) - NS // 2 + FOURIER_TRIM).tolist())


@pytest.mark.parametrize("method", SUBPIXEL_METHODS)
def test_accumulator_batches_match_one_call(method: str, subpixel_scan) -> None:
    _, pos, patches = subpixel_scan
    w = np.random.default_rng(12).random((NS, NS))
    ref = stitch_patches(patches, pos, weights=w, subpixel=method)
    acc = StitchAccumulator(pos, NS, weights=w, subpixel=method, chunk=7)
    for start in range(0, len(pos), 50):
        acc.add(patches[start : start + 50], pos[start : start + 50])
    s = acc.result()
    assert acc.count == len(pos)
    assert s.origin_px == ref.origin_px
    np.testing.assert_array_equal(s.weight, ref.weight)
    np.testing.assert_array_equal(s.obj, ref.obj)


def test_accumulator_refuses_positions_outside_the_plan() -> None:
    acc = StitchAccumulator(np.array([[20.0, 20.0], [30.0, 30.0]]), N)
    with pytest.raises(DataError, match="outside the canvas"):
        acc.add(np.ones((1, N, N), np.complex64), np.array([[50.0, 20.0]]))
    with pytest.raises(DataError, match="shape"):
        acc.add(np.ones((1, N + 2, N + 2), np.complex64), np.array([[20.0, 20.0]]))


def test_default_subpixel() -> None:
    assert default_subpixel(np.array([[1.0, 2.0], [-3.0, 4.0]])) == "none"
    assert default_subpixel(np.array([[1.0, 2.5]])) == "fourier"
    with pytest.raises(DataError, match="subpixel"):
        stitch_patches(np.ones((1, N, N), np.complex64), np.zeros((1, 2)), subpixel="cubic")


# --------------------------------------------------------------------------- precision


def test_float32_accumulation_error() -> None:
    """The float32 canvas against the float64 one, patches cut from one object with
    Gaussian weights, K = 49 overlapping patches per interior pixel (N = 32, step 5).

    Bound: a sequential float32 sum of K terms errs by at most (K-1) u sum|terms|
    (u = 2^-24), for numerator and weight sum alike: <= 2 (K-1) u = 5.7e-6 relative for
    their ratio. Measured 4.0e-7 of max |obj| (rms 7e-8); asserted: 2e-6, a quarter of
    the 1e-5 parity budget (the runtime compares objects at 1e-5 relative)."""
    n, step = 32, 5
    obj = _object(140, 140, seed=5)
    pos = _grid(20, 120, 20, 120, step)
    patches = _cut(obj, pos, n)
    c = np.arange(n) - n / 2 + 0.5
    w = np.exp(-(c[:, None] ** 2 + c[None, :] ** 2) / (n / 3) ** 2)
    s32 = stitch_patches(patches, pos, weights=w)
    s64 = stitch_patches(patches, pos, weights=w, accumulate="float64")
    assert int(stitch_patches(np.ones_like(patches), pos).weight.max()) == 49
    assert s32.obj.dtype == s64.obj.dtype == np.complex64  # the output is complex64 both ways
    diff = np.abs(s32.obj.astype(np.complex128) - s64.obj)
    peak = float(np.abs(s64.obj).max())
    assert 0 < diff.max() / peak < 2e-6
    assert (diff[s64.mask] / np.abs(s64.obj[s64.mask])).max() < 2 * 49 * 2.0**-24
    np.testing.assert_allclose(s32.weight, s64.weight, rtol=2 * 49 * 2.0**-24)
    np.testing.assert_array_equal(s32.mask, s64.mask)


def _random_scan(m: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patches, fractional positions, weights): disagreeing patches, for bit-identity."""
    rng = np.random.default_rng(seed)
    patches = (rng.standard_normal((m, N, N)) + 1j * rng.standard_normal((m, N, N))).astype(
        np.complex64)
    return patches, rng.uniform(0, 60, (m, 2)), rng.random((N, N))


def test_prefetch_and_accumulate_options() -> None:
    """Prefetching the next chunk in a helper thread changes nothing, bit for bit; a bad
    precision name is refused."""
    patches, pos, w = _random_scan(300, 13)
    for method in SUBPIXEL_METHODS:
        a = StitchAccumulator(pos, N, weights=w, subpixel=method, chunk=16, prefetch=True)
        b = StitchAccumulator(pos, N, weights=w, subpixel=method, chunk=16, prefetch=False)
        a.add(patches, pos)
        b.add(patches, pos)
        np.testing.assert_array_equal(a.result().obj, b.result().obj)
        np.testing.assert_array_equal(a.result().weight, b.result().weight)
    with pytest.raises(DataError, match="accumulate"):
        StitchAccumulator(pos, N, accumulate="float16")


@pytest.mark.parametrize("cores", [1, 3])
def test_prepare_workers_change_nothing(cores: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sub-pixel chunks are prepared by one helper per core; placement stays in patch
    order, so any number of helpers gives the same bits."""
    patches, pos, w = _random_scan(200, 14)
    monkeypatch.setattr("runtime.stitch.os.cpu_count", lambda: cores)
    for method in ("fourier", "bilinear", "none"):
        acc = StitchAccumulator(pos, N, weights=w, subpixel=method, chunk=8)
        assert acc.prepare_workers == (1 if method == "none" else cores)
        ref = StitchAccumulator(pos, N, weights=w, subpixel=method, chunk=8, prefetch=False)
        acc.add(patches, pos)
        ref.add(patches, pos)
        np.testing.assert_array_equal(acc.result().obj, ref.result().obj)
