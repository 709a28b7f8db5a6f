"""Audit the saved files, not the Python objects they came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptycho_export.parity import load_pt2, load_torchscript
from runtime.errors import ArtifactError

ONNX_FLOAT = 1  # onnx.TensorProto.FLOAT
ONNX_INTEGER_TYPES = {6, 7}  # INT32, INT64: shapes, axes, indices
ONNX_DOUBLE = 11


def _dims(value_info: Any) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


ONNX_WEIGHT_TYPES = {"fp32": {ONNX_FLOAT}, "fp16": {ONNX_FLOAT, 10}, "bf16": {ONNX_FLOAT, 16}}


def audit_onnx(path: Path, inputs: dict[str, list], outputs: dict[str, list], opset: int,
               precision: str = "fp32") -> dict[str, Any]:
    """Full checker, read-back opset/IR, float32 I/O and weights, no double anywhere."""
    import onnx

    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as err:
        raise ArtifactError(f"{path}: onnx.checker rejects the exported graph: "
                            f"{str(err).splitlines()[0]}") from None
    problems = []
    read_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                      None)
    if read_opset != opset:
        problems.append(f"opset is {read_opset}, {opset} was requested")
    for kind, declared, actual in (("input", inputs, model.graph.input),
                                   ("output", outputs, model.graph.output)):
        got = {v.name: v for v in actual}
        if list(got) != list(declared):
            problems.append(f"{kind} names are {list(got)}, expected {list(declared)}")
            continue
        for name, shape in declared.items():
            value = got[name]
            if value.type.tensor_type.elem_type != ONNX_FLOAT:
                problems.append(f"{kind} '{name}' is not float32")
            if _dims(value) != shape:
                problems.append(f"{kind} '{name}' has shape {_dims(value)}, expected {shape}")
    for tensor in model.graph.initializer:
        weight_types = ONNX_WEIGHT_TYPES[precision]
        if tensor.data_type not in weight_types and tensor.data_type not in ONNX_INTEGER_TYPES:
            problems.append(f"initializer '{tensor.name}' has ONNX type {tensor.data_type}")
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            problems.append(f"initializer '{tensor.name}' lives in an external data file")
    for node in model.graph.node:
        if node.op_type == "Cast" and any(a.name == "to" and a.i == ONNX_DOUBLE
                                          for a in node.attribute):
            problems.append(f"node '{node.name}' casts to double")
    if list(path.parent.glob(path.name + ".data")):
        problems.append("an external .onnx.data file was written next to it")
    if problems:
        raise ArtifactError(f"{path.name} failed its audit: " + "; ".join(problems[:4]))
    op_types: dict[str, int] = {}
    for node in model.graph.node:
        op_types[node.op_type] = op_types.get(node.op_type, 0) + 1
    return {"opset": read_opset, "ir_version": int(model.ir_version),
            "node_count": len(model.graph.node), "op_types": dict(sorted(op_types.items()))}


def _check_outputs(path: Path, outputs: Any, device: str, shapes: list[tuple[int, ...]]) -> None:
    outputs = outputs if isinstance(outputs, tuple | list) else (outputs,)
    for tensor, shape in zip(outputs, shapes, strict=True):
        if tensor.device.type != torch.device(device).type:
            raise ArtifactError(f"{path.name}: loaded for {device}, but produced outputs on "
                                f"{tensor.device}: a device is baked into the file")
        if tensor.dtype != torch.float32 or tuple(tensor.shape) != shape:
            raise ArtifactError(f"{path.name}: output is {tensor.dtype}{tuple(tensor.shape)}, "
                                f"expected float32{shape}")


def audit_torch_file(path: Path, loader: str, examples: tuple[np.ndarray, ...],
                     shapes: list[tuple[int, ...]]) -> dict[str, Any]:
    """Reload from disk on CPU (and CUDA when present); outputs must land on that device."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and loader == "torchscript"
                         else [])
    for device in devices:
        module = (load_torchscript(path, device) if loader == "torchscript"
                  else load_pt2(path))
        args = [torch.from_numpy(e).to(device) for e in examples]
        with torch.inference_mode():
            _check_outputs(path, module(*args), device, shapes)
    return {"reloaded_on": devices}
