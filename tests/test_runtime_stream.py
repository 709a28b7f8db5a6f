"""ptycho-run on large scans: memory-mapped input, batch-by-batch stitching, IO binding on
CUDA (with a recording stand-in session: no GPU here), batch size chosen from memory,
sub-pixel stitching from the command line.

The artifact is a toy ONNX graph written with onnx.helper (amplitude = 0.5 x, phase =
0.25 x), so the expected object is known exactly and no torch is needed; tests that need
it skip where the onnx package is absent (a runtime-only install).
"""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.run import app
from runtime.batching import (
    DEFAULT_BATCH,
    GPU_HEADROOM_BYTES,
    MAX_AUTO_BATCH,
    MAX_AUTO_BATCH_CPU,
    auto_batch,
    bytes_per_pattern,
    choose_batch,
    iter_batches,
)
from runtime.errors import EXIT_USAGE, DataError, EnvironmentProblem, RunUsageError
from runtime.grouping import group_neighbours
from runtime.manifest import ArtifactSpec, load_artifact
from runtime.memory import mem_available_bytes
from runtime.model_session import make_runner
from runtime.run import run_scan
from runtime.runner import OrtRunner
from runtime.scan import load_scan, validate_scan
from runtime.scan_stream import memmap_npz_member, open_scan
from runtime.session import (
    IOBindingRunner,
    SessionInfo,
    _nvidia_smi_id,
    _provider_list,
    create_session,
    cuda_free_bytes,
)
from runtime.stitch import FOURIER_TRIM, stitch_patches, to_complex

N = 32
M = 3000


# --------------------------------------------------------------------------- fixtures


def _write_artifact(folder: Path, n: int = N, gridsize: int = 1, batch: int | None = None,
                    widths: list[int] | None = None) -> Path:
    """A verified-looking artifact folder around a two-Mul ONNX graph."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    c = gridsize * gridsize
    shape: list[Any] = ["batch" if batch is None else batch, c, n, n]
    graph = helper.make_graph(
        [helper.make_node("Mul", ["diffraction", "half"], ["amplitude"]),
         helper.make_node("Mul", ["diffraction", "quarter"], ["phase"])],
        "toy",
        [helper.make_tensor_value_info("diffraction", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("amplitude", TensorProto.FLOAT, shape),
         helper.make_tensor_value_info("phase", TensorProto.FLOAT, shape)],
        initializer=[helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
                     helper.make_tensor("quarter", TensorProto.FLOAT, [], [0.25])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    folder.mkdir(parents=True)
    onnx.save(model, folder / "model.onnx")
    blob = (folder / "model.onnx").read_bytes()
    manifest = {
        "format": "ptycho-export-artifacts", "format_version": 1,
        "artifacts": {"onnx": {"file": "model.onnx"}},
        "files": {"model.onnx": {"sha256": hashlib.sha256(blob).hexdigest(),
                                 "size": len(blob)}},
        "model": {"patch_size": n, "gridsize": gridsize, "widths": widths or [4, 8, 16]},
        "inputs": [{"name": "diffraction", "shape": shape, "dtype": "float32"}],
        "outputs": [{"name": "amplitude", "shape": shape, "dtype": "float32"},
                    {"name": "phase", "shape": shape, "dtype": "float32"}],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _probe(n: int = N) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) - (n - 1) / 2
    return np.exp(-(yy**2 + xx**2) / (n / 4) ** 2).astype(np.complex64)


def _arrays(m: int = M, n: int = N, fractional: bool = True, seed: int = 0
            ) -> dict[str, np.ndarray]:
    """A scan's npz members: m patterns on a 3 px raster, optionally sub-pixel jittered."""
    rng = np.random.default_rng(seed)
    cols = 60
    rows = -(-m // cols)
    yy, xx = np.meshgrid(np.arange(rows) * 3.0, np.arange(cols) * 3.0, indexing="ij")
    pos = np.stack([yy.ravel(), xx.ravel()], axis=1)[:m] + n
    if fractional:
        pos = pos + rng.uniform(-0.5, 0.5, pos.shape)
    return {"diffraction": rng.uniform(0, 2, (m, n, n)).astype(np.float32),
            "probeGuess": _probe(n), "xcoords": pos[:, 1], "ycoords": pos[:, 0]}


@pytest.fixture(scope="module")
def big_scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 3000-pattern scan stored uncompressed (np.savez) and compressed."""
    root = tmp_path_factory.mktemp("scans")
    arrays = _arrays()
    np.savez(root / "stored.npz", **arrays)
    np.savez_compressed(root / "compressed.npz", **arrays)
    return {"stored": root / "stored.npz", "compressed": root / "compressed.npz"}


@pytest.fixture(scope="module")
def toy_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toy")
    return {"g1": _write_artifact(root / "g1"), "g2": _write_artifact(root / "g2", gridsize=2)}


def _object(outdir: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(outdir / "object.npz") as data:
        return data["object"], data["weight"]


def _in_memory_reference(data: Path, gridsize: int, subpixel: str) -> Any:
    """The pre-streaming path: whole scan in memory, every patch kept, one stitch call."""
    scan = load_scan(data)
    groups = group_neighbours(scan.positions_px, gridsize)
    x = scan.amplitudes[groups]
    patches = to_complex(0.5 * x[:, 0], 0.25 * x[:, 0])  # the toy model, channel 0
    return stitch_patches(patches, scan.positions_px[groups[:, 0]],
                          weights=np.abs(scan.probe).astype(np.float32) ** 2,
                          subpixel=subpixel)


# --------------------------------------------------------------------------- reading


def test_stored_scan_is_memory_mapped(big_scans: dict[str, Path]) -> None:
    scan = open_scan(big_scans["stored"])
    assert isinstance(scan.amplitudes, np.memmap)
    assert not scan.amplitudes.flags.writeable
    ref = load_scan(big_scans["stored"])
    np.testing.assert_array_equal(scan.amplitudes, ref.amplitudes)
    np.testing.assert_array_equal(scan.positions_px, ref.positions_px)
    np.testing.assert_array_equal(scan.probe, ref.probe)
    assert scan.n_patterns == M and scan.patch_size == N


def test_compressed_scan_falls_back_to_reading(big_scans: dict[str, Path]) -> None:
    assert memmap_npz_member(big_scans["compressed"], "diffraction") is None
    scan = open_scan(big_scans["compressed"])
    assert not isinstance(scan.amplitudes, np.memmap)
    np.testing.assert_array_equal(scan.amplitudes, load_scan(big_scans["stored"]).amplitudes)


def test_other_layouts(tmp_path: Path) -> None:
    arrays = _arrays(m=20, n=8)
    # Legacy key, stored: mapped too.
    legacy = {("diff3d" if k == "diffraction" else k): v for k, v in arrays.items()}
    np.savez(tmp_path / "legacy.npz", **legacy)
    assert isinstance(open_scan(tmp_path / "legacy.npz").amplitudes, np.memmap)
    # float64 and Fortran order are read (and converted) the ordinary way.
    for name, amp in (("f64", arrays["diffraction"].astype(np.float64)),
                      ("fortran", np.asfortranarray(arrays["diffraction"]))):
        np.savez(tmp_path / f"{name}.npz", **{**arrays, "diffraction": amp})
        scan = open_scan(tmp_path / f"{name}.npz")
        assert not isinstance(scan.amplitudes, np.memmap)
        assert scan.amplitudes.dtype == np.float32
        np.testing.assert_array_equal(scan.amplitudes, arrays["diffraction"])
    # The member offset is found wherever the member sits in the archive.
    np.savez(tmp_path / "last.npz", probeGuess=arrays["probeGuess"], xcoords=arrays["xcoords"],
             ycoords=arrays["ycoords"], junk=np.arange(1000), diffraction=arrays["diffraction"])
    mm = memmap_npz_member(tmp_path / "last.npz", "diffraction")
    assert isinstance(mm, np.memmap)
    np.testing.assert_array_equal(mm, arrays["diffraction"])
    assert memmap_npz_member(tmp_path / "last.npz", "missing") is None
    (tmp_path / "not_a_zip.npz").write_bytes(b"hello")
    assert memmap_npz_member(tmp_path / "not_a_zip.npz", "diffraction") is None


@pytest.mark.parametrize("damage", ["nan", "negative", "no_probe", "short_coords", "truncated"])
def test_streaming_checks_say_what_load_scan_says(tmp_path: Path, damage: str) -> None:
    arrays = _arrays(m=50, n=8)
    amp = arrays["diffraction"]
    if damage == "nan":
        amp[3, 1, 1] = np.nan
        amp[40, 0, 0] = np.inf
    elif damage == "negative":
        amp[7, 2, 2] = -0.5
        amp[9, 0, 0] = -1.5
    elif damage == "no_probe":
        del arrays["probeGuess"]
    elif damage == "short_coords":
        arrays["xcoords"] = arrays["xcoords"][:-1]
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-2000])
    if damage in ("nan", "negative"):
        # Chunk-wise (a few patterns per step): counts and first pattern over the whole stack.
        assert isinstance(memmap_npz_member(path, "diffraction"), np.memmap)
    with pytest.raises(DataError) as expected:
        load_scan(path)
    with pytest.raises(DataError) as got:
        open_scan(path, chunk_bytes=3 * 8 * 8 * 4)
    assert str(got.value) == str(expected.value)


# --------------------------------------------------------------------------- streaming run


@pytest.mark.parametrize("gridsize", [1, 2])
def test_streaming_run_equals_the_in_memory_path(tmp_path: Path, big_scans: dict[str, Path],
                                                 toy_artifacts: dict[str, Path],
                                                 gridsize: int) -> None:
    """3000 patterns (gridsize 1; 600 for gridsize 2, whose neighbour search is the slow
    part): mapped + streamed, read + streamed and the old all-in-memory path agree bit for
    bit."""
    artifact = toy_artifacts[f"g{gridsize}"]
    scans = big_scans
    if gridsize == 2:
        arrays = _arrays(m=600)
        scans = {"stored": tmp_path / "stored.npz", "compressed": tmp_path / "compressed.npz"}
        np.savez(scans["stored"], **arrays)
        np.savez_compressed(scans["compressed"], **arrays)
    mapped = run_scan(artifact, scans["stored"], tmp_path / "mapped", provider="cpu",
                      batch_size=100, progress=False)
    assert mapped["data"]["memory_mapped"] is True
    assert mapped["stitch"] == {"subpixel": "fourier", "crop": FOURIER_TRIM,
                                "subpixel_reason": mapped["stitch"]["subpixel_reason"],
                                "weights": "|probe|^2", "overlapped_with_inference": False}
    assert "not whole pixels" in mapped["stitch"]["subpixel_reason"]
    read = run_scan(artifact, scans["compressed"], tmp_path / "read", provider="cpu",
                    progress=False)  # automatic batch: other batch boundaries
    assert read["data"]["memory_mapped"] is False
    assert read["batch_size"] != mapped["batch_size"]
    ref = _in_memory_reference(scans["stored"], gridsize, "fourier")
    for outdir in (tmp_path / "mapped", tmp_path / "read"):
        obj, weight = _object(outdir)
        np.testing.assert_array_equal(obj, ref.obj)
        np.testing.assert_array_equal(weight, ref.weight)


def test_streaming_run_holds_no_patch_stack(tmp_path: Path, big_scans: dict[str, Path],
                                            toy_artifacts: dict[str, Path]) -> None:
    """Python-side peak memory of a whole run stays well under the M x N x N complex64
    patch stack (24.6 MB) that the in-memory path held on top of the 12.3 MB input (its
    peak measured 45 MB): the input is mapped, patches go to the canvas batch by batch.
    Measured: 6.9 MB at batch 64 (batch temporaries, validation chunk, PNG writing)."""
    patch_stack = M * N * N * 8
    args = (toy_artifacts["g1"], big_scans["stored"], tmp_path / "out")
    run_scan(*args, provider="cpu", batch_size=64, progress=False)  # imports: not counted
    tracemalloc.start()
    try:
        run_scan(*args, provider="cpu", batch_size=64, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < patch_stack / 2.5, f"peak {peak / 1e6:.1f} MB"


@pytest.mark.parametrize("method", ["none", "bilinear"])
def test_subpixel_option(tmp_path: Path, big_scans: dict[str, Path],
                         toy_artifacts: dict[str, Path], method: str) -> None:
    report = run_scan(toy_artifacts["g1"], big_scans["stored"], tmp_path / "out",
                      provider="cpu", progress=False, subpixel=method)
    assert report["stitch"]["subpixel"] == method and report["stitch"]["crop"] == 0
    ref = _in_memory_reference(big_scans["stored"], 1, method)
    np.testing.assert_array_equal(_object(tmp_path / "out")[0], ref.obj)


def test_integer_positions_default_to_none(tmp_path: Path,
                                           toy_artifacts: dict[str, Path]) -> None:
    data = tmp_path / "int.npz"
    np.savez(data, **_arrays(m=200, fractional=False))
    report = run_scan(toy_artifacts["g1"], data, tmp_path / "out", provider="cpu",
                      progress=False)
    assert report["stitch"]["subpixel"] == "none" and report["stitch"]["crop"] == 0
    assert "whole pixel" in report["stitch"]["subpixel_reason"]


def test_bad_subpixel_is_a_usage_error(tmp_path: Path, big_scans: dict[str, Path],
                                       toy_artifacts: dict[str, Path]) -> None:
    with pytest.raises(RunUsageError, match="--subpixel 'cubic'"):
        run_scan(toy_artifacts["g1"], big_scans["stored"], tmp_path / "out",
                 subpixel="cubic", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_subpixel_and_batch_reason(tmp_path: Path, big_scans: dict[str, Path],
                                       toy_artifacts: dict[str, Path]) -> None:
    runner = CliRunner()
    result = runner.invoke(app, [str(toy_artifacts["g1"]), str(big_scans["stored"]), "-o",
                                 str(tmp_path / "out"), "--provider", "cpu", "--subpixel",
                                 "bilinear", "--no-self-check", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "subpixel bilinear (given)" in result.output
    assert "MemAvailable" in result.output  # why this batch size
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["batch_choice"]["source"] == "memory"
    bad = runner.invoke(app, [str(toy_artifacts["g1"]), str(big_scans["stored"]), "-o",
                              str(tmp_path / "out2"), "--subpixel", "cubic", "--no-progress",
                              "--no-self-check"])
    assert bad.exit_code == EXIT_USAGE
    helptext = runner.invoke(app, ["--help"], terminal_width=200).output
    assert "--device-id" in helptext and "--subpixel" in helptext


# --------------------------------------------------------------------------- batch size


def _spec(batch: int | None = None, widths: Any = (4, 8, 16), n: int = 8,
          channels: int = 1) -> ArtifactSpec:
    shape = ["batch" if batch is None else batch, channels, n, n]
    model = {"patch_size": n, "gridsize": 1}
    if widths is not None:
        model["widths"] = list(widths)
    return ArtifactSpec(
        folder=Path("."), manifest_path=Path("manifest.json"), model_path=Path("model.onnx"),
        model_sha256="", patch_size=n, gridsize=1, channels=channels,
        input_name="diffraction", input_shape=tuple(shape),
        output_names=("amplitude", "phase"), batch=batch, tolerances={}, golden_path=None,
        manifest={"model": model, "outputs": [{"name": "amplitude", "shape": shape},
                                              {"name": "phase", "shape": shape}]})


def _info(provider: str = "cpu", device_id: int = 0) -> SessionInfo:
    ep = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[provider]
    return SessionInfo(requested=provider, provider=provider, ep=ep, providers=[ep],
                       available=[ep], threads=None, onnxruntime_version="test",
                       device_id=device_id)


def test_bytes_per_pattern_estimate() -> None:
    per, how = bytes_per_pattern(_spec(widths=(4, 8, 16), n=8))
    # input + 2 outputs: 3 * 4 * 64; maps: 8 * 4 * (4 * 64 + 8 * 16 + 16 * 4)
    assert per == 3 * 4 * 64 + 8 * 4 * (4 * 64 + 8 * 16 + 16 * 4)
    assert "[4, 8, 16]" in how
    default, how = bytes_per_pattern(_spec(widths=None, n=64))
    assert "PtychoPINN default" in how
    # PtychoPINN's default model at N = 64: about 15 MB per pattern (an upper bound).
    assert 10e6 < default < 20e6


def test_choose_batch() -> None:
    assert choose_batch(10**6, None) == DEFAULT_BATCH == 256
    assert choose_batch(10**6, 2**30) == MAX_AUTO_BATCH == 1024
    assert choose_batch(10**6, 2**30, cap=MAX_AUTO_BATCH_CPU) == MAX_AUTO_BATCH_CPU == 256
    assert choose_batch(10**6, None, cap=64) == 64
    assert choose_batch(10**6, 3 * 10**8) == 256
    assert choose_batch(10**9, 10) == 1


def test_mem_available(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       8000000 kB\nMemAvailable:    2048 kB\n")
    assert mem_available_bytes(meminfo) == 2048 * 1024
    meminfo.write_text("MemTotal:       8000000 kB\n")
    assert mem_available_bytes(meminfo) is None
    assert mem_available_bytes(tmp_path / "missing") is None


def test_auto_batch_cpu(tmp_path: Path) -> None:
    spec = _spec(n=64, widths=(64, 128, 256))
    per, _ = bytes_per_pattern(spec)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemAvailable: {per * 200 // 1024} kB\n")  # a quarter fits 50
    batch, facts = auto_batch(spec, _info("cpu"), meminfo=meminfo,
                              gpu_free=lambda _: pytest.fail("asked the GPU"))
    assert batch == 32 and facts["source"] == "memory"
    assert "MemAvailable" in facts["reason"] and "25%" in facts["reason"]
    batch, facts = auto_batch(spec, _info("cpu"), meminfo=tmp_path / "missing")
    assert batch == DEFAULT_BATCH and facts["source"] == "default"
    assert "unknown" in facts["reason"]
    meminfo.write_text(f"MemAvailable: {per * 100_000 // 1024} kB\n")  # room for 25,000
    batch, facts = auto_batch(spec, _info("cpu"), meminfo=meminfo)
    assert batch == MAX_AUTO_BATCH_CPU and "CPU: larger batches are slower" in facts["reason"]


def test_auto_batch_cuda() -> None:
    spec = _spec(n=64, widths=(64, 128, 256))
    per, _ = bytes_per_pattern(spec)
    asked = []

    def free(device: int) -> int:
        asked.append(device)
        return GPU_HEADROOM_BYTES + 100 * per

    batch, facts = auto_batch(spec, _info("cuda", device_id=3), gpu_free=free)
    assert asked == [3] and batch == 64 and facts["budget_bytes"] == 100 * per
    assert "GPU 3" in facts["reason"]
    batch, facts = auto_batch(spec, _info("cuda"), gpu_free=lambda _: GPU_HEADROOM_BYTES // 2)
    assert batch == 1 and facts["budget_bytes"] == 0
    batch, facts = auto_batch(spec, _info("cuda"), gpu_free=lambda _: None)
    assert batch == DEFAULT_BATCH and "unknown" in facts["reason"]
    batch, _ = auto_batch(spec, _info("cuda"), gpu_free=lambda _: 10**6 * per)
    assert batch == MAX_AUTO_BATCH  # the GPU keeps the larger cap


def test_cuda_free_bytes_reads_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f'#!/bin/sh\necho "$@" > "{tmp_path}/args"\necho 1234\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert cuda_free_bytes(1) == 1234 << 20
    assert (tmp_path / "args").read_text().split()[-2:] == ["-i", "5"]
    assert _nvidia_smi_id(4) == "4"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert cuda_free_bytes(0) is None


# --------------------------------------------------------------------------- IO binding


class _Value:
    """Stand-in OrtValue: an array that remembers where it was said to live."""

    def __init__(self, array: np.ndarray, device: str, device_id: int) -> None:
        self.array, self.device, self.device_id = array, device, device_id


class _FakeOrt:
    """Records every OrtValue created, like onnxruntime.OrtValue's two factories."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        ort = self

        class OrtValue:
            @staticmethod
            def ortvalue_from_numpy(x: np.ndarray, device: str, device_id: int) -> _Value:
                ort.log.append(("input", x.shape, device, device_id))
                return _Value(np.array(x), device, device_id)

            @staticmethod
            def ortvalue_from_shape_and_type(shape: tuple[int, ...], dtype: Any, device: str,
                                             device_id: int) -> _Value:
                ort.log.append(("alloc", tuple(shape), np.dtype(dtype), device, device_id))
                return _Value(np.full(shape, np.nan, dtype), device, device_id)

        self.OrtValue = OrtValue


class _Binding:
    def __init__(self, log: list[Any]) -> None:
        self.log, self.inputs, self.outputs = log, {}, {}

    def bind_ortvalue_input(self, name: str, value: _Value) -> None:
        self.inputs[name] = value

    def bind_ortvalue_output(self, name: str, value: _Value) -> None:
        self.outputs[name] = value

    def copy_outputs_to_cpu(self) -> list[np.ndarray]:
        self.log.append("copy")
        return [v.array.copy() for v in self.outputs.values()]


class _Session:
    """The toy model (amplitude 0.5 x, phase 0.25 x) behind both run APIs."""

    def __init__(self) -> None:
        self.log: list[Any] = []
        self.bound_outputs: list[int] = []

    def io_binding(self) -> _Binding:
        self.log.append("io_binding")
        return _Binding(self.log)

    def run_with_iobinding(self, binding: _Binding) -> None:
        self.log.append("run_with_iobinding")
        x = binding.inputs["diffraction"]
        assert x.device == "cuda"
        for name, scale in (("amplitude", 0.5), ("phase", 0.25)):
            out = binding.outputs[name]
            assert out.device == "cuda" and out.array.shape == x.array.shape
            out.array[...] = scale * x.array
            self.bound_outputs.append(id(out))

    def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.log.append("run")
        x = feed["diffraction"]
        return [0.5 * x, 0.25 * x]


def _collect(spec: ArtifactSpec, x: np.ndarray, batch: int, runner: Any
             ) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {"amplitude": [], "phase": []}
    for _, _, out in iter_batches(runner, spec, len(x), lambda a, b: x[a:b], batch):
        for name, value in out.items():
            parts[name].append(value)
    return {name: np.concatenate(v) for name, v in parts.items()}


def test_cuda_session_runs_through_io_binding() -> None:
    spec, session, ort = _spec(), _Session(), _FakeOrt()
    runner = make_runner(session, _info("cuda", device_id=1), spec, ort=ort)
    assert isinstance(runner, IOBindingRunner)
    x = np.random.default_rng(0).random((10, 1, 8, 8), dtype=np.float32)
    out = _collect(spec, x, 4, runner)  # batches of 4, 4, 2
    np.testing.assert_array_equal(out["amplitude"], 0.5 * x)
    np.testing.assert_array_equal(out["phase"], 0.25 * x)
    # One binding; per batch: input to the device, one run, one copy back; no session.run.
    assert session.log == ["io_binding"] + ["run_with_iobinding", "copy"] * 3
    inputs = [e for e in ort.log if e[0] == "input"]
    assert inputs == [("input", (4, 1, 8, 8), "cuda", 1)] * 2 + [("input", (2, 1, 8, 8),
                                                                  "cuda", 1)]
    # Outputs preallocated on the device once per batch shape, then reused.
    allocs = [e for e in ort.log if e[0] == "alloc"]
    assert allocs == [("alloc", (b, 1, 8, 8), np.dtype(np.float32), "cuda", 1)
                      for b in (4, 4, 2, 2)]
    assert len(set(session.bound_outputs)) == 4 and len(session.bound_outputs) == 6


def test_fixed_batch_io_binding_pads_and_trims() -> None:
    spec, session, ort = _spec(batch=4), _Session(), _FakeOrt()
    runner = make_runner(session, _info("cuda"), spec, ort=ort)
    x = np.random.default_rng(1).random((10, 1, 8, 8), dtype=np.float32)
    out = _collect(spec, x, 4, runner)
    np.testing.assert_array_equal(out["amplitude"], 0.5 * x)
    assert {e[1] for e in ort.log} == {(4, 1, 8, 8)}  # the padded last batch too
    assert sum(e[0] == "alloc" for e in ort.log) == 2


def test_cpu_session_keeps_plain_run() -> None:
    spec, session = _spec(), _Session()
    runner = make_runner(session, _info("cpu"), spec, ort=_FakeOrt())
    assert isinstance(runner, OrtRunner) and not isinstance(runner, IOBindingRunner)
    x = np.random.default_rng(2).random((10, 1, 8, 8), dtype=np.float32)
    out = _collect(spec, x, 4, runner)
    np.testing.assert_array_equal(out["phase"], 0.25 * x)
    assert session.log == ["run"] * 3


def test_io_binding_calls_against_real_onnxruntime(toy_artifacts: dict[str, Path]) -> None:
    """The same binding calls through a real (CPU) session: API names and argument order
    are onnxruntime's, outputs come back in output order, buffers are reused."""
    import onnxruntime

    from runtime.batching import output_shape

    spec = load_artifact(toy_artifacts["g1"])
    session, _ = create_session(spec.model_path, "cpu")
    runner = IOBindingRunner(session, onnxruntime, spec.input_name, spec.output_names,
                             lambda name, b: output_shape(spec, name, b), device="cpu")
    x = np.random.default_rng(3).random((7, 1, N, N), dtype=np.float32)
    out = _collect(spec, x, 3, runner)
    np.testing.assert_array_equal(out["amplitude"], 0.5 * x)
    np.testing.assert_array_equal(out["phase"], 0.25 * x)
    assert sorted(runner._outputs) == [1, 3]


def test_device_id_reaches_the_providers() -> None:
    cuda = ("CUDAExecutionProvider", {"use_tf32": "0", "device_id": "2"})
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert _provider_list("cuda", available, 2) == [cuda, "CPUExecutionProvider"]
    assert _provider_list("tensorrt", available, 2) == [
        ("TensorrtExecutionProvider", {"device_id": "2"}), cuda, "CPUExecutionProvider"]
    assert _provider_list("cpu", available, 2) == ["CPUExecutionProvider"]
    assert _info("cpu", 2).to_dict()["device_id"] is None
    assert _info("cuda", 2).to_dict()["device_id"] == 2
    with pytest.raises(EnvironmentProblem, match="--device-id"):
        create_session("model.onnx", "cpu", device_id=-1)


def test_toy_artifact_loads(toy_artifacts: dict[str, Path]) -> None:
    spec = load_artifact(toy_artifacts["g2"])
    assert spec.channels == 4 and spec.batch is None
    session, info = create_session(spec.model_path, "cpu")
    x = np.ones((2, 4, N, N), np.float32)
    amplitude, phase = session.run(None, {"diffraction": x})
    assert amplitude.shape == x.shape and float(phase[0, 0, 0, 0]) == 0.25
    assert info.to_dict()["device_id"] is None


def test_validate_scan_unchanged_for_memory_inputs() -> None:
    """The in-memory contract is untouched: validate_scan still returns plain arrays."""
    arrays = _arrays(m=5, n=8)
    scan = validate_scan(arrays["diffraction"], arrays["probeGuess"], arrays["xcoords"],
                         arrays["ycoords"])
    assert not isinstance(scan.amplitudes, np.memmap)
    assert os.fspath(scan.source) == "<memory>"


def test_batch_larger_than_the_scan_says_so(tmp_path: Path, big_scans: dict[str, Path],
                                            toy_artifacts: dict[str, Path]) -> None:
    arrays = _arrays(m=40)
    path = tmp_path / "small.npz"
    np.savez(path, **arrays)
    report = run_scan(toy_artifacts["g1"], path, tmp_path / "out", provider="cpu",
                      batch_size=100, progress=False)
    assert report["batch_size"] == 40 and report["batches"] == 1
    assert report["batch_choice"]["reason"] == "--batch-size; the scan has only 40 patterns"


@pytest.mark.parametrize("subpixel", ["fourier", "none"])
def test_stitching_overlapped_with_inference_is_bit_identical(
        tmp_path: Path, big_scans: dict[str, Path], toy_artifacts: dict[str, Path],
        subpixel: str) -> None:
    """On a GPU each batch is stitched in a helper thread while the next one is inferred;
    forced on here, the result must equal the sequential path bit for bit."""
    reports = {}
    for overlap in (False, True):
        reports[overlap] = run_scan(toy_artifacts["g1"], big_scans["stored"],
                                    tmp_path / f"o{overlap}", provider="cpu", batch_size=96,
                                    progress=False, subpixel=subpixel, overlap_stitch=overlap)
        assert reports[overlap]["stitch"]["overlapped_with_inference"] is overlap
    a, b = _object(tmp_path / "oFalse"), _object(tmp_path / "oTrue")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert reports[True]["seconds"]["inference"] > 0 and reports[True]["seconds"]["stitch"] > 0


def test_batch_stitcher_reports_a_helper_error_in_the_caller() -> None:
    from runtime.run import BatchStitcher
    from runtime.stitch import StitchAccumulator

    acc = StitchAccumulator(np.array([[20.0, 20.0], [24.0, 24.0]]), 8)
    ones = np.ones((1, 8, 8), np.float32)
    with pytest.raises(DataError, match="outside the canvas"), \
            BatchStitcher(acc, overlap=True) as stitcher:
        stitcher.add(ones, ones, np.array([[20.0, 20.0]]))
        stitcher.add(ones, ones, np.array([[90.0, 90.0]]))  # not planned: the helper fails
        for _ in range(5):  # later batches are drained, never added
            stitcher.add(ones, ones, np.array([[24.0, 24.0]]))
    assert acc.count == 1
    with BatchStitcher(acc, overlap=False) as inline:
        inline.add(ones, ones, np.array([[24.0, 24.0]]))
    assert acc.count == 2 and inline.seconds > 0 and inline.waited == 0
