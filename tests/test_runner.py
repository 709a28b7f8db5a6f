"""The one runner protocol (runtime/runner.py): feeds checked against each runner's inputs,
the onnxruntime runner, fixed-batch chunking, and the registry through which the torch-free
runtime finds the torch runners without naming the torch side."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from runtime.runner import OrtRunner, RunnerError, TensorMeta, known_kinds, runner_factory

ROOT = Path(__file__).resolve().parents[1]


def test_tensor_meta_names_what_does_not_fit() -> None:
    meta = TensorMeta("diffraction", (None, 1, 8, 8))
    assert meta.problem(np.zeros((5, 1, 8, 8), np.float32)) == ""
    assert "float64" in meta.problem(np.zeros((5, 1, 8, 8)))
    assert "(?, 1, 8, 8)" in meta.problem(np.zeros((5, 2, 8, 8), np.float32))
    assert TensorMeta("x", None).problem(np.zeros((3,), np.float32)) == ""
    # widening is exact, narrowing is refused
    assert TensorMeta("x", None, "float64").problem(np.zeros((3,), np.float32)) == ""
    assert "int64" in TensorMeta("x", None).problem(np.zeros((3,), np.int64))


@pytest.fixture(scope="module")
def exported(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from ptycho_export.export.pipeline import ExportOptions, export_bundle

    folder = tmp_path_factory.mktemp("runner") / "art"
    export_bundle(tiny_bundle, folder, ExportOptions(formats=["onnx"]))
    return folder


def test_onnxruntime_runner_checks_its_feed(exported: Path) -> None:
    runner = OrtRunner("onnxruntime cpu", exported / "model.onnx")
    assert not runner.active
    (meta,) = runner.input_metadata()
    assert runner.active and meta.name == "diffraction" and meta.shape[0] is None
    x = np.random.default_rng(0).uniform(0, 2, (3, *meta.shape[1:])).astype(np.float32)
    out = runner.infer({"diffraction": x})
    assert set(out) == {"amplitude", "phase"} and out["amplitude"].shape == x.shape
    with pytest.raises(RunnerError, match="float64, expected float32"):
        runner.infer({"diffraction": x.astype(np.float64)})
    with pytest.raises(RunnerError, match="lacks \\['diffraction'\\]"):
        runner.infer({"x": x})
    runner.deactivate()
    assert not runner.active and runner.session is None
    with OrtRunner("again", session=_session(exported)) as again:
        np.testing.assert_array_equal(again.infer({"diffraction": x})["phase"], out["phase"])


def _session(exported: Path):  # noqa: ANN202
    from runtime.session import create_session

    return create_session(exported / "model.onnx", "cpu")[0]


def test_torch_runner_refuses_a_float64_feed(tiny_bundle: Path) -> None:
    pytest.importorskip("torch")
    from ptycho_export.bundle import build_net, read_bundle
    from ptycho_export.export.wrapper import INPUT_NAME, OUTPUT_NAMES, InferenceWrapper
    from ptycho_export.parity import eager_runner

    runner = eager_runner(InferenceWrapper(build_net(read_bundle(tiny_bundle))), (INPUT_NAME,),
                          OUTPUT_NAMES)
    x = np.zeros((2, 1, 32, 32))
    with pytest.raises(RunnerError, match="float64, expected float32"):
        runner.infer({INPUT_NAME: x})
    assert runner.infer({INPUT_NAME: x.astype(np.float32)})["amplitude"].shape == x.shape


def test_the_registry_finds_the_torch_runners_by_kind() -> None:
    pytest.importorskip("torch")
    assert {"onnxruntime", "eager", "torchscript", "pt2", "torchscript_session"} <= set(
        known_kinds())
    assert runner_factory("onnxruntime") is OrtRunner
    assert runner_factory("torchscript").__module__ == "ptycho_export.parity"
    with pytest.raises(LookupError, match="no runner of kind 'tensorrt-llm'.*known: "):
        runner_factory("tensorrt-llm")


def test_the_runtime_names_nothing_in_the_torch_side() -> None:
    imports = re.compile(r"^\s*(from|import)\s+ptycho_export\b", re.MULTILINE)
    named = [path.name for path in sorted((ROOT / "runtime").glob("*.py"))
             if imports.search(path.read_text(encoding="utf-8"))]
    assert named == []
