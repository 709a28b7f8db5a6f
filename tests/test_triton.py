"""`--format triton`: the repository Triton reads, checked with Triton's own config proto."""

import importlib.util
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from typer.testing import CliRunner

from cli.export import app as export_app
from runtime.run import self_check_artifact


def model_config_proto():
    """Triton's ModelConfig message, loaded from the tritonclient wheel's generated module
    (its grpc package import needs grpcio, which we do not otherwise need)."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tritonclient is not installed (dev extra)")
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.ModelConfig


def _export(tiny_bundle, repo, *extra):
    result = CliRunner().invoke(export_app, [str(tiny_bundle), "--format", "triton", "-o",
                                             str(repo), *extra])
    assert result.exit_code == 0, result.output
    return repo / "ptycho"


def _graph_io(model_path):
    graph = onnx.load(str(model_path)).graph
    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    return {v.name: dims(v) for v in [*graph.input, *graph.output]}


def test_dynamic_batch_repository_matches_the_onnx_graph(tiny_bundle, tmp_path):
    model_dir = _export(tiny_bundle, tmp_path / "repo")
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_proto()())
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size > 0
    assert list(config.dynamic_batching.preferred_batch_size) == [64, 256]
    io = _graph_io(model_dir / "1" / "model.onnx")
    for tensor in [*config.input, *config.output]:
        assert tensor.data_type == 11  # TYPE_FP32
        assert io[tensor.name][0] == "batch"
        assert list(tensor.dims) == io[tensor.name][1:]
    assert {t.name for t in config.input} == {"diffraction"}
    assert {t.name for t in config.output} == {"amplitude", "phase"}
    assert config.instance_group[0].kind == 1  # KIND_GPU


def test_fixed_batch_gets_max_batch_size_zero_and_full_dims(tiny_bundle, tmp_path):
    model_dir = _export(tiny_bundle, tmp_path / "repo", "--batch", "4",
                        "--triton-instance", "cpu")
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_proto()())
    assert config.max_batch_size == 0
    assert not config.HasField("dynamic_batching")
    io = _graph_io(model_dir / "1" / "model.onnx")
    for tensor in [*config.input, *config.output]:
        assert list(tensor.dims) == io[tensor.name] == [4, 1, 32, 32]
    assert config.instance_group[0].kind == 2  # KIND_CPU


def test_other_models_in_the_repository_are_untouched_and_version_dir_self_checks(
        tiny_bundle, tmp_path):
    repo = tmp_path / "repo"
    (repo / "other" / "1").mkdir(parents=True)
    (repo / "other" / "config.pbtxt").write_text('name: "other"\n')
    model_dir = _export(tiny_bundle, repo)
    _export(tiny_bundle, repo)  # re-export replaces only <repo>/ptycho
    assert (repo / "other" / "config.pbtxt").read_text() == 'name: "other"\n'
    assert sorted(p.name for p in repo.iterdir()) == ["other", "ptycho"]
    report = self_check_artifact(model_dir / "1", provider="cpu")
    assert report["self_check"]["status"] == "PASS"
