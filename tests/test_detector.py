"""runtime.detector: counts -> amplitudes without integer overflow, kind heuristics, crop."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.detector import (
    center_crop,
    crop_window,
    frames_to_amplitudes,
    kind_warning,
    looks_like,
    marker_warning,
)
from runtime.errors import DataError


def _uint16_counts(seed: int = 0, shape: tuple[int, ...] = (5, 16, 16)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frames = rng.poisson(40.0, size=shape).astype(np.uint16)
    # Values whose square (or sum of squares) wraps in uint16: 256^2 = 65536.
    frames[0, 8, 8] = 65000
    frames[1, 8, 8] = 1000
    frames[2, 3, 4] = 300
    return frames


# --------------------------------------------------------------------------- conversion


def test_uint16_counts_match_float64_reference_exactly():
    frames = _uint16_counts()
    # The trap this guards against: arithmetic in the native dtype wraps round.
    assert int((frames[1] * frames[1])[8, 8]) != 1000 * 1000
    out = frames_to_amplitudes(frames, "counts", "scan.h5")
    ref = np.sqrt(frames.astype(np.float64)).astype(np.float32)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, ref)
    # Squaring the amplitudes in float gives the counts back (float32 rounding only).
    np.testing.assert_allclose(out.astype(np.float64) ** 2, frames, rtol=2e-7)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.uint32, np.int64,
                                   np.float32, np.float64])
def test_every_numeric_dtype_equals_reference(dtype):
    frames = _uint16_counts(1).clip(0, 250).astype(dtype)
    out = frames_to_amplitudes(frames, "counts")
    np.testing.assert_array_equal(out, np.sqrt(frames.astype(np.float64)).astype(np.float32))


def test_amplitude_kind_is_only_cast():
    amp = np.random.default_rng(2).random((3, 8, 8)).astype(np.float64)
    out = frames_to_amplitudes(amp, "amplitude")
    np.testing.assert_array_equal(out, amp.astype(np.float32))
    assert out.dtype == np.float32


def test_negative_counts_refused_with_pattern_number():
    frames = np.zeros((4, 8, 8), np.int32)
    frames[2, 1, 1] = -1
    with pytest.raises(DataError) as err:
        frames_to_amplitudes(frames, "counts", "run7.h5", key="/entry/data/data", start=100)
    msg = str(err.value)
    assert msg.startswith("run7.h5: dataset '/entry/data/data'")
    assert "negative" in msg and "pattern 102" in msg and "\n" not in msg


def test_nonfinite_complex_and_bool_refused():
    bad = np.ones((2, 4, 4), np.float32)
    bad[1, 0, 0] = np.nan
    with pytest.raises(DataError, match="NaN/Inf.*pattern 1"):
        frames_to_amplitudes(bad, "amplitude", "a.npz")
    with pytest.raises(DataError, match="complex"):
        frames_to_amplitudes(np.ones((1, 4, 4), np.complex64), "counts")
    with pytest.raises(DataError, match="dtype bool"):
        frames_to_amplitudes(np.ones((1, 4, 4), bool), "counts")
    with pytest.raises(DataError, match="data kind"):
        frames_to_amplitudes(np.ones((1, 4, 4)), "intensity")  # type: ignore[arg-type]


def test_float64_beyond_float32_range_refused():
    with pytest.raises(DataError, match="float32 range"):
        frames_to_amplitudes(np.full((1, 2, 2), 1e300), "amplitude")


# --------------------------------------------------------------------------- kind heuristics


def test_looks_like_verdicts():
    counts = _uint16_counts()
    assert looks_like(counts) == "counts"
    assert looks_like(counts.astype(np.float32)) == "counts"  # integer-valued floats
    assert looks_like(np.sqrt(counts.astype(np.float32))) == "amplitude"  # raw sqrt
    normalised = np.sqrt(counts.astype(np.float64)) / 300.0
    assert looks_like(normalised.astype(np.float32)) == "amplitude"
    assert looks_like(np.random.default_rng(0).poisson(0.5, (4, 8, 8))) == "unknown"
    assert looks_like(counts * np.float32(0.37)) == "unknown"  # scaled / processed
    assert looks_like(np.zeros((2, 4, 4))) == "unknown"
    assert looks_like(counts.astype(np.int32) - 100) == "unknown"  # negative values


def test_looks_like_samples_only_first_frames():
    frames = np.zeros((100, 8, 8), np.float32)
    frames[:8] = _uint16_counts(shape=(8, 16, 16))[:, :8, :8] / 65000.0 + 0.01
    frames[50] = 1000.0  # beyond the sample: not looked at
    assert looks_like(frames) == "amplitude"


def test_kind_warning_names_file_and_other_kind():
    counts = _uint16_counts()
    text = kind_warning(counts, "amplitude", "scan.h5", key="/entry/data/data")
    assert text is not None and "\n" not in text
    assert text.startswith("scan.h5: dataset '/entry/data/data'")
    assert "--data-kind counts" in text
    amp = (np.sqrt(counts.astype(np.float64)) / 300).astype(np.float32)
    text = kind_warning(amp, "counts", "scan.h5")
    assert text is not None and "--data-kind amplitude" in text
    assert kind_warning(counts, "counts", "scan.h5") is None
    assert kind_warning(amp, "amplitude", "scan.h5") is None
    assert kind_warning(counts * np.float32(0.37), "counts", "x") is None  # unknown: quiet


def test_marker_warning_for_dtype_maximum():
    frames = _uint16_counts()
    assert marker_warning(frames, "s.h5") is None
    frames[0, :, 5] = 65535
    text = marker_warning(frames, "s.h5")
    assert text is not None and "65535" in text and "16 pixels" in text
    assert marker_warning(frames.astype(np.float32), "s.h5") is None


# --------------------------------------------------------------------------- cropping


def _delta_at_dc(m: int, h: int) -> np.ndarray:
    """Frames whose only bright pixel is DC, placed exactly where fftshift puts it."""
    spectrum = np.fft.fftshift(np.abs(np.fft.fft2(np.ones((h, h)))))
    frames = np.repeat(spectrum[None], m, axis=0)
    assert np.unravel_index(np.argmax(frames[0]), frames[0].shape) == (h // 2, h // 2)
    return frames


@pytest.mark.parametrize(("h", "n"), [(128, 64), (64, 64), (65, 64), (66, 63), (33, 1),
                                      (9, 4)])
def test_center_crop_keeps_dc_at_n_half(h, n):
    frames = _delta_at_dc(3, h)
    out = center_crop(frames, n, "f.h5")
    assert out.shape == (3, n, n)
    for frame in out:
        assert np.unravel_index(np.argmax(frame), frame.shape) == (n // 2, n // 2)
    first = crop_window(h, h, n).start
    assert first == h // 2 - n // 2
    np.testing.assert_array_equal(out, frames[:, first:first + n, first:first + n])


def test_center_crop_is_a_view_and_chunk_consistent():
    frames = np.arange(10 * 12 * 12, dtype=np.uint16).reshape(10, 12, 12)
    full = center_crop(frames, 6)
    assert np.shares_memory(full, frames)
    assert center_crop(frames, 12) is frames  # already N x N: untouched
    pieces = np.concatenate([center_crop(frames[a:a + 3], 6) for a in range(0, 10, 3)])
    np.testing.assert_array_equal(pieces, full)
    np.testing.assert_array_equal(center_crop(frames[0], 6), full[0])  # single 2-D frame


def test_center_crop_refusals():
    with pytest.raises(DataError, match="non-square frames 12x16"):
        center_crop(np.zeros((2, 12, 16)), 8, "det.h5", key="/entry/data/data")
    with pytest.raises(DataError, match="smaller than the model's 64x64"):
        center_crop(np.zeros((2, 32, 32)), 64, "det.h5")
    with pytest.raises(DataError, match="positive integer"):
        center_crop(np.zeros((2, 32, 32)), 0)
    with pytest.raises(DataError, match="shape"):
        center_crop(np.zeros(5), 2)
