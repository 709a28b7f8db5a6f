"""Property-based tests (hypothesis) of the three readers/writers that see untrusted data.

- The npz scan reader (`runtime.scan.load_scan` and the memory-mapping `open_scan`): random
  keys, shapes and dtypes, and random damage to the bytes of a valid file. Each example
  either returns a ScanData that meets the contract or raises DataError; anything else
  (IndexError, MemoryError, a hang, ...) is a bug.
- The bundle reader (`ptycho_export.bundle.read_bundle`): random damage to a valid tiny
  bundle's bytes, and random edits of its members with the manifest rehashed (so only the
  content checks can catch them): a valid Bundle or a BundleError, nothing else.
- The stitcher: total weight is conserved (M x sum(weights), no crop), and integer shifts
  of a known object come back exactly.

Every example runs under a wall-clock guard (SIGALRM), so a hang fails the test instead of
stalling CI. Example counts are modest: the whole file takes a few seconds on 2 cores.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import signal
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import BundleParts, rewrite_bundle
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from runtime.errors import DataError
from runtime.scan import ScanData, load_scan
from runtime.scan_stream import open_scan
from runtime.stitch import SUBPIXEL_METHODS, StitchAccumulator, crop_to, stitch_patches

# CI: 60 fixed examples per test. A deeper hunt: PTYCHO_FUZZ_EXAMPLES=2000 (random seeds).
DEEP = int(os.environ.get("PTYCHO_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=DEEP or 60, deadline=None, derandomize=not DEEP,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
GUARD_S = 10


class Hang(Exception):
    """An example ran past the guard: a hang, reported as a failure."""


@contextlib.contextmanager
def time_limit(seconds: int = GUARD_S) -> Iterator[None]:
    """Fail (not stall) if the body runs longer than `seconds` (main thread, POSIX)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not \
            threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise Hang(f"example ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- npz reader
KEYS = ("diffraction", "diff3d", "probeGuess", "xcoords", "ycoords", "objectGuess",
        "scan_index", "Y")
DTYPES = [np.float16, np.float32, np.float64, ">f4", np.int8, np.uint16, np.int64,
          np.complex64, np.complex128, np.bool_, "<U2", "datetime64[s]"]
N = 4
M = 3


def assert_contract(scan: ScanData) -> None:
    """What every ScanData the readers return guarantees downstream."""
    amp = np.asarray(scan.amplitudes)
    assert amp.dtype == np.float32 and amp.ndim == 3 and amp.shape[0] >= 1
    assert amp.shape[1] == amp.shape[2] >= 1
    assert np.all(np.isfinite(amp)) and np.all(amp >= 0)
    m, n = amp.shape[0], amp.shape[1]
    assert scan.probe.dtype == np.complex64 and scan.probe.shape == (n, n)
    assert np.all(np.isfinite(scan.probe)) and np.any(scan.probe)
    assert scan.positions_px.dtype == np.float64 and scan.positions_px.shape == (m, 2)
    assert np.all(np.isfinite(scan.positions_px))
    if scan.object_truth is not None:
        assert scan.object_truth.dtype == np.complex64 and scan.object_truth.ndim == 2
    if scan.scan_index is not None:
        assert scan.scan_index.dtype == np.int64 and scan.scan_index.shape == (m,)


def read_both(path: Path) -> None:
    """load_scan and open_scan: a valid ScanData or DataError, and the same verdict."""
    verdicts = []
    for reader in (load_scan, open_scan):
        with time_limit():
            try:
                scan = reader(path)
            except DataError as err:
                message = str(err)
                assert "\n" not in message and str(path) in message, message
                verdicts.append(("refused", message))
                continue
        assert_contract(scan)
        verdicts.append(("ok", ""))
    assert verdicts[0][0] == verdicts[1][0], verdicts


def valid_arrays(m: int = M, n: int = N) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"diffraction": rng.uniform(0, 2, (m, n, n)).astype(np.float32),
            "probeGuess": (np.ones((n, n)) + 0.5j).astype(np.complex64),
            "xcoords": np.arange(m, dtype=np.float64) * 2 + n,
            "ycoords": np.arange(m, dtype=np.float64) + n,
            "objectGuess": np.ones((3 * n, 3 * n), np.complex64),
            "scan_index": np.arange(m)}


def any_array(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(st.sampled_from([(), (0,), (M,), (M + 1,), (N, N), (M, N, N), (M, N, N + 1),
                                  (0, N, N), (M, 0, 0), (1, N, N), (M, N, N, 1)]))
    if dtype.kind in "fc":
        # the largest finite value of the dtype, and for double ones a value that is finite
        # there but overflows float32 / complex64
        big = [float(np.finfo(dtype).max)] + ([1e39] if dtype.itemsize * (
            2 if dtype.kind == "f" else 1) >= 16 else [])
        elements = st.sampled_from([0.0, 1.0, 0.5, -1.0, math.nan, math.inf, -0.0, *big])
        return draw(hnp.arrays(dtype, shape, elements=elements))
    return draw(hnp.arrays(dtype, shape))


@st.composite
def npz_members(draw: st.DrawFn) -> dict[str, np.ndarray]:
    """Start from a valid scan and replace, drop or add a few members at random."""
    arrays = valid_arrays()
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=3, unique=True)):
        action = draw(st.sampled_from(["replace", "replace", "drop"]))
        if action == "drop":
            arrays.pop(key, None)
        else:
            arrays[key] = any_array(draw)
    return arrays


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fuzz-") as folder:
        yield Path(folder)


@FUZZ
@given(arrays=npz_members(), compressed=st.booleans(), pickled=st.booleans())
def test_npz_reader_random_members(scratch: Path, arrays: dict[str, np.ndarray],
                                   compressed: bool, pickled: bool) -> None:
    if pickled:  # an object array: np.savez pickles it; the reader must refuse, not run it
        payload = np.empty(M, dtype=object)
        payload[:] = [complex(1, 1)] * M
        arrays = {**arrays, "xcoords": payload}
    path = scratch / "members.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    read_both(path)


@functools.cache
def valid_npz() -> dict[str, bytes]:
    """One valid scan, stored (memory-mappable) and deflated, as bytes."""
    out = {}
    for name, save in (("stored", np.savez), ("deflated", np.savez_compressed)):
        buffer = io.BytesIO()
        save(buffer, **valid_arrays(m=6, n=8))
        out[name] = buffer.getvalue()
    return out


@st.composite
def damaged(draw: st.DrawFn, blob: bytes) -> bytes:
    data = bytearray(blob)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "flip", "zero", "truncate", "insert", "dup"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "zero":
            span = draw(st.integers(1, 64))
            data[at : at + span] = bytes(len(data[at : at + span]))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            span = draw(st.integers(1, 200))
            data[at:at] = data[at : at + span]
    return bytes(data)


@FUZZ
@given(data=st.data(), layout=st.sampled_from(["stored", "deflated"]))
def test_npz_reader_damaged_bytes(scratch: Path, data: st.DataObject, layout: str) -> None:
    blob = data.draw(damaged(valid_npz()[layout]))
    path = scratch / "damaged.npz"
    path.write_bytes(blob)
    read_both(path)


@FUZZ
@given(header=st.sampled_from([
    "{'descr': '<f4', 'fortran_order': False, 'shape': (999999999999, 8, 8), }",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (-6, 8, 8), }",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (6, 8), }",
    "{'descr': '|O', 'fortran_order': False, 'shape': (6, 8, 8), }",
    "{'descr': '<f4', 'fortran_order': True, 'shape': (6, 8, 8), }",
    "{'descr': '>f8', 'fortran_order': False, 'shape': (3, 8, 8), }",
    "{'descr': 'zz', 'fortran_order': False, 'shape': (6, 8, 8), }",
    "{'descr': '<f4', 'shape': (6, 8, 8), }",
    "not a dict at all",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (2**70, 8, 8), }",
]), stored=st.booleans())
def test_npz_reader_hostile_array_headers(scratch: Path, header: str, stored: bool) -> None:
    """Hand-written .npy headers (huge, negative or lying shapes, object dtype) inside
    an otherwise valid archive: refused with DataError, never allocated or unpickled."""
    arrays = valid_arrays(m=6, n=8)
    body = arrays["diffraction"].tobytes()
    text = header.encode("latin1")
    pad = 64 - (10 + len(text) + 1) % 64
    npy = b"\x93NUMPY\x01\x00" + (len(text) + pad + 1).to_bytes(2, "little") + text + \
        b" " * pad + b"\n" + body
    path = scratch / "header.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED) \
            as archive:
        archive.writestr("diffraction.npy", npy)
        for key in ("probeGuess", "xcoords", "ycoords"):
            buffer = io.BytesIO()
            np.save(buffer, arrays[key])
            archive.writestr(f"{key}.npy", buffer.getvalue())
    read_both(path)


# ---------------------------------------------------------------- bundle reader
# (torch-side: the tiny_bundle fixture skips these on a runtime-only install)


def assert_valid_bundle(bundle: object) -> None:
    """What a Bundle that read_bundle returns guarantees the model builder."""
    import torch

    config, norm = bundle.config, bundle.normalization
    n = config.patch_size
    assert bundle.probe.dtype == np.complex64 and bundle.probe.shape == (n, n)
    for value in (norm.amplitude_scale, norm.probe_scale, config.amp_max):
        assert math.isfinite(value) and value > 0, (norm, config)
    assert all(w > 0 for w in config.widths)
    assert all(t.dtype == torch.float32 for t in bundle.state_dict.values())


def read_verdict(path: Path) -> None:
    from ptycho_export.bundle import read_bundle
    from runtime.errors import BundleError

    with time_limit():
        try:
            bundle = read_bundle(path)
        except BundleError as err:
            message = str(err)
            assert "\n" not in message and str(path) in message, message
            return
    assert_valid_bundle(bundle)


@FUZZ
@given(data=st.data())
def test_bundle_reader_damaged_bytes(scratch: Path, tiny_bundle: Path,
                                     data: st.DataObject) -> None:
    blob = data.draw(damaged(tiny_bundle.read_bytes()))
    path = scratch / "damaged.zip"
    path.write_bytes(blob)
    read_verdict(path)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, 1, -1, 32, 0.5, -2.5, 1e308, math.nan, math.inf, -math.inf])
    | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=6)
CONFIG_FIELDS = [("model", "patch_size"), ("model", "gridsize"), ("model", "widths"),
                 ("model", "amp_max"), ("normalization", "amplitude_scale"),
                 ("normalization", "probe_scale"), ("training", "epochs"), ("data", "source")]


@st.composite
def member_edit(draw: st.DrawFn):  # noqa: ANN202 - a rewrite_bundle callback
    kind = draw(st.sampled_from(["config", "config", "drop-key", "member-bytes",
                                 "member-truncate"]))
    if kind in ("config", "drop-key"):
        section, key = draw(st.sampled_from(CONFIG_FIELDS))
        value = draw(JSON_VALUES)

        def edit(parts: BundleParts) -> None:
            config = json.loads(parts.members["config.json"])
            if kind == "drop-key":
                config[section].pop(key, None)
            else:
                config[section][key] = value
            parts.members["config.json"] = json.dumps(config).encode()
        return edit
    name = draw(st.sampled_from(["probe.npy", "golden.npz", "weights.safetensors",
                                 "config.json"]))
    junk = draw(st.binary(max_size=64))
    cut = draw(st.integers(0, 4096))

    def replace(parts: BundleParts) -> None:
        blob = parts.members[name]
        parts.members[name] = junk if kind == "member-bytes" else blob[: min(cut, len(blob))]
    return replace


@FUZZ
@given(edit=member_edit())
def test_bundle_reader_rehashed_member_edits(scratch: Path, tiny_bundle: Path, edit) -> None:  # noqa: ANN001
    """The manifest is rehashed after the edit: only the content checks stand between the
    edit and a model built from it."""
    path = rewrite_bundle(tiny_bundle, scratch / "edited.zip", edit)
    read_verdict(path)


# ---------------------------------------------------------------- stitcher
@st.composite
def stitch_case(draw: st.DrawFn, integer: bool) -> tuple[np.ndarray, np.ndarray, int]:
    n = draw(st.sampled_from([2, 4, 6, 8]))
    m = draw(st.integers(1, 12))
    if integer:
        coord = st.integers(-20, 20).map(float)
    else:
        coord = st.floats(-20, 20, allow_nan=False, allow_infinity=False)
    pos = np.array(draw(st.lists(st.tuples(coord, coord), min_size=m, max_size=m)),
                   dtype=np.float64)
    weights = draw(hnp.arrays(np.float32, (n, n), elements=st.floats(
        0, 4, width=32, allow_nan=False, allow_infinity=False)))
    return pos, weights, n


@FUZZ
@given(case=stitch_case(integer=False), method=st.sampled_from(SUBPIXEL_METHODS),
       chunk=st.integers(1, 5))
def test_stitcher_conserves_total_weight(case: tuple[np.ndarray, np.ndarray, int],
                                         method: str, chunk: int) -> None:
    pos, weights, n = case
    m = len(pos)
    patches = np.ones((m, n, n), np.complex64)
    with time_limit():
        out = stitch_patches(patches, pos, weights=weights, crop=0, subpixel=method,
                             chunk=chunk)
    expected = m * float(weights.astype(np.float64).sum())
    assert float(out.weight.astype(np.float64).sum()) == pytest.approx(expected, rel=1e-5,
                                                                        abs=1e-4)
    assert np.all(out.weight >= 0)
    unweighted = stitch_patches(patches, pos, crop=0, subpixel=method, chunk=chunk)
    total = float(unweighted.weight.astype(np.float64).sum())
    if method == "bilinear":  # (1 - f) + f splat weights, rounded to float32
        assert total == pytest.approx(m * n * n, rel=1e-6)
    else:  # whole-pixel placement: every weight 1.0, summed exactly
        assert total == m * n * n


@FUZZ
@given(case=stitch_case(integer=True), method=st.sampled_from(SUBPIXEL_METHODS),
       weighted=st.booleans(), seed=st.integers(0, 2**16), batches=st.integers(1, 3))
def test_stitcher_is_exact_for_integer_shifts(case: tuple[np.ndarray, np.ndarray, int],
                                              method: str, weighted: bool, seed: int,
                                              batches: int) -> None:
    pos, weights, n = case
    weights = weights + np.float32(0.25)  # > 0 everywhere: every covered pixel has weight
    rng = np.random.default_rng(seed)
    size = 64
    obj = (rng.uniform(0.1, 2, (size, size)) * np.exp(1j * rng.uniform(-3, 3, (size, size)))
           ).astype(np.complex64)
    origin = 30  # positions in [-20, 20] become [10, 50]: every patch inside the object
    centres = pos + origin
    patches = np.stack([obj[int(y) - n // 2 : int(y) + n // 2, int(x) - n // 2 : int(x) + n // 2]
                        for y, x in centres])
    acc = StitchAccumulator(centres, n, weights=weights if weighted else None, crop=0,
                            subpixel=method)
    with time_limit():
        for part in np.array_split(np.arange(len(centres)), batches):
            acc.add(patches[part], centres[part])
        out = acc.result()
    assume(out.mask.any())
    truth = crop_to(obj, out)
    # The canvas accumulates in float32 (runtime.stitch, "Precision"): each pixel is
    # sum(w_k v) / sum(w_k) over its K <= m patches, all holding the same value v and
    # w_k > 0, so nothing cancels: each product and the quotient round once, each of the
    # two sums K - 1 times, by at most u = 2^-24 relative: |error| <= 2 K u |v|.
    bound = 2 * len(centres) * 2.0**-24
    np.testing.assert_allclose(out.obj[out.mask], truth[out.mask], rtol=bound, atol=0)
    if not weighted and len(centres) <= 2:  # v + v and (v + v) / 2 are exact
        np.testing.assert_array_equal(out.obj[out.mask], truth[out.mask])
    assert np.all(out.obj[~out.mask] == 0)
