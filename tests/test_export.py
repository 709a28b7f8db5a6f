"""Export pipeline: manifest, parity gate, metadata, batch axis, atomic output, usage errors.

The tiny bundle is exported once per module (onnx + torchscript + pt2 + physics) and the
tests read that folder back from disk; the failure-path tests run their own short exports.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

import ptycho_export.export.pipeline as pipeline  # noqa: E402
from ptycho_export.bundle import load_predictor  # noqa: E402
from ptycho_export.export import ExportOptions, export_bundle  # noqa: E402
from ptycho_export.export.formats import UsageError, parse_formats  # noqa: E402
from runtime.atomic import OutputNotOurs  # noqa: E402
from runtime.errors import EXIT_PARITY, EXIT_USAGE, ArtifactError, ParityError  # noqa: E402

N = 32
AMP_TOL = 1e-5  # amplitude: max |error| / max |reference|
PHASE_TOL = 1e-4  # phase: amplitude-weighted wrapped error, radians
CASES = {"golden", "random_counts", "zeros", "saturated"}
ALL_FORMATS = ["onnx", "torchscript", "pt2"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run_onnx(session: ort.InferenceSession, batch: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(session.run(["amplitude", "phase"], {"diffraction": batch}))


def _inputs(batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 4.0, (batch, 1, N, N)).astype(np.float32)


def _assert_close(expected: tuple[np.ndarray, ...], got: tuple[np.ndarray, ...]) -> None:
    """Same criteria as the gate, computed here independently."""
    (amp_ref, phase_ref), (amp, phase) = expected, got
    assert amp.shape == amp_ref.shape and phase.shape == phase_ref.shape
    assert amp.dtype == np.float32 and phase.dtype == np.float32
    amp_err = np.max(np.abs(amp.astype(np.float64) - amp_ref)) / np.max(np.abs(amp_ref))
    assert amp_err <= AMP_TOL
    wrapped = np.angle(np.exp(1j * (phase.astype(np.float64) - phase_ref)))
    weight = np.abs(amp_ref) / np.max(np.abs(amp_ref))
    assert np.max(np.abs(wrapped) * weight) <= PHASE_TOL


@pytest.fixture(scope="module")
def exported(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    outdir = tmp_path_factory.mktemp("export") / "artifacts"
    export_bundle(tiny_bundle, outdir,
                  ExportOptions(formats=list(ALL_FORMATS), with_physics=True,
                                command="pytest"))
    return outdir


@pytest.fixture(scope="module")
def manifest(exported: Path) -> dict:
    return json.loads((exported / "manifest.json").read_text())


@pytest.fixture(scope="module")
def predictor(tiny_bundle: Path):  # noqa: ANN201
    return load_predictor(tiny_bundle, "cpu")


def _eager(predictor, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    amplitude, phase = predictor(batch)
    return amplitude.numpy(), phase.numpy()


# ---------------------------------------------------------------- manifest
def test_manifest_lists_every_file_with_its_hash(exported: Path, manifest: dict) -> None:
    files = manifest["files"]
    on_disk = {p.name for p in exported.iterdir()}
    assert on_disk == set(files) | {"manifest.json"}
    assert {"model.onnx", "model.ts", "model.pt2", "physics.onnx", "golden.npz",
            "parity.md"} <= set(files)
    for name, entry in files.items():
        path = exported / name
        assert entry["size"] == path.stat().st_size, name
        assert entry["sha256"] == _sha256(path), name


def test_manifest_records_source_versions_and_tolerances(tiny_bundle: Path,
                                                          manifest: dict) -> None:
    assert manifest["format"] == "ptycho-export-artifacts"
    assert manifest["source_bundle"] == {"file": tiny_bundle.name,
                                         "sha256": _sha256(tiny_bundle)}
    assert manifest["command"] == "pytest"
    for package in ("ptycho-export", "torch", "onnx", "onnxruntime", "numpy"):
        assert manifest["versions"].get(package), package
    assert manifest["tolerances"]["amplitude_rel_max"] == AMP_TOL
    assert manifest["tolerances"]["phase_weighted_max_rad"] == PHASE_TOL
    assert manifest["parity"]["status"] == "PASS"
    assert manifest["precision"] == "fp32"


def test_manifest_opset_ir_version_and_io_match_the_onnx_file(exported: Path,
                                                               manifest: dict) -> None:
    for key, filename in (("onnx", "model.onnx"), ("physics", "physics.onnx")):
        model = onnx.load(str(exported / filename))
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        facts = manifest["artifacts"][key]
        assert facts["file"] == filename
        assert opset == facts["opset"] == 20
        assert facts["ir_version"] == model.ir_version
    shape = ["batch", 1, N, N]
    assert [(i["name"], i["shape"], i["dtype"]) for i in manifest["inputs"]] == [
        ("diffraction", shape, "float32")]
    assert [(o["name"], o["shape"], o["dtype"]) for o in manifest["outputs"]] == [
        ("amplitude", shape, "float32"), ("phase", shape, "float32")]
    session = _session(exported / "model.onnx")
    assert [(i.name, i.shape, i.type) for i in session.get_inputs()] == [
        ("diffraction", shape, "tensor(float)")]
    assert [(o.name, o.shape, o.type) for o in session.get_outputs()] == [
        ("amplitude", shape, "tensor(float)"), ("phase", shape, "tensor(float)")]


# ---------------------------------------------------------------- parity numbers
def test_parity_rows_are_within_tolerance_and_cover_every_case(manifest: dict) -> None:
    rows = manifest["parity"]["rows"]
    gated = [r for r in rows if r["gated"]]
    model_rows = [r for r in gated if "amplitude" in r["outputs"]]
    candidates = {r["candidate"] for r in model_rows}
    assert candidates == {"onnxruntime cpu", "torchscript cpu", "pt2 cpu"}
    for candidate in candidates:
        assert {r["case"] for r in model_rows if r["candidate"] == candidate} == CASES
    for row in gated:
        assert row["failures"] == []
        outputs = row["outputs"]
        if "amplitude" in outputs:
            assert outputs["amplitude"]["rel_max"] <= AMP_TOL, row
            assert outputs["phase"]["weighted_max"] <= PHASE_TOL, row
            assert all(o["nan_count"] == o["inf_count"] == 0 for o in outputs.values())
        else:  # the physics graph
            assert outputs["predicted_diffraction"]["rel_max"] <= AMP_TOL, row
    for row in model_rows:
        if row["candidate"] in ("torchscript cpu", "pt2 cpu"):
            assert row["reference"] == "eager fp32 cpu"
            for output in row["outputs"].values():
                assert output["max_abs"] == 0.0, row
    physics = [r for r in gated if "predicted_diffraction" in r["outputs"]]
    assert len(physics) == 1 and "physics" in physics[0]["candidate"]
    # fp64 rows are informational only and never gate
    assert any(not r["gated"] and "fp64" in r["reference"] for r in rows)


# ---------------------------------------------------------------- embedded metadata
def test_onnx_metadata_props(tiny_bundle: Path, exported: Path) -> None:
    meta = _session(exported / "model.onnx").get_modelmeta().custom_metadata_map
    assert meta["patch_size"] == str(N)
    assert float(meta["amplitude_scale"]) == 0.5
    assert meta["source_bundle_sha256"] == _sha256(tiny_bundle)
    assert meta["input"] == "diffraction" and meta["outputs"] == "amplitude,phase"


def test_torchscript_extra_files_and_bit_exact_reload(tiny_bundle: Path, exported: Path,
                                                      predictor) -> None:  # noqa: ANN001
    extra = {"ptycho_export.json": ""}
    module = torch.jit.load(str(exported / "model.ts"), map_location="cpu",
                            _extra_files=extra)
    meta = json.loads(extra["ptycho_export.json"])
    assert meta["patch_size"] == str(N)
    assert meta["source_bundle_sha256"] == _sha256(tiny_bundle)
    batch = _inputs(5, seed=3)
    with torch.inference_mode():
        amplitude, phase = module(torch.from_numpy(batch))
        program_amp, program_phase = torch.export.load(
            str(exported / "model.pt2")).module()(torch.from_numpy(batch))
    ref_amp, ref_phase = _eager(predictor, batch)
    np.testing.assert_array_equal(amplitude.numpy(), ref_amp)
    np.testing.assert_array_equal(phase.numpy(), ref_phase)
    np.testing.assert_array_equal(program_amp.numpy(), ref_amp)
    np.testing.assert_array_equal(program_phase.numpy(), ref_phase)


# ---------------------------------------------------------------- batch axis
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_dynamic_batch_onnx_matches_eager(exported: Path, predictor, batch: int) -> None:  # noqa: ANN001
    inputs = _inputs(batch, seed=batch)
    got = _run_onnx(_session(exported / "model.onnx"), inputs)
    assert got[0].shape == (batch, 1, N, N)
    _assert_close(_eager(predictor, inputs), got)


def test_fixed_batch_export(tiny_bundle: Path, tmp_path: Path) -> None:
    result = export_bundle(tiny_bundle, tmp_path / "fixed",
                           ExportOptions(formats=["onnx"], batch=4))
    assert result.manifest["inputs"][0]["shape"] == [4, 1, N, N]
    assert all(o["shape"] == [4, 1, N, N] for o in result.manifest["outputs"])
    session = _session(tmp_path / "fixed" / "model.onnx")
    assert session.get_inputs()[0].shape == [4, 1, N, N]
    amplitude, _ = _run_onnx(session, _inputs(4, seed=0))
    assert amplitude.shape == (4, 1, N, N)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument,
                       match="(?i)dimension|shape"):
        _run_onnx(session, _inputs(3, seed=0))


def test_dft_physics_keeps_the_dynamic_batch(tiny_bundle: Path, tmp_path: Path) -> None:
    outdir = tmp_path / "dft"
    result = export_bundle(tiny_bundle, outdir,
                           ExportOptions(formats=["onnx"], with_physics=True, fft_impl="dft"))
    facts = result.manifest["artifacts"]["physics"]
    assert facts["fft_impl"] == "dft" and "DFT" in facts["op_types"]
    session = _session(outdir / "physics.onnx")
    assert [i.shape for i in session.get_inputs()] == [["batch", 1, N, N]] * 2 + \
        [["batch", N, N]] * 2
    rng = np.random.default_rng(0)
    feeds = {name: rng.uniform(0.1, 1.0, (3, 1, N, N)).astype(np.float32)
             for name in ("amplitude", "phase")}
    feeds |= {name: rng.normal(size=(3, N, N)).astype(np.float32)
              for name in ("probe_re", "probe_im")}
    (predicted,) = session.run(None, feeds)
    assert predicted.shape == (3, 1, N, N) and np.isfinite(predicted).all()
    matmul = export_bundle(tiny_bundle, tmp_path / "matmul",
                           ExportOptions(formats=["onnx"], with_physics=True))
    assert "DFT" not in matmul.manifest["artifacts"]["physics"]["op_types"]
    (same,) = _session(tmp_path / "matmul" / "physics.onnx").run(None, feeds)
    np.testing.assert_allclose(same, predicted, rtol=0, atol=1e-4 * np.abs(predicted).max())


# ---------------------------------------------------------------- golden + single file
def test_golden_reproduces_through_onnxruntime(tiny_bundle: Path, exported: Path,
                                               predictor) -> None:  # noqa: ANN001
    with np.load(exported / "golden.npz", allow_pickle=False) as golden:
        inputs = golden["diffraction"]
        expected = (golden["amplitude"], golden["phase"])
    assert inputs.dtype == np.float32 and inputs.shape[1:] == (1, N, N)
    _assert_close(expected, _run_onnx(_session(exported / "model.onnx"), inputs))
    # golden.npz is the eager model's own answer on the bundle's golden patterns
    np.testing.assert_array_equal(expected[0], _eager(predictor, inputs)[0])


def test_onnx_is_a_single_file(exported: Path) -> None:
    assert not list(exported.rglob("*.onnx.data"))
    assert not list(exported.rglob("*.data"))
    for name in ("model.onnx", "physics.onnx"):
        model = onnx.load(str(exported / name), load_external_data=False)
        assert all(t.data_location != onnx.TensorProto.EXTERNAL
                   for t in model.graph.initializer)


# ---------------------------------------------------------------- atomic output
def _leftovers(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.*"))


def test_existing_export_is_replaced_wholly(tiny_bundle: Path, tmp_path: Path) -> None:
    outdir = tmp_path / "out"
    export_bundle(tiny_bundle, outdir, ExportOptions(formats=["onnx", "torchscript"]))
    (outdir / "stale.txt").write_text("left in an export folder")
    export_bundle(tiny_bundle, outdir, ExportOptions(formats=["onnx"]))
    assert not (outdir / "stale.txt").exists() and not (outdir / "model.ts").exists()
    assert (outdir / "manifest.json").is_file() and (outdir / "model.onnx").is_file()
    assert _leftovers(tmp_path, "out") == []


def test_a_folder_we_did_not_write_is_refused_before_any_work(
        tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outdir = tmp_path / "mine"
    outdir.mkdir()
    (outdir / "notes.txt").write_text("my notes")
    monkeypatch.setattr(pipeline, "lint_module", lambda *a, **k: pytest.fail("work began"))
    with pytest.raises(OutputNotOurs) as caught:
        export_bundle(tiny_bundle, outdir, ExportOptions(formats=["onnx"]))
    assert caught.value.exit_code == EXIT_USAGE
    assert str(caught.value).startswith(f"{outdir}: exists and was not written by "
                                        "ptycho-export (it holds notes.txt)")
    assert "--force" in str(caught.value)
    assert (outdir / "notes.txt").read_text() == "my notes"
    # a file, too
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputNotOurs, match="exists and is not a folder"):
        export_bundle(tiny_bundle, tmp_path / "afile", ExportOptions(formats=["onnx"]))
    monkeypatch.undo()
    # an empty folder is fine, and --force replaces anyone's
    (tmp_path / "empty").mkdir()
    export_bundle(tiny_bundle, tmp_path / "empty", ExportOptions(formats=["onnx"]))
    export_bundle(tiny_bundle, outdir, ExportOptions(formats=["onnx"], force=True))
    assert not (outdir / "notes.txt").exists() and (outdir / "model.onnx").is_file()


def test_failed_export_leaves_old_outdir_intact(tiny_bundle: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    outdir = tmp_path / "out"
    export_bundle(tiny_bundle, outdir, ExportOptions(formats=["onnx"]))
    before = {p.name: p.read_bytes() for p in outdir.iterdir()}

    def broken_audit(*args: object, **kwargs: object) -> dict:
        raise ArtifactError("planted audit failure")

    monkeypatch.setattr(pipeline, "audit_onnx", broken_audit)
    with pytest.raises(ArtifactError, match="planted audit failure"):
        export_bundle(tiny_bundle, outdir, ExportOptions(formats=["onnx"]))
    assert {p.name: p.read_bytes() for p in outdir.iterdir()} == before
    assert _leftovers(tmp_path, "out") == []


# ---------------------------------------------------------------- parity gate
def test_parity_gate_refuses_a_perturbed_onnx(tiny_bundle: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = pipeline.save_onnx
    perturbed: list[str] = []

    def save_then_perturb(program, example, path, *args, **kwargs) -> None:  # noqa: ANN001
        real_save(program, example, path, *args, **kwargs)
        model = onnx.load(str(path))
        # The last Conv (a decoder head): the untrained tiny net's output is nearly flat and
        # barely depends on its encoder, so 1% on an early Conv moves it by ~3e-7 only.
        head = [node.input[1] for node in model.graph.node if node.op_type == "Conv"][-1]
        for tensor in model.graph.initializer:
            if tensor.name == head:
                weight = numpy_helper.to_array(tensor) * np.float32(1.01)
                tensor.CopyFrom(numpy_helper.from_array(weight.astype(np.float32),
                                                        tensor.name))
                perturbed.append(tensor.name)
                break
        onnx.save(model, str(path))

    outdir = tmp_path / "out"
    export_bundle(tiny_bundle, outdir, ExportOptions(formats=["onnx", "torchscript"]))
    before = {p.name: p.read_bytes() for p in outdir.iterdir()}
    monkeypatch.setattr(pipeline, "save_onnx", save_then_perturb)
    with pytest.raises(ParityError) as caught:
        export_bundle(tiny_bundle, outdir, ExportOptions(formats=["onnx"]))
    assert len(perturbed) == 1
    message = str(caught.value)
    assert "onnxruntime" in message
    assert "amplitude" in message or "phase" in message
    assert caught.value.exit_code == EXIT_PARITY == 5
    failed = tmp_path / "out.failed"
    assert f"the previous export in {outdir} is intact" in message
    assert f"report in {failed / 'parity_failure.md'}" in message
    # the last working deployment survives whole; the report sits beside it
    assert {p.name: p.read_bytes() for p in outdir.iterdir()} == before
    assert sorted(p.name for p in failed.iterdir()) == ["parity_failure.json",
                                                        "parity_failure.md"]
    report = json.loads((failed / "parity_failure.json").read_text())
    assert report["status"] == "FAIL" and report["failures"]
    assert all("onnxruntime" in f for f in report["failures"])
    assert "FAILED" in (failed / "parity_failure.md").read_text()
    assert _leftovers(tmp_path, "out") == []
    # a later good export supersedes the stale failure report
    monkeypatch.undo()
    export_bundle(tiny_bundle, outdir, ExportOptions(formats=["onnx"]))
    assert not failed.exists()
    # with no previous output, nothing is written to it
    monkeypatch.setattr(pipeline, "save_onnx", save_then_perturb)
    with pytest.raises(ParityError, match=f"nothing was written to {tmp_path / 'new'}"):
        export_bundle(tiny_bundle, tmp_path / "new", ExportOptions(formats=["onnx"]))
    assert not (tmp_path / "new").exists() and (tmp_path / "new.failed").is_dir()


# ---------------------------------------------------------------- usage errors
def test_unknown_format_suggests_the_closest_name() -> None:
    with pytest.raises(UsageError, match="did you mean 'onnx'") as caught:
        parse_formats("onxx")
    assert caught.value.exit_code == EXIT_USAGE
    assert parse_formats("all") == ALL_FORMATS
    assert parse_formats("onnx, pt2,onnx") == ["onnx", "pt2"]


@pytest.mark.parametrize(("options", "pattern"), [
    (ExportOptions(precision="int8"), "precision 'int8'"),
    (ExportOptions(opset=17), "opset 17"),
    (ExportOptions(formats=["onxx"]), "unknown format"),
    (ExportOptions(batch=0), "batch"),
])
def test_bad_options_are_usage_errors(tiny_bundle: Path, tmp_path: Path,
                                      options: ExportOptions, pattern: str) -> None:
    with pytest.raises(UsageError, match=pattern) as caught:
        export_bundle(tiny_bundle, tmp_path / "out", options)
    assert caught.value.exit_code == EXIT_USAGE
    assert list(tmp_path.iterdir()) == []


def test_manifest_carries_the_training_probe_and_geometry(exported: Path, manifest: dict,
                                                         tiny_bundle: Path) -> None:
    from ptycho_export.bundle import read_bundle

    bundle = read_bundle(tiny_bundle)
    probe = np.load(exported / "probe.npy", allow_pickle=False)
    np.testing.assert_array_equal(probe, bundle.probe)
    assert manifest["probe"]["file"] == "probe.npy" and "probe.npy" in manifest["files"]
    assert manifest["geometry"]["patch_size"] == bundle.config.patch_size
    assert "N/2" in manifest["geometry"]["origin_convention"]
    assert manifest["geometry"]["object_pixel_size_m"] == bundle.data.get("pixel_size_m")
    assert manifest["normalization"]["amplitude_scale"] == bundle.normalization.amplitude_scale
