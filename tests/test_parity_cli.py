"""ptycho-parity: a whole scan through the eager model and every artifact, per patch and on
the stitched object; exit codes, parity.json numbers, the error-map PNG, planted faults.

The tiny bundle is exported once per module (onnx + torchscript + pt2) and checked once;
the failure tests copy that folder and tamper with the copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import BundleParts, rewrite_bundle
from typer.testing import CliRunner

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402
from PIL import Image  # noqa: E402

import ptycho_export.parity_check as parity_check  # noqa: E402
import ptycho_export.parity_report as parity_report  # noqa: E402
from cli.parity import app  # noqa: E402
from ptycho_export.data.simulate import SimulationConfig, simulate_scan  # noqa: E402
from ptycho_export.export import ExportOptions, export_bundle  # noqa: E402
from ptycho_export.parity_check import infer_groups, object_errors  # noqa: E402
from ptycho_export.parity_report import error_rgb  # noqa: E402
from runtime.errors import EXIT_BAD_INPUT, EXIT_PARITY  # noqa: E402
from runtime.images import UNVISITED_RGB  # noqa: E402
from runtime.scan import save_scan  # noqa: E402

ARTIFACT_RUNNERS = {"onnxruntime cpu", "torchscript cpu", "pt2 cpu"}


def _strict_json(path: Path) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{path} holds the non-JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _rows(report: dict, **where: object) -> list[dict]:
    return [r for r in report["rows"] if all(r[k] == v for k, v in where.items())]


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture(scope="module")
def cli() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def exported(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    outdir = tmp_path_factory.mktemp("parity_export") / "artifacts"
    export_bundle(tiny_bundle, outdir,
                  ExportOptions(formats=["onnx", "torchscript", "pt2"], command="pytest"))
    return outdir


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = SimulationConfig(patch_size=32, grid_shape=(6, 6), step_px=4,
                              probe_diameter_px=12, defocus=3)
    path = tmp_path_factory.mktemp("parity_scan") / "scan.npz"
    save_scan(path, simulate_scan(config))
    return path


@pytest.fixture(scope="module")
def passed(cli: CliRunner, tiny_bundle: Path, exported: Path, scan_file: Path,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    report_dir = tmp_path_factory.mktemp("parity_pass") / "report"
    result = cli.invoke(app, [str(tiny_bundle), str(exported), str(scan_file),
                              "-o", str(report_dir), "--batch-size", "16"])
    return result, report_dir


def _copy_artifacts(exported: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "artifacts"
    shutil.copytree(exported, folder)
    return folder


def _rehash(folder: Path, name: str) -> None:
    """Record a file's new sha256/size in manifest.json, so only parity can catch it."""
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    blob = (folder / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
    manifest_path.write_text(json.dumps(manifest, indent=2))


# ---------------------------------------------------------------- the passing run
def test_parity_passes_with_real_numbers(passed: tuple[object, Path]) -> None:
    result, report_dir = passed
    assert result.exit_code == 0, result.output + result.stderr
    assert "parity PASS" in result.output
    assert "onnxruntime cpu" in result.output and "torchscript cpu" in result.output
    report = _strict_json(report_dir / "parity.json")
    assert report["status"] == "PASS" and report["failures"] == []
    assert report["scan"]["groups"] == 36 and report["scan"]["batch_size"] == 16
    assert report["artifact"]["source_bundle_verified"] is True
    assert set(report["artifact"]["files"]) == {"model.onnx", "model.ts", "model.pt2"}

    gated = _rows(report, kind="export")
    assert {r["runner"] for r in gated if r["status"] != "skipped"} == ARTIFACT_RUNNERS
    for row in gated:
        if row["status"] != "skipped":
            assert row["status"] == "PASS" and row["gated"], row

    onnx_patch = _rows(report, kind="export", runner="onnxruntime cpu", level="patch")[0]
    amplitude = onnx_patch["metrics"]["outputs"]["amplitude"]
    assert 0.0 < amplitude["rel_max"] < 1e-5  # a real float32 difference, well in tolerance
    assert 0.0 <= onnx_patch["metrics"]["phase_weighted_max_rad"] < 1e-4
    onnx_object = _rows(report, kind="export", runner="onnxruntime cpu", level="object")[0]
    m = onnx_object["metrics"]
    assert 0.0 < m["complex_rel_max"] < 1e-5
    assert m["pixels"] == report["scan"]["well_lit_pixels"] > 0
    assert m["amplitude_psnr_db"] > 100 and m["nonfinite_pixels"] == 0

    for runner in ("torchscript cpu", "pt2 cpu"):  # same kernels as eager: bit-identical
        patch = _rows(report, kind="export", runner=runner, level="patch")[0]
        assert all(o["max_abs"] == 0.0 for o in patch["metrics"]["outputs"].values()), patch
        obj = _rows(report, kind="export", runner=runner, level="object")[0]
        assert obj["metrics"]["complex_rel_max"] == 0.0
        assert obj["metrics"]["amplitude_psnr_db"] == "inf"  # strict JSON for infinity

    exact = _rows(report, kind="exact", runner="eager fp32 cpu", level="patch")[0]
    assert exact["gated"] is False and exact["reference"] == "eager fp64 cpu"
    assert 0.0 < exact["metrics"]["amplitude_rel_max"] < 1e-5


def test_error_png_opens_with_the_worst_artifact(passed: tuple[object, Path]) -> None:
    _, report_dir = passed
    report = _strict_json(report_dir / "parity.json")
    assert report["picture"]["runner"] == "onnxruntime cpu"  # TorchScript/.pt2 are exact
    assert report["picture"]["amplitude_error_max"] > 0
    with Image.open(report_dir / "parity_errors.png") as image:
        image.load()
        assert image.mode == "RGB"
        assert image.width > 4 * 256 and image.height >= 256
    assert not list(report_dir.glob(".*tmp"))


def test_cuda_rows_are_reported(passed: tuple[object, Path]) -> None:
    result, report_dir = passed
    report = _strict_json(report_dir / "parity.json")
    device_rows = _rows(report, kind="device")
    labels = {r["runner"] for r in device_rows}
    assert {"eager fp32 cuda", "eager fp32 cuda (tf32)", "onnxruntime cuda",
            "torchscript cuda", "torchscript cuda (tf32)", "pt2 cuda",
            "pt2 cuda (tf32)"} <= labels
    assert all(r["gated"] != ("(tf32)" in r["runner"]) for r in device_rows)
    if torch.cuda.is_available():
        assert any(r["status"] in ("PASS", "FAIL") for r in device_rows)
    else:
        assert all(r["status"] == "skipped" and "CUDA" in r["note"] for r in device_rows)
        assert report["environment"]["cuda_available"] is False
        skipped = [r for r in report["runners"] if r["status"] == "skipped"]
        assert {r["runner"] for r in skipped} >= {"eager fp32 cuda", "pt2 cuda"}
        assert "skipped" in result.output


def test_device_rows_with_cuda_present(tiny_bundle: Path, exported: Path, scan_file: Path,
                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA bookkeeping, on a machine without one: "cuda" torch runners are built on
    the CPU, so CUDA-vs-CPU rows must be exact; onnxruntime has no CUDA here, so its CUDA
    rows stay skipped with the reason."""
    real_build = parity_check.build_runner

    def build(variant, wrapper, files):  # noqa: ANN001, ANN202
        if variant.device == "cuda" and variant.family != "onnx":
            runner = real_build(dataclasses.replace(variant, device="cpu"), wrapper, files)
            runner.name = variant.label
            return runner
        return real_build(variant, wrapper, files)

    monkeypatch.setattr(parity_check, "build_runner", build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "simulated")
    monkeypatch.setattr(parity_check, "_ort_cuda_reason", lambda: "no CUDA in onnxruntime")
    report = parity_report.run_parity_check(tiny_bundle, exported, scan_file,
                                            tmp_path / "report")
    assert report["status"] == "PASS"
    device = _rows(report, kind="device")
    ran = [r for r in device if r["status"] != "skipped"]
    assert {r["runner"] for r in ran} == {
        "eager fp32 cuda", "eager fp32 cuda (tf32)", "torchscript cuda",
        "torchscript cuda (tf32)", "pt2 cuda", "pt2 cuda (tf32)"}
    assert {r["level"] for r in ran} == {"patch", "object"}
    for row in ran:
        assert row["gated"] == ("(tf32)" not in row["runner"])
        assert row["status"] == ("PASS" if row["gated"] else "info")
        assert row["note"].startswith("TF32 on" if "(tf32)" in row["runner"] else "TF32 off")
        assert row["reference"] == row["runner"].split(" cuda")[0] + " cpu"
        if row["level"] == "patch":
            assert all(o["max_abs"] == 0.0 for o in row["metrics"]["outputs"].values())
    skipped = [r for r in device if r["status"] == "skipped"]
    assert [(r["runner"], r["note"]) for r in skipped] == [
        ("onnxruntime cuda", "no CUDA in onnxruntime")]
    exported_rows = {r["runner"] for r in _rows(report, kind="export") if r["gated"]}
    assert {"torchscript cuda", "pt2 cuda"} <= exported_rows  # also gated against eager


# ---------------------------------------------------------------- failures
def test_perturbed_onnx_fails_with_exit_5(cli: CliRunner, tiny_bundle: Path, exported: Path,
                                          scan_file: Path, tmp_path: Path) -> None:
    folder = _copy_artifacts(exported, tmp_path)
    model = onnx.load(str(folder / "model.onnx"))
    # The last Conv (a decoder head): the untrained tiny net barely depends on its encoder.
    head = [node.input[1] for node in model.graph.node if node.op_type == "Conv"][-1]
    tensor = next(t for t in model.graph.initializer if t.name == head)
    weight = numpy_helper.to_array(tensor) * np.float32(1.01)
    tensor.CopyFrom(numpy_helper.from_array(weight.astype(np.float32), tensor.name))
    onnx.save(model, str(folder / "model.onnx"))
    _rehash(folder, "model.onnx")

    report_dir = tmp_path / "report"
    result = cli.invoke(app, [str(tiny_bundle), str(folder), str(scan_file),
                              "-o", str(report_dir)])
    assert result.exit_code == EXIT_PARITY == 5, result.output + result.stderr
    line = _one_error_line(result.stderr)
    assert "onnxruntime cpu" in line
    assert "amplitude" in line or "phase" in line
    assert str(report_dir / "parity.json") in line
    report = _strict_json(report_dir / "parity.json")
    assert report["status"] == "FAIL" and report["failures"]
    assert all(f.startswith("onnxruntime") for f in report["failures"])
    for runner in ("torchscript cpu", "pt2 cpu"):
        assert all(r["status"] == "PASS"
                   for r in _rows(report, kind="export", runner=runner))
    patch, obj = (_rows(report, kind="export", runner="onnxruntime cpu", level=level)[0]
                  for level in ("patch", "object"))
    assert patch["status"] == "FAIL" and patch["worst_output"] in ("amplitude", "phase")
    # The untrained head's phase is nearly flat, so 1% on it is nearly a global phase
    # offset. The stitched-object gate compares pixel for pixel (no alignment), so it fails
    # too; the aligned number, reported beside it, is much smaller.
    assert obj["status"] == "FAIL"
    assert obj["metrics"]["complex_rel_max_unaligned"] > 1e-3
    assert obj["metrics"]["complex_rel_max"] < obj["metrics"]["complex_rel_max_unaligned"]
    assert (report_dir / "parity_errors.png").is_file()
    assert "FAIL" in result.output


def test_tolerance_flags_override_the_manifest(cli: CliRunner, tiny_bundle: Path,
                                               exported: Path, scan_file: Path,
                                               tmp_path: Path) -> None:
    result = cli.invoke(app, [str(tiny_bundle), str(exported), str(scan_file),
                              "-o", str(tmp_path / "report"), "--amplitude-tol", "1e-9",
                              "--object-tol", "1e-9"])
    assert result.exit_code == EXIT_PARITY, result.output + result.stderr
    line = _one_error_line(result.stderr)
    assert "onnxruntime cpu" in line and ("amplitude" in line or "phase" in line)
    report = _strict_json(tmp_path / "report" / "parity.json")
    assert report["tolerances"]["patch"]["amplitude_rel_max"] == 1e-9
    assert report["tolerances"]["patch"]["phase_weighted_max_rad"] == 1e-4  # manifest's
    assert report["tolerances"]["object"]["object_complex_rel_max"] == 1e-9
    failed = [r for r in report["rows"] if r["status"] == "FAIL"]
    # ONNX fails both levels; TorchScript and .pt2 are exact, so they pass even at 1e-9
    assert {(r["runner"], r["level"]) for r in failed} == {("onnxruntime cpu", "patch"),
                                                           ("onnxruntime cpu", "object")}


def test_artifacts_of_another_bundle_exit_3(cli: CliRunner, tiny_bundle: Path,
                                            exported: Path, scan_file: Path,
                                            tmp_path: Path) -> None:
    def retrain(parts: BundleParts) -> None:
        config = json.loads(parts.members["config.json"])
        config["training"]["epochs"] = 2
        parts.members["config.json"] = json.dumps(config).encode()

    other = rewrite_bundle(tiny_bundle, tmp_path / "other.zip", retrain)
    report_dir = tmp_path / "report"
    result = cli.invoke(app, [str(other), str(exported), str(scan_file),
                              "-o", str(report_dir)])
    assert result.exit_code == EXIT_BAD_INPUT == 3, result.output + result.stderr
    line = _one_error_line(result.stderr)
    assert "exported from tiny.zip" in line and "other.zip" in line
    assert not report_dir.exists()


def test_edited_torchscript_file_fails_the_hash_check(cli: CliRunner, tiny_bundle: Path,
                                                      exported: Path, scan_file: Path,
                                                      tmp_path: Path) -> None:
    folder = _copy_artifacts(exported, tmp_path)
    with open(folder / "model.ts", "ab") as handle:
        handle.write(b"\0")
    result = cli.invoke(app, [str(tiny_bundle), str(folder), str(scan_file),
                              "-o", str(tmp_path / "report")])
    assert result.exit_code == EXIT_BAD_INPUT, result.output + result.stderr
    assert "model.ts" in _one_error_line(result.stderr)


def test_scan_of_another_patch_size_exit_3(cli: CliRunner, tiny_bundle: Path, exported: Path,
                                           tmp_path: Path) -> None:
    scan = simulate_scan(SimulationConfig(patch_size=16, grid_shape=(2, 2), step_px=4,
                                          probe_diameter_px=8, defocus=1))
    save_scan(tmp_path / "small.npz", scan)
    result = cli.invoke(app, [str(tiny_bundle), str(exported), str(tmp_path / "small.npz"),
                              "-o", str(tmp_path / "report")])
    assert result.exit_code == EXIT_BAD_INPUT, result.output + result.stderr
    assert "16x16" in _one_error_line(result.stderr)


def test_runner_that_raises_is_a_failed_check(cli: CliRunner, tiny_bundle: Path,
                                              exported: Path, scan_file: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real_build = parity_check.build_runner

    class Broken:
        name = "pt2 cpu"

        def infer(self, inputs: dict) -> dict:
            raise RuntimeError("planted kernel failure")

    def build(variant, wrapper, files):  # noqa: ANN001, ANN202
        return Broken() if variant.label == "pt2 cpu" else real_build(variant, wrapper, files)

    monkeypatch.setattr(parity_check, "build_runner", build)
    result = cli.invoke(app, [str(tiny_bundle), str(exported), str(scan_file),
                              "-o", str(tmp_path / "report")])
    assert result.exit_code == EXIT_PARITY, result.output + result.stderr
    line = _one_error_line(result.stderr)
    assert "pt2 cpu" in line and "planted kernel failure" in line
    report = _strict_json(tmp_path / "report" / "parity.json")
    assert {r["runner"] for r in report["rows"] if r["status"] == "FAIL"} == {"pt2 cpu"}
    assert report["worst"]["ratio_to_limit"] == "inf"


# ---------------------------------------------------------------- pure pieces
def test_fixed_batch_pads_the_last_batch_and_trims_it_again() -> None:
    seen: list[int] = []

    class Doubler:
        name = "doubler"

        def infer(self, inputs: dict) -> dict:
            x = inputs["diffraction"]
            seen.append(len(x))
            return {"amplitude": 2 * x, "phase": -x}

    amplitudes = np.arange(5 * 4 * 4, dtype=np.float32).reshape(5, 4, 4)
    groups = np.arange(5)[:, None]
    out = infer_groups(Doubler(), amplitudes, groups, "diffraction", 2, fixed=True)
    assert seen == [2, 2, 2]
    assert out["amplitude"].shape == (5, 1, 4, 4)
    np.testing.assert_array_equal(out["amplitude"][:, 0], 2 * amplitudes)
    seen.clear()
    infer_groups(Doubler(), amplitudes, groups, "diffraction", 2, fixed=False)
    assert seen == [2, 2, 1]
def test_object_errors_remove_only_a_global_factor() -> None:
    rng = np.random.default_rng(0)
    ref = (rng.uniform(0.5, 1.0, (20, 20)) * np.exp(1j * rng.uniform(-3, 3, (20, 20))))
    ref = ref.astype(np.complex64)
    mask = np.zeros((20, 20), bool)
    mask[2:18, 2:18] = True
    shifted = (ref * np.exp(1j * 0.3)).astype(np.complex64)
    metrics, maps = object_errors(shifted, ref, mask)
    assert metrics["complex_rel_max_unaligned"] > 0.1  # raw maps show the offset...
    assert metrics["complex_rel_max"] < 1e-6  # ...the gated number removes it
    assert np.isnan(maps["phase"][0, 0]) and np.nanmax(maps["phase"]) == pytest.approx(0.3)

    broken = ref.copy()
    broken[5, 5] = np.nan
    metrics, _ = object_errors(broken, ref, mask)
    assert metrics["nonfinite_pixels"] == 1
    assert metrics["complex_rel_max"] == float("inf")


def test_error_map_is_scaled_by_its_own_max() -> None:
    error = np.array([[0.0, 1e-7], [2e-7, np.nan]])
    mask = np.array([[True, True], [True, False]])
    rgb, top = error_rgb(error, mask)
    assert top == 2e-7
    assert tuple(rgb[0, 0]) == (255, 255, 255)  # zero error: white
    assert tuple(rgb[1, 0]) == (103, 0, 13)  # the max: darkest red
    assert tuple(rgb[1, 1]) == UNVISITED_RGB
    zero, top = error_rgb(np.zeros((2, 2)), np.ones((2, 2), bool))
    assert top == 0.0 and (zero == 255).all()


def test_each_runner_is_checked_against_the_measurements(cli: CliRunner, trained_bundle: Path,
                                                        tmp_path: Path) -> None:
    """With the physics graph, every runner's patches get the data-consistency figures:
    the same numbers for the eager model and the ONNX artifact (they agree to float32),
    and the same as the training scan's reference, since this is the training scan."""
    art = tmp_path / "art"
    export_bundle(trained_bundle, art, ExportOptions(formats=["onnx"], with_physics=True))
    result = cli.invoke(app, [str(trained_bundle), str(art),
                              str(trained_bundle.parent / "scan.npz"), "-o", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output + result.stderr
    assert "data consistency" in result.output and "median R" in result.output
    runners = {r["runner"]: r for r in _strict_json(tmp_path / "r" / "parity.json")["runners"]}
    eager = runners["eager fp32 cpu"]["consistency"]
    onnx = runners["onnxruntime cpu"]["consistency"]
    assert eager["patterns"] == onnx["patterns"] == 64
    assert 0.01 < eager["r_factor"]["median"] < 1.0
    assert onnx["r_factor"]["median"] == pytest.approx(eager["r_factor"]["median"], rel=1e-4)
    assert onnx["deviance_per_pixel"]["median"] == pytest.approx(
        eager["deviance_per_pixel"]["median"], rel=1e-3)
    assert onnx["reference"]["out_of_distribution"] is False


def test_without_physics_the_table_says_why(passed: tuple[object, Path]) -> None:
    result, report_dir = passed
    assert "data consistency: not computed (the artifact has no physics graph" in \
        " ".join(result.output.split())
    runners = _strict_json(report_dir / "parity.json")["runners"]
    ran = [r for r in runners if r["status"] == "ran"]
    assert ran and all(r["consistency"]["status"] == "not computed" for r in ran)
