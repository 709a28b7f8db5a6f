"""The torch runners (eager at any dtype and device, TorchScript, `.pt2`) of the one runner
protocol (runtime.runner, where the onnxruntime runner lives), and the parity gate.

Each runner takes named numpy arrays and returns named numpy outputs; the gate is then a
loop: same inputs through every runner, `runtime.compare` on each pair. The runtime finds
these runners by kind through the `ptycho_export.runners` entry points (pyproject.toml).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from runtime.compare import OutputStats, compare_outputs, tolerance_failures
from runtime.runner import BaseRunner, Runner, TensorMeta


def _named(outputs: tuple[torch.Tensor, ...] | torch.Tensor, names: tuple[str, ...]
           ) -> dict[str, np.ndarray]:
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    return {n: o.detach().to("cpu").numpy() for n, o in zip(names, outputs, strict=True)}


class TorchRunner(BaseRunner):
    """An nn.Module, TorchScript module or .pt2 program, on one device and dtype: fed numpy
    arrays of that dtype (a float64 array never reaches a float32 runner unnoticed)."""

    def __init__(self, name: str, module: nn.Module, input_names: tuple[str, ...],
                 output_names: tuple[str, ...], device: str = "cpu",
                 dtype: torch.dtype = torch.float32, *,
                 memory_format: torch.memory_format = torch.contiguous_format,
                 tf32: bool | None = None) -> None:
        """``memory_format``: the layout inputs are given in (channels_last for a module
        converted to it); ``tf32``: CUDA TF32 on or off while it runs (None: untouched)."""
        super().__init__()
        self.name, self.module = name, module
        self.input_names, self.output_names = tuple(input_names), tuple(output_names)
        self.device, self.dtype = device, dtype
        self.memory_format, self.tf32 = memory_format, tf32

    def _metadata(self) -> list[TensorMeta]:
        # fed float32 (narrower torch dtypes cast inside), or float64 for the exact reference
        dtype = "float64" if self.dtype == torch.float64 else "float32"
        return [TensorMeta(n, None, dtype) for n in self.input_names]

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        switch = tf32_mode(self.tf32) if self.tf32 is not None else contextlib.nullcontext()
        with switch, torch.inference_mode():
            args = [torch.from_numpy(feed[n]).to(self.device, self.dtype)
                    for n in self.input_names]
            if self.memory_format != torch.contiguous_format:
                args = [a.contiguous(memory_format=self.memory_format) for a in args]
            return _named(self.module(*args), self.output_names)  # .to("cpu") syncs CUDA


@contextlib.contextmanager
def tf32_mode(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA matmuls and cuDNN convs on or off, restored afterwards."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch nudges towards fp32_precision
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def eager_runner(module: nn.Module, input_names, output_names, *, dtype=torch.float32,  # noqa: ANN001
                 device: str = "cpu") -> TorchRunner:
    import copy

    # Widen or narrow by kind: Module.to(dtype) would turn a complex buffer (a probe) real.
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    clone = copy.deepcopy(module).to(device=device)
    clone._apply(lambda t: t.to(dtype) if t.is_floating_point()  # noqa: SLF001
                 else t.to(complex_dtype) if t.is_complex() else t)
    clone.eval()
    label = f"eager {'fp64' if dtype == torch.float64 else 'fp32'} {device}"
    return TorchRunner(label, clone, tuple(input_names), tuple(output_names), device, dtype)


def load_torchscript(path: str | os.PathLike[str], device: str = "cpu",
                     extra_files: dict[str, Any] | None = None) -> torch.jit.ScriptModule:
    """The one loader of a model.ts: ``torch.jit.load`` onto ``device``, in eval mode
    (TorchScript's deprecation warning silenced); ``extra_files`` as torch fills it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        extra = {} if extra_files is None else {"_extra_files": extra_files}
        return torch.jit.load(str(path), map_location=device, **extra).eval()


def load_pt2(path: str | os.PathLike[str], device: str = "cpu",
             extra_files: dict[str, Any] | None = None) -> nn.Module:
    """The one loader of a model.pt2: ``torch.export.load``, moved to ``device`` by
    ``move_to_device_pass`` (which also rewrites the program's device constants, which a
    plain ``.to(device)`` of its module would miss), as a callable module."""
    extra = {} if extra_files is None else {"extra_files": extra_files}
    program = torch.export.load(str(path), **extra)
    if torch.device(device).type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    return program.module()


def torchscript_runner(path: Path, input_names, output_names, device: str = "cpu"  # noqa: ANN001
                       ) -> TorchRunner:
    return TorchRunner(f"torchscript {device}", load_torchscript(path, device),
                       tuple(input_names), tuple(output_names), device)


def pt2_runner(path: Path, input_names, output_names, device: str = "cpu"  # noqa: ANN001
               ) -> TorchRunner:
    return TorchRunner(f"pt2 {device}", load_pt2(path, device), tuple(input_names),
                       tuple(output_names), device)


def parity_cases(golden: np.ndarray, n_random: int = 8, seed: int = 0
                 ) -> dict[str, np.ndarray]:
    """Inputs that a deployment meets: real patterns, fresh Poisson draws at the same count
    level, an all-zero pattern (beam off) and a saturated one (detector at its max)."""
    golden = np.asarray(golden, dtype=np.float32)
    rng = np.random.default_rng(seed)
    mean_intensity = np.square(golden.astype(np.float64)).mean(axis=0, keepdims=True)
    levels = rng.uniform(0.5, 2.0, size=(n_random, 1, 1, 1))
    counts = rng.poisson(mean_intensity * levels)
    top = float(golden.max()) if golden.size else 1.0
    return {
        "golden": golden,
        "random_counts": np.sqrt(counts).astype(np.float32),
        "zeros": np.zeros_like(golden[:1]),
        "saturated": np.full_like(golden[:1], top),
    }


@dataclass
class ParityRow:
    candidate: str
    reference: str
    case: str
    stats: dict[str, OutputStats]
    failures: list[str]
    gated: bool

    def to_dict(self) -> dict:
        return {"candidate": self.candidate, "reference": self.reference, "case": self.case,
                "gated": self.gated, "failures": self.failures,
                "outputs": {k: v.to_dict() for k, v in self.stats.items()}}


def run_parity(reference: Runner, candidates: list[Runner], cases: dict[str, np.ndarray],
               input_name: str, tolerances: dict[str, float],
               float64_reference: Runner | None = None) -> list[ParityRow]:
    """Gated rows: every candidate vs the fp32 eager reference. Informational rows: fp32
    eager and each candidate vs the fp64 eager run, which shows how much of the error is
    plain float32 arithmetic rather than the export."""
    rows = []
    for case, batch in cases.items():
        feeds = {input_name: batch}
        expected = reference.infer(feeds)
        outputs = {c.name: c.infer(feeds) for c in candidates}
        for candidate in candidates:
            stats = compare_outputs(expected, outputs[candidate.name])
            rows.append(ParityRow(candidate.name, reference.name, case, stats,
                                  tolerance_failures(stats, tolerances), True))
        if float64_reference is not None:
            exact = float64_reference.infer({input_name: batch.astype(np.float64)})
            exact = {k: v.astype(np.float32) for k, v in exact.items()}
            for name, produced in [(reference.name, expected), *outputs.items()]:
                stats = compare_outputs(exact, produced)
                rows.append(ParityRow(name, float64_reference.name, case, stats, [], False))
    return rows


def parity_table(rows: list[ParityRow]) -> str:
    """Markdown: one line per candidate/case/output, worst numbers first-class."""
    lines = ["| candidate | reference | case | output | max abs | rel to max | p99 abs | "
             "phase weighted | NaN/Inf | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for name, s in row.stats.items():
            weighted = f"{s.weighted_max:.2e}" if s.weighted_max is not None else ""
            bad = [f for f in row.failures if f.startswith(name)]
            status = ("FAIL" if bad else "ok") if row.gated else "info"
            lines.append(f"| {row.candidate} | {row.reference} | {row.case} | {name} | "
                         f"{s.max_abs:.2e} | {s.rel_max:.2e} | {s.p99_abs:.2e} | {weighted} | "
                         f"{s.nan_count}/{s.inf_count} | {status} |")
    return "\n".join(lines)

