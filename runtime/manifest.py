"""Read an exported artifact folder's manifest.json and verify the files it lists (no torch).

The runtime trusts nothing in an artifact folder until the manifest says what it is and the
model file's size and sha256 match what the exporter recorded: a model edited, truncated or
swapped after export would otherwise run and produce plausible but wrong images.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.compare import DEFAULT_TOLERANCES
from runtime.errors import ArtifactError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "ptycho-export-artifacts"
MANIFEST_VERSION = 1
DEFAULT_MODEL_FILE = "model.onnx"
# Model formats ptycho-run can execute: manifest "artifacts" key -> default file name.
MODEL_FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts", "pt2": "model.pt2"}
FORMAT_LABELS = {"onnx": "ONNX", "torchscript": "TorchScript", "pt2": ".pt2"}

__all__ = ["ArtifactSpec", "MANIFEST_NAME", "MODEL_FORMATS", "check_provenance", "load_artifact",
           "sha256_file", "verify_file"]


def sha256_file(path: str | os.PathLike[str], block: int = 1 << 20) -> str:
    """Streamed sha256, so a large model is never read into memory at once."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ArtifactSpec:
    """What the runtime needs from a verified artifact folder."""

    folder: Path
    manifest_path: Path
    model_path: Path
    model_sha256: str
    patch_size: int
    gridsize: int
    channels: int
    input_name: str
    input_shape: tuple[int | str, ...]  # e.g. ("batch", 1, 64, 64)
    output_names: tuple[str, ...]
    batch: int | None  # None: dynamic batch axis
    tolerances: dict[str, float]
    golden_path: Path | None
    golden_input: str = "diffraction"
    golden_outputs: tuple[str, ...] = ()
    precision: str = "fp32"
    manifest: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    model_format: str = "onnx"  # key of MODEL_FORMATS: which runtime executes model_path


def _fail(where: Path, problem: str) -> ArtifactError:
    return ArtifactError(f"{where}: {problem}")


def _resolve(path: Path) -> tuple[Path, str | None]:
    """(folder, model file name or None) from a folder, a model file or the manifest itself."""
    if path.is_dir():
        return path, None
    if path.exists():
        if path.name == MANIFEST_NAME:
            return path.parent, None
        return path.parent, path.name
    raise ArtifactError(f"{path}: not found (give the exported folder or its model.onnx / "
                        "model.ts)")


def _read_manifest(manifest_path: Path) -> dict[str, Any]:
    if not manifest_path.is_file():
        raise _fail(manifest_path, "missing; an artifact folder written by ptycho-export has "
                    "one (was the folder copied without it?)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise _fail(manifest_path, f"cannot be read ({type(err).__name__})") from err
    except json.JSONDecodeError as err:
        raise _fail(manifest_path, f"is not valid JSON (line {err.lineno}: {err.msg})") from err
    if not isinstance(manifest, dict):
        raise _fail(manifest_path, "is not a JSON object")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise _fail(manifest_path, f"format is {manifest.get('format')!r}, expected "
                    f"{MANIFEST_FORMAT!r} (is this a ptycho-export artifact folder?)")
    version = manifest.get("format_version")
    if version != MANIFEST_VERSION:
        hint = ("written by a newer ptycho-export; upgrade this runtime"
                if isinstance(version, int) and version > MANIFEST_VERSION else "unsupported")
        raise _fail(manifest_path, f"format_version {version!r} ({hint}); this runtime reads "
                    f"version {MANIFEST_VERSION}")
    return manifest


def _plain_name(manifest_path: Path, name: Any, what: str) -> str:
    """Refuse names that would reach outside the artifact folder."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name \
            or "\\" in name:
        raise _fail(manifest_path, f"{what} {name!r} is not a plain file name")
    return name


def verify_file(folder: Path, name: str, files: dict[str, Any], manifest_path: Path) -> str:
    """Check one file's size and sha256 against manifest "files"; return the sha256."""
    path = folder / name
    entry = files.get(name)
    if not isinstance(entry, dict) or "sha256" not in entry:
        raise _fail(manifest_path, f"does not list {name} under \"files\" (cannot verify it)")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (listed in {MANIFEST_NAME})")
    size = path.stat().st_size
    if "size" in entry and entry["size"] != size:
        raise ArtifactError(f"{path} is {size} bytes but {MANIFEST_NAME} lists {entry['size']} "
                            "(truncated or edited after export?)")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ArtifactError(f"{path} does not match its sha256 in {MANIFEST_NAME} "
                            "(edited after export?)")
    return digest


def check_provenance(model_path: Path, metadata: dict[str, str] | None,
                     manifest: dict[str, Any], manifest_path: Path) -> None:
    """A model file must come from the export its manifest describes.

    The hash check cannot see a model file from another export swapped in with the manifest
    rehashed; the metadata the exporter embeds in every model file (ONNX metadata_props,
    TorchScript and .pt2 extra/ptycho_export.json) can: its source bundle sha256 and model facts
    must be the manifest's. Manifests that record no source bundle (models exported from
    elsewhere, hand-written test folders) have nothing to compare and pass.
    """
    source = manifest.get("source_bundle")
    recorded = source.get("sha256") if isinstance(source, dict) else None
    if not isinstance(recorded, str):
        return
    embedded = (metadata or {}).get("source_bundle_sha256")
    if not isinstance(embedded, str):
        raise ArtifactError(f"{model_path}: carries no ptycho-export provenance, but "
                            f"{manifest_path.name} says it was exported from "
                            f"{source.get('file', 'a bundle')}; a model file was swapped in: "
                            "re-export the bundle")
    if embedded != recorded:
        raise ArtifactError(f"{model_path}: was exported from another bundle (sha256 "
                            f"{embedded[:12]}...) than {manifest_path.name} records "
                            f"({recorded[:12]}...); a model file was swapped in: re-export the "
                            "bundle")
    model = manifest.get("model") or {}
    for key in ("patch_size", "gridsize"):
        if metadata and key in metadata and isinstance(model, dict) and key in model \
                and str(model[key]) != str(metadata[key]):
            raise ArtifactError(f"{model_path}: {key} is {metadata[key]} in the file but "
                                f"{model[key]} in {manifest_path.name}; re-export the bundle")


def _int(manifest_path: Path, value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(manifest_path, f"{what} is {value!r}, expected a positive integer")
    return value


def _model_entry(manifest: dict[str, Any], manifest_path: Path, folder: Path,
                 given_name: str | None, model_format: str | None) -> tuple[str, str]:
    """(format, model file name): ``model_format`` when given; else the format whose file
    was named on the command line; else ONNX (what the torch-free runtime runs)."""
    artifacts = manifest.get("artifacts") or {}
    if not isinstance(artifacts, dict):
        raise _fail(manifest_path, "\"artifacts\" is not a table")
    if model_format is not None and model_format not in MODEL_FORMATS:
        raise ArtifactError(f"--format {model_format!r}: choose one of "
                            f"{', '.join(MODEL_FORMATS)}")
    if model_format is None:
        model_format = "onnx"
        for key in MODEL_FORMATS:
            entry = artifacts.get(key)
            if given_name is not None and isinstance(entry, dict) and \
                    entry.get("file", MODEL_FORMATS[key]) == given_name:
                model_format = key
    entry = artifacts.get(model_format)
    label = FORMAT_LABELS[model_format]
    if not isinstance(entry, dict):
        formats = ", ".join(sorted(artifacts)) or "none"
        hint = ("the torch-free runtime needs one: re-export with --format onnx"
                if model_format == "onnx" else f"re-export with --format {model_format}, or "
                "run its model.onnx")
        raise _fail(manifest_path, f"lists no {label} model (formats: {formats}); {hint}")
    model_name = _plain_name(manifest_path, entry.get("file", MODEL_FORMATS[model_format]),
                             "model file")
    if given_name is not None and given_name != model_name:
        raise ArtifactError(f"{folder / given_name}: not the {label} model of this artifact "
                            f"({MANIFEST_NAME} names {model_name})")
    return model_format, model_name


def load_artifact(path: str | os.PathLike[str], check_golden: bool = False,
                  model_format: str | None = None) -> ArtifactSpec:
    """Read and verify an artifact folder (or its model file / manifest.json).

    The model file's size and sha256 are always checked; golden.npz only when
    ``check_golden`` (the self-check reads it). ``model_format`` ("onnx" | "torchscript" | "pt2")
    picks the model file; None means the one given as ``path`` (model.ts: TorchScript),
    else ONNX. Any problem is an ArtifactError whose one line names the file.
    """
    folder, given_name = _resolve(Path(path))
    manifest_path = folder / MANIFEST_NAME
    manifest = _read_manifest(manifest_path)
    model_format, model_name = _model_entry(manifest, manifest_path, folder, given_name,
                                            model_format)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise _fail(manifest_path, "has no \"files\" table of sha256 hashes")
    model_sha = verify_file(folder, model_name, files, manifest_path)

    model = manifest.get("model") or {}
    patch_size = _int(manifest_path, model.get("patch_size"), "model.patch_size")
    gridsize = _int(manifest_path, model.get("gridsize"), "model.gridsize")
    inputs = manifest.get("inputs") or []
    if not inputs or not isinstance(inputs[0], dict):
        raise _fail(manifest_path, "has no \"inputs\" entry")
    input_name = inputs[0].get("name")
    shape = inputs[0].get("shape")
    if not isinstance(input_name, str) or not isinstance(shape, list) or len(shape) != 4:
        raise _fail(manifest_path, f"input {input_name!r} has shape {shape!r}; expected "
                    "[batch, C, N, N]")
    channels = _int(manifest_path, shape[1], "input channel count")
    if channels != gridsize * gridsize:
        raise _fail(manifest_path, f"input has {channels} channels but gridsize {gridsize} "
                    f"means {gridsize * gridsize}")
    if shape[2] != patch_size or shape[3] != patch_size:
        raise _fail(manifest_path, f"input shape {shape} disagrees with patch_size {patch_size}")
    batch = None if isinstance(shape[0], str) else _int(manifest_path, shape[0], "batch size")
    outputs = manifest.get("outputs") or []
    output_names = tuple(o.get("name") for o in outputs if isinstance(o, dict))
    if not output_names or not all(isinstance(n, str) for n in output_names):
        raise _fail(manifest_path, "has no named \"outputs\"")
    if "amplitude" not in output_names or "phase" not in output_names:
        raise _fail(manifest_path, f"outputs {list(output_names)} lack amplitude and phase")

    precision = str(manifest.get("precision", "fp32"))
    tolerances = dict(DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["fp32"]))
    raw_tol = manifest.get("tolerances") or {}
    if not isinstance(raw_tol, dict):
        raise _fail(manifest_path, "\"tolerances\" is not a table")
    tolerances.update({str(k): float(v) for k, v in raw_tol.items()})

    golden = manifest.get("golden") or {}
    golden_path = None
    if isinstance(golden, dict) and golden.get("file"):
        golden_path = folder / _plain_name(manifest_path, golden["file"], "golden file")
    if check_golden:
        if golden_path is None:
            raise _fail(manifest_path, "lists no golden file; the self-check needs golden.npz")
        verify_file(folder, golden_path.name, files, manifest_path)

    return ArtifactSpec(
        folder=folder, manifest_path=manifest_path, model_path=folder / model_name,
        model_sha256=model_sha, patch_size=patch_size, gridsize=gridsize, channels=channels,
        input_name=input_name, input_shape=tuple(shape), output_names=output_names,
        batch=batch, tolerances=tolerances, golden_path=golden_path,
        golden_input=str(golden.get("input", input_name)) if isinstance(golden, dict)
        else input_name,
        golden_outputs=tuple(golden.get("outputs", output_names)) if isinstance(golden, dict)
        else output_names,
        precision=precision, manifest=manifest, model_format=model_format)


def is_export_folder(folder: Path) -> bool:
    """Written by ptycho-export: its manifest says so, or it is a failure report of ours."""
    folder = Path(folder)
    if (folder / "parity_failure.json").is_file():
        return True
    try:
        return json.loads((folder / MANIFEST_NAME).read_text()).get("format") == MANIFEST_FORMAT
    except (OSError, ValueError, AttributeError):
        return False
