"""The scan contract: round trips, one float32 conversion, one-line DataErrors, no pickle."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import DataError
from runtime.scan import ScanData, load_scan, save_scan, validate_scan

M, N = 5, 8


def _arrays(m: int = M, n: int = N) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "diffraction": rng.uniform(0.0, 0.9, size=(m, n, n)).astype(np.float32),
        "probeGuess": (rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n))).astype(np.complex64),
        "xcoords": rng.uniform(10, 20, size=m),
        "ycoords": rng.uniform(10, 20, size=m),
        "objectGuess": np.exp(1j * rng.uniform(-1, 1, size=(30, 30))).astype(np.complex64),
        "scan_index": np.zeros(m, dtype=np.int64),
    }


def _write(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


def _scan() -> ScanData:
    a = _arrays()
    return validate_scan(
        a["diffraction"],
        a["probeGuess"],
        a["xcoords"],
        a["ycoords"],
        a["objectGuess"],
        a["scan_index"],
    )


def _same(a: ScanData, b: ScanData) -> None:
    for name in ("amplitudes", "probe", "positions_px", "object_truth", "scan_index"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        assert np.array_equal(x, y), name


# --------------------------------------------------------------------------- happy paths


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    scan = _scan()
    path = tmp_path / "scan.npz"
    save_scan(path, scan)
    loaded = load_scan(path)
    _same(scan, loaded)
    assert loaded.source == str(path)
    assert loaded.n_patterns == M and loaded.patch_size == N
    with np.load(path, allow_pickle=False) as npz:
        assert set(npz.files) == {
            "diffraction",
            "probeGuess",
            "xcoords",
            "ycoords",
            "objectGuess",
            "scan_index",
        }
        assert npz["diffraction"].dtype == np.float32
        assert npz["probeGuess"].dtype == np.complex64
        assert npz["xcoords"].dtype == np.float64


def test_loaded_dtypes_and_positions_order(tmp_path: Path) -> None:
    a = _arrays()
    scan = load_scan(_write(tmp_path / "data.npz", a))
    assert scan.amplitudes.dtype == np.float32 and scan.amplitudes.flags.c_contiguous
    assert scan.probe.dtype == np.complex64
    assert scan.positions_px.dtype == np.float64 and scan.positions_px.shape == (M, 2)
    assert np.array_equal(scan.positions_px[:, 0], a["ycoords"])
    assert np.array_equal(scan.positions_px[:, 1], a["xcoords"])
    assert scan.object_truth is not None and scan.object_truth.dtype == np.complex64
    assert scan.scan_index is not None and scan.scan_index.dtype == np.int64


def test_optional_keys_may_be_absent(tmp_path: Path) -> None:
    a = _arrays()
    del a["objectGuess"], a["scan_index"]
    scan = load_scan(_write(tmp_path / "data.npz", a))
    assert scan.object_truth is None and scan.scan_index is None
    save_scan(tmp_path / "again.npz", scan)
    with np.load(tmp_path / "again.npz") as npz:
        assert "objectGuess" not in npz.files and "scan_index" not in npz.files


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_float_amplitudes_become_float32_once(tmp_path: Path, dtype: type) -> None:
    a = _arrays()
    a["diffraction"] = a["diffraction"].astype(dtype)
    scan = load_scan(_write(tmp_path / "data.npz", a))
    assert scan.amplitudes.dtype == np.float32
    assert np.array_equal(scan.amplitudes, a["diffraction"].astype(np.float32))


def test_float32_input_is_not_copied() -> None:
    a = _arrays()
    scan = validate_scan(a["diffraction"], a["probeGuess"], a["xcoords"], a["ycoords"])
    assert scan.amplitudes is a["diffraction"]


def test_legacy_diff3d_key(tmp_path: Path) -> None:
    a = _arrays()
    a["diff3d"] = a.pop("diffraction")
    scan = load_scan(_write(tmp_path / "data.npz", a))
    assert np.array_equal(scan.amplitudes, a["diff3d"])


def test_diffraction_wins_over_diff3d(tmp_path: Path) -> None:
    a = _arrays()
    a["diff3d"] = np.full((M, N, N), 7, dtype=np.uint16)  # would be rejected if read
    scan = load_scan(_write(tmp_path / "data.npz", a))
    assert np.array_equal(scan.amplitudes, a["diffraction"])


def test_real_probe_is_accepted_silently(tmp_path: Path) -> None:
    a = _arrays()
    a["probeGuess"] = np.abs(a["probeGuess"]).astype(np.float64)
    scan = load_scan(_write(tmp_path / "data.npz", a))
    assert scan.probe.dtype == np.complex64
    assert np.array_equal(scan.probe.real, a["probeGuess"].astype(np.float32))
    assert not np.any(scan.probe.imag)


def test_extra_keys_are_ignored(tmp_path: Path) -> None:
    a = _arrays()
    a["Y"] = np.ones((M, N, N), dtype=np.complex64)
    assert load_scan(_write(tmp_path / "data.npz", a)).n_patterns == M


# --------------------------------------------------------------------------- contract errors

Mutation = Callable[[dict[str, np.ndarray]], None]


def _set(key: str, value: Callable[[dict[str, np.ndarray]], np.ndarray]) -> Mutation:
    def mutate(a: dict[str, np.ndarray]) -> None:
        a[key] = value(a)

    return mutate


def _drop(key: str) -> Mutation:
    def mutate(a: dict[str, np.ndarray]) -> None:
        del a[key]

    return mutate


def _poison(key: str, index: tuple[int, ...], values: list[float]) -> Mutation:
    def mutate(a: dict[str, np.ndarray]) -> None:
        arr = a[key].copy()
        for k, v in enumerate(values):
            arr[(index[0] + k, *index[1:])] = v
        a[key] = arr

    return mutate


def _empty(a: dict[str, np.ndarray]) -> None:
    a["diffraction"] = np.zeros((0, N, N), np.float32)
    a["xcoords"] = a["ycoords"] = np.zeros(0)
    a["scan_index"] = np.zeros(0, np.int64)


CASES: list[tuple[str, Mutation, str, str]] = [
    ("missing-diffraction", _drop("diffraction"), "diffraction", "keys present: probeGuess"),
    ("missing-probe", _drop("probeGuess"), "probeGuess", "is missing"),
    ("missing-x", _drop("xcoords"), "xcoords", "is missing"),
    ("missing-y", _drop("ycoords"), "ycoords", "is missing"),
    ("rank-2", _set("diffraction", lambda a: a["diffraction"][0]), "diffraction", "rank 2"),
    (
        "non-square",
        _set("diffraction", lambda a: a["diffraction"][:, :, :6]),
        "diffraction",
        "non-square",
    ),
    (
        "counts",
        _set("diffraction", lambda a: (a["diffraction"] * 1000).astype(np.uint16)),
        "diffraction",
        "np.sqrt(counts)",
    ),
    (
        "complex-diffraction",
        _set("diffraction", lambda a: a["diffraction"].astype(np.complex64)),
        "diffraction",
        "complex",
    ),
    (
        "nan",
        _poison("diffraction", (2, 0, 0), [np.nan, np.inf, -np.inf]),
        "diffraction",
        "3 NaN/Inf values (first at pattern 2)",
    ),
    (
        "negative",
        _poison("diffraction", (1, 3, 3), [-0.5, -0.25]),
        "diffraction",
        "2 negative values (min -0.5",
    ),
    ("empty", _empty, "diffraction", "no patterns"),
    (
        "probe-shape",
        _set("probeGuess", lambda a: a["probeGuess"][:6, :6]),
        "probeGuess",
        "(6, 6)",
    ),
    ("probe-nan", _poison("probeGuess", (0, 1), [np.nan]), "probeGuess", "NaN/Inf"),
    ("probe-zero", _set("probeGuess", lambda a: 0 * a["probeGuess"]), "probeGuess", "zeros"),
    ("x-length", _set("xcoords", lambda a: a["xcoords"][:4]), "xcoords", "4 positions"),
    ("y-length", _set("ycoords", lambda a: np.zeros(M + 1)), "ycoords", "6 positions"),
    ("x-rank", _set("xcoords", lambda a: a["xcoords"][:, None]), "xcoords", "rank 2"),
    ("y-nan", _poison("ycoords", (3,), [np.inf]), "ycoords", "1 NaN/Inf values"),
    (
        "object-rank",
        _set("objectGuess", lambda a: a["objectGuess"][None]),
        "objectGuess",
        "rank 3",
    ),
    ("object-nan", _poison("objectGuess", (4, 4), [np.nan]), "objectGuess", "NaN/Inf"),
    ("index-length", _set("scan_index", lambda a: np.zeros(2, np.int64)), "scan_index", "2"),
    (
        "index-float",
        _set("scan_index", lambda a: np.full(M, 0.5)),
        "scan_index",
        "non-integer",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "key", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_contract_violation_is_one_line_data_error(
    tmp_path: Path, mutate: Mutation, key: str, fragment: str
) -> None:
    a = _arrays()
    mutate(a)
    path = _write(tmp_path / "data.npz", a)
    with pytest.raises(DataError) as info:
        load_scan(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: key '{key}'"), msg
    assert fragment in msg, msg


def test_legacy_key_is_named_in_errors(tmp_path: Path) -> None:
    a = _arrays()
    a["diff3d"] = (a.pop("diffraction") * 100).astype(np.uint16)
    with pytest.raises(DataError, match="key 'diff3d' has integer dtype uint16"):
        load_scan(_write(tmp_path / "data.npz", a))


def test_validate_scan_names_memory_source() -> None:
    a = _arrays()
    with pytest.raises(DataError, match=r"^<memory>: key 'xcoords' has 2 positions"):
        validate_scan(a["diffraction"], a["probeGuess"], a["xcoords"][:2], a["ycoords"])


# --------------------------------------------------------------------------- unreadable files


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.npz"
    with pytest.raises(DataError, match="nope.npz: file not found"):
        load_scan(path)


def test_directory_is_not_a_scan(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path.name)):
        load_scan(tmp_path)


@pytest.mark.parametrize(
    "content", [b"", b"hello, not an archive\n", b"PK\x03\x04truncated"], ids=str
)
def test_not_an_npz(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    with pytest.raises(DataError, match="bad.npz: not a readable .npz archive"):
        load_scan(path)


def test_truncated_npz(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.npz", _arrays())
    path = tmp_path / "cut.npz"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.npz"):
        load_scan(path)


def test_corrupt_member(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.npz", _arrays())
    data = bytearray(good.read_bytes())
    start = data.index(b"\x93NUMPY") + 200  # inside the first member's payload
    data[start : start + 16] = bytes(16)
    path = tmp_path / "crc.npz"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="crc.npz: key '"):
        load_scan(path)


def test_single_npy_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "one.npy"
    np.save(path, np.zeros((2, 4, 4), np.float32))
    with pytest.raises(DataError, match="one.npy: is a single .npy array"):
        load_scan(path)


UNPICKLED: list[str] = []


def _mark_unpickled() -> str:
    UNPICKLED.append("ran")
    return "payload"


class _Payload:
    def __reduce__(self) -> tuple[Callable[[], str], tuple[()]]:
        return (_mark_unpickled, ())


def test_pickled_object_array_is_refused_not_unpickled(tmp_path: Path) -> None:
    a = _arrays()
    payload = np.empty(M, dtype=object)
    payload[:] = [_Payload() for _ in range(M)]
    a["xcoords"] = payload
    path = tmp_path / "evil.npz"
    np.savez(path, **a)  # np.savez pickles object arrays by default
    UNPICKLED.clear()
    with pytest.raises(DataError, match="evil.npz: key 'xcoords' holds Python objects"):
        load_scan(path)
    assert UNPICKLED == []


# --------------------------------------------------------------------------- atomic save


def test_failed_save_leaves_old_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "scan.npz"
    old = _scan()
    save_scan(path, old)
    before = path.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_scan(path, old)
    with pytest.raises(RuntimeError):
        save_scan(tmp_path / "new.npz", old)
    assert sorted(os.listdir(tmp_path)) == ["scan.npz"]
    assert path.read_bytes() == before
    monkeypatch.undo()
    _same(load_scan(path), old)


def test_save_overwrites_atomically(tmp_path: Path) -> None:
    path = tmp_path / "scan.npz"
    save_scan(path, _scan())
    a = _arrays(m=3)
    smaller = validate_scan(a["diffraction"], a["probeGuess"], a["xcoords"], a["ycoords"])
    save_scan(path, smaller)
    assert load_scan(path).n_patterns == 3
    assert sorted(os.listdir(tmp_path)) == ["scan.npz"]


def test_save_into_missing_directory_is_data_error(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "scan.npz"
    with pytest.raises(DataError, match="scan.npz: cannot write"):
        save_scan(path, _scan())


def test_runtime_scan_is_torch_free() -> None:
    import subprocess
    import sys

    code = (
        "import sys, runtime.scan; sys.exit('torch' in sys.modules or 'lightning' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
