"""Checks of what a model does and what its frozen graphs compute, not what it registers.

- Behaviour: two eager runs on the same input must agree (random ops, dropout with
  training=True would be frozen as noise or dropped), and each sample's output must not
  depend on the rest of the batch (batch norm in training mode, F.batch_norm(...,
  training=True), a statistic over the batch): a dynamic-batch artifact would answer
  differently for each batching. These replace a check of `module.training` flags, which
  every caller had already cleared with `.eval()` and which misses functional calls.
- float64: any float64 (or complex128) constant or intermediate in the `torch.export`
  program or the traced TorchScript graph, such as a plain tensor attribute
  `self.c = torch.ones(16, dtype=torch.float64)` that is neither parameter nor buffer.
Each finding names the op and the user's source line when it is known.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ptycho_export.export.complex_ops import user_frame

BEHAVIOUR_TOLERANCE = 1e-5  # max |difference| relative to max |output|, fp32
REDUCED_BEHAVIOUR_TOLERANCE = 1e-2  # fp16 / bf16 copies
RANDOM_OPS = frozenset({
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like",
    "bernoulli", "normal", "uniform", "multinomial", "poisson", "exponential", "geometric",
    "cauchy", "log_normal", "random", "rrelu_with_noise"})
DROPOUT_OPS = frozenset({"dropout", "native_dropout", "feature_dropout", "alpha_dropout",
                         "feature_alpha_dropout"})  # with train=True they drop
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)


class SuspectOps(TorchDispatchMode):
    """Records the first user line of each random op, of dropout that drops, and of batch
    norm that uses batch statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.random: dict[str, str] = {}
        self.batch: dict[str, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__.rstrip("_")
        if name in RANDOM_OPS or (name in DROPOUT_OPS and (
                kwargs.get("train", args[2] if len(args) > 2 else True) is True)):
            self.random.setdefault(name, user_frame())
        elif "batch_norm" in name:
            training = kwargs.get("training", args[5] if len(args) > 5 else False)
            if training is True:
                self.batch.setdefault(name, user_frame())
        return func(*args, **kwargs)


def flat_tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) result, complex ones as real views."""
    if isinstance(value, torch.Tensor):
        return [torch.view_as_real(value) if value.is_complex() else value]
    if isinstance(value, list | tuple):
        return [t for item in value for t in flat_tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in flat_tensors(item)]
    return []


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape:
            return float("inf")
        scale = float(y.abs().max()) if y.numel() else 0.0
        diff = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
        worst = max(worst, diff / (scale or 1.0))
    return worst


def _named(found: dict[str, str]) -> str:
    return ", ".join(f"{op}{' at ' + where if where else ''}" for op, where in
                     list(found.items())[:3])


def behaviour_findings(module: nn.Module, example: tuple[torch.Tensor, ...],
                       tolerance: float = BEHAVIOUR_TOLERANCE) -> list[str]:
    """Refusals for non-determinism and for batch dependence (empty when neither);
    `tolerance` is looser for reduced-precision copies, whose kernels may block batches
    differently."""
    recorder = SuspectOps()
    with torch.inference_mode(), recorder:
        first = flat_tensors(module(*example))
        second = flat_tensors(module(*example))
        alone = [flat_tensors(module(*(t[i:i + 1] for t in example)))
                 for i in range(example[0].shape[0])]
    findings = []
    spread = _relative(first, second)
    if not spread <= tolerance:
        culprits = f" ({_named(recorder.random)})" if recorder.random else ""
        findings.append(
            f"forward is not deterministic: two runs on the same input differ by "
            f"{spread:.1e} of max{culprits}; random ops or dropout with training=True "
            "(F.dropout(x, p, training=True), a module left in train mode) would be frozen "
            "as noise or silently dropped: remove them from the inference path")
        return findings
    together = [[t[i:i + 1] for t in first] for i in range(len(alone))]
    dependence = max((_relative(a, b) for a, b in zip(alone, together, strict=True)),
                     default=0.0)
    if not dependence <= tolerance:
        culprits = f" ({_named(recorder.batch)})" if recorder.batch else ""
        findings.append(
            f"forward's output for one sample depends on the rest of the batch (a sample "
            f"alone differs by {dependence:.1e} of max){culprits}: batch norm using batch "
            "statistics (a module left in train mode, F.batch_norm(..., training=True)) or "
            "another statistic over the batch; a dynamic-batch artifact would answer "
            "differently for each batching: normalise per sample, or call .eval()")
    return findings


def _stack_line(trace: str | None) -> str:
    """The innermost 'file:line' of a user frame in a torch.fx stack trace string."""
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace or "")
    for file, line in reversed(frames):
        if not str(Path(file).resolve()).startswith(_TORCH_DIR) and "/ptycho_export/" \
                not in file:
            return f"{file}:{line}"
    return ""


def float64_in_program(program: torch.export.ExportedProgram) -> list[str]:
    """float64/complex128 values in the exported program: constants, inputs, intermediates."""
    signature = program.graph_signature
    lifted = dict(getattr(signature, "inputs_to_lifted_tensor_constants", {}) or {})
    lifted.update(getattr(signature, "inputs_to_buffers", {}) or {})
    found = []
    for node in program.graph.nodes:
        if not any(t.dtype == torch.float64 for t in flat_tensors(node.meta.get("val"))):
            continue
        trace = node.meta.get("stack_trace")
        if node.op == "placeholder":  # a constant has no trace of its own: its first use
            trace = next((u.meta.get("stack_trace") for u in node.users
                          if u.meta.get("stack_trace")), None)
            what, at = f"constant self.{lifted.get(node.name, node.name)}", " used at "
        else:
            what, at = f"op {node.target}", " at "
        where = _stack_line(trace)
        found.append(f"{what}{at + where if where else ''}")
    return found[:3]


def float64_in_trace(traced: torch.jit.ScriptModule) -> list[str]:
    """float64 tensors produced anywhere in the traced graph."""
    found = []
    for node in traced.inlined_graph.nodes():
        for out in node.outputs():
            kind = out.type()
            if kind.kind() != "TensorType" or kind.scalarType() not in ("Double",
                                                                        "ComplexDouble"):
                continue
            if node.kind() == "prim::Constant" and kind.dim() == 0:
                continue  # a Python number the trace wrapped: it never widens float32 math
            where = node.sourceRange().strip().splitlines()
            found.append(f"{node.kind()}{' at ' + where[0] if where else ''}")
            break
    return found[:3]


def float64_refusal(places: list[str]) -> str:
    return ("forward computes in float64: " + "; ".join(places) + " -- a float64 tensor "
            "that is neither parameter nor buffer (a plain attribute, torch.tensor(...) of a "
            "numpy float64, .double()) reaches the graph; the frozen model would compute in "
            "double on every call: make it float32")
