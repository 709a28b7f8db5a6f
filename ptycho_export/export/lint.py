"""Refuse models that would freeze wrongly, before freezing them.

Tracing records one execution: a Python branch on tensor values, a device named inside
`forward` or a float64 constant is baked in silently. Each check here turns one such
trap into a clear error naming the module or source line and the fix.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from runtime.errors import PtychoError


class ExportLintError(PtychoError):
    """The model cannot be frozen faithfully; the message says where and how to fix it."""


@dataclass
class LintResult:
    exported: torch.export.ExportedProgram
    traced: torch.jit.ScriptModule


def check_eval_mode(module: nn.Module) -> list[str]:
    return [
        f"module '{name or type(module).__name__}' ({type(sub).__name__}) is in train mode: "
        "call model.eval() before export (dropout/batch-norm would freeze random or "
        "batch-dependent behaviour)"
        for name, sub in module.named_modules() if sub.training
    ][:3]


def check_float32(module: nn.Module, allowed: tuple[torch.dtype, ...] = (torch.float32,),
                  allow_complex: bool = False) -> list[str]:
    """float64 (or other unexpected float) tensors, and complex ones unless `allow_complex`
    (foreign modules may keep a complex64 probe buffer: the dynamo exporter stores it as a
    real initializer; complex128 is always refused)."""
    findings = []
    for kind, items in (("parameter", module.named_parameters()),
                        ("buffer", module.named_buffers())):
        for name, tensor in items:
            if tensor.is_floating_point() and tensor.dtype not in allowed:
                findings.append(f"{kind} '{name}' is {tensor.dtype}: store it as float32 "
                                "(model.float(), or register it with dtype=torch.float32)")
            elif tensor.is_complex() and not (allow_complex and tensor.dtype == torch.complex64):
                findings.append(f"{kind} '{name}' is complex: store real and imaginary parts "
                                "as two float32 buffers")
    return findings[:3]


def _raising_call(text: str) -> str:
    """' at FILE:LINE (`code`)' from torch.export's "The following call raised this error"."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("The following call raised this error") and i + 1 < len(lines):
            where = lines[i + 1].strip()
            if where.startswith('File "'):
                file, _, rest = where[6:].partition('", line ')
                lineno = rest.split(",")[0]
                code = lines[i + 2].strip() if i + 2 < len(lines) else ""
                return f" at {file}:{lineno}" + (f" (`{code}`)" if code else "")
    return ""


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(err).__name__


def export_program(module: nn.Module, example: tuple[torch.Tensor, ...],
                   dynamic_batch: bool) -> torch.export.ExportedProgram:
    """torch.export as a checker: it refuses data-dependent branches loudly."""
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        dynamic_shapes = tuple({0: batch} for _ in example)
    try:
        return torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as err:  # torch raises many types here; all mean "cannot freeze"
        text = str(err)
        hint = ""
        if "data-dependent" in text or "GuardOnDataDependent" in type(err).__name__ + text:
            hint = (f"{_raising_call(text)} -- forward branches on tensor values (e.g. "
                    "`if x.max() > 0:`); a frozen graph would keep only one branch: use "
                    "torch.where or move the decision out of forward")
        raise ExportLintError(f"torch.export refused the model: {_first_line(err)}{hint}"
                              ) from None


def trace_strict(module: nn.Module, example: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
    """torch.jit.trace with every TracerWarning turned into a refusal naming its source line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        traced = torch.jit.trace(module, example, check_trace=False)
    tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if tracer:
        first = tracer[0]
        raise ExportLintError(
            f"tracing is unsafe at {first.filename}:{first.lineno}: {first.message} -- the "
            "frozen graph would keep this value fixed; compute it with tensor ops instead")
    return traced


def baked_devices(traced: torch.jit.ScriptModule) -> list[str]:
    """Device constants in the traced graph: tensors created with an explicit device."""
    found = []
    for node in traced.inlined_graph.nodes():
        if node.kind() == "prim::Constant" and node.output().type().kind() == "DeviceObjType":
            where = node.sourceRange().strip().splitlines()
            location = where[0] if where else "forward"
            found.append(f"a device ({node.output().toIValue()}) is baked into forward at "
                         f"{location}: create tensors from an existing tensor or buffer "
                         "(torch.zeros_like, x.new_zeros) instead of naming a device")
    return found[:3]


def lint_module(module: nn.Module, example: tuple[torch.Tensor, ...],
                dynamic_batch: bool = True,
                allowed_dtypes: tuple[torch.dtype, ...] = (torch.float32,),
                allow_complex: bool = False) -> LintResult:
    findings = check_eval_mode(module) + check_float32(module, allowed_dtypes, allow_complex)
    if findings:
        raise ExportLintError("; ".join(findings))
    exported = export_program(module, example, dynamic_batch)
    traced = trace_strict(module, example)
    devices = baked_devices(traced)
    if devices:
        raise ExportLintError("; ".join(devices))
    return LintResult(exported=exported, traced=traced)
