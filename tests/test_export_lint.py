"""The lint refuses each classic freezing bug with a message that names it and its place."""

from __future__ import annotations

import inspect

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from ptycho_export.export.lint import (  # noqa: E402
    ExportLintError,
    LintResult,
    baked_devices,
    lint_module,
)


def _example() -> torch.Tensor:
    return torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def _lint(module: nn.Module) -> LintResult:
    return lint_module(module, (_example(),), dynamic_batch=True)


def _refusal(module: nn.Module) -> str:
    with pytest.raises(ExportLintError) as caught:
        _lint(module)
    return str(caught.value)


def _marked_line(cls: type) -> int:
    """Line number of the statement tagged `# <- here` in cls.forward."""
    lines, start = inspect.getsourcelines(cls.forward)
    return start + next(i for i, line in enumerate(lines) if "# <- here" in line)


# ---------------------------------------------------------------- the bugs
class Float64Buffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", torch.ones(1, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset.float()


class ArangeOnNamedDevice(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.arange(x.shape[-1], device="cpu")  # <- here


class OnesOnNamedDevice(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.ones(x.shape[-2:], device=torch.device("cpu"))  # <- here


class FactoryWithoutDevice(nn.Module):
    """No device named, yet the trace records the default one (cpu) as a constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.ones(x.shape[-1])  # <- here


class OnesOnInputDevice(nn.Module):
    """Upstream's pattern: a tensor made on the input's device."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.ones(x.shape[-2:], device=x.device)  # <- here


class DataDependentBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.max() > 0.5:
            return x * 2
        return x


class WithDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x)


class WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


class ShapeAsPythonFloat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / float(x.shape[-1])  # <- here


class TensorAsPythonNumber(nn.Module):
    """A value read off the input (the batch's max, capped): the same for each sample alone
    and in the batch at the example's level, so only the rescaled proof exposes it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.amax().clamp(max=0.5).item()  # <- here


class FunctionalDropout(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(x, 0.5, training=True)


class RandomNoise(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


class FunctionalBatchNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.batch_norm(x, None, None, training=True)


class Float64Attribute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = torch.full((16,), 0.5, dtype=torch.float64)  # neither parameter nor buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.c.float()  # <- here


class Float64Intermediate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() * 2).float()  # <- here


class ShapeComparison(nn.Module):
    """Upstream's pattern: a sanity check on fixed sizes before combining two branches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.sigmoid(x), torch.tanh(x)
        if a.shape[-2:] != b.shape[-2:]:  # <- here
            raise ValueError("branches differ")
        return a * b


class LoopOverBatch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[i] * 2 for i in range(x.shape[0])])


class Clean(nn.Module):
    """The shape of the real wrapper: conv, two real outputs, tensors made from x."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x * self.scale) + torch.zeros_like(x) + x.new_zeros(x.shape[-1])
        return torch.sigmoid(y[:, :1]), torch.pi * torch.tanh(y[:, 1:])


# ---------------------------------------------------------------- tests
def test_float64_buffer_is_named() -> None:
    message = _refusal(Float64Buffer().eval())
    assert "buffer 'offset'" in message
    assert "float64" in message and "float32" in message


def test_float64_parameter_is_named() -> None:
    module = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1)).eval()
    module[0].bias.data = module[0].bias.data.double()
    message = _refusal(module)
    assert "parameter '0.bias'" in message and "float32" in message


@pytest.mark.parametrize("cls", [ArangeOnNamedDevice, OnesOnNamedDevice, FactoryWithoutDevice,
                                 OnesOnInputDevice])
def test_device_baked_by_the_trace_follows_the_input(cls: type, tmp_path) -> None:
    # torch.export keeps devices symbolic; the trace records a prim::Constant device,
    # which the lint rewrites to the device of the graph's input, naming the source line.
    module = cls().eval()
    assert baked_devices(torch.jit.trace(module, (_example(),), check_trace=False))
    result = _lint(module)
    assert "torchscript" not in result.refused
    assert baked_devices(result.traced) == []
    assert len(result.device_rewrites) == 1
    assert f"{__file__}({_marked_line(cls)})" in result.device_rewrites[0]
    assert "follows the input" in result.device_rewrites[0]
    path = tmp_path / "m.ts"
    torch.jit.save(result.traced, str(path))
    batch = torch.rand(3, 1, 16, 16)
    on_cpu = torch.jit.load(str(path), map_location="cpu")
    torch.testing.assert_close(on_cpu(batch), module(batch), rtol=0, atol=0)
    # The saved file makes its tensors where the input is: on the meta device here (on
    # CUDA in the GPU check), which would fail with a baked cpu constant.
    on_meta = torch.jit.load(str(path), map_location="meta")
    assert on_meta(batch.to("meta")).device.type == "meta"


def test_device_rewrite_reaches_submodules() -> None:
    module = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), OnesOnInputDevice()).eval()
    result = _lint(module)
    assert baked_devices(result.traced) == []
    assert "of 1" in result.device_rewrites[0]  # the submodule's own graph, named


def test_data_dependent_branch() -> None:
    message = _refusal(DataDependentBranch().eval())
    assert message.startswith("every requested format was refused: onnx, pt2: "
                              "torch.export refused the model")
    assert "data-dependent" in message
    assert "branches on tensor values" in message and "torch.where" in message
    # the trace's warning for the same branch cannot be proven harmless
    assert "torchscript: tracing is unsafe at " in message
    assert "cannot prove it harmless" in message


@pytest.mark.parametrize("module", [WithDropout(), FunctionalDropout().eval(),
                                    RandomNoise().eval()], ids=["module", "functional", "rand"])
def test_randomness_is_refused_by_behaviour(module: nn.Module) -> None:
    # F.dropout(training=True) and rand_like used to pass: the trace ran without a check
    message = _refusal(module)
    assert message.startswith("forward is not deterministic: two runs on the same input "
                              "differ by ")
    assert __file__ in message  # the op is named with the user's line
    assert "dropout" in message or "rand_like" in message


@pytest.mark.parametrize("module", [WithBatchNorm(), FunctionalBatchNorm().eval()],
                         ids=["module", "functional"])
def test_batch_statistics_are_refused_by_behaviour(module: nn.Module) -> None:
    message = _refusal(module)
    assert message.startswith("forward's output for one sample depends on the rest of the "
                              "batch")
    assert "batch_norm at " in message and __file__ in message


def test_one_submodule_left_in_train_mode_is_caught() -> None:
    module = WithBatchNorm().eval()
    module.bn.train()
    assert "depends on the rest of the batch" in _refusal(module)
    module.bn.eval()
    assert _lint(module).refused == {}


@pytest.mark.parametrize("cls", [Float64Attribute, Float64Intermediate])
def test_float64_in_what_the_graph_computes_is_refused(cls: type) -> None:
    # a plain attribute is neither parameter nor buffer: it used to pass unnoticed
    message = _refusal(cls().eval())
    assert message.startswith("forward computes in float64: ")
    assert f"{__file__}:{_marked_line(cls)}" in message or \
        f"{__file__}({_marked_line(cls)})" in message
    torchscript_only = str(pytest.raises(ExportLintError, lint_module, cls().eval(),
                                         (_example(),), formats=("torchscript",)).value)
    assert torchscript_only.startswith("forward computes in float64: ")


@pytest.mark.parametrize("cls", [ShapeAsPythonFloat, ShapeComparison])
def test_shape_only_trace_warning_is_proven_and_recorded(cls: type) -> None:
    result = _lint(cls().eval())
    assert result.refused == {}
    (warning,) = result.trace_warnings
    assert warning.where == f"{__file__}:{_marked_line(cls)}"
    assert warning.accepted.startswith("proven harmless: torch.export accepts the module")
    assert result.record()["trace_warnings_accepted"][0]["where"] == warning.where


def test_value_read_off_a_tensor_refuses_torchscript_alone() -> None:
    # torch.export keeps x.sum().item() symbolic (ONNX and .pt2 are right); the trace
    # freezes the example's sum, which the proof on rescaled inputs exposes.
    result = _lint(TensorAsPythonNumber().eval())
    assert set(result.refused) == {"torchscript"}
    assert result.exported is not None and result.traced is None
    message = result.refused["torchscript"]
    assert message.startswith(f"tracing is unsafe at {__file__}:"
                              f"{_marked_line(TensorAsPythonNumber)}")
    assert "differs from eager" in message and "--allow-trace-warning" in message
    with pytest.raises(ExportLintError, match="tracing is unsafe"):
        lint_module(TensorAsPythonNumber().eval(), (_example(),), formats=("torchscript",))


def test_loop_over_the_batch_is_refused_for_every_format() -> None:
    # No TracerWarning at all: the trace unrolls the loop for the example's batch of 2.
    message = _refusal(LoopOverBatch().eval())
    assert "onnx, pt2: torch.export refused the model" in message
    assert "forward fixes the batch size" in message and "--batch N" in message
    assert ("torchscript: the trace does not reproduce eager: the trace fails at batch 1, "
            "the example's values x0.001") in message


def test_loop_over_a_fixed_batch_is_exported() -> None:
    result = lint_module(LoopOverBatch().eval(), (_example(),), dynamic_batch=False)
    assert result.refused == {}


def test_allow_trace_warning_is_explicit_and_recorded() -> None:
    where = f"tests/test_export_lint.py:{_marked_line(TensorAsPythonNumber)}"
    result = lint_module(TensorAsPythonNumber().eval(), (_example(),),
                         allow_trace_warnings=[where])
    assert result.refused == {}
    assert result.trace_warnings[0].accepted == f"allowed by --allow-trace-warning {where}"
    other = lint_module(TensorAsPythonNumber().eval(), (_example(),),
                        allow_trace_warnings=["other.py:" + where.split(":")[1]])
    assert "torchscript" in other.refused


def test_onnx_alone_never_traces() -> None:
    result = lint_module(TensorAsPythonNumber().eval(), (_example(),), formats=("onnx",))
    assert result.refused == {} and result.traced is None and result.trace_warnings == []


def test_clean_module_passes_and_returns_both_programs() -> None:
    module = Clean().eval()
    result = _lint(module)
    assert isinstance(result.exported, torch.export.ExportedProgram)
    assert isinstance(result.traced, torch.jit.ScriptModule)
    batch = torch.rand(5, 1, 16, 16)  # a batch size other than the example's
    with torch.inference_mode():
        expected = module(batch)
        for got in (result.exported.module()(batch), result.traced(batch)):
            for e, g in zip(expected, got, strict=True):
                torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.gpu
def test_device_rewritten_trace_runs_on_cuda(tmp_path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    module = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), OnesOnInputDevice()).eval()
    raw = torch.jit.trace(module, (_example(),), check_trace=False)
    torch.jit.save(raw, str(tmp_path / "raw.ts"))
    result = _lint(module)
    torch.jit.save(result.traced, str(tmp_path / "fixed.ts"))
    batch = torch.rand(3, 1, 16, 16)
    with torch.inference_mode():
        want = module(batch)
        with pytest.raises(RuntimeError):  # the baked cpu constant meets a cuda tensor
            torch.jit.load(str(tmp_path / "raw.ts"), map_location="cuda")(batch.cuda())
        got = torch.jit.load(str(tmp_path / "fixed.ts"), map_location="cuda")(batch.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
