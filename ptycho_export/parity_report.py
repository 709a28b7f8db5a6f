"""ptycho-parity: every exported artifact against the eager model on a real scan.

The export gate checks a handful of patterns; this check runs a whole scan (every group,
batched) through the bundle's eager model and through each artifact of an export folder,
on every device this machine has, and compares at two levels:

1. per patch, with the export gate's metrics (`runtime.compare`) and the manifest's
   tolerances;
2. on the stitched object, stitched exactly as the eager path does
   (`reconstruct.stitch_with_probe`): amplitude and phase error maps on the well-lit mask,
   PSNR, and the gated number, max |candidate - reference| relative to max |reference
   object| with no alignment (two runtimes must agree pixel for pixel); the same number
   after removing the global complex factor (`runtime.metrics.align_to_reference`) is
   reported beside it.

Reference rows: eager float32 on the CPU is the gated reference; eager float64 is the
exact one (informational: how much of any error is plain float32 arithmetic). With CUDA,
each torch runner (eager, TorchScript, .pt2) and onnxruntime also run there with TF32 off
(gated, CUDA vs CPU) and the torch ones once more with TF32 on (informational); without
CUDA those rows are reported as skipped, never left out.

Outputs: `parity.json` (every number), `parity_errors.png` (error maps of the worst
artifact), each written atomically; `run_parity_check` returns the same report and
`raise_for_status` turns a failed one into a ParityError (exit 5).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from runtime.atomic import write_atomic
from runtime.compare import DEFAULT_TOLERANCES, OutputStats, compare_outputs, tolerance_failures
from runtime.errors import ArtifactError, DataError, EnvironmentProblem, ParityError, PtychoError
from runtime.images import (
    UNVISITED_RGB,
    amplitude_rgb,
    phase_rgb,
    save_comparison_png,
    upscale_nearest,
)
from runtime.metrics import align_to_reference, reconstruction_errors

REPORT_JSON = "parity.json"
REPORT_PNG = "parity_errors.png"
REPORT_FORMAT = "ptycho-parity-report"
DEFAULT_BATCH = 256
# Stitched object: max |candidate - reference| / max |reference| on the well-lit mask (raw;
# the value after global-phase alignment is reported beside it).
OBJECT_TOLERANCE_KEY = "object_complex_rel_max"
DEFAULT_OBJECT_TOLERANCES: dict[str, float] = {"fp32": 1e-5}
# Artifact formats that map diffraction -> (amplitude, phase); others are listed, not run.
MODEL_FORMATS = ("onnx", "torchscript", "pt2")
REFERENCE = "eager fp32 cpu"
EXACT = "eager fp64 cpu"
KIND_TITLES = {
    "export": "artifacts vs eager fp32 cpu (gated)",
    "device": "CUDA vs CPU, same runner (TF32 off: gated; TF32 on: informational)",
    "exact": "vs eager fp64 cpu (exact reference, informational)",
}
PASS, FAIL, INFO, SKIPPED = "PASS", "FAIL", "info", "skipped"

Log = Callable[[str], None]


# ---------------------------------------------------------------- artifact folder
@dataclass
class VerifiedArtifacts:
    folder: Path
    manifest: dict[str, Any]
    files: dict[str, Path]  # format -> verified model file
    sha256: dict[str, str]  # file name -> sha256 (checked against manifest "files")
    not_compared: dict[str, str]  # manifest artifact key -> why it is not run here
    tolerances: dict[str, float]
    precision: str
    batch: int | None  # fixed batch of the artifacts, None when dynamic


NOT_READABLE: Any = object()  # this format keeps no metadata we can read without loading it
TORCHSCRIPT_METADATA = "extra/ptycho_export.json"


def embedded_metadata(kind: str, path: Path) -> dict[str, str] | None | Any:
    """The metadata ptycho-export embeds in a model file, read without running or
    unpickling anything: ONNX metadata_props (via the onnx package), TorchScript's
    ``extra/ptycho_export.json`` (straight from the zip). None when the file has none,
    NOT_READABLE for .pt2 (none is written) or without the onnx package."""
    if kind == "torchscript":
        import zipfile
        import zlib

        try:
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist()
                         if n.count("/") == 2 and n.endswith("/" + TORCHSCRIPT_METADATA)]
                if len(names) != 1 or archive.getinfo(names[0]).file_size > 1 << 20:
                    return None
                values = json.loads(archive.read(names[0]))
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError,
                NotImplementedError, zlib.error):
            return None
        return {str(k): str(v) for k, v in values.items()} if isinstance(values, dict) else None
    if kind == "onnx":
        try:
            import onnx
        except ImportError:
            return NOT_READABLE
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception:  # noqa: BLE001 - protobuf decode errors share no base class
            return None
        return {entry.key: entry.value for entry in model.metadata_props}
    return NOT_READABLE


def _plain(manifest_path: Path, name: Any) -> str:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name \
            or "\\" in name:
        raise ArtifactError(f"{manifest_path}: artifact file {name!r} is not a plain file name")
    return name


def verify_artifacts(artifact_dir: str | os.PathLike, bundle_path: str | os.PathLike,
                     bundle_config: dict[str, Any] | None = None) -> VerifiedArtifacts:
    """Manifest + sha256 of every model file, and proof that the export came from this
    bundle (manifest source_bundle sha256 == the bundle file's sha256; for a --model-class
    export the checkpoint's sha256 is checked when the model is rebuilt). ArtifactError
    (exit 3) otherwise, naming the file."""
    from runtime.manifest import (
        MANIFEST_NAME,
        _read_manifest,
        check_provenance,
        load_artifact,
        sha256_file,
        verify_file,
    )

    folder = Path(artifact_dir)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: not a folder; give the artifact folder that "
                            "ptycho-export wrote (it holds manifest.json)")
    manifest_path = folder / MANIFEST_NAME
    manifest = _read_manifest(manifest_path)
    artifacts = manifest.get("artifacts")
    files = manifest.get("files")
    if not isinstance(artifacts, dict) or not isinstance(files, dict):
        raise ArtifactError(f"{manifest_path}: has no \"artifacts\" / \"files\" tables")
    precision = str(manifest.get("precision", "fp32"))
    if "onnx" in artifacts:
        spec = load_artifact(folder)  # the runtime's own checks of the ONNX model + manifest
        tolerances = dict(spec.tolerances)
        batch = spec.batch
    else:
        tolerances = dict(DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["fp32"]))
        raw = manifest.get("tolerances") or {}
        if not isinstance(raw, dict):
            raise ArtifactError(f"{manifest_path}: \"tolerances\" is not a table")
        tolerances.update({str(k): float(v) for k, v in raw.items()})
        shape = ((manifest.get("inputs") or [{}])[0] or {}).get("shape") or ["batch"]
        batch = shape[0] if isinstance(shape[0], int) and not isinstance(shape[0], bool) \
            else None

    found: dict[str, Path] = {}
    digests: dict[str, str] = {}
    not_compared: dict[str, str] = {}
    for key, facts in artifacts.items():
        if key not in MODEL_FORMATS:
            not_compared[key] = ("physics graph (object -> diffraction), gated at export"
                                 if key == "physics" else "not a diffraction -> object model")
            continue
        if not isinstance(facts, dict):
            raise ArtifactError(f"{manifest_path}: artifacts.{key} is not a table")
        name = _plain(manifest_path, facts.get("file"))
        digests[name] = verify_file(folder, name, files, manifest_path)
        found[key] = folder / name
    if not found:
        raise ArtifactError(f"{manifest_path}: lists no model artifact "
                            f"({', '.join(MODEL_FORMATS)}); nothing to compare")

    source = manifest.get("source_bundle")
    recorded = source.get("sha256") if isinstance(source, dict) else None
    if is_foreign(manifest):
        pass  # rebuild_reference checks the checkpoint against source.checkpoint.sha256
    elif not isinstance(recorded, str):
        raise ArtifactError(f"{manifest_path}: records no source_bundle sha256, so it cannot "
                            "be tied to a bundle; re-export it with ptycho-export")
    actual = sha256_file(bundle_path)
    if not is_foreign(manifest) and recorded != actual:
        origin = source.get("file", "another bundle")
        raise ArtifactError(f"{folder} was exported from {origin} (sha256 {recorded[:12]}...), "
                            f"not from {bundle_path} (sha256 {actual[:12]}...); pass the "
                            "bundle it came from, or re-export this one")
    if not is_foreign(manifest) and bundle_config is not None and \
            manifest.get("model") != bundle_config:
        raise ArtifactError(f"{manifest_path}: \"model\" {manifest.get('model')} differs from "
                            f"the bundle's config {bundle_config} (manifest edited?)")
    for key, path in found.items():
        metadata = embedded_metadata(key, path)
        if metadata is not NOT_READABLE:
            check_provenance(path, metadata, manifest, manifest_path)
    return VerifiedArtifacts(folder=folder, manifest=manifest, files=found, sha256=digests,
                             not_compared=not_compared, tolerances=tolerances,
                             precision=precision, batch=batch)


def is_foreign(manifest: dict[str, Any]) -> bool:
    """Exported with --model-class (a checkpoint, not a bundle, is its source)."""
    source = manifest.get("source")
    return isinstance(source, dict) and source.get("kind") == "module"


@dataclass
class Reference:
    """The eager model an export is compared with, and the geometry it needs."""

    wrapper: Any
    patch_size: int
    gridsize: int
    channels: int
    origin: str  # what it was rebuilt from, for the log


def load_reference(source_path: Path, artifact_dir: Path) -> tuple[Reference, VerifiedArtifacts]:
    """The bundle's model, or for a --model-class export the module rebuilt from the
    manifest and its checkpoint (`source_path`)."""
    from runtime.manifest import MANIFEST_NAME, _read_manifest

    manifest_path = Path(artifact_dir) / MANIFEST_NAME
    manifest = _read_manifest(manifest_path) if manifest_path.is_file() else {}
    if is_foreign(manifest):
        from ptycho_export.export.foreign import rebuild_reference

        artifacts = verify_artifacts(artifact_dir, source_path)
        model = manifest.get("model") or {}
        channels = int(model.get("channels") or 0)
        gridsize = model.get("gridsize")
        if not gridsize:
            raise ArtifactError(f"{manifest_path}: {channels} input channels is not "
                                "gridsize**2; ptycho-parity cannot group patterns for it")
        wrapper = rebuild_reference(artifact_dir, manifest, source_path)
        return Reference(wrapper, int(model["patch_size"]), int(gridsize), channels,
                         f"{manifest['source'].get('class')} + {source_path.name}"), artifacts
    from ptycho_export.bundle import build_net, read_bundle
    from ptycho_export.export.wrapper import InferenceWrapper

    bundle = read_bundle(source_path)
    config = bundle.config
    artifacts = verify_artifacts(artifact_dir, source_path, config.to_dict())
    return Reference(InferenceWrapper(build_net(bundle)).eval(), config.patch_size,
                     config.gridsize, config.channels, source_path.name), artifacts


# ---------------------------------------------------------------- runners
@dataclass(frozen=True)
class Variant:
    """One runner to build: an artifact format (or eager) on one device."""

    family: str  # eager | onnx | torchscript | pt2
    device: str  # cpu | cuda
    tf32: bool = False
    skip: str | None = None  # why it cannot run on this machine

    @property
    def label(self) -> str:
        base = {"eager": "eager fp32", "onnx": "onnxruntime"}.get(self.family, self.family)
        return f"{base} {self.device}" + (" (tf32)" if self.tf32 else "")


def plan_variants(formats: list[str], cuda_reason: str | None, ort_cuda_reason: str | None
                  ) -> list[Variant]:
    """Every runner in run order: per family CPU first (the CUDA rows compare with it).

    `cuda_reason` / `ort_cuda_reason`: None when torch / onnxruntime can use CUDA here,
    else why not (the CUDA variants are then kept, marked skipped)."""
    variants = [Variant("eager", "cuda", False, cuda_reason),
                Variant("eager", "cuda", True, cuda_reason)]
    for family in (f for f in MODEL_FORMATS if f in formats):
        variants.append(Variant(family, "cpu"))
        if family == "onnx":
            variants.append(Variant(family, "cuda", False, ort_cuda_reason))
        else:
            variants += [Variant(family, "cuda", False, cuda_reason),
                         Variant(family, "cuda", True, cuda_reason)]
    return variants


def _ort_cuda_reason() -> str | None:
    try:
        from runtime.session import available_providers

        providers = available_providers()
    except EnvironmentProblem as err:
        return str(err)
    if "CUDAExecutionProvider" not in providers:
        return f"no CUDA in onnxruntime (providers: {', '.join(providers)})"
    return None


def build_runner(variant: Variant, wrapper: Any, files: dict[str, Path]) -> Any:
    """A runner (runtime.runner protocol) for one variant (CUDA onnxruntime through the runtime's
    `create_session`, which refuses a silent CPU fallback and keeps TF32 off)."""
    from ptycho_export.export.wrapper import INPUT_NAME, OUTPUT_NAMES
    from ptycho_export.parity import eager_runner, pt2_runner_on, torchscript_runner
    from runtime.runner import OrtRunner

    label = variant.label
    if variant.family == "eager":
        runner = eager_runner(wrapper, (INPUT_NAME,), OUTPUT_NAMES, device=variant.device)
    elif variant.family == "onnx":
        from runtime.session import create_session

        session, _ = create_session(files["onnx"], variant.device)
        runner = OrtRunner(label, session=session)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            if variant.family == "torchscript":
                runner = torchscript_runner(files["torchscript"], (INPUT_NAME,), OUTPUT_NAMES,
                                            variant.device)
            else:
                runner = pt2_runner_on(files["pt2"], (INPUT_NAME,), OUTPUT_NAMES,
                                       variant.device)
    runner.name = label
    return runner


def infer_groups(runner: Any, amplitudes: np.ndarray, groups: np.ndarray, input_name: str,
                 batch: int, fixed: bool) -> dict[str, np.ndarray]:
    """All groups through one runner, `batch` at a time (a fixed-batch artifact gets its
    last batch padded with repeats, trimmed again afterwards)."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(groups), batch):
        x = np.ascontiguousarray(amplitudes[groups[start:start + batch]], dtype=np.float32)
        n = len(x)
        if fixed and n < batch:
            x = np.concatenate([x, np.repeat(x[-1:], batch - n, axis=0)])
        for name, value in runner.infer({input_name: x}).items():
            parts.setdefault(name, []).append(np.asarray(value)[:n])
    try:
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}
    except ValueError as err:
        raise ArtifactError(f"{runner.name}: output shapes differ between batches "
                            f"({err})") from None


# ---------------------------------------------------------------- comparisons
@dataclass
class CheckRow:
    """One runner x reference x level: its worst numbers and verdict."""

    runner: str
    reference: str
    kind: str  # export | device | exact
    level: str  # patch | object | "-" (skipped: neither level ran)
    gated: bool
    status: str  # PASS | FAIL | info | skipped
    metrics: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    worst_ratio: float = 0.0  # max value / limit over the gated numbers
    worst_output: str = ""
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"runner": self.runner, "reference": self.reference, "kind": self.kind,
                "level": self.level, "gated": self.gated, "status": self.status,
                "metrics": self.metrics, "failures": self.failures,
                "worst_ratio": self.worst_ratio, "worst_output": self.worst_output,
                "note": self.note}


def _ratio(value: float | None, limit: float) -> float:
    if value is None or not math.isfinite(value):
        return math.inf
    if limit <= 0:
        return math.inf if value > 0 else 0.0
    return value / limit


def patch_ratios(stats: dict[str, OutputStats], tolerances: dict[str, float]
                 ) -> dict[str, float]:
    """value / limit per output, with the same limits as `tolerance_failures` (inf for a
    wrong shape or dtype, or any NaN/Inf)."""
    ratios = {}
    for name, s in stats.items():
        if not s.shape_ok or not s.dtype_ok or s.nan_count or s.inf_count:
            ratios[name] = math.inf
        elif name == "phase":
            value = s.weighted_max if s.weighted_max is not None else s.max_abs
            ratios[name] = _ratio(value, tolerances.get("phase_weighted_max_rad", 1e-4))
        else:
            ratios[name] = _ratio(s.rel_max, tolerances.get(f"{name}_rel_max", 1e-5))
    return ratios


def patch_row(runner: str, reference: str, kind: str, gated: bool,
              expected: dict[str, np.ndarray], produced: dict[str, np.ndarray],
              tolerances: dict[str, float], note: str = "") -> CheckRow:
    stats = compare_outputs(expected, produced)
    metrics: dict[str, Any] = {"outputs": {k: v.to_dict() for k, v in stats.items()}}
    if "amplitude" in stats:
        metrics["amplitude_rel_max"] = stats["amplitude"].rel_max
    if "phase" in stats:
        phase = stats["phase"]
        metrics["phase_weighted_max_rad"] = phase.weighted_max
        metrics["phase_max_rad"] = phase.max_abs
    metrics["nan_count"] = sum(s.nan_count for s in stats.values())
    metrics["inf_count"] = sum(s.inf_count for s in stats.values())
    row = CheckRow(runner, reference, kind, "patch", gated, INFO, metrics, note=note)
    if gated:
        ratios = patch_ratios(stats, tolerances)
        row.worst_output = max(ratios, key=lambda k: ratios[k]) if ratios else ""
        row.worst_ratio = ratios.get(row.worst_output, 0.0)
        row.failures = tolerance_failures(stats, tolerances)
        row.status = FAIL if row.failures else PASS
    return row


def object_errors(candidate: np.ndarray, reference: np.ndarray, mask: np.ndarray
                  ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Numbers and error maps of a stitched object against a reference on `mask`.

    Maps (float64, NaN outside the mask): |amplitude difference| and |wrapped phase
    difference| (rad), both raw (no alignment): parity means the same pixels.
    """
    from runtime.compare import wrap_phase

    # Aligned in the objects' own precision (complex64): an identical object then stays
    # bit-identical (error 0, PSNR inf) instead of picking up the fitted factor's rounding.
    cand = np.asarray(candidate)
    ref = np.asarray(reference)
    if cand.shape != ref.shape:
        raise DataError(f"stitched objects differ in shape: {cand.shape} vs {ref.shape}")
    sel = np.asarray(mask, dtype=bool)
    ref_amp = np.abs(ref.astype(np.complex128))
    scale = float(ref_amp[sel].max()) if sel.any() else 0.0
    nonfinite = int((~np.isfinite(cand[sel])).sum())

    amp_map = np.full(ref.shape, np.nan)
    amp_map[sel] = np.abs(np.abs(cand[sel].astype(np.complex128)) - ref_amp[sel])
    phase_map = np.full(ref.shape, np.nan)
    phase_map[sel] = np.abs(wrap_phase(np.angle(cand[sel].astype(np.complex128))
                                       - np.angle(ref[sel].astype(np.complex128))))

    def worst(values: np.ndarray) -> float:
        values = np.where(np.isfinite(values), values, np.inf)
        return float(values.max()) if values.size else 0.0

    def rel(value: float) -> float:
        return value / scale if scale > 0 else value

    ref128 = ref[sel].astype(np.complex128)
    raw = worst(np.abs(cand[sel].astype(np.complex128) - ref128))
    weight = ref_amp[sel] / scale if scale > 0 else np.ones(int(sel.sum()))
    with np.errstate(invalid="ignore", over="ignore"):  # NaN candidates: reported, not warned
        aligned = align_to_reference(cand, ref, sel)
        aligned_max = worst(np.abs(aligned[sel].astype(np.complex128) - ref128))
        quality = reconstruction_errors(cand, ref, sel)
    metrics = {
        "pixels": int(sel.sum()),
        "reference_max_abs": scale,
        "nonfinite_pixels": nonfinite,
        "amplitude_max_abs": worst(amp_map[sel]),
        "amplitude_rel_max": rel(worst(amp_map[sel])),
        "phase_max_rad": worst(phase_map[sel]),
        "phase_weighted_max_rad": worst(phase_map[sel] * weight),
        "complex_max_abs": raw,
        "complex_rel_max_unaligned": rel(raw),
        "complex_max_abs_aligned": aligned_max,
        "complex_rel_max": rel(aligned_max),  # information; the raw one is gated
        "amplitude_psnr_db": quality["amplitude_psnr_db"],
        "amplitude_rmse": quality["amplitude_rmse"],
        "phase_rmse_rad": quality["phase_rmse_rad"],
        "complex_nrmse": quality["complex_nrmse"],
    }
    return metrics, {"amplitude": amp_map, "phase": phase_map}


def object_row(runner: str, reference: str, kind: str, gated: bool, metrics: dict[str, Any],
               limit: float, note: str = "") -> CheckRow:
    row = CheckRow(runner, reference, kind, "object", gated, INFO, metrics, note=note)
    if not gated:
        return row
    # Two runtimes on the same scan must agree pixel for pixel: gate on the raw difference.
    # The aligned number (global phase/scale removed) is kept as information.
    value = metrics["complex_rel_max_unaligned"]
    row.worst_ratio = math.inf if metrics["nonfinite_pixels"] else _ratio(value, limit)
    amp, phase = metrics["amplitude_rel_max"], metrics["phase_weighted_max_rad"]
    row.worst_output = "amplitude" if not amp < phase else "phase"
    if metrics["nonfinite_pixels"]:
        row.failures.append(f"stitched object: {metrics['nonfinite_pixels']} NaN/Inf pixels "
                            "on the well-lit mask")
    elif row.worst_ratio > 1.0:
        row.failures.append(
            f"stitched object (mostly {row.worst_output}): max |error| {value:.3g} of "
            f"max|object| > {limit:.3g} (after global-phase alignment "
            f"{metrics['complex_rel_max']:.3g}; amplitude {amp:.3g} of max, weighted phase "
            f"{phase:.3g} rad)")
    row.status = FAIL if row.failures else PASS
    return row


def skipped_row(runner: str, reference: str, kind: str, gated: bool, reason: str
                ) -> CheckRow:
    return CheckRow(runner, reference, kind, "-", gated, SKIPPED, note=reason)


# ---------------------------------------------------------------- picture
# White (no error) through yellow and orange to dark red (the map's own max): readable in
# print, and zero never looks like UNVISITED_RGB (dark blue-grey) outside the mask.
_ERROR_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_ERROR_RGB = np.array([(255, 255, 255), (254, 227, 145), (254, 153, 41), (217, 72, 1),
                       (103, 0, 13)], dtype=np.float64)
ERROR_LUT = np.stack([np.interp(np.linspace(0, 1, 256), _ERROR_STOPS, _ERROR_RGB[:, c])
                      for c in range(3)], axis=1).round().astype(np.uint8)


def error_rgb(error: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float]:
    """(H, W, 3) uint8 of a non-negative error map scaled by its own max (returned), so the
    largest error is always the darkest red; UNVISITED_RGB outside the mask."""
    error = np.asarray(error, dtype=np.float64)
    valid = np.asarray(mask, dtype=bool) & np.isfinite(error)
    top = float(error[valid].max()) if valid.any() else 0.0
    rgb = np.empty((*error.shape, 3), dtype=np.uint8)
    rgb[...] = UNVISITED_RGB
    scaled = error[valid] / top if top > 0 else np.zeros(int(valid.sum()))
    rgb[valid] = ERROR_LUT[np.clip(np.rint(scaled * 255), 0, 255).astype(np.int64)]
    bad = np.asarray(mask, dtype=bool) & ~np.isfinite(error)
    rgb[bad] = (0, 0, 0)  # NaN/Inf where the mask says there should be a value
    return rgb, top


def colour_bar(height: int, width: int = 80) -> np.ndarray:
    ramp = np.linspace(255, 0, max(height, 2)).round().astype(np.int64)
    return np.repeat(ERROR_LUT[ramp][:, None, :], width, axis=1)


def save_error_png(path: Path, reference: np.ndarray, maps: dict[str, np.ndarray],
                   mask: np.ndarray, runner: str, upscale_to: int = 256) -> dict[str, float]:
    """Eager amplitude and phase (for orientation), then the worst runner's amplitude and
    phase error maps, each normalised by its own max (printed in its title)."""
    amp_rgb, amp_max = error_rgb(maps["amplitude"], mask)
    phase_rgb_, phase_max = error_rgb(maps["phase"], mask)

    def big(rgb: np.ndarray) -> np.ndarray:
        return upscale_nearest(rgb, upscale_to)

    panels = [
        (f"{REFERENCE}\namplitude", big(amplitude_rgb(np.abs(reference), mask))),
        (f"{REFERENCE}\nphase (rad)", big(phase_rgb(np.angle(reference), mask))),
        (f"|amplitude error|\n{runner}\nmax {amp_max:.2e}", big(amp_rgb)),
        (f"|phase error| (rad)\n{runner}\nmax {phase_max:.2e}", big(phase_rgb_)),
    ]
    panels.append(("colour scale\ntop: panel max\nbottom: 0", colour_bar(panels[-1][1].shape[0])))
    save_comparison_png(path, panels)
    return {"amplitude_error_max": amp_max, "phase_error_max_rad": phase_max}


# ---------------------------------------------------------------- output
def _json_safe(value: Any) -> Any:
    """Strict JSON: non-finite floats become "inf" / "-inf" / "nan" strings."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Path):
        return str(value)
    return value


def write_json_atomic(path: Path, payload: Any) -> Path:
    text = json.dumps(_json_safe(payload), indent=2, sort_keys=True, allow_nan=False) + "\n"
    with write_atomic(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def default_outdir(artifact_dir: Path) -> Path:
    folder = Path(artifact_dir).resolve()  # "." has no name of its own
    return folder.parent / f"{folder.name}_parity"


def _environment() -> dict[str, Any]:
    import torch

    from ptycho_export.export.pipeline import versions

    env: dict[str, Any] = {"versions": versions(), "cuda_available": torch.cuda.is_available()}
    if env["cuda_available"]:
        env["cuda_device"] = torch.cuda.get_device_name(0)
        env["torch_cuda"] = torch.version.cuda
    with contextlib.suppress(PtychoError, ImportError):
        from runtime.session import available_providers

        env["onnxruntime_providers"] = available_providers()
    return env


# ---------------------------------------------------------------- the check
def run_parity_check(bundle: str | os.PathLike, artifact_dir: str | os.PathLike,
                     data: str | os.PathLike, outdir: str | os.PathLike | None = None, *,
                     batch_size: int = DEFAULT_BATCH,
                     tolerances: dict[str, float] | None = None,
                     object_tol: float | None = None, cuda: bool = True,
                     log: Log | None = None) -> dict[str, Any]:
    """Run the whole check, write parity.json + parity_errors.png, return the report.

    `tolerances` override the manifest's per-patch ones (keys as in runtime.compare),
    `object_tol` the stitched-object one; `cuda=False` skips the CUDA runners (default:
    each runs where torch / onnxruntime sees CUDA). A
    failed comparison does not raise here: pass the report to `raise_for_status`.
    """
    import torch

    from ptycho_export.bundle import sha256_file
    from ptycho_export.export.wrapper import INPUT_NAME, OUTPUT_NAMES
    from ptycho_export.parity import eager_runner, tf32_mode
    from ptycho_export.reconstruct import patch_per_position, stitch_with_probe
    from runtime.grouping import group_neighbours, group_offsets
    from runtime.physics_check import OutputChecker
    from runtime.scan import load_scan

    log = log or (lambda message: None)
    started = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    from runtime.compare import check_tolerances

    check_tolerances(dict(tolerances or {}) | (
        {OBJECT_TOLERANCE_KEY: object_tol} if object_tol is not None else {}))
    bundle_path, data_path = Path(bundle), Path(data)
    artifact_dir = Path(artifact_dir)
    outdir = Path(outdir) if outdir is not None else default_outdir(artifact_dir)

    config, artifacts = load_reference(bundle_path, artifact_dir)
    log(f"artifacts: {', '.join(p.name for p in artifacts.files.values())} in {artifact_dir} "
        f"(sha256 verified; exported from {config.origin})")
    scan = load_scan(data_path)
    if scan.patch_size != config.patch_size:
        raise DataError(f"{data_path}: patterns are {scan.patch_size}x{scan.patch_size} but "
                        f"the model expects {config.patch_size}x{config.patch_size}")
    if scan.n_patterns < config.channels:
        raise DataError(f"{data_path}: {scan.n_patterns} pattern(s), but gridsize "
                        f"{config.gridsize} groups {config.channels} neighbours per sample")

    patch_tol = dict(artifacts.tolerances) | dict(tolerances or {})
    limit = object_tol if object_tol is not None else float(artifacts.tolerances.get(
        OBJECT_TOLERANCE_KEY, DEFAULT_OBJECT_TOLERANCES.get(artifacts.precision, 1e-5)))
    from runtime.compare import loosened

    looser = loosened(dict(tolerances or {}), dict(artifacts.tolerances)) | loosened(
        {OBJECT_TOLERANCE_KEY: limit} if object_tol is not None else {},
        {OBJECT_TOLERANCE_KEY: DEFAULT_OBJECT_TOLERANCES.get(artifacts.precision, 1e-5)})
    for key, facts in looser.items():
        log(f"warning: tolerance {key} loosened to {facts['limit']:g} (the artifact's "
            f"{facts['default']:g}); recorded in parity.json")
    fixed = artifacts.batch is not None
    batch = artifacts.batch if fixed else batch_size
    groups = group_neighbours(scan.positions_px, config.gridsize)
    log(f"scan: {scan.n_patterns} patterns, {len(groups)} groups of {config.channels}, "
        f"batch {batch}{' (fixed by the artifact)' if fixed else ''}")

    # torch and onnxruntime find CUDA independently (a CPU torch next to onnxruntime-gpu
    # still checks the ONNX model on CUDA, and the other way round).
    off = None if cuda else "CUDA turned off by the caller"
    cuda_reason = off or (None if torch.cuda.is_available()
                          else "no CUDA (torch.cuda.is_available() is False)")
    ort_reason = off or (_ort_cuda_reason() if "onnx" in artifacts.files else None)
    variants = plan_variants(list(artifacts.files), cuda_reason, ort_reason)

    wrapper = config.wrapper
    runners_info: list[dict[str, Any]] = []
    rows: list[CheckRow] = []

    checker = OutputChecker.open(artifact_dir)
    anchors = scan.positions_px[groups[:, 0]]
    anchor_amplitudes = scan.amplitudes[groups[:, :1]] if checker.physics else None
    offsets = group_offsets(scan.positions_px, groups) if config.channels > 1 else None

    def residual(outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        """Each runner's patches against the measurements (the artifact's physics graph):
        a parity figure that needs no eager model."""
        section = checker.check(anchor_amplitudes, outputs["amplitude"], outputs["phase"],
                                scan.probe, offsets, anchors)
        section.pop("outlier_patterns", None)  # ptycho-run's report lists them
        return section

    def run(runner: Any, label: str, tf32: bool = False) -> tuple[dict[str, np.ndarray], Any]:
        t0 = time.perf_counter()
        with tf32_mode(tf32), torch.inference_mode():
            outputs = infer_groups(runner, scan.amplitudes, groups, INPUT_NAME, batch, fixed)
        seconds = time.perf_counter() - t0
        recon = None
        if {"amplitude", "phase"} <= set(outputs) and outputs["amplitude"].shape == \
                outputs["phase"].shape and outputs["amplitude"].ndim == 4:
            recon = stitch_with_probe(
                patch_per_position(outputs["amplitude"], outputs["phase"]), scan)
        info = {"runner": label, "status": "ran", "seconds": seconds,
                "groups_per_s": len(groups) / seconds if seconds > 0 else None}
        if recon is not None:
            info["consistency"] = residual(outputs)
        runners_info.append(info)
        log(f"ran {label}: {len(groups)} groups in {seconds:.2f} s")
        return outputs, recon

    reference_out, reference_recon = run(eager_runner(wrapper, (INPUT_NAME,), OUTPUT_NAMES),
                                         REFERENCE)
    if reference_recon is None:
        raise ArtifactError("the eager model's outputs cannot be stitched")
    mask = reference_recon.well_lit
    reference_obj = reference_recon.stitched.obj
    exact_raw, _ = run(eager_runner(wrapper, (INPUT_NAME,), OUTPUT_NAMES,
                                    dtype=torch.float64), EXACT)
    exact_out = {k: v.astype(np.float32) for k, v in exact_raw.items()}
    exact_obj = stitch_with_probe(
        patch_per_position(exact_out["amplitude"], exact_out["phase"]), scan).stitched.obj
    del exact_raw

    maps_vs_reference: dict[str, dict[str, np.ndarray]] = {}

    def compare(label: str, outputs: dict[str, np.ndarray], recon: Any, against: str,
                expected: dict[str, np.ndarray], expected_obj: np.ndarray, kind: str,
                gated: bool, note: str = "") -> None:
        rows.append(patch_row(label, against, kind, gated, expected, outputs, patch_tol, note))
        if recon is None:
            rows.append(CheckRow(label, against, kind, "object", gated, FAIL if gated else INFO,
                                 failures=["stitched object: outputs are not amplitude and "
                                           "phase of the expected shape"] if gated else [],
                                 worst_ratio=math.inf if gated else 0.0,
                                 worst_output="object", note=note))
            return
        metrics, maps = object_errors(recon.stitched.obj, expected_obj, mask)
        rows.append(object_row(label, against, kind, gated, metrics, limit, note))
        if kind == "export":
            maps_vs_reference[label] = maps

    compare(REFERENCE, reference_out, reference_recon, EXACT, exact_out, exact_obj, "exact",
            False)
    cpu_outputs: dict[str, tuple[dict[str, np.ndarray], np.ndarray]] = {
        "eager": (reference_out, reference_obj)}
    for variant in variants:
        label = variant.label
        cpu_label = Variant(variant.family, "cpu").label
        comparisons = []  # (reference label, kind, gated, note)
        if variant.family != "eager" and not variant.tf32:
            comparisons.append((REFERENCE, "export", True, ""))
        if variant.device == "cuda":
            note = "TF32 on" if variant.tf32 else "TF32 off"
            comparisons.append((cpu_label, "device", not variant.tf32, note))
        if not variant.tf32:
            comparisons.append((EXACT, "exact", False, ""))
        skip = variant.skip
        if skip is None and variant.device == "cuda" and variant.family not in cpu_outputs:
            skip = f"{cpu_label} did not run"
        runner = None
        if skip is None:
            try:
                runner = build_runner(variant, wrapper, artifacts.files)
            except EnvironmentProblem as err:
                if variant.device == "cpu":
                    raise
                skip = str(err)
            except PtychoError:
                raise
            except Exception as err:  # torch.jit / torch.export load errors share no base
                if variant.device == "cuda":
                    skip = f"could not load on CUDA: {' '.join(str(err).split())[:200]}"
                else:
                    path = artifacts.files[variant.family]
                    raise ArtifactError(f"{path}: cannot be loaded ({type(err).__name__}: "
                                        f"{' '.join(str(err).split())[:200]})") from err
        if runner is None:
            runners_info.append({"runner": label, "status": SKIPPED, "reason": skip})
            log(f"skipped {label}: {skip}")
            for against, kind, gated, _ in comparisons:
                if kind != "exact":  # informational; the runner list records the skip
                    rows.append(skipped_row(label, against, kind, gated, skip or ""))
            continue
        try:
            outputs, recon = run(runner, label, variant.tf32)
        except PtychoError:
            raise
        except Exception as err:  # the artifact loads but does not run here: a failed check
            reason = f"inference raised {type(err).__name__}: {' '.join(str(err).split())[:200]}"
            runners_info.append({"runner": label, "status": "error", "reason": reason})
            log(f"{label}: {reason}")
            for against, kind, gated, note in comparisons:
                rows.append(CheckRow(label, against, kind, "-", gated, FAIL if gated else INFO,
                                     failures=[reason] if gated else [],
                                     worst_ratio=math.inf if gated else 0.0,
                                     worst_output="inference", note=note or reason))
            continue
        finally:
            del runner
        for against, kind, gated, note in comparisons:
            if against == REFERENCE:
                expected, expected_obj = reference_out, reference_obj
            elif against == EXACT:
                expected, expected_obj = exact_out, exact_obj
            else:
                expected, expected_obj = cpu_outputs[variant.family]
            compare(label, outputs, recon, against, expected, expected_obj, kind, gated, note)
        if variant.device == "cpu" and recon is not None:
            cpu_outputs[variant.family] = (outputs, recon.stitched.obj)
        if variant.device == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- verdict, picture, report
    gated_rows = [r for r in rows if r.gated and r.status in (PASS, FAIL)]
    failed = [r for r in gated_rows if r.status == FAIL]
    worst = max(gated_rows, key=lambda r: r.worst_ratio, default=None)
    export_objects = [r for r in rows if r.kind == "export" and r.level == "object"
                      and r.status in (PASS, FAIL) and r.runner in maps_vs_reference]
    picture: dict[str, Any] = {}
    outdir.mkdir(parents=True, exist_ok=True)
    if export_objects:
        shown = max(export_objects, key=lambda r: r.worst_ratio)
        picture = save_error_png(outdir / REPORT_PNG, reference_obj,
                                 maps_vs_reference[shown.runner], mask, shown.runner)
        picture = {"file": REPORT_PNG, "runner": shown.runner, **picture}

    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "format_version": 1,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "status": FAIL if failed else PASS,
        "bundle": {"file": str(bundle_path), "sha256": sha256_file(bundle_path),
                   "kind": "checkpoint" if is_foreign(artifacts.manifest) else "bundle"},
        "artifact": {"folder": str(artifact_dir),
                     "files": {p.name: artifacts.sha256[p.name]
                               for p in artifacts.files.values()},
                     "formats": list(artifacts.files), "not_compared": artifacts.not_compared,
                     "source_verified": True,
                     "source_bundle_verified": not is_foreign(artifacts.manifest)},
        "scan": {"file": str(data_path), "patterns": scan.n_patterns, "groups": len(groups),
                 "patch_size": scan.patch_size, "gridsize": config.gridsize,
                 "batch_size": batch, "fixed_batch": fixed,
                 "object_shape": list(reference_obj.shape),
                 "well_lit_pixels": int(mask.sum())},
        "tolerances": {"patch": patch_tol, "object": {OBJECT_TOLERANCE_KEY: limit},
                       "loosened": looser,
                       "object_metric": "max |candidate - reference| / max |reference| on "
                                        "the well-lit mask, no alignment"},
        "environment": _environment(),
        "runners": runners_info,
        "rows": [r.to_dict() for r in rows],
        "failures": [f"{r.runner} vs {r.reference} [{r.level}] {f}" for r in failed
                     for f in r.failures],
        "worst": None if worst is None else {
            "runner": worst.runner, "reference": worst.reference, "level": worst.level,
            "output": worst.worst_output, "ratio_to_limit": worst.worst_ratio},
        "picture": picture,
        "outdir": str(outdir),
        "seconds": time.perf_counter() - started,
    }
    write_json_atomic(outdir / REPORT_JSON, report)
    return report


def raise_for_status(report: dict[str, Any]) -> None:
    """ParityError (exit 5) naming the worst failing runner and output, in one line."""
    if report["status"] != FAIL:
        return
    failed = [r for r in report["rows"] if r["gated"] and r["status"] == FAIL]
    worst = max(failed, key=lambda r: r["worst_ratio"])
    reason = next((f for f in worst["failures"] if f.startswith(worst["worst_output"])),
                  worst["failures"][0])
    where = f"per-patch {reason}" if worst["level"] == "patch" else reason
    raise ParityError(f"parity FAILED ({len(report['failures'])} check(s)); worst: "
                      f"{worst['runner']} vs {worst['reference']}, {where}; report in "
                      f"{Path(report['outdir']) / REPORT_JSON}")


# ---------------------------------------------------------------- terminal table
def _fmt(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        return value
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return "0" if value == 0 else f"{value:.2e}"


def consistency_table(report: dict[str, Any]) -> Any:
    """rich Table: each runner's patches against the measured patterns (median and p95
    R-factor, outliers), or the one line saying why that was not computed."""
    from rich.table import Table

    ran = [r for r in report["runners"] if isinstance(r.get("consistency"), dict)]
    computed = [r for r in ran if "r_factor" in r["consistency"]]
    if not computed:
        reason = next((r["consistency"].get("reason") for r in ran), None)
        return f"data consistency: not computed ({reason or 'no runner produced patches'})"
    table = Table(title="data consistency: each runner's patches against the measured "
                        "patterns", title_justify="left", title_style="bold")
    for name in ("runner", "median R", "p95 R", "outliers", "deviance / px", "vs training"):
        table.add_column(name, justify="left" if name == "runner" else "right")
    for r in computed:
        c = r["consistency"]
        reference = c.get("reference") or {}
        table.add_row(r["runner"], f"{c['r_factor']['median']:.4f}",
                      f"{c['r_factor']['p95']:.4f}", str(c["outliers"]),
                      f"{c['deviance_per_pixel']['median']:.3g}",
                      "" if not reference else "OUTSIDE" if reference["out_of_distribution"]
                      else "in range")
    return table


def render_table(report: dict[str, Any]) -> Any:
    """rich renderables: one table per comparison kind, one row per runner x level with its
    worst numbers and verdict (the full numbers are in parity.json)."""
    from rich.console import Group
    from rich.table import Table

    patch_tol = report["tolerances"]["patch"]
    object_tol = report["tolerances"]["object"][OBJECT_TOLERANCE_KEY]
    styles = {PASS: "green", FAIL: "bold red", INFO: "dim", SKIPPED: "yellow"}
    tables = []
    for kind, title in KIND_TITLES.items():
        rows = [r for r in report["rows"] if r["kind"] == kind]
        if not rows:
            continue
        table = Table(title=title, title_justify="left", title_style="bold")
        for name, justify in (("runner", "left"), ("vs", "left"), ("level", "left"),
                              ("amplitude", "right"), ("phase rad", "right"),
                              ("object |err|", "right"), ("PSNR dB", "right"),
                              ("NaN/Inf", "right"), ("status", "left")):
            table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
        table.add_column("note", overflow="ellipsis", no_wrap=True, max_width=40)
        for row in rows:
            m = row["metrics"]
            bad = m.get("nan_count", 0) + m.get("inf_count", 0) if row["level"] == "patch" \
                else m.get("nonfinite_pixels")
            style = styles[row["status"]]
            table.add_row(
                row["runner"], row["reference"], row["level"],
                _fmt(m.get("amplitude_rel_max")), _fmt(m.get("phase_weighted_max_rad")),
                _fmt(m.get("complex_rel_max_unaligned")), _fmt(m.get("amplitude_psnr_db")),
                "" if bad is None else str(bad), f"[{style}]{row['status']}[/{style}]",
                row["note"].split(" (")[0])  # parity.json has the whole reason
        tables.append(table)
    tables.append(consistency_table(report))
    tables.append(
        f"gates: per patch, amplitude max error <= {patch_tol.get('amplitude_rel_max'):g} of "
        f"max|ref| and amplitude-weighted phase error <= "
        f"{patch_tol.get('phase_weighted_max_rad'):g} rad; stitched object, max |error| "
        f"<= {object_tol:g} of max|object| (well-lit pixels, no alignment)")
    return Group(*tables)


def summary_line(report: dict[str, Any]) -> str:
    gated = [r for r in report["rows"] if r["gated"] and r["status"] in (PASS, FAIL)]
    skipped = [r for r in report["rows"] if r["status"] == SKIPPED]
    worst = report.get("worst") or {}
    text = (f"parity {report['status']}: {len(gated)} gated checks on "
            f"{report['scan']['groups']} groups")
    if worst:
        ratio = worst["ratio_to_limit"]
        share = ("inf x" if not math.isfinite(ratio) else
                 f"{ratio:.3g} x" if ratio >= 1 else f"{ratio:.1%} of")
        text += (f"; worst {worst['runner']} ({worst['level']} {worst['output']}) at "
                 f"{share} its limit")
    if skipped:
        text += f"; {len(skipped)} CUDA comparisons skipped (see note)"
    return text
