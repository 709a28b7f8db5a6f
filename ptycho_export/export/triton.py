"""`--format triton`: a Triton Inference Server model repository around the ONNX export.

Layout: <repository>/<name>/config.pbtxt and <repository>/<name>/1/{model.onnx,
manifest.json, golden.npz, parity.md}. The version folder is a complete ptycho-export
artifact folder, so `ptycho-run <repository>/<name>/1 scan.npz` and its self-check work on
exactly the files Triton serves. Triton assumes the batch is the first dimension not listed
in `dims`: a dynamic-batch export gets `max_batch_size` > 0 and dynamic batching; a
fixed-batch export gets `max_batch_size: 0` and full dims.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from runtime.atomic import ensure_replaceable, replace_dir, temp_dir_beside
from runtime.errors import PtychoError

INSTANCE_KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}


class TritonUsageError(PtychoError):
    exit_code = 2


def _tensor_block(entries: list[dict[str, Any]], dynamic: bool) -> str:
    lines = []
    for entry in entries:
        dims = entry["shape"][1:] if dynamic else entry["shape"]
        lines.append(f'  {{ name: "{entry["name"]}" data_type: TYPE_FP32 '
                     f'dims: [ {", ".join(str(int(d)) for d in dims)} ] }}')
    return ",\n".join(lines)


def triton_config(manifest: dict[str, Any], name: str, max_batch_size: int = 1024,
                  instance_kind: str = "gpu", instance_count: int = 1,
                  preferred_batch_sizes: tuple[int, ...] = (64, 256),
                  queue_delay_us: int = 100) -> str:
    """config.pbtxt text for the export described by `manifest` (protobuf text format)."""
    if instance_kind not in INSTANCE_KINDS:
        raise TritonUsageError(f"instance kind {instance_kind!r}: choose gpu or cpu")
    inputs, outputs = manifest["inputs"], manifest["outputs"]
    dynamic = inputs[0]["shape"][0] == "batch"
    parts = [f'name: "{name}"', 'platform: "onnxruntime_onnx"',
             f"max_batch_size: {max_batch_size if dynamic else 0}",
             f"input [\n{_tensor_block(inputs, dynamic)}\n]",
             f"output [\n{_tensor_block(outputs, dynamic)}\n]"]
    if dynamic:
        preferred = [b for b in preferred_batch_sizes if b <= max_batch_size]
        parts.append("dynamic_batching {\n"
                     f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
                     f"  max_queue_delay_microseconds: {queue_delay_us}\n}}")
    gpus = " gpus: [ 0 ]" if instance_kind == "gpu" else ""
    parts.append(f"instance_group [\n  {{ count: {instance_count} kind: "
                 f"{INSTANCE_KINDS[instance_kind]}{gpus} }}\n]")
    parts.append("version_policy: { latest: { num_versions: 1 } }")
    return "\n".join(parts) + "\n"


def check_model_folder(repository: Path, name: str, force: bool = False) -> None:
    """<repository>/<name> may be replaced only when it is a Triton model folder (it holds
    config.pbtxt) or `force`."""
    ensure_replaceable(repository / name, lambda folder: (folder / "config.pbtxt").is_file(),
                       "ptycho-export --format triton", force)


def write_triton_repository(export_dir: Path, repository: Path, name: str,
                            force: bool = False, **config_options: Any) -> Path:
    """Move a finished ONNX export folder into <repository>/<name>/1 with a config.pbtxt.

    Only <repository>/<name> is replaced (atomically): other models in the repository are
    never touched.
    """
    if not name or "/" in name or name.startswith("."):
        raise TritonUsageError(f"model name {name!r} must be a plain folder name")
    manifest = json.loads((export_dir / "manifest.json").read_text())
    if set(manifest.get("artifacts", {})) - {"physics"} != {"onnx"}:
        raise TritonUsageError("a Triton version folder holds the ONNX artifact only")
    check_model_folder(repository, name, force)
    staging = temp_dir_beside(repository / name)
    try:
        shutil.copytree(export_dir, staging / "1")
        (staging / "config.pbtxt").write_text(triton_config(manifest, name, **config_options))
        replace_dir(staging, repository / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return repository / name

