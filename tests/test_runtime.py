"""ptycho-run: torch-free inference on an exported artifact, checked against the eager model.

The tiny bundle is exported once per module (dynamic batch, and fixed batch 5) and a small
simulated N = 32 scan is reconstructed from it; failure-path tests work on copies of the
artifact folder. This file collects without torch: the torch-free import test always runs,
everything that needs an exported artifact is skipped on a base install.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.run import app
from runtime.errors import (
    EXIT_BAD_INPUT,
    EXIT_ENVIRONMENT,
    EXIT_USAGE,
    ArtifactError,
    DataError,
    EnvironmentProblem,
    ParityError,
)
from runtime.manifest import load_artifact
from runtime.run import RunUsageError, run_scan, self_check_artifact
from runtime.scan import ScanData, save_scan, validate_scan
from runtime.session import check_single_distribution, parse_profile

N = 32
REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "lightning", "pytorch_lightning", "torchvision", "safetensors")
BLOCKER = f"""
import importlib.abc, sys
BLOCKED = {BLOCKED!r}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"blocked in the torch-free runtime: {{name}}", name=name)
        return None
sys.meta_path.insert(0, Blocker())
"""
OUTPUT_FILES = {"object.npz", "amplitude.png", "phase.png", "report.json"}


def _blocked_python(code: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=120)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def scan_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ptycho_export.data.simulate import SimulationConfig, simulate_scan

    scan = simulate_scan(SimulationConfig(patch_size=N, grid_shape=(8, 8), step_px=4,
                                          probe_diameter_px=12, defocus=3))
    path = tmp_path_factory.mktemp("scan") / "scan.npz"
    save_scan(path, scan)
    return path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> dict[str, Path]:
    """{"dynamic": folder, "fixed5": folder}, exported from the tiny bundle."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from ptycho_export.export import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("artifacts")
    export_bundle(tiny_bundle, root / "dynamic", ExportOptions(formats=["onnx"]))
    export_bundle(tiny_bundle, root / "fixed5", ExportOptions(formats=["onnx"], batch=5))
    return {"dynamic": root / "dynamic", "fixed5": root / "fixed5"}


@pytest.fixture(scope="module")
def artifact(artifacts: dict[str, Path]) -> Path:
    return artifacts["dynamic"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory, artifact: Path, scan_path: Path
                ) -> tuple[Path, dict[str, Any]]:
    """One run with defaults + self-check, in a parent folder of its own."""
    outdir = tmp_path_factory.mktemp("run") / "out"
    report = run_scan(artifact, scan_path, outdir, provider="cpu", self_check=True,
                      progress=False)
    return outdir, report


@pytest.fixture
def artifact_copy(tmp_path: Path, artifact: Path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / "artifact"))


def _rehash(folder: Path, name: str) -> None:
    """Record a file's new hash, so only the check under test can notice the edit."""
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    path = folder / name
    manifest["files"][name] = {"sha256": _sha256(path), "size": path.stat().st_size}
    manifest_path.write_text(json.dumps(manifest))


def _edit_manifest(folder: Path, **changes: Any) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def _object(outdir: Path) -> np.ndarray:
    with np.load(outdir / "object.npz") as data:
        return data["object"]


# --------------------------------------------------------------------------- torch-free


def test_runtime_modules_import_without_torch() -> None:
    result = _blocked_python(
        "import runtime.run, runtime.session, runtime.manifest, cli.run\n"
        "import ptycho_export.torchscript_session\n"
        "import onnxruntime\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {BLOCKED!r})\n"
        "assert not bad, bad\n"
        "print('ok')\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_blocker_really_blocks_torch() -> None:
    """Guards the test above: with the blocker installed, importing torch must fail."""
    result = _blocked_python("import torch\n")
    assert result.returncode != 0
    assert "blocked in the torch-free runtime" in result.stderr


def test_full_cli_run_without_torch(tmp_path: Path, artifact: Path, scan_path: Path) -> None:
    outdir = tmp_path / "out"
    result = _blocked_python(
        "from cli.run import main\n"
        f"sys.argv = ['ptycho-run', {str(artifact)!r}, {str(scan_path)!r}, '-o', "
        f"{str(outdir)!r}, '--provider', 'cpu', '--no-progress']\n"
        "try:\n    main()\nexcept SystemExit as stop:\n    code = stop.code or 0\n"
        "else:\n    code = 0\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {BLOCKED!r})\n"
        "assert not bad, bad\n"
        "sys.exit(code)\n")
    assert result.returncode == 0, result.stderr
    assert "self-check: PASS" in result.stdout
    assert {p.name for p in outdir.iterdir()} == OUTPUT_FILES


# --------------------------------------------------------------------------- results


def test_object_matches_the_eager_path(default_run: tuple[Path, dict[str, Any]],
                                       tiny_bundle: Path, scan_path: Path) -> None:
    from ptycho_export.bundle import load_predictor
    from ptycho_export.reconstruct import reconstruct_eager
    from runtime.scan import load_scan

    eager = reconstruct_eager(load_predictor(tiny_bundle), load_scan(scan_path))
    outdir, _ = default_run
    with np.load(outdir / "object.npz") as data:
        obj, mask = data["object"], data["mask"]
        origin, weight = data["origin_px"], data["weight"]
    assert obj.dtype == np.complex64 and mask.dtype == bool
    assert obj.shape == eager.stitched.obj.shape
    np.testing.assert_allclose(obj, eager.stitched.obj, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(mask, eager.well_lit)
    assert tuple(origin.tolist()) == eager.stitched.origin_px
    np.testing.assert_allclose(weight, eager.stitched.weight, rtol=1e-6)


def test_outputs_and_report(default_run: tuple[Path, dict[str, Any]], artifact: Path,
                            scan_path: Path) -> None:
    outdir, report = default_run
    assert {p.name for p in outdir.iterdir()} == OUTPUT_FILES
    # Only the output folder in its parent: no temp or backup folders left behind.
    assert [p.name for p in outdir.parent.iterdir()] == ["out"]
    saved = json.loads((outdir / "report.json").read_text())
    for key in ("provider", "node_counts", "patterns", "patterns_per_s", "self_check"):
        assert saved[key] == report[key]
    assert saved["provider"]["ep"] == "CPUExecutionProvider"
    assert saved["provider"]["provider"] == "cpu"
    assert saved["node_counts"]["CPUExecutionProvider"] > 0
    assert saved["patterns"] == 64 and saved["patterns_per_s"] > 0
    assert saved["artifact"]["sha256"] == _sha256(artifact / "model.onnx")
    assert saved["data"]["file"] == str(scan_path)
    assert saved["self_check"]["status"] == "PASS"
    from PIL import Image

    for name in ("amplitude.png", "phase.png"):
        with Image.open(outdir / name) as image:
            assert image.mode == "RGB" and min(image.size) >= 512
            assert image.size[0] > image.size[1]  # square object + colour bar on the right
    with np.load(outdir / "object.npz") as data:
        obj = data["object"]
        assert data["amplitude"].dtype == np.float32 == data["phase"].dtype
        np.testing.assert_allclose(data["amplitude"], np.abs(obj), rtol=1e-6)
        np.testing.assert_allclose(data["phase"], np.angle(obj), atol=1e-6)
    # The simulated scan has objectGuess: scored after removing global factor and ramp.
    quality = saved["quality"]
    assert quality["ground_truth"] is True and quality["scored_pixels"] > 0
    for key in ("model", "flat_baseline", "model_global_factor_only"):
        assert 0 <= quality[key]["phase_rmse_rad"] <= np.pi
        assert "phase_ramp_x_rad_per_px" in quality[key] or key.endswith("only")


def test_report_says_how_the_run_was_shaped(default_run: tuple[Path, dict[str, Any]]) -> None:
    """save_scan writes uncompressed members, so the scan is memory-mapped; the simulator's
    positions are whole pixels, so the stitch defaults to integer placement; no
    --batch-size, so the batch comes from free memory (min with the 64 patterns)."""
    _, report = default_run
    assert report["data"]["memory_mapped"] is True
    assert report["stitch"]["subpixel"] == "none" and report["stitch"]["crop"] == 0
    assert report["batch_choice"]["source"] in ("memory", "default")
    assert report["batch_choice"]["bytes_per_pattern"] > 0
    assert report["batch_size"] == 64 and report["io_binding"] is False


@pytest.mark.parametrize("batch_size", [1, 7])
def test_batch_size_does_not_change_the_result(tmp_path: Path, artifact: Path, scan_path: Path,
                                               default_run: tuple[Path, dict[str, Any]],
                                               batch_size: int) -> None:
    report = run_scan(artifact, scan_path, tmp_path / "out", provider="cpu",
                      batch_size=batch_size, progress=False)
    assert report["batch_size"] == batch_size
    assert report["batches"] == -(-64 // batch_size)
    np.testing.assert_array_equal(_object(tmp_path / "out"), _object(default_run[0]))


def test_fixed_batch_artifact_pads_the_last_batch(tmp_path: Path, artifacts: dict[str, Path],
                                                  scan_path: Path,
                                                  default_run: tuple[Path, dict[str, Any]]
                                                  ) -> None:
    report = run_scan(artifacts["fixed5"], scan_path, tmp_path / "out", provider="cpu",
                      self_check=True, progress=False)
    assert report["batch_size"] == 5 and report["batches"] == 13  # 64 = 12 * 5 + 4
    assert report["self_check"]["status"] == "PASS"
    np.testing.assert_allclose(_object(tmp_path / "out"), _object(default_run[0]),
                               rtol=0, atol=1e-6)


def test_fixed_batch_artifact_refuses_another_batch_size(tmp_path: Path,
                                                         artifacts: dict[str, Path],
                                                         scan_path: Path) -> None:
    with pytest.raises(RunUsageError, match="fixed batch of 5"):
        run_scan(artifacts["fixed5"], scan_path, tmp_path / "out", batch_size=8,
                 progress=False)
    assert not (tmp_path / "out").exists()


def test_an_older_output_folder_is_replaced(tmp_path: Path, artifact: Path,
                                            scan_path: Path) -> None:
    outdir = tmp_path / "out"
    report = run_scan(artifact, scan_path, outdir, provider="cpu", progress=False)
    assert report["producer"] == "ptycho-run"
    (outdir / "stale.txt").write_text("left in a run folder")
    run_scan(artifact, scan_path, outdir, provider="cpu", progress=False)
    assert {p.name for p in outdir.iterdir()} == OUTPUT_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_folder_ptycho_run_did_not_write_is_refused(tmp_path: Path, artifact: Path,
                                                       scan_path: Path) -> None:
    from runtime.atomic import OutputNotOurs

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    with pytest.raises(OutputNotOurs, match="exists and was not written by ptycho-run"):
        run_scan(artifact, scan_path, mine, provider="cpu", progress=False)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    run_scan(artifact, scan_path, mine, provider="cpu", progress=False, force=True)
    assert {p.name for p in mine.iterdir()} == OUTPUT_FILES


def test_output_folder_holding_the_inputs_is_refused(tmp_path: Path, artifact: Path,
                                                     scan_path: Path) -> None:
    data = Path(shutil.copy(scan_path, tmp_path / "scan.npz"))
    with pytest.raises(RunUsageError, match="inside it"):
        run_scan(artifact, data, tmp_path, progress=False)
    assert data.exists()


# --------------------------------------------------------------------------- self-check


def test_self_check_alone_passes(artifact: Path) -> None:
    result = self_check_artifact(artifact, provider="cpu")
    assert result["self_check"]["status"] == "PASS"
    assert result["self_check"]["failures"] == []
    assert result["provider"]["ep"] == "CPUExecutionProvider"


def test_self_check_failure_is_reported_and_stops_the_run(artifact_copy: Path,
                                                          scan_path: Path,
                                                          tmp_path: Path) -> None:
    golden = artifact_copy / "golden.npz"
    with np.load(golden) as data:
        arrays = dict(data)
    arrays["amplitude"] = arrays["amplitude"] * 1.01 + 0.01
    np.savez(golden, **arrays)
    _rehash(artifact_copy, "golden.npz")
    result = self_check_artifact(artifact_copy, provider="cpu")["self_check"]
    assert result["status"] == "FAIL"
    assert any(f.startswith("amplitude:") for f in result["failures"])
    with pytest.raises(ParityError, match="self-check FAILED") as caught:
        run_scan(artifact_copy, scan_path, tmp_path / "out", provider="cpu", self_check=True,
                 progress=False)
    assert caught.value.exit_code == 5  # the same code as a failed export gate
    assert not (tmp_path / "out").exists()
    cli = CliRunner().invoke(app, [str(artifact_copy), "--provider", "cpu"])
    assert cli.exit_code == 5 and "self-check FAILED" in cli.stderr


# --------------------------------------------------------------------------- artifact errors


def test_model_with_an_appended_byte_is_refused(artifact_copy: Path) -> None:
    with open(artifact_copy / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ArtifactError, match="edited after export") as info:
        load_artifact(artifact_copy)
    assert "model.onnx" in str(info.value) and "\n" not in str(info.value)


def test_model_with_a_flipped_byte_fails_the_sha256(artifact_copy: Path) -> None:
    model = artifact_copy / "model.onnx"
    blob = bytearray(model.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    model.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match=r"model.onnx does not match its sha256 in "
                                            r"manifest.json \(edited after export\?\)"):
        load_artifact(artifact_copy / "model.onnx")


def test_tampered_golden_is_caught_only_when_self_checking(artifact_copy: Path) -> None:
    with open(artifact_copy / "golden.npz", "ab") as handle:
        handle.write(b"\0")
    load_artifact(artifact_copy)
    with pytest.raises(ArtifactError, match="golden.npz"):
        load_artifact(artifact_copy, check_golden=True)


def test_missing_manifest(artifact_copy: Path) -> None:
    (artifact_copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json: missing"):
        load_artifact(artifact_copy)


@pytest.mark.parametrize(("change", "message"), [
    ({"format": "something-else"}, "format is 'something-else'"),
    ({"format_version": 2}, "newer ptycho-export"),
    ({"artifacts": {}}, "lists no ONNX model"),
])
def test_inconsistent_manifest(artifact_copy: Path, change: dict[str, Any],
                               message: str) -> None:
    _edit_manifest(artifact_copy, **change)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(artifact_copy)


def test_manifest_that_is_not_json(artifact_copy: Path) -> None:
    (artifact_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(artifact_copy)


def test_model_not_listed_in_files(artifact_copy: Path) -> None:
    manifest = json.loads((artifact_copy / "manifest.json").read_text())
    del manifest["files"]["model.onnx"]
    (artifact_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="does not list model.onnx"):
        load_artifact(artifact_copy)


def test_missing_artifact_path(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        load_artifact(tmp_path / "nowhere")


def test_spec_fields(artifacts: dict[str, Path]) -> None:
    spec = load_artifact(artifacts["dynamic"] / "model.onnx", check_golden=True)
    assert (spec.patch_size, spec.gridsize, spec.channels) == (N, 1, 1)
    assert spec.input_name == "diffraction" and spec.input_shape == ("batch", 1, N, N)
    assert spec.output_names == ("amplitude", "phase")
    assert spec.batch is None and spec.golden_path == artifacts["dynamic"] / "golden.npz"
    assert spec.tolerances["amplitude_rel_max"] > 0
    assert load_artifact(artifacts["fixed5"]).batch == 5


# --------------------------------------------------------------------------- data errors


@pytest.fixture
def wrong_size_scan(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    scan: ScanData = validate_scan(rng.uniform(0, 2, (9, 64, 64)).astype(np.float32),
                                   np.ones((64, 64), np.complex64),
                                   np.repeat(np.arange(3.0), 3) * 4 + 40,
                                   np.tile(np.arange(3.0), 3) * 4 + 40)
    path = tmp_path / "big.npz"
    save_scan(path, scan)
    return path


def test_wrong_patch_size_is_a_data_error(tmp_path: Path, artifact: Path,
                                          wrong_size_scan: Path) -> None:
    parent = tmp_path / "parent"
    with pytest.raises(DataError, match="patterns are 64x64 but the model expects 32x32") \
            as info:
        run_scan(artifact, wrong_size_scan, parent / "out", progress=False)
    assert str(wrong_size_scan) in str(info.value)
    assert not parent.exists()


# --------------------------------------------------------------------------- environment


def _has_cuda_ep() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def test_cuda_without_the_cuda_provider(tmp_path: Path, artifact: Path,
                                        scan_path: Path) -> None:
    if _has_cuda_ep():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(EnvironmentProblem, match=r"CPU build.*ptycho-export\[gpu\]"):
        run_scan(artifact, scan_path, tmp_path / "out", provider="cuda", progress=False)
    assert not (tmp_path / "out").exists()


def test_both_onnxruntime_wheels_installed_is_refused() -> None:
    check_single_distribution({"onnxruntime": "1.32.0"})
    with pytest.raises(EnvironmentProblem, match="uninstall") as info:
        check_single_distribution({"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"})
    assert "onnxruntime 1.32.0 and onnxruntime-gpu 1.31.1" in str(info.value)


def test_parse_profile_counts_each_node_once() -> None:
    def event(name: str, provider: str, op: str) -> dict[str, Any]:
        return {"cat": "Node", "name": f"{name}_kernel_time",
                "args": {"provider": provider, "op_name": op}}

    events = [event("conv1", "CUDAExecutionProvider", "Conv"),
              event("conv1", "CUDAExecutionProvider", "Conv"),  # second run
              event("dft", "CPUExecutionProvider", "DFT"),
              {"cat": "Node", "name": "dft_fence_before", "args": {}},
              {"cat": "Session", "name": "model_run"}]
    assert parse_profile(events) == {"CPUExecutionProvider": {"DFT": 1},
                                     "CUDAExecutionProvider": {"Conv": 1}}


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_cli_success(runner: CliRunner, tmp_path: Path, artifact: Path,
                     scan_path: Path) -> None:
    outdir = tmp_path / "out"
    result = runner.invoke(app, [str(artifact), str(scan_path), "-o", str(outdir),
                                 "--provider", "cpu", "--batch-size", "16", "--threads", "1",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "provider: cpu" in result.output
    assert "patterns/s" in result.output
    assert "self-check: PASS" in result.output
    assert {p.name for p in outdir.iterdir()} == OUTPUT_FILES
    assert json.loads((outdir / "report.json").read_text())["provider"]["threads"] == 1


def test_cli_self_check_only(runner: CliRunner, artifact: Path) -> None:
    result = runner.invoke(app, [str(artifact), "--provider", "cpu"])
    assert result.exit_code == 0, result.output
    assert "self-check: PASS" in result.output


def test_cli_bad_data_exit_3(runner: CliRunner, tmp_path: Path, artifact: Path,
                             wrong_size_scan: Path) -> None:
    outdir = tmp_path / "out"
    result = runner.invoke(app, [str(artifact), str(wrong_size_scan), "-o", str(outdir),
                                 "--no-progress"])
    assert result.exit_code == EXIT_BAD_INPUT == 3
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "64x64" in lines[0]
    assert not outdir.exists()


def test_cli_tampered_artifact_exit_3(runner: CliRunner, tmp_path: Path, artifact_copy: Path,
                                      scan_path: Path) -> None:
    with open(artifact_copy / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    result = runner.invoke(app, [str(artifact_copy), str(scan_path), "-o",
                                 str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "model.onnx" in result.output and "after export" in result.output


def test_cli_cuda_missing_exit_4(runner: CliRunner, tmp_path: Path, artifact: Path,
                                 scan_path: Path) -> None:
    if _has_cuda_ep():
        pytest.skip("this onnxruntime has the CUDA provider")
    result = runner.invoke(app, [str(artifact), str(scan_path), "-o", str(tmp_path / "out"),
                                 "--provider", "cuda", "--no-progress"])
    assert result.exit_code == EXIT_ENVIRONMENT == 4
    assert "pip install 'ptycho-export[gpu]'" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_fixed_batch_mismatch_exit_2(runner: CliRunner, tmp_path: Path,
                                         artifacts: dict[str, Path], scan_path: Path) -> None:
    result = runner.invoke(app, [str(artifacts["fixed5"]), str(scan_path), "-o",
                                 str(tmp_path / "out"), "--batch-size", "3", "--no-progress"])
    assert result.exit_code == EXIT_USAGE == 2
    assert "fixed batch of 5" in result.output
