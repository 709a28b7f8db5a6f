"""Reduced-precision exports: float32 I/O, narrower weights, their own recorded tolerances."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ptycho_export.bundle import load_predictor
from ptycho_export.export.formats import UsageError
from ptycho_export.export.pipeline import ExportOptions, export_bundle
from runtime.compare import DEFAULT_TOLERANCES


@pytest.fixture(scope="module")
def fp16_export(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "out"
    return export_bundle(tiny_bundle, out, ExportOptions(formats=["onnx", "torchscript"],
                                                         precision="fp16"))


def test_fp16_onnx_keeps_float32_io_and_stores_half_weights(fp16_export):
    model = onnx.load(str(fp16_export.outdir / "model.onnx"))
    assert {i.type.tensor_type.elem_type for i in model.graph.input} == {onnx.TensorProto.FLOAT}
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {onnx.TensorProto.FLOAT}
    assert onnx.TensorProto.FLOAT16 in {t.data_type for t in model.graph.initializer}


def test_fp16_parity_is_recorded_with_its_own_tolerance(fp16_export, tiny_bundle):
    manifest = fp16_export.manifest
    assert manifest["precision"] == "fp16"
    assert manifest["tolerances"] == DEFAULT_TOLERANCES["fp16"]
    gated = [r for r in fp16_export.rows if r.gated]
    worst = max(r.stats["amplitude"].rel_max for r in gated)
    # Really reduced (not silently fp32) and still within the fp16 budget.
    assert 1e-6 < worst <= DEFAULT_TOLERANCES["fp16"]["amplitude_rel_max"]
    session = ort.InferenceSession(str(fp16_export.outdir / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(0, 3, (3, 1, 32, 32)).astype(np.float32)
    amplitude, _ = session.run(None, {"diffraction": x})
    reference, _ = load_predictor(tiny_bundle).predict(x)
    assert np.abs(amplitude - reference).max() / np.abs(reference).max() < 5e-3


def test_bf16_is_refused_for_onnx_but_exports_torchscript(tiny_bundle, tmp_path):
    with pytest.raises(UsageError, match="bfloat16"):
        export_bundle(tiny_bundle, tmp_path / "x", ExportOptions(formats=["onnx"],
                                                                 precision="bf16"))
    assert not (tmp_path / "x").exists()
    result = export_bundle(tiny_bundle, tmp_path / "bf16",
                           ExportOptions(formats=["torchscript"], precision="bf16"))
    assert result.manifest["tolerances"] == DEFAULT_TOLERANCES["bf16"]
    assert result.manifest["parity"]["status"] == "PASS"
