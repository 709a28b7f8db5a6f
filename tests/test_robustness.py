"""Bad input, faults and hostile files, end to end (docs/robustness.md lists every case).

Each case goes through the command a user runs wherever that matters, and checks the
contract of every failure: the documented exit code (3 bad input, 4 environment, 130
interrupted), exactly one line on stderr that names the file and says what to do, no
traceback unless --verbose, and nothing half-written: no partial output, no temp file
left behind, any older output intact.

Most runtime cases use a toy ONNX artifact written with onnx.helper (amplitude = 0.5 x,
phase = 0.25 x, N = 16) with a valid manifest and golden data, so they need no torch and
cost milliseconds; the torch-side cases (bundles, export, training, TorchScript) use the
session's tiny bundle and skip on a runtime-only install.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tracemalloc
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import BundleParts, rewrite_bundle
from typer.testing import CliRunner

from cli.run import app as run_app
from cli.simulate import app as simulate_app
from runtime.errors import (
    EXIT_BAD_INPUT,
    EXIT_ENVIRONMENT,
    EXIT_USAGE,
    ArtifactError,
    DataError,
    EnvironmentProblem,
    os_error_line,
)
from runtime.run import run_scan
from runtime.scan import load_scan, save_scan, validate_scan
from runtime.scan_stream import open_scan

N = 16
M = 25
EXIT_INTERRUPTED = 130
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_toy_artifact(folder: Path, *, n: int = N, file_n: int | None = None,
                       elem: str = "FLOAT", opset: int = 17, ir_version: int = 9,
                       metadata: dict[str, str] | None = None,
                       manifest_extra: dict[str, Any] | None = None) -> Path:
    """An artifact folder around a two-Mul ONNX graph, hashes and golden data included.

    ``file_n``/``elem``/``opset``/``ir_version``/``metadata`` describe the model file;
    the manifest always declares a float32 (batch, 1, n, n) input, as the exporter would.
    """
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    kind = getattr(TensorProto, elem)
    fn = file_n or n
    shape = ["batch", 1, fn, fn]
    graph = helper.make_graph(
        [helper.make_node("Mul", ["diffraction", "half"], ["amplitude"]),
         helper.make_node("Mul", ["diffraction", "quarter"], ["phase"])],
        "toy",
        [helper.make_tensor_value_info("diffraction", kind, shape)],
        [helper.make_tensor_value_info("amplitude", kind, shape),
         helper.make_tensor_value_info("phase", kind, shape)],
        initializer=[helper.make_tensor("half", kind, [], [0.5]),
                     helper.make_tensor("quarter", kind, [], [0.25])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    if metadata:
        helper.set_model_props(model, metadata)
    folder.mkdir(parents=True)
    onnx.save(model, folder / "model.onnx")
    x = np.random.default_rng(0).uniform(0, 2, (3, 1, n, n)).astype(np.float32)
    np.savez(folder / "golden.npz", diffraction=x, amplitude=0.5 * x, phase=0.25 * x)
    declared = ["batch", 1, n, n]
    manifest = {
        "format": "ptycho-export-artifacts", "format_version": 1,
        "artifacts": {"onnx": {"file": "model.onnx", "opset": 17}},
        "files": {name: {"sha256": _sha256(folder / name),
                         "size": (folder / name).stat().st_size}
                  for name in ("model.onnx", "golden.npz")},
        "model": {"patch_size": n, "gridsize": 1, "widths": [4, 8, 16]},
        "inputs": [{"name": "diffraction", "shape": declared, "dtype": "float32"}],
        "outputs": [{"name": "amplitude", "shape": declared, "dtype": "float32"},
                    {"name": "phase", "shape": declared, "dtype": "float32"}],
        "golden": {"file": "golden.npz", "input": "diffraction",
                   "outputs": ["amplitude", "phase"]},
        **(manifest_extra or {}),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def probe(n: int = N) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) - (n - 1) / 2
    return np.exp(-(yy**2 + xx**2) / (n / 3) ** 2).astype(np.complex64)


def scan_arrays(m: int = M, n: int = N, seed: int = 0) -> dict[str, np.ndarray]:
    """A 5 x 5 raster, 4 px steps, integer positions: the npz data contract's members."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(m)))
    yy, xx = np.meshgrid(np.arange(side) * 4.0, np.arange(side) * 4.0, indexing="ij")
    pos = np.stack([yy.ravel(), xx.ravel()], axis=1)[:m] + n
    return {"diffraction": rng.uniform(0, 2, (m, n, n)).astype(np.float32),
            "probeGuess": probe(n), "xcoords": pos[:, 1], "ycoords": pos[:, 0]}


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


def error_line(result: Any, code: int, *fragments: str) -> str:
    """The failure contract: exit code, one stderr line with every fragment, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(("error: ", "interrupted: ", "terminated: ")), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert "Traceback" not in result.output
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Temp files and folders (ours all start with a dot) left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def invoke(app: Any, *args: Any) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_artifact(tmp_path_factory.mktemp("toy") / "artifact")


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_npz(tmp_path_factory.mktemp("scan") / "scan.npz", scan_arrays())


SIMULATE = ("--patch-size", N, "--rows", 3, "--cols", 3, "--probe-diameter", 8, "--step", 4)


def run_args(artifact: Path, data: Path, outdir: Path, *extra: str) -> list[Any]:
    return [artifact, data, "-o", outdir, "--provider", "cpu", "--no-progress",
            "--no-self-check", *extra]


# ---------------------------------------------------------------- data: one line, exit 3
class Marker:
    """Unpickling this creates ``path``: proof that a pickle ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return (open, (self.path, "w"))


def _forged_header(a: dict[str, np.ndarray], path: Path) -> None:
    """A valid archive whose diffraction .npy header claims 10**12 patterns."""
    import io

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {
        "descr": "<f4", "fortran_order": False, "shape": (10**12, N, N)})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("diffraction.npy", header.getvalue() + a["diffraction"].tobytes())
        for key in ("probeGuess", "xcoords", "ycoords"):
            buffer = io.BytesIO()
            np.save(buffer, a[key])
            archive.writestr(f"{key}.npy", buffer.getvalue())


def _mutate(key: str, value: Callable[[dict[str, np.ndarray]], Any]) -> Callable:
    def mutate(a: dict[str, np.ndarray], path: Path) -> None:
        result = value(a)
        if result is None:
            a.pop(key)
        else:
            a[key] = result
        write_npz(path, a)
    return mutate


def _poison(key: str, value: float) -> Callable:
    def mutate(a: dict[str, np.ndarray], path: Path) -> None:
        arr = a[key].copy()
        arr.flat[5] = value
        arr.flat[len(arr.flat) // 2] = value
        a[key] = arr
        write_npz(path, a)
    return mutate


def _empty(a: dict[str, np.ndarray], path: Path) -> None:
    write_npz(path, {**a, "diffraction": np.zeros((0, N, N), np.float32),
                     "xcoords": np.zeros(0), "ycoords": np.zeros(0)})


def _bytes(blob: bytes) -> Callable:
    def mutate(a: dict[str, np.ndarray], path: Path) -> None:
        path.write_bytes(blob)
    return mutate


def _pickled(a: dict[str, np.ndarray], path: Path) -> None:
    payload = np.empty(M, dtype=object)
    payload[:] = [Marker(path.with_name("PWNED")) for _ in range(M)]
    write_npz(path, {**a, "xcoords": payload})


DATA_CASES = [
    ("missing-diffraction", _mutate("diffraction", lambda a: None),
     "key 'diffraction' is missing"),
    ("wrong-rank", _mutate("diffraction", lambda a: a["diffraction"][0]), "rank 2"),
    ("non-square", _mutate("diffraction", lambda a: a["diffraction"][:, :, :10]),
     "non-square patterns 16x10"),
    ("nan-inf", _poison("diffraction", np.nan), "2 NaN/Inf values (first at pattern 0)"),
    ("negative", _poison("diffraction", -0.5), "2 negative values"),
    ("zero-probe", _mutate("probeGuess", lambda a: 0 * a["probeGuess"]), "all zeros"),
    ("positions-length", _mutate("xcoords", lambda a: a["xcoords"][:-3]),
     "has 22 positions but 'diffraction' has 25 patterns"),
    ("positions-nan", _poison("ycoords", np.nan), "key 'ycoords' has 2 NaN/Inf values"),
    ("empty-scan", _empty, "the scan has no patterns"),
    ("integer-counts", _mutate("diffraction", lambda a: (a["diffraction"] * 9).astype(int)),
     "store np.sqrt(counts)"),
    ("float64-beyond-float32", _mutate("diffraction", lambda a: np.where(
        np.arange(M)[:, None, None] == 7, 1e39, a["diffraction"].astype(np.float64))),
     f"{N * N} values beyond the float32 range (first at pattern 7)"),
    ("probe-beyond-complex64", _mutate("probeGuess", lambda a: a["probeGuess"].astype(
        np.complex128) * 1e39), "beyond the complex64 range"),
    ("real-probe-beyond-complex64", _mutate("probeGuess", lambda a: np.full((N, N), 1e39)),
     f"has {N * N} values beyond the complex64 range (first at row 0)"),
    ("not-an-npz", _bytes(b"just some text\n"), "not a readable .npz archive"),
    ("truncated", lambda a, path: path.write_bytes(write_npz(path, a).read_bytes()[:3000]),
     "not a readable .npz archive"),
    ("pickled-object-array", _pickled, "holds Python objects (pickled data); refusing"),
    ("forged-header", _forged_header, "the file is truncated or its header is forged"),
    ("patch-size", lambda a, path: write_npz(path, scan_arrays(n=2 * N)),
     "patterns are 32x32 but the model expects 16x16"),
]


@pytest.mark.parametrize(("make", "fragment"), [c[1:] for c in DATA_CASES],
                         ids=[c[0] for c in DATA_CASES])
def test_bad_scan_is_one_line_exit_3(tmp_path: Path, toy: Path, make: Callable,
                                     fragment: str) -> None:
    data = tmp_path / "bad.npz"
    make(scan_arrays(), data)
    outdir = tmp_path / "out"
    result = invoke(run_app, *run_args(toy, data, outdir))
    error_line(result, EXIT_BAD_INPUT, str(data), fragment)
    assert not outdir.exists() and leftovers(tmp_path) == []
    assert not (tmp_path / "PWNED").exists()  # the planted pickle never ran


def test_verbose_shows_the_traceback(tmp_path: Path, toy: Path) -> None:
    data = write_npz(tmp_path / "bad.npz", {**scan_arrays(), "diffraction": np.zeros(3)})
    result = invoke(run_app, *run_args(toy, data, tmp_path / "out", "--verbose"))
    assert result.exit_code == EXIT_BAD_INPUT
    assert "Traceback" in result.stderr and "DataError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {data}")


def test_float64_overflow_check_prints_no_warning(tmp_path: Path) -> None:
    """The one-line promise: numpy's "overflow encountered in cast" RuntimeWarning would be
    a second stderr line, so the conversion is silent and the check says it."""
    a = scan_arrays()
    a["diffraction"] = a["diffraction"].astype(np.float64)
    a["diffraction"][3, 0, 0] = 1e300
    path = write_npz(tmp_path / "big.npz", a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match="1 values beyond the float32 range"):
            load_scan(path)


def test_damaged_member_refused_the_same_way_when_memory_mapped(tmp_path: Path) -> None:
    """One flipped data byte in a stored (memory-mappable) scan: the zip reader refuses it
    by its CRC-32, and so does the memory-mapped path, with the same line."""
    path = write_npz(tmp_path / "scan.npz", scan_arrays())
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"\x93NUMPY") + 300] ^= 0x01  # inside the diffraction data
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as read:
        load_scan(path)
    with pytest.raises(DataError) as mapped:
        open_scan(path)
    assert str(mapped.value) == str(read.value)
    assert "Bad CRC-32 for file 'diffraction.npy'" in str(read.value)


# ---------------------------------------------------------------- data that works
def test_all_zero_scan_runs_to_a_finite_object(tmp_path: Path, toy: Path) -> None:
    """Beam off: every pattern zero is valid data for inference (the export's parity gate
    checks the real network on an all-zero pattern too); the object is finite."""
    a = scan_arrays()
    a["diffraction"] = np.zeros_like(a["diffraction"])
    data = write_npz(tmp_path / "dark.npz", a)
    result = invoke(run_app, *run_args(toy, data, tmp_path / "out"))
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "out" / "object.npz") as out:
        obj = out["object"]
    assert np.all(np.isfinite(obj)) and np.all(obj == 0)


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_float64_and_float16_scans_give_the_float32_result(tmp_path: Path, toy: Path,
                                                           dtype: type) -> None:
    a = scan_arrays()
    exact = a["diffraction"].astype(dtype)  # what the file holds
    write_npz(tmp_path / "wide.npz", {**a, "diffraction": exact})
    write_npz(tmp_path / "f32.npz", {**a, "diffraction": exact.astype(np.float32)})
    for name in ("wide", "f32"):
        run_scan(toy, tmp_path / f"{name}.npz", tmp_path / name, provider="cpu",
                 progress=False)
    objects = []
    for name in ("wide", "f32"):
        with np.load(tmp_path / name / "object.npz") as out:
            objects.append(out["object"])
    np.testing.assert_array_equal(objects[0], objects[1])


def test_large_scan_is_memory_mapped_not_read(tmp_path: Path) -> None:
    """A 64 MB stored scan: the amplitudes come back as a read-only np.memmap and the
    whole-stack checks run chunk by chunk, so Python-side peak memory stays a small
    fraction of the file. Nothing here depends on the size: a 2 GB file takes the same
    path (file offsets and np.memmap), only with more chunks."""
    m, n = 4000, 64
    a = scan_arrays(m=m, n=n)
    a["diffraction"] = np.random.default_rng(1).uniform(0, 2, (m, n, n)).astype(np.float32)
    path = write_npz(tmp_path / "big.npz", a)
    size = path.stat().st_size
    assert size > 60e6
    del a
    tracemalloc.start()
    try:
        scan = open_scan(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(scan.amplitudes, np.memmap) and not scan.amplitudes.flags.writeable
    assert scan.n_patterns == m
    assert peak < size / 10, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.0f} MB file"


# ---------------------------------------------------------------- artifacts
def test_onnx_with_a_float64_input_is_refused_before_running(tmp_path: Path) -> None:
    artifact = write_toy_artifact(tmp_path / "double", elem="DOUBLE")
    data = write_npz(tmp_path / "scan.npz", scan_arrays())
    outdir = tmp_path / "out"
    line = error_line(invoke(run_app, *run_args(artifact, data, outdir)), EXIT_BAD_INPUT,
                      str(artifact / "model.onnx"), "tensor(double)", "declares float32",
                      "re-export")
    assert "manifest.json" in line
    assert not outdir.exists()
    # the self-check alone is refused the same way
    error_line(invoke(run_app, artifact, "--provider", "cpu"), EXIT_BAD_INPUT,
               "tensor(double)")


def test_model_file_inconsistent_with_its_manifest(tmp_path: Path, scan_file: Path) -> None:
    """The manifest declares 16x16 patterns; the file (hashes recorded) takes 32x32."""
    artifact = write_toy_artifact(tmp_path / "swapped", file_n=2 * N)
    with pytest.raises(ArtifactError, match=r"has shape \['batch', 1, 32, 32\] in the file "
                                            r"but manifest.json declares \['batch', 1, 16, 16\]"):
        run_scan(artifact, scan_file, tmp_path / "out", provider="cpu", progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_unsupported_opset_is_one_stderr_line_exit_4(tmp_path: Path, scan_file: Path) -> None:
    """A real process, so onnxruntime's own C++ logging would show on stderr too."""
    artifact = write_toy_artifact(tmp_path / "future", opset=99)
    outdir = tmp_path / "out"
    argv = ["ptycho-run", *(str(a) for a in run_args(artifact, scan_file, outdir))]
    code = f"import sys; from cli.run import main; sys.argv = {argv!r}; main()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == EXIT_ENVIRONMENT, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert str(artifact / "model.onnx") in lines[0]
    assert "needs ONNX opset 99" in lines[0] and "upgrade onnxruntime" in lines[0]
    assert "onnxruntime_src" not in lines[0]  # no C++ source location
    assert not outdir.exists()


def test_unsupported_ir_version_is_an_environment_problem(tmp_path: Path) -> None:
    from runtime.session import create_session

    artifact = write_toy_artifact(tmp_path / "future", ir_version=99)
    with pytest.raises(EnvironmentProblem, match=r"model.onnx: the model has ONNX IR version "
                                                 r"99 \(this onnxruntime reads up to \d+\)"):
        create_session(artifact / "model.onnx", "cpu")


@pytest.mark.parametrize(("metadata", "fragment"), [
    ({"source_bundle_sha256": "a" * 64}, "was exported from another bundle (sha256 aaaaaaaaaaaa"),
    ({}, "carries no ptycho-export provenance"),
    ({"source_bundle_sha256": "b" * 64, "patch_size": "64"},
     "patch_size is 64 in the file but 16 in manifest.json"),
])
def test_onnx_from_another_export_is_refused(tmp_path: Path, scan_file: Path,
                                             metadata: dict[str, str], fragment: str) -> None:
    """A model.onnx swapped in with the manifest rehashed passes the hash check; the
    provenance the exporter embeds in every model file does not."""
    artifact = write_toy_artifact(tmp_path / "art", metadata=metadata, manifest_extra={
        "source_bundle": {"file": "tiny.zip", "sha256": "b" * 64}})
    outdir = tmp_path / "out"
    error_line(invoke(run_app, *run_args(artifact, scan_file, outdir)), EXIT_BAD_INPUT,
               str(artifact / "model.onnx"), fragment)
    assert not outdir.exists()


# ---------------------------------------------------------------- environment
def test_cuda_requested_without_cuda_exit_4(tmp_path: Path, toy: Path, scan_file: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic on every machine: this onnxruntime is made to report the CPU build."""
    import onnxruntime

    import runtime.session as session

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(session, "installed_ort_distributions",
                        lambda: {"onnxruntime": onnxruntime.__version__})
    outdir = tmp_path / "out"
    args = run_args(toy, scan_file, outdir)
    args[args.index("cpu")] = "cuda"
    error_line(invoke(run_app, *args), EXIT_ENVIRONMENT, "--provider cuda", "CPU build",
               "pip install 'ptycho-export[gpu]'")
    assert not outdir.exists()


def test_both_onnxruntime_packages_exit_4(tmp_path: Path, toy: Path, scan_file: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import runtime.session as session

    monkeypatch.setattr(session, "installed_ort_distributions",
                        lambda: {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.32.0"})
    outdir = tmp_path / "out"
    error_line(invoke(run_app, *run_args(toy, scan_file, outdir)), EXIT_ENVIRONMENT,
               "both onnxruntime 1.32.0 and onnxruntime-gpu 1.32.0 are installed",
               "pip uninstall -y onnxruntime onnxruntime-gpu")
    assert not outdir.exists()


def read_only(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``folder`` unwritable: chmod 0o500 where that binds (not root); as root (CI
    containers), where chmod does not stop writes, creating anything in it fails with
    EACCES instead (Path.mkdir and os.open, the two ways our writers create files)."""
    folder.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o500)  # undone by the caller
        return
    real_mkdir, real_open = Path.mkdir, os.open

    def inside(path: Any) -> bool:
        return Path(path).parent == folder

    def mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
        if inside(self):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        real_mkdir(self, *args, **kwargs)

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_CREAT and inside(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)


@pytest.mark.parametrize("command", ["ptycho-run", "ptycho-simulate"])
def test_output_folder_not_writable_exit_4(tmp_path: Path, toy: Path, scan_file: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           command: str) -> None:
    locked = tmp_path / "locked"
    try:
        read_only(locked, monkeypatch)
        if command == "ptycho-run":
            target = locked / "out"
            result = invoke(run_app, *run_args(toy, scan_file, target))
        else:
            target = locked / "scan.npz"
            result = invoke(simulate_app, target, *SIMULATE)
        error_line(result, EXIT_ENVIRONMENT, str(target), "ermission denied",
                   "check the permissions" if command == "ptycho-run" else "writable folder")
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


def _fill_disk_after(nbytes: int, error: BaseException) -> Callable[..., None]:
    """A stand-in writer that writes ``nbytes`` of garbage to the file, then fails."""
    def write(target: Any, *args: Any, **kwargs: Any) -> None:
        if hasattr(target, "write"):
            target.write(b"\0" * nbytes)
        else:
            Path(target).write_bytes(b"\0" * nbytes)
        raise error
    return write


ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("error", [ENOSPC, KeyboardInterrupt()], ids=["disk-full", "ctrl-c"])
def test_run_fault_while_writing_keeps_the_old_output(tmp_path: Path, toy: Path,
                                                      scan_file: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      error: BaseException) -> None:
    """object.npz is written, then the first PNG fails half-way."""
    import runtime.run as run_module

    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / "old.txt").write_text("previous run")
    (outdir / "report.json").write_text('{"producer": "ptycho-run"}')  # an output of ours
    monkeypatch.setattr(run_module, "save_png", _fill_disk_after(1000, error))
    result = invoke(run_app, *run_args(toy, scan_file, outdir))
    if isinstance(error, OSError):
        error_line(result, EXIT_ENVIRONMENT, str(outdir), "No space left on device",
                   "previous output is intact")
    else:
        error_line(result, EXIT_INTERRUPTED, "interrupted: no partial outputs were kept")
    assert sorted(p.name for p in outdir.iterdir()) == ["old.txt", "report.json"]
    assert leftovers(tmp_path) == []


def test_run_ctrl_c_mid_inference(tmp_path: Path, toy: Path, scan_file: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import runtime.run as run_module

    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / "old.txt").write_text("previous run")
    (outdir / "report.json").write_text('{"producer": "ptycho-run"}')  # an output of ours
    calls = []

    class Interrupted(run_module.StitchAccumulator):
        def add(self, *args: Any, **kwargs: Any) -> None:
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            super().add(*args, **kwargs)

    monkeypatch.setattr(run_module, "StitchAccumulator", Interrupted)
    result = invoke(run_app, *run_args(toy, scan_file, outdir, "--batch-size", "4"))
    error_line(result, EXIT_INTERRUPTED, "interrupted")
    assert len(calls) == 2  # stopped after one batch, mid-run
    assert sorted(p.name for p in outdir.iterdir()) == ["old.txt", "report.json"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [ENOSPC, KeyboardInterrupt()], ids=["disk-full", "ctrl-c"])
def test_scan_writer_fault_keeps_the_old_file(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              error: BaseException) -> None:
    """ptycho-simulate (save_scan): the archive fails half-written."""
    target = tmp_path / "scan.npz"
    target.write_bytes(b"old scan")
    monkeypatch.setattr(np, "savez", _fill_disk_after(5000, error))
    result = invoke(simulate_app, target, *SIMULATE)
    if isinstance(error, OSError):
        error_line(result, EXIT_ENVIRONMENT, str(target), "No space left on device",
                   "previous file is intact")
    else:
        error_line(result, EXIT_INTERRUPTED, "interrupted")
    assert target.read_bytes() == b"old scan"
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- torch side
@pytest.fixture(scope="module")
def torch_side() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    pytest.importorskip("onnx")


def test_bundle_writer_disk_full_names_the_bundle(tmp_path: Path, tiny_bundle: Path,
                                                  tiny_parts: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from ptycho_export.bundle import write_bundle

    target = tmp_path / "model.zip"
    shutil.copy(tiny_bundle, target)
    old = target.read_bytes()
    real = zipfile.ZipFile.writestr
    written: list[str] = []

    def writestr(self: zipfile.ZipFile, name: Any, data: Any, *args: Any, **kw: Any) -> None:
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(str(name))
        real(self, name, data, *args, **kw)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", writestr)
    with pytest.raises(OSError) as info:
        write_bundle(target, config=tiny_parts.config, normalization=tiny_parts.normalization,
                     state_dict=tiny_parts.state_dict, probe=tiny_parts.probe,
                     golden=tiny_parts.golden, training={}, data={})
    line, code = os_error_line(info.value)
    assert code == EXIT_ENVIRONMENT and line.startswith(f"{target}: No space left on device")
    assert target.read_bytes() == old and os.listdir(tmp_path) == ["model.zip"]


@pytest.mark.parametrize("fault", ["disk-full", "ctrl-c"])
def test_export_fault_keeps_the_old_export(tmp_path: Path, tiny_bundle: Path, torch_side: None,
                                           monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    """Disk full while the manifest (the last file) is written; Ctrl-C during the parity
    gate: the old export folder survives whole, no temp folder is left."""
    from cli.export import app as export_app
    from ptycho_export.export import pipeline

    outdir = tmp_path / "export"
    outdir.mkdir()
    (outdir / "old.txt").write_text("previous export")
    (outdir / "manifest.json").write_text('{"format": "ptycho-export-artifacts"}')
    if fault == "disk-full":
        monkeypatch.setattr(pipeline, "write_json", _fill_disk_after(100, ENOSPC))
    else:
        def interrupt(*args: Any, **kwargs: Any) -> None:
            raise KeyboardInterrupt
        monkeypatch.setattr(pipeline, "run_parity", interrupt)
    result = invoke(export_app, tiny_bundle, "--format", "onnx", "-o", outdir)
    if fault == "disk-full":
        error_line(result, EXIT_ENVIRONMENT, str(outdir), "No space left on device")
    else:
        error_line(result, EXIT_INTERRUPTED, "interrupted")
    assert sorted(p.name for p in outdir.iterdir()) == ["manifest.json", "old.txt"]
    assert leftovers(tmp_path) == []


@pytest.fixture
def zero_scan(tmp_path: Path) -> Path:
    scan = validate_scan(np.zeros((M, 32, 32), np.float32), probe(32),
                         np.repeat(np.arange(5.0), 5) * 4 + 32,
                         np.tile(np.arange(5.0), 5) * 4 + 32)
    save_scan(tmp_path / "dark.npz", scan)
    return tmp_path / "dark.npz"


def test_training_refuses_an_all_zero_scan(tmp_path: Path, zero_scan: Path,
                                           torch_side: None) -> None:
    from cli.train import app as train_app

    bundle = tmp_path / "b.zip"
    result = invoke(train_app, zero_scan, "-o", bundle, "--epochs", 1, "--preset", "tiny",
                    "--no-progress", "--accelerator", "cpu", "--devices", "1")
    error_line(result, EXIT_BAD_INPUT, str(zero_scan), "amplitudes are all zero",
               "train on a scan with measured diffraction")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dark.npz"]  # no bundle, no run dir


def test_training_ctrl_c_exits_130_and_writes_no_bundle(tmp_path: Path, torch_side: None,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """Lightning turns Ctrl-C into sys.exit(1) and ignores SIGINT from then on; the
    command still exits 130, keeps the old bundle and gets its Ctrl-C back."""
    from cli.train import app as train_app
    from ptycho_export.data.simulate import SimulationConfig, simulate_scan
    from ptycho_export.model.lightning import PtychoModule

    save_scan(tmp_path / "scan.npz", simulate_scan(SimulationConfig(
        patch_size=32, grid_shape=(4, 4), step_px=4, probe_diameter_px=12, defocus=3)))
    bundle = tmp_path / "b.zip"
    bundle.write_bytes(b"old bundle")

    def interrupted(self: Any, *args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(PtychoModule, "training_step", interrupted)
    before = signal.getsignal(signal.SIGINT)
    try:
        result = invoke(train_app, tmp_path / "scan.npz", "-o", bundle, "--epochs", 1,
                        "--preset", "tiny", "--no-progress", "--accelerator", "cpu",
                        "--devices", "1")
        assert signal.getsignal(signal.SIGINT) == before
    finally:
        signal.signal(signal.SIGINT, before)
    assert result.exit_code == EXIT_INTERRUPTED, (result.output, result.exception)
    assert "interrupted: no partial outputs were kept" in result.stderr
    assert bundle.read_bytes() == b"old bundle" and leftovers(tmp_path) == []


# ---------------------------------------------------------------- bundles, via the CLI
def _edit_config(section: str, key: str, value: Any = None, drop: bool = False) -> Callable:
    def mutate(parts: BundleParts) -> None:
        config = json.loads(parts.members["config.json"])
        if drop:
            del config[section][key]
        else:
            config[section][key] = value
        parts.members["config.json"] = json.dumps(config).encode()
    return mutate


def _set_member(name: str, blob: bytes | Callable[[Path], bytes]) -> Callable:
    def mutate(parts: BundleParts) -> None:
        parts.members[name] = blob
    return mutate


def _forged_probe(parts: BundleParts) -> None:
    header = b"{'descr': '<c8', 'fortran_order': False, 'shape': (999999999, 32, 32), }"
    header += b" " * (117 - len(header)) + b"\n"
    parts.members["probe.npy"] = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + \
        header + bytes(64)


BUNDLE_CASES: list[tuple[str, Callable[[Path, Path], Path], tuple[str, ...]]] = [
    ("empty-zip", lambda src, dst: zipfile.ZipFile(dst, "w").close() or dst,
     ("the zip is empty",)),
    ("truncated-zip", lambda src, dst: dst.write_bytes(src.read_bytes()[:5000]) and dst,
     ("not a readable zip bundle",)),
    ("path-traversal", lambda src, dst: rewrite_bundle(src, dst, _set_member(
        "../../evil", b"owned")), ("'../../evil' has an unsafe path",)),
    ("absolute-path", lambda src, dst: rewrite_bundle(src, dst, _set_member(
        "/etc/evil", b"owned")), ("'/etc/evil' has an unsafe path",)),
    ("manifest-missing", lambda src, dst: rewrite_bundle(
        src, dst, lambda p: setattr(p, "manifest", None)), ("manifest.json is missing",)),
    ("sha256-mismatch", lambda src, dst: rewrite_bundle(src, dst, _set_member(
        "probe.npy", np.zeros((32, 32), np.complex64).tobytes()), rehash=False),
     ("'probe.npy' does not match its sha256", "re-export or re-download")),
    ("format-version", lambda src, dst: rewrite_bundle(
        src, dst, lambda p: p.manifest.update(format_version=7)),
     ("format version 7 is not supported", "upgrade")),
    ("config-missing-key", lambda src, dst: rewrite_bundle(
        src, dst, _edit_config("normalization", "amplitude_scale", drop=True)),
     ("config.json is invalid: missing key 'amplitude_scale'", "re-create it")),
    ("config-nan-scale", lambda src, dst: rewrite_bundle(
        src, dst, _edit_config("normalization", "amplitude_scale", float("nan"))),
     ("normalization amplitude_scale is nan; expected a finite number > 0",)),
    ("config-float-patch-size", lambda src, dst: rewrite_bundle(
        src, dst, _edit_config("model", "patch_size", 32.7)),
     ("model patch_size is 32.7; expected an integer",)),
    ("config-zero-amp-max", lambda src, dst: rewrite_bundle(
        src, dst, _edit_config("model", "amp_max", 0)), ("model amp_max is 0",)),
    ("forged-probe-header", lambda src, dst: rewrite_bundle(src, dst, _forged_probe),
     ("probe.npy or golden.npz is unreadable",)),
]


@pytest.mark.parametrize(("make", "fragments"), [c[1:] for c in BUNDLE_CASES],
                         ids=[c[0] for c in BUNDLE_CASES])
def test_hostile_bundle_is_one_line_exit_3(tmp_path: Path, tiny_bundle: Path,
                                           make: Callable[[Path, Path], Path],
                                           fragments: tuple[str, ...]) -> None:
    from cli.bundle import app as bundle_app

    path = make(tiny_bundle, tmp_path / "hostile.zip")
    error_line(invoke(bundle_app, "verify", path), EXIT_BAD_INPUT, str(path), *fragments)


def test_pickled_weights_are_refused_without_running_the_payload(tmp_path: Path,
                                                                 tiny_bundle: Path) -> None:
    """A .ckpt-style pickle offered as weights.safetensors, hashes rehashed: refused; the
    planted payload (it would create a file when unpickled) never runs."""
    from cli.bundle import app as bundle_app

    marker = tmp_path / "PWNED"
    payload = pickle.dumps({"state_dict": Marker(marker)})
    pickle.loads(payload).clear()  # the payload is live: loading it the usual way runs it
    assert marker.exists()
    marker.unlink()
    path = rewrite_bundle(tiny_bundle, tmp_path / "pickle.zip",
                          _set_member("weights.safetensors", payload))
    error_line(invoke(bundle_app, "verify", path), EXIT_BAD_INPUT, str(path),
               "refused without being unpickled")
    assert not marker.exists()


# ---------------------------------------------------------------- TorchScript swapped in
@pytest.fixture(scope="module")
def two_exports(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path,
                torch_side: None) -> dict[str, Path]:
    """TorchScript exports of the tiny bundle and of a retrained copy (other weights)."""
    import torch
    from safetensors.torch import load as load_weights
    from safetensors.torch import save as save_weights

    from ptycho_export.export import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("two_exports")

    def retrain(parts: BundleParts) -> None:
        weights = load_weights(parts.members["weights.safetensors"])
        parts.members["weights.safetensors"] = save_weights(
            {k: (v * 1.1 if v.dtype == torch.float32 and k != "amplitude_scale" else v)
             for k, v in weights.items()})  # a retrained model keeps its input scale

    other = rewrite_bundle(tiny_bundle, root / "other.zip", retrain)
    out = {}
    for name, bundle in (("mine", tiny_bundle), ("other", other)):
        export_bundle(bundle, root / name, ExportOptions(formats=["torchscript"]))
        out[name] = root / name
    return out


def test_torchscript_file_from_another_model_is_refused(tmp_path: Path, tiny_bundle: Path,
                                                        two_exports: dict[str, Path]) -> None:
    from cli.parity import app as parity_app

    folder = Path(shutil.copytree(two_exports["mine"], tmp_path / "artifacts"))
    shutil.copy(two_exports["other"] / "model.ts", folder / "model.ts")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.ts"] = {"sha256": _sha256(folder / "model.ts"),
                                     "size": (folder / "model.ts").stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    data = tmp_path / "scan.npz"
    write_npz(data, scan_arrays(n=32))
    report = tmp_path / "report"
    error_line(invoke(parity_app, tiny_bundle, folder, data, "-o", report), EXIT_BAD_INPUT,
               str(folder / "model.ts"), "was exported from another bundle",
               "a model file was swapped in")
    assert not report.exists()


# ---------------------------------------------------------------- -o onto someone's folder
def test_run_onto_a_folder_it_did_not_write_is_refused(tmp_path: Path, toy: Path,
                                                       scan_file: Path) -> None:
    """The issue's reproduction: `mkdir mine && echo x > mine/notes.txt`, then -o mine."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x\n")
    result = invoke(run_app, *run_args(toy, scan_file, mine))
    error_line(result, EXIT_USAGE, str(mine), "was not written by ptycho-run", "notes.txt",
               "--force")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    forced = invoke(run_app, *run_args(toy, scan_file, mine, "--force"))
    assert forced.exit_code == 0, forced.output
    assert not (mine / "notes.txt").exists() and (mine / "report.json").is_file()


def test_export_onto_a_folder_it_did_not_write_is_refused(tmp_path: Path, tiny_bundle: Path,
                                                          torch_side: None) -> None:
    from cli.export import app as export_app

    mine = tmp_path / "mine2"
    mine.mkdir()
    (mine / "notes.txt").write_text("x\n")
    result = invoke(export_app, tiny_bundle, "-o", mine)
    error_line(result, EXIT_USAGE, str(mine), "was not written by ptycho-export", "--force")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    fresh = invoke(export_app, tiny_bundle, "-o", tmp_path / "art")
    assert fresh.exit_code == 0, fresh.output
    hint = [ln for ln in fresh.output.splitlines() if ln.startswith("next: ")]
    assert hint == [f"next: ptycho-run {tmp_path / 'art'} your_scan.npz -o "
                    f"{tmp_path / 'art_run'} --provider auto"]


# ---------------------------------------------------------------- tolerances
@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf"])
def test_nonsense_tolerance_is_refused_before_any_work(tmp_path: Path, tiny_bundle: Path,
                                                       torch_side: None, value: str) -> None:
    # --amplitude-tol nan used to PASS the gate (every comparison with NaN is false)
    from cli.export import app as export_app

    result = invoke(export_app, tiny_bundle, "--amplitude-tol", value, "-o", tmp_path / "x")
    error_line(result, EXIT_USAGE, f"--amplitude-tol {float(value)}", "positive finite")
    assert not (tmp_path / "x").exists()


def test_loosened_tolerance_is_a_warning_and_recorded(tmp_path: Path, tiny_bundle: Path,
                                                     torch_side: None) -> None:
    from cli.export import app as export_app

    result = invoke(export_app, tiny_bundle, "--phase-tol", "0.01", "-o", tmp_path / "x")
    assert result.exit_code == 0, result.output
    assert ("warning: tolerance phase_weighted_max_rad loosened to 0.01 (default 0.0001); "
            "recorded in the manifest") in result.output
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert manifest["tolerances_loosened"] == {
        "phase_weighted_max_rad": {"limit": 0.01, "default": 1e-4}}
    assert manifest["tolerances"]["phase_weighted_max_rad"] == 0.01
    tighter = invoke(export_app, tiny_bundle, "--phase-tol", "5e-5", "-o", tmp_path / "y")
    assert tighter.exit_code == 0 and "warning: tolerance" not in tighter.output


def test_parity_tolerances_are_checked_and_the_help_says_what_is_gated(
        tmp_path: Path, tiny_bundle: Path, torch_side: None) -> None:
    from cli.parity import app as parity_app

    result = invoke(parity_app, tiny_bundle, tmp_path, tmp_path / "scan.npz",
                    "--object-tol", "nan")
    error_line(result, EXIT_USAGE, "--object-tol nan", "positive finite")
    helptext = " ".join(invoke(parity_app, "--help").output.replace("│", " ").split())
    assert "without any alignment" in helptext and "after global-phase" not in helptext


# ---------------------------------------------------------------- memory sized by the input
def test_one_far_position_is_refused_before_any_allocation(tmp_path: Path, toy: Path,
                                                           scan_file: Path) -> None:
    """One position moved to (3e5, 3e5) used to end in `MemoryError: Unable to allocate
    671. GiB` with a traceback, exit 1."""
    with np.load(scan_file) as data:
        arrays = dict(data)
    arrays["xcoords"] = arrays["xcoords"].copy()
    arrays["ycoords"] = arrays["ycoords"].copy()
    arrays["xcoords"][3] = 3e5
    arrays["ycoords"][3] = 3e5
    far = tmp_path / "far.npz"
    np.savez(far, **arrays)
    outdir = tmp_path / "out"
    result = invoke(run_app, *run_args(toy, far, outdir))
    line = error_line(result, EXIT_BAD_INPUT, str(far), "object canvas needing",
                      "GiB", "check the positions")
    assert "300000" in line
    assert not outdir.exists() and leftovers(tmp_path) == []


def test_canvas_check_against_the_memory_the_machine_reports(tmp_path: Path) -> None:
    from runtime.batching import check_canvas

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100 kB\nMemAvailable: 1048576 kB\n")  # 1 GiB
    positions = np.array([[0.0, 0.0], [100.0, 4000.0]])
    facts = check_canvas(positions, 64, tmp_path / "s.npz", meminfo)  # 166 x 4066 px
    assert facts["shape"] == [166, 4066] and facts["bytes"] == 166 * 4066 * 40
    with pytest.raises(DataError, match="a 6066 x 6066 object canvas needing 1.4 GiB, "
                                        "more than the 1.0 GiB"):
        check_canvas(np.array([[0.0, 0.0], [6000.0, 6000.0]]), 64, tmp_path / "s.npz",
                     meminfo)


def test_a_memory_error_anywhere_is_one_line(tmp_path: Path, toy: Path, scan_file: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import runtime.run as run_module

    def no_memory(*args: Any, **kwargs: Any) -> None:
        raise MemoryError("Unable to allocate 12.0 GiB for an array")

    monkeypatch.setattr(run_module, "group_neighbours", no_memory)
    result = invoke(run_app, *run_args(toy, scan_file, tmp_path / "out"))
    error_line(result, EXIT_ENVIRONMENT, "out of memory (Unable to allocate 12.0 GiB",
               "nothing half-written")


# ---------------------------------------------------------------- two writers of one folder
def test_a_second_writer_of_the_same_folder_fails_at_once(tmp_path: Path, toy: Path,
                                                          scan_file: Path) -> None:
    from runtime.atomic import output_lock

    outdir = tmp_path / "out"
    run_scan(toy, scan_file, outdir, provider="cpu", progress=False)
    before = {p.name: p.read_bytes() for p in outdir.iterdir()}
    with output_lock(outdir, "ptycho-run"):  # a live writer (this process) holds it
        result = invoke(run_app, *run_args(toy, scan_file, outdir))
    error_line(result, EXIT_BAD_INPUT, str(outdir), "another ptycho-run", f"pid {os.getpid()}",
               "is writing it now")
    assert {p.name: p.read_bytes() for p in outdir.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path: Path, toy: Path,
                                                     scan_file: Path) -> None:
    import subprocess

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (tmp_path / ".out.lock").write_text(f"{dead.stdout.strip()} ptycho-run\n")
    result = invoke(run_app, *run_args(toy, scan_file, tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert not (tmp_path / ".out.lock").exists()


def test_two_runs_into_one_folder_at_once_never_mix(tmp_path: Path, toy: Path,
                                                    scan_file: Path) -> None:
    """Two real processes: each either writes the folder whole or fails with the lock
    line; the folder left is one run's, report and object together."""
    import subprocess

    outdir = tmp_path / "out"
    command = [sys.executable, "-c", "from cli.run import main; main()",
               *map(str, run_args(toy, scan_file, outdir))]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parents[1])
             for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for code, stderr in results:
        assert code == 0 or (code == EXIT_BAD_INPUT and "is writing it now" in stderr), stderr
    assert any(code == 0 for code, _ in results)
    report = json.loads((outdir / "report.json").read_text())
    assert report["producer"] == "ptycho-run" and sorted(report["files"]) == sorted(
        p.name for p in outdir.iterdir())
    assert leftovers(tmp_path) == []


def test_hdf5_declaring_more_frames_than_memory_is_refused_before_reading(
        tmp_path: Path, toy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunked, compressed dataset can declare 10^7 frames in a 160 MB file: it used to
    fail only when the 153 GiB array was allocated."""
    h5py = pytest.importorskip("h5py")

    path = tmp_path / "declared.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("diffraction", shape=(400, N, N), dtype="f4", chunks=(1, N, N),
                         compression="gzip")
        f["xcoords"] = np.zeros(400)
        f["ycoords"] = np.zeros(400)
    import runtime.memory

    monkeypatch.setattr(runtime.memory, "mem_available_bytes", lambda *a: 100_000)
    result = invoke(run_app, *run_args(toy, path, tmp_path / "out"), "--data-kind",
                    "amplitude", "--hdf5-x", "xcoords", "--hdf5-y", "ycoords",
                    "--hdf5-diffraction", "diffraction")
    error_line(result, EXIT_BAD_INPUT, str(path), "dataset 'diffraction' declares 400 frames",
               "more than the 0.0 GiB available")
    assert not (tmp_path / "out").exists()
