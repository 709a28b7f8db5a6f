"""ptycho-run on an artifact's model.ts (TorchScript, where torch is installed).

One tiny export holds both model.onnx and model.ts; the two must give the same object.
Without torch, asking for model.ts must be a one-line install hint, and the torch-free
import of the runtime must not have changed (tests/test_runtime.py checks that too).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.run import app
from runtime.errors import EXIT_ENVIRONMENT, ArtifactError, EnvironmentProblem
from runtime.manifest import load_artifact
from runtime.run import RunUsageError, run_scan
from runtime.scan import save_scan

N = 32


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Path:
    """An artifact folder with model.onnx, model.ts and model.pt2 of the tiny bundle."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from ptycho_export.export import ExportOptions, export_bundle

    folder = tmp_path_factory.mktemp("both") / "artifact"
    export_bundle(tiny_bundle, folder, ExportOptions(formats=["onnx", "torchscript", "pt2"]))
    return folder


@pytest.fixture(scope="module")
def scan_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ptycho_export.data.simulate import SimulationConfig, simulate_scan

    scan = simulate_scan(SimulationConfig(patch_size=N, grid_shape=(6, 6), step_px=4,
                                          probe_diameter_px=12, defocus=3))
    path = tmp_path_factory.mktemp("scan") / "scan.npz"
    save_scan(path, scan)
    return path


def _object(outdir: Path) -> np.ndarray:
    with np.load(outdir / "object.npz") as data:
        return data["object"]


def test_model_ts_and_model_onnx_give_the_same_object(tmp_path: Path, both: Path,
                                                      scan_path: Path) -> None:
    onnx = run_scan(both, scan_path, tmp_path / "onnx", provider="cpu", self_check=True,
                    progress=False)
    ts = run_scan(both / "model.ts", scan_path, tmp_path / "ts", provider="cpu",
                  self_check=True, progress=False)
    assert onnx["runtime"] == "onnxruntime" and onnx["artifact"]["format"] == "onnx"
    assert ts["runtime"] == "torchscript" and ts["artifact"]["format"] == "torchscript"
    assert ts["artifact"]["model"] == "model.ts" and ts["self_check"]["status"] == "PASS"
    assert ts["provider"]["ep"] == "TorchScript(cpu)" and ts["io_binding"] is False
    assert ts["node_ops"]["TorchScript(cpu)"]["_convolution"] > 0
    a, b = _object(tmp_path / "onnx"), _object(tmp_path / "ts")
    assert a.shape == b.shape and a.dtype == b.dtype == np.complex64
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert rel <= 1e-5, rel
    saved = json.loads((tmp_path / "ts" / "report.json").read_text())
    assert saved["runtime"] == "torchscript" and saved["quality"]["ground_truth"] is True


def test_model_pt2_runs_too_and_gives_the_same_object(tmp_path: Path, both: Path,
                                                       scan_path: Path) -> None:
    """Every format the exporter writes is runnable: model.pt2 through torch.export.load,
    self-checked against the golden outputs, provenance checked, the same object."""
    onnx = run_scan(both, scan_path, tmp_path / "onnx", provider="cpu", progress=False)
    pt2 = run_scan(both / "model.pt2", scan_path, tmp_path / "pt2", provider="cpu",
                   self_check=True, progress=False)
    assert pt2["runtime"] == "pt2" and pt2["artifact"]["format"] == "pt2"
    assert pt2["self_check"]["status"] == "PASS" and pt2["provider"]["ep"] == "pt2(cpu)"
    assert pt2["node_ops"]["pt2(cpu)"]["conv2d"] > 0
    a, b = _object(tmp_path / "onnx"), _object(tmp_path / "pt2")
    assert np.abs(a - b).max() / np.abs(a).max() <= 1e-5
    assert onnx["artifact"]["format"] == "onnx"


def test_format_option_picks_model_ts_from_the_folder(tmp_path: Path, both: Path,
                                                      scan_path: Path) -> None:
    outdir = tmp_path / "out"
    result = CliRunner().invoke(app, [str(both), str(scan_path), "-o", str(outdir),
                                      "--format", "torchscript", "--provider", "cpu",
                                      "--no-self-check", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "TorchScript(cpu)" in result.output
    assert json.loads((outdir / "report.json").read_text())["artifact"]["model"] == "model.ts"
    assert load_artifact(both).model_format == "onnx"  # the folder alone: ONNX
    with pytest.raises(ArtifactError, match="not the ONNX model"):
        load_artifact(both / "model.ts", model_format="onnx")
    with pytest.raises(RunUsageError, match="--format 'triton'"):
        run_scan(both, scan_path, tmp_path / "x", model_format="triton", progress=False)


def test_model_ts_is_hash_checked(tmp_path: Path, both: Path) -> None:
    copy = Path(shutil.copytree(both, tmp_path / "artifact"))
    model = copy / "model.ts"
    blob = bytearray(model.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    model.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match=r"model.ts does not match its sha256"):
        load_artifact(model)
    load_artifact(copy)  # the ONNX model of the same folder is untouched


def test_onnx_only_artifact_has_no_torchscript(tmp_path: Path, both: Path) -> None:
    copy = Path(shutil.copytree(both, tmp_path / "artifact"))
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["artifacts"]["torchscript"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="lists no TorchScript model"):
        load_artifact(copy, model_format="torchscript")


def test_torchscript_refuses_tensorrt(tmp_path: Path, both: Path, scan_path: Path) -> None:
    with pytest.raises(EnvironmentProblem, match="runs on cpu or cuda"):
        run_scan(both / "model.ts", scan_path, tmp_path / "out", provider="tensorrt",
                 progress=False)
    assert not (tmp_path / "out").exists()


def test_model_ts_without_torch_is_a_one_line_hint(tmp_path: Path, both: Path,
                                                   scan_path: Path) -> None:
    from test_runtime import BLOCKED, _blocked_python

    outdir = tmp_path / "out"
    result = _blocked_python(
        "from cli.run import main\n"
        f"sys.argv = ['ptycho-run', {str(both / 'model.ts')!r}, {str(scan_path)!r}, '-o', "
        f"{str(outdir)!r}, '--no-progress']\n"
        "try:\n    main()\nexcept SystemExit as stop:\n    code = stop.code or 0\n"
        "else:\n    code = 0\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {BLOCKED!r})\n"
        "assert not bad, bad\n"
        "sys.exit(code)\n")
    assert result.returncode == EXIT_ENVIRONMENT, result.stdout + result.stderr
    text = (result.stdout + result.stderr).strip()
    assert "pip install 'ptycho-export[train]'" in text and "model.onnx" in text
    assert len(text.splitlines()) == 1, text
    assert not outdir.exists()
