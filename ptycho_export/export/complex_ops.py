"""Complex-number ops that torch's dynamo ONNX exporter cannot translate, rewritten before export.

Measured with torch 2.13 / onnxscript 0.7.2 (`docs/exporting-existing-models.md`): the
exporter has no translation for three complex cases that upstream models use:

- `aten.mul` of a *real* tensor by a complex Python scalar (`1j * phase`);
- `aten.exp` of a complex tensor (`torch.exp(1j * phase)`);
- `aten.pad` / `aten.constant_pad_nd` of a complex tensor (`F.pad(object_patch, ...)`).

Everything else such models need (complex multiply, `torch.complex`, `torch.polar`,
`view_as_real`, `abs`, `angle`, fft2, complex times complex scalar) translates. The rewrite
runs on the `torch.export` program as decompositions (`ExportedProgram.run_decompositions`
with a table holding only these ops), so the same program feeds ONNX and `.pt2`; a
decomposition returns `NotImplemented` for real inputs, which keeps the original op.
Each rewrite is exact algebra in the same dtype:

    x * (a + bj)            -> complex(x * a, x * b)                      (x real)
    exp(z)                  -> complex(exp(re z) cos(im z), exp(re z) sin(im z))
    pad(z, p, mode, v)      -> complex(pad(re z, p, mode, re v), pad(im z, p, mode, im v))

TorchScript needs none of this (it runs complex ops natively) and traces the module as
written. Complex ops that remain untranslatable are refused by `explain_onnx_failure`,
which names the op and the user's source line.
"""

from __future__ import annotations

import re
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _re_im(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    parts = torch.view_as_real(z)
    return parts[..., 0], parts[..., 1]


def _real_times_complex_scalar(a: Any, b: Any) -> Any:
    tensor, scalar = (a, b) if isinstance(b, complex) else (b, a)
    if not (isinstance(tensor, torch.Tensor) and isinstance(scalar, complex)) \
            or tensor.is_complex() or tensor.dtype == torch.bool:
        return NotImplemented
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float32)  # int * 1j is complex64 in torch
    return torch.complex(tensor * scalar.real, tensor * scalar.imag)


def _complex_exp(z: torch.Tensor) -> Any:
    if not z.is_complex():
        return NotImplemented
    re_z, im_z = _re_im(z)
    magnitude = torch.exp(re_z)
    return torch.complex(magnitude * torch.cos(im_z), magnitude * torch.sin(im_z))


def _complex_pad(z: torch.Tensor, pad: list[int], mode: str = "constant",
                 value: float | complex | None = None) -> Any:
    if not z.is_complex():
        return NotImplemented
    re_z, im_z = _re_im(z)
    if mode == "constant":
        fill = complex(value or 0.0)
        return torch.complex(aten.constant_pad_nd(re_z, pad, fill.real),
                             aten.constant_pad_nd(im_z, pad, fill.imag))
    return torch.complex(aten.pad(re_z, pad, mode), aten.pad(im_z, pad, mode))


def _complex_constant_pad(z: torch.Tensor, pad: list[int], value: float | complex = 0.0
                          ) -> Any:
    return _complex_pad(z, pad, "constant", value)


@dataclass(frozen=True)
class ComplexRewrite:
    op: str  # the exporter's name, e.g. "aten.exp.default"
    what: str  # the user-level pattern
    into: str  # what it becomes
    applies: Callable[[list[Any]], bool]  # on the node's args (FakeTensors / Python values)
    decomposition: Callable[..., Any]


def _val(arg: Any) -> Any:
    return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg


def _is_complex(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_complex()


def _is_real(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and not value.is_complex()


def _mul_applies(args: list[Any]) -> bool:
    return len(args) >= 2 and any(
        _is_real(t) and isinstance(s, complex) for t, s in ((args[0], args[1]),
                                                             (args[1], args[0])))


REWRITES: tuple[ComplexRewrite, ...] = (
    ComplexRewrite("aten.mul.Tensor", "real tensor * complex Python scalar (e.g. 1j * phase)",
                   "torch.complex(x * re(c), x * im(c))", _mul_applies,
                   _real_times_complex_scalar),
    ComplexRewrite("aten.mul.Scalar", "real tensor * complex Python scalar (e.g. 1j * phase)",
                   "torch.complex(x * re(c), x * im(c))", _mul_applies,
                   _real_times_complex_scalar),
    ComplexRewrite("aten.exp.default", "torch.exp of a complex tensor",
                   "polar form: complex(exp(re) * cos(im), exp(re) * sin(im))",
                   lambda args: _is_complex(args[0]), _complex_exp),
    ComplexRewrite("aten.pad.default", "F.pad of a complex tensor",
                   "pad real and imaginary parts separately, then torch.complex",
                   lambda args: _is_complex(args[0]), _complex_pad),
    ComplexRewrite("aten.constant_pad_nd.default", "constant padding of a complex tensor",
                   "pad real and imaginary parts separately, then torch.complex",
                   lambda args: _is_complex(args[0]), _complex_constant_pad),
)


def _op(name: str) -> torch._ops.OpOverload:
    _, packet, overload = name.split(".")
    return getattr(getattr(aten, packet), overload)


def decomposition_table() -> dict[torch._ops.OpOverload, Callable[..., Any]]:
    return {_op(r.op): r.decomposition for r in REWRITES}


@dataclass
class RewriteReport:
    """Which rewrites fired and how often (per op), for the manifest's notes."""

    counts: dict[str, int] = field(default_factory=dict)

    def notes(self, where: dict[str, str] | None = None) -> list[str]:
        by_op = {r.op: r for r in REWRITES}
        lines = []
        for op, count in self.counts.items():
            rule = by_op[op]
            place = (where or {}).get(op.split(".")[1], "")
            lines.append(f"rewrote {count}x {rule.what} ({op}) -> {rule.into}"
                         + (f"; first at {place}" if place else ""))
        return lines


def rewrite_complex(program: torch.export.ExportedProgram
                    ) -> tuple[torch.export.ExportedProgram, RewriteReport]:
    """The program with the untranslatable complex ops rewritten (unchanged if none)."""
    report = RewriteReport()
    rules = {_op(r.op): r for r in REWRITES}
    for node in program.graph.nodes:
        rule = rules.get(node.target) if node.op == "call_function" else None
        if rule is not None and rule.applies([_val(a) for a in node.args]):
            report.counts[rule.op] = report.counts.get(rule.op, 0) + 1
    if not report.counts:
        return program, report
    with warnings.catch_warnings():  # torch-internal pytree FutureWarning, not ours
        warnings.filterwarnings("ignore", category=FutureWarning)
        return program.run_decompositions(decomposition_table()), report


# ---------------------------------------------------------------- locating ops in user code
_SKIP_DIRS = tuple(str(Path(p).resolve().parent) for p in (torch.__file__, __file__))
_SKIP_PACKAGES = ("lightning", "pytorch_lightning", "lightning_fabric", "lightning_utilities")
_PAD_NAMES = ("pad", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d",
              "reflection_pad3d", "replication_pad1d", "replication_pad2d",
              "replication_pad3d", "_pad_circular")


def user_frame(stack: list[traceback.FrameSummary] | None = None) -> str:
    """'file:line (`code`)' of the innermost frame outside torch, Lightning, the standard
    library's contextlib and this package (the user's model code)."""
    stack = traceback.extract_stack() if stack is None else stack
    for frame in reversed(stack):
        if frame.filename.startswith("<"):
            continue
        name = str(Path(frame.filename).resolve())
        if name.startswith(_SKIP_DIRS) or name.endswith("contextlib.py") or any(
                f"/{pkg}/" in name for pkg in _SKIP_PACKAGES):
            continue
        code = f" (`{frame.line.strip()}`)" if frame.line else ""
        return f"{frame.filename}:{frame.lineno}{code}"
    return ""


class ComplexOpRecorder(TorchDispatchMode):
    """Eager run that records, per aten op name, the first user line where it met a complex
    tensor (input or output)."""

    def __init__(self) -> None:
        super().__init__()
        self.where: dict[str, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in self.where:
            flat = [*torch.utils._pytree.tree_leaves((args, kwargs or {})),
                    *torch.utils._pytree.tree_leaves(out)]
            if any(isinstance(t, torch.Tensor) and t.is_complex() for t in flat):
                self.where[name] = user_frame()
        return out


def record_complex_ops(module: torch.nn.Module, example: tuple[torch.Tensor, ...]
                       ) -> dict[str, str]:
    recorder = ComplexOpRecorder()
    with torch.no_grad(), recorder:
        module(*example)
    where = dict(recorder.where)
    for alias in _PAD_NAMES:  # F.pad reaches the dispatcher as constant_pad_nd & co.
        if alias in where:
            where.setdefault("pad", where[alias])
    return where


_NO_FUNCTION = re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)', "
                          r"overload='(\w+)'\)>")


def explain_onnx_failure(err: BaseException, where: dict[str, str]) -> str | None:
    """A one-line reason for an ONNX translation failure on a complex op, or None."""
    text = f"{err}\n{err.__cause__ or ''}"
    match = _NO_FUNCTION.search(text)
    if match is None:
        return None
    op = f"{match.group(1)}.{match.group(2)}"
    packet = match.group(1).split(".")[-1]
    place = where.get(packet, "")
    kind = "complex-valued input" if "complex-valued" in text else "its inputs"
    return (f"ONNX export refused: torch's exporter has no translation of {op} for "
            f"{kind}" + (f" at {place}" if place else "") + " -- write it in real arithmetic "
            "(torch.polar, torch.complex, view_as_real), or export --format torchscript/pt2 "
            "only (they run complex ops natively)")
