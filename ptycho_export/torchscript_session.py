"""Run an artifact's model.ts or model.pt2 in ptycho-run, where PyTorch is installed.

The torch-free install runs model.onnx with onnxruntime; this module is where ptycho-run
touches torch, and it imports it only inside :func:`import_torch`, i.e. only when a torch
model is actually run. runtime.run finds it through the runner registry
(``torchscript_session`` and ``pt2_session`` kinds), never by name.

:class:`TorchScriptSession` offers the part of onnxruntime's InferenceSession API that
run_scan uses (``run(names, feed)`` on float32 numpy in, float32 numpy out), so batching,
self-check, stitching and outputs are the same code for both formats. Inputs are cast to
float32 at the boundary (and outputs come back as float32), as with ONNX.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from types import ModuleType
from typing import Any

import numpy as np

from runtime.errors import ArtifactError, EnvironmentProblem
from runtime.session import SessionInfo

__all__ = ["TorchScriptSession", "create_pt2_session", "create_torchscript_session",
           "import_torch"]

METADATA_FILE = "ptycho_export.json"  # torch.jit.save(..., _extra_files=) of ptycho-export
TORCHSCRIPT_PROVIDERS = ("cpu", "cuda", "auto")


def import_torch() -> ModuleType:
    """torch, or a one-line EnvironmentProblem saying how to get it (or to use ONNX)."""
    try:
        import torch
    except ImportError as err:
        raise EnvironmentProblem(
            "model.ts needs PyTorch, which is not installed here: pip install "
            "'ptycho-export[train]' (with a torch wheel for your platform), or run the "
            "artifact's model.onnx, which needs only onnxruntime") from err
    return torch


class TorchScriptSession:
    """A loaded TorchScript module behind onnxruntime's ``session.run`` interface."""

    def __init__(self, module: Any, torch: ModuleType, device: str, input_name: str,
                 output_names: tuple[str, ...], metadata: dict[str, str] | None) -> None:
        self.module, self.torch, self.device = module, torch, device
        self.input_name, self.output_names = input_name, tuple(output_names)
        self.metadata = metadata

    def run(self, names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        x = np.ascontiguousarray(feed[self.input_name], dtype=np.float32)
        with torch.inference_mode():
            out = self.module(torch.from_numpy(x).to(self.device))
        if isinstance(out, torch.Tensor):
            out = (out,)
        if not isinstance(out, tuple | list) or len(out) != len(self.output_names):
            got = len(out) if isinstance(out, tuple | list) else type(out).__name__
            raise ArtifactError(f"TorchScript model returned {got} outputs, but its manifest "
                                f"lists {len(self.output_names)} ({', '.join(self.output_names)})")
        values = {name: value.detach().to("cpu", torch.float32).numpy()
                  for name, value in zip(self.output_names, out, strict=True)}
        return [values[n] for n in (names or self.output_names)]

    def op_counts(self) -> dict[str, int]:
        """aten ops in the graph, by kind: the report's node counts (TorchScript's inlined
        graph, or the .pt2 program's FX graph)."""
        counts: Counter[str] = Counter()
        with contextlib.suppress(Exception):  # an exotic module without a graph: no counts
            graph = getattr(self.module, "inlined_graph", None)
            if graph is not None:
                kinds = (node.kind() for node in graph.nodes())
            else:
                kinds = (f"aten::{str(node.target).split('.')[1]}"
                         for node in self.module.graph.nodes
                         if node.op == "call_function" and str(node.target).startswith("aten."))
            for kind in kinds:
                if kind.startswith("aten::"):
                    counts[kind.removeprefix("aten::")] += 1
        return dict(sorted(counts.items()))


def _device(torch: ModuleType, provider: str, device_id: int) -> str:
    if provider not in TORCHSCRIPT_PROVIDERS:
        raise EnvironmentProblem(f"--provider {provider!r}: a TorchScript model runs on cpu or "
                                 "cuda (TensorRT is an onnxruntime provider: run model.onnx)")
    has_cuda = bool(torch.cuda.is_available())
    if provider == "auto":
        provider = "cuda" if has_cuda else "cpu"
    if provider == "cpu":
        return "cpu"
    if not has_cuda:
        raise EnvironmentProblem(f"--provider cuda: this torch {torch.__version__} sees no CUDA "
                                 "device (a CPU-only wheel, or no driver); install a CUDA torch "
                                 "or use --provider cpu")
    if device_id >= torch.cuda.device_count():
        raise EnvironmentProblem(f"--device-id {device_id}: torch sees "
                                 f"{torch.cuda.device_count()} CUDA device(s)")
    return f"cuda:{device_id}"


def _prepare(provider: str, threads: int | None, device_id: int) -> tuple[ModuleType, str]:
    """torch, the device to load onto, and torch's intra-op threads set for this process
    (torch.set_num_threads is process-wide)."""
    torch = import_torch()
    device = _device(torch, provider, device_id)
    if threads is not None:
        if threads < 1:
            raise EnvironmentProblem(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))
    return torch, device


def create_torchscript_session(model_path: str | os.PathLike[str], input_name: str,
                               output_names: tuple[str, ...], provider: str = "auto",
                               threads: int | None = None, device_id: int = 0
                               ) -> tuple[TorchScriptSession, SessionInfo]:
    """``torch.jit.load(map_location=device)`` of a verified model.ts, with the metadata
    ptycho-export embedded in it (for the provenance check). ``threads`` sets torch's
    intra-op threads for this process (torch.set_num_threads is process-wide)."""
    torch, device = _prepare(provider, threads, device_id)
    from ptycho_export.parity import load_torchscript

    extra = {METADATA_FILE: ""}
    try:
        module = load_torchscript(model_path, device, extra)
    except Exception as err:  # torch raises RuntimeError / ValueError / pickle errors
        line = " ".join(str(err).split())[:300]
        raise ArtifactError(f"{model_path}: torch.jit.load cannot load it: {line}") from err
    return _session(torch, module, "torchscript", provider, device, threads, device_id,
                    input_name, output_names, extra.get(METADATA_FILE))


def create_pt2_session(model_path: str | os.PathLike[str], input_name: str,
                       output_names: tuple[str, ...], provider: str = "auto",
                       threads: int | None = None, device_id: int = 0
                       ) -> tuple[TorchScriptSession, SessionInfo]:
    """``torch.export.load`` of a verified model.pt2 (its program moved to the device by
    ``move_to_device_pass``, which also rewrites the device constants a plain ``.to``
    would miss), with the embedded metadata for the provenance check."""
    torch, device = _prepare(provider, threads, device_id)
    from ptycho_export.parity import load_pt2

    extra = {METADATA_FILE: ""}
    try:
        module = load_pt2(model_path, device, extra)
    except Exception as err:  # torch raises RuntimeError / ValueError / zip errors
        line = " ".join(str(err).split())[:300]
        raise ArtifactError(f"{model_path}: torch.export.load cannot load it: {line}") from err
    return _session(torch, module, "pt2", provider, device, threads, device_id,
                    input_name, output_names, extra.get(METADATA_FILE))


def _session(torch: ModuleType, module: Any, runtime: str, provider: str, device: str,
             threads: int | None, device_id: int, input_name: str,
             output_names: tuple[str, ...], raw_metadata: str | bytes | None
             ) -> tuple[TorchScriptSession, SessionInfo]:
    metadata = None
    if raw_metadata:
        try:
            values = json.loads(raw_metadata)
        except (ValueError, UnicodeDecodeError):
            values = None
        if isinstance(values, dict):
            metadata = {str(k): str(v) for k, v in values.items()}
    label = "TorchScript" if runtime == "torchscript" else "pt2"
    info = SessionInfo(requested=provider, provider="cpu" if device == "cpu" else "cuda",
                       ep=f"{label}({device})", providers=[device], available=["cpu"] + (
                           [f"cuda:{i}" for i in range(torch.cuda.device_count())]
                           if torch.cuda.is_available() else []),
                       threads=threads, onnxruntime_version="not used",
                       device_id=device_id, runtime=runtime,
                       runtime_version=f"torch {torch.__version__}")
    return TorchScriptSession(module, torch, device, input_name, output_names, metadata), info
