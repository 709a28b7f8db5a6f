"""Refuse models that would freeze wrongly, before freezing them: per format.

ONNX and `.pt2` are made from one `torch.export` program, so `torch.export` judges them:
it refuses Python branches on tensor values loudly. TorchScript is a `torch.jit.trace`,
which records one execution and bakes in silently whatever Python saw: a branch, a number
read off a tensor, a device. Its checks guard the TorchScript file alone, so a model whose
trace is unsafe still gets its ONNX and `.pt2` (and the manifest says why TorchScript was
refused). Each refusal names the source line and the fix.

Trace warnings are proven harmless, not assumed so: a warning is accepted only when
`torch.export` (dynamic batch, fixed C, H, W) accepts the module, so no Python branch
depends on tensor values, and the trace reproduces eager at other batch sizes on inputs of
other values and scales. Devices baked by the trace (`torch.ones(..., device=x.device)`)
are rewritten to follow the input's device.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import torch
from torch import nn

from ptycho_export.export.graph_checks import (
    BEHAVIOUR_TOLERANCE,
    REDUCED_BEHAVIOUR_TOLERANCE,
    behaviour_findings,
    flat_tensors,
    float64_in_program,
    float64_in_trace,
    float64_refusal,
)
from runtime.errors import PtychoError

ALL_FORMATS = ("onnx", "torchscript", "pt2")
EXPORT_FORMATS = ("onnx", "pt2")  # the formats made from the torch.export program
PROOF_SCALES = (1e-3, 0.37, 2.9)  # fresh inputs: the example's rows, cycled and rescaled
PROOF_TOLERANCE = 1e-5  # trace vs eager, max |difference| relative to max |eager|


class ExportLintError(PtychoError):
    """The model cannot be frozen faithfully; the message says where and how to fix it."""


@dataclass
class TraceWarning:
    where: str  # file:line
    message: str
    accepted: str = ""  # why it is harmless; empty while unproven

    def to_dict(self) -> dict[str, str]:
        return {"where": self.where, "message": self.message, "accepted": self.accepted}


@dataclass
class LintResult:
    """What each format is made from, and which formats were refused (name -> reason)."""

    exported: torch.export.ExportedProgram | None = None
    traced: torch.jit.ScriptModule | None = None
    refused: dict[str, str] = field(default_factory=dict)
    trace_warnings: list[TraceWarning] = field(default_factory=list)
    device_rewrites: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """The manifest's "lint" entry."""
        return {"refused_formats": dict(self.refused),
                "trace_warnings_accepted": [w.to_dict() for w in self.trace_warnings],
                "devices_made_input_relative": list(self.device_rewrites)}

    def notes(self) -> list[str]:
        found = [f"{name} refused: {why}" for name, why in self.refused.items()]
        found += [f"trace warning at {w.where} accepted: {w.accepted}"
                  for w in self.trace_warnings]
        found += [f"TorchScript: {d}" for d in self.device_rewrites]
        return found


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
        elif "Constraints violated (batch)" in text:
            hint = (" -- forward fixes the batch size (a Python loop over the batch, "
                    "int(x.shape[0]), len(x)): write it batch-agnostic, or export a fixed "
                    "batch with --batch N")
        raise ExportLintError(f"torch.export refused the model: {_first_line(err)}{hint}"
                              ) from None


# ---------------------------------------------------------------- the trace (TorchScript)
def trace_recording(module: nn.Module, example: tuple[torch.Tensor, ...]
                    ) -> tuple[torch.jit.ScriptModule, list[TraceWarning]]:
    """torch.jit.trace, with its TracerWarnings collected once per source line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        traced = torch.jit.trace(module, example, check_trace=False)
    found: dict[str, TraceWarning] = {}
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning):
            where = f"{w.filename}:{w.lineno}"
            first = str(w.message).split(". ")[0].strip()
            found.setdefault(where, TraceWarning(where, first))
    return traced, list(found.values())


def _script_graphs(module: torch.jit.ScriptModule) -> Iterator[tuple[str, Any]]:
    """(module path, forward graph) of a traced module and every submodule (a graph shared
    by two instances of one class comes twice; rewriting it once is enough)."""
    stack: list[tuple[str, Any]] = [("", module)]
    while stack:
        name, sub = stack.pop()
        c = getattr(sub, "_c", None)
        if c is not None and c._has_method("forward"):  # noqa: SLF001 - no public query
            yield name, c._get_method("forward").graph  # noqa: SLF001
        stack.extend((f"{name}.{child}" if name else child, s)
                     for child, s in sub.named_children())


def _device_constants(graph: Any) -> list[Any]:
    return [node for node in graph.nodes()
            if node.kind() == "prim::Constant"
            and node.output().type().kind() == "DeviceObjType"]


def _source_of(node: Any) -> str:
    where = node.sourceRange().strip().splitlines()
    return where[0] if where else "forward"


def make_devices_follow_input(traced: torch.jit.ScriptModule) -> tuple[list[str], list[str]]:
    """Replace each device constant the trace baked in (`torch.ones(..., device=x.device)`
    records x's device at trace time) by `prim::device` of a tensor input of the same graph,
    so the saved file creates those tensors where its inputs are. Returns (what was
    rewritten, what could not be: a graph without a tensor input)."""
    rewritten, left = [], []
    for name, graph in _script_graphs(traced):
        tensors = [v for v in graph.inputs() if v.type().kind() == "TensorType"]
        for node in _device_constants(graph):
            where = _source_of(node)
            baked = node.output().toIValue()
            if not tensors:
                left.append(f"a device ({baked}) is baked into forward at {where}: create "
                            "tensors from an existing tensor or buffer (torch.zeros_like, "
                            "x.new_zeros) instead of naming a device")
                continue
            follow = graph.create("prim::device", [tensors[0]])
            follow.output().setType(node.output().type())
            follow.insertAfter(node)
            node.output().replaceAllUsesWith(follow.output())
            node.destroy()
            rewritten.append(f"device {baked} baked at {where} now follows the input of "
                             f"{name or 'forward'}")
    return rewritten, left


def baked_devices(traced: torch.jit.ScriptModule) -> list[str]:
    """Device constants left anywhere in the traced graph."""
    return [f"a device ({node.output().toIValue()}) is baked into forward at "
            f"{_source_of(node)}" for node in _device_constants(traced.inlined_graph)][:3]


def _fresh_inputs(example: tuple[torch.Tensor, ...], dynamic_batch: bool
                  ) -> Iterator[tuple[str, tuple[torch.Tensor, ...]]]:
    """The example's rows cycled to other batch sizes (when the batch is dynamic) and
    rescaled: a value the trace froze from the example shows up as a difference."""
    batch = example[0].shape[0]
    sizes = (1, batch + 1) if dynamic_batch else (batch,)
    for size in sizes:
        order = torch.arange(size - 1, -1, -1) % batch
        for scale in PROOF_SCALES:
            yield (f"batch {size}, the example's values x{scale}",
                   tuple(t[order] * scale if t.is_floating_point() else t[order]
                         for t in example))


def trace_difference(traced: torch.jit.ScriptModule, module: nn.Module,
                     example: tuple[torch.Tensor, ...], dynamic_batch: bool) -> str:
    """'' when the trace reproduces eager on fresh inputs, else what differs."""
    with torch.inference_mode():
        for label, feed in _fresh_inputs(example, dynamic_batch):
            try:
                got = flat_tensors(traced(*feed))
            except Exception as err:  # noqa: BLE001 - a failing trace is the finding
                return f"the trace fails at {label}: {_first_line(err)}"
            want = flat_tensors(module(*feed))
            if len(got) != len(want):
                return f"the trace returns {len(got)} outputs, eager {len(want)}"
            for i, (g, w) in enumerate(zip(got, want, strict=True)):
                if g.shape != w.shape:
                    return (f"at {label} output {i} is {tuple(g.shape)} from the trace, "
                            f"{tuple(w.shape)} from eager")
                scale = float(w.abs().max()) or 1.0
                diff = float((g.double() - w.double()).abs().max()) / scale
                if not diff <= PROOF_TOLERANCE:
                    return (f"at {label} output {i} differs from eager by {diff:.2e} of its "
                            "max")
    return ""


def _allowed(where: str, allow: Iterable[str]) -> str | None:
    """The --allow-trace-warning entry (FILE:LINE, FILE may be a path suffix) matching."""
    path, _, line = where.rpartition(":")
    for entry in allow:
        file, _, want = entry.rpartition(":")
        if want == line and file and PurePath(path).parts[-len(PurePath(file).parts):] \
                == PurePath(file).parts:
            return entry
    return None


def lint_trace(module: nn.Module, example: tuple[torch.Tensor, ...], dynamic_batch: bool,
               exported: torch.export.ExportedProgram | None, export_refusal: str,
               allow_trace_warnings: Iterable[str] = ()
               ) -> tuple[torch.jit.ScriptModule | None, str, list[TraceWarning], list[str]]:
    """(traced or None, refusal, accepted warnings, device rewrites) for TorchScript."""
    traced, found = trace_recording(module, example)
    rewrites, left = make_devices_follow_input(traced)
    if left:
        return None, "; ".join(left[:3]), [], rewrites
    # A trace can be wrong without a warning (a Python loop over the batch unrolls
    # silently), so every trace is run against eager on fresh inputs.
    difference = trace_difference(traced, module, example, dynamic_batch)
    if not found:
        if difference:
            return None, (f"the trace does not reproduce eager: {difference} -- forward "
                          "keeps a Python value from the example (a loop over the batch, a "
                          "number read off a tensor); compute it with tensor ops"), [], rewrites
        return traced, "", [], rewrites
    allow = list(allow_trace_warnings)
    if exported is None and not export_refusal:
        try:
            export_program(module, example, dynamic_batch)
        except ExportLintError as err:
            export_refusal = str(err)
    sizes = "1 and the example's + 1" if dynamic_batch else "the fixed one"
    for warning in found:
        entry = _allowed(warning.where, allow)
        if entry is not None:
            warning.accepted = f"allowed by --allow-trace-warning {entry}"
        elif not export_refusal and not difference:
            warning.accepted = (
                "proven harmless: torch.export accepts the module (no Python branch on "
                "tensor values) and the trace reproduces eager at batch sizes "
                f"{sizes}, inputs x" + ", x".join(f"{k:g}" for k in PROOF_SCALES))
    unproven = [w for w in found if not w.accepted]
    if unproven:
        first = unproven[0]
        why = (f"cannot prove it harmless ({export_refusal})" if export_refusal
               else f"the trace keeps a value fixed: {difference}")
        return None, (f"tracing is unsafe at {first.where}: {first.message} -- {why}; "
                      "compute it with tensor ops instead, or if you know it depends only "
                      f"on fixed sizes, pass --allow-trace-warning {first.where}"), [], rewrites
    return traced, "", found, rewrites


def lint_module(module: nn.Module, example: tuple[torch.Tensor, ...],
                dynamic_batch: bool = True,
                allowed_dtypes: tuple[torch.dtype, ...] = (torch.float32,),
                allow_complex: bool = False, formats: Iterable[str] = ALL_FORMATS,
                allow_trace_warnings: Iterable[str] = ()) -> LintResult:
    """Checks that apply to every format (dtypes, determinism, batch independence, float64
    in the graphs) raise; the rest decide per format. Raises when every requested format
    is refused."""
    formats = list(formats)
    findings = check_float32(module, allowed_dtypes, allow_complex)
    reduced = any(d in allowed_dtypes for d in (torch.float16, torch.bfloat16))
    findings = findings or behaviour_findings(
        module, example, REDUCED_BEHAVIOUR_TOLERANCE if reduced else BEHAVIOUR_TOLERANCE)
    if findings:
        raise ExportLintError("; ".join(findings))
    result = LintResult()
    export_refusal = ""
    if any(f in EXPORT_FORMATS for f in formats):
        try:
            result.exported = export_program(module, example, dynamic_batch)
        except ExportLintError as err:
            export_refusal = str(err)
            result.refused.update({f: export_refusal for f in formats if f in EXPORT_FORMATS})
        if result.exported is not None and torch.float64 not in allowed_dtypes:
            wide = float64_in_program(result.exported)
            if wide:
                raise ExportLintError(float64_refusal(wide))
    if "torchscript" in formats:
        traced, refusal, accepted, rewrites = lint_trace(
            module, example, dynamic_batch, result.exported, export_refusal,
            allow_trace_warnings)
        result.traced, result.trace_warnings, result.device_rewrites = traced, accepted, rewrites
        if refusal:
            result.refused["torchscript"] = refusal
        elif traced is not None and torch.float64 not in allowed_dtypes:
            wide = float64_in_trace(traced)
            if wide:
                raise ExportLintError(float64_refusal(wide))
    if all(f in result.refused for f in formats):
        reasons = list(dict.fromkeys(result.refused[f] for f in formats))
        if len(reasons) == 1:
            raise ExportLintError(reasons[0])
        by_reason: dict[str, list[str]] = {}
        for f in formats:
            by_reason.setdefault(result.refused[f], []).append(f)
        raise ExportLintError("every requested format was refused: " + "; ".join(
            f"{', '.join(names)}: {why}" for why, names in by_reason.items()))
    return result
