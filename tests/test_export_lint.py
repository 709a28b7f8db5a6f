"""The lint refuses each classic freezing bug with a message that names it and its place."""

from __future__ import annotations

import inspect

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from ptycho_export.export.lint import ExportLintError, LintResult, lint_module  # noqa: E402


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
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.sum().item()  # <- here


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


@pytest.mark.parametrize("cls", [ArangeOnNamedDevice, OnesOnNamedDevice, FactoryWithoutDevice])
def test_device_baked_into_forward(cls: type) -> None:
    # torch.export accepts these (it keeps devices symbolic); the traced graph keeps a
    # prim::Constant device, which the lint reports with the source line.
    message = _refusal(cls().eval())
    assert "a device (cpu) is baked into forward" in message
    assert f"{__file__}({_marked_line(cls)})" in message
    assert "zeros_like" in message


def test_data_dependent_branch() -> None:
    message = _refusal(DataDependentBranch().eval())
    assert message.startswith("torch.export refused the model")
    assert "data-dependent" in message
    assert "branches on tensor values" in message and "torch.where" in message


@pytest.mark.parametrize(("module", "child"), [
    (WithDropout(), "'drop' (Dropout)"),
    (WithBatchNorm(), "'bn' (BatchNorm2d)"),
])
def test_train_mode_is_refused(module: nn.Module, child: str) -> None:
    assert module.training
    message = _refusal(module)
    assert f"module {child} is in train mode" in message
    assert "eval()" in message


def test_train_mode_of_one_submodule_is_enough() -> None:
    module = WithBatchNorm().eval()
    module.bn.train()
    message = _refusal(module)
    assert "'bn' (BatchNorm2d) is in train mode" in message
    assert "WithBatchNorm" not in message


@pytest.mark.parametrize("cls", [ShapeAsPythonFloat, TensorAsPythonNumber])
def test_tracer_warning_becomes_a_refusal_with_file_and_line(cls: type) -> None:
    # torch.export accepts both (a static dim; an unbacked float); the trace warns.
    message = _refusal(cls().eval())
    assert message.startswith("tracing is unsafe at ")
    assert f"{__file__}:{_marked_line(cls)}" in message
    assert "Python" in message and "tensor ops" in message


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
