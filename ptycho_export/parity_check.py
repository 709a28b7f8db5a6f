"""ptycho-parity's computing half: the eager reference and every artifact of an export
folder run over a whole scan, compared per patch and on the stitched object.

:class:`ParitySetup` verifies what is compared (artifact hashes against the bundle, the
scan against the model, tolerances) before any model runs; :class:`ParityRun` runs one
runner of the runtime.runner protocol per :class:`Variant` (format x device x TF32) and
collects the :class:`CheckRow` of each comparison. ptycho_export.parity_report loops over
them and writes the report.

Reference rows: eager float32 on the CPU is the gated reference; eager float64 is the
exact one (informational: how much of any error is plain float32 arithmetic). With CUDA,
each torch runner (eager, TorchScript, .pt2) and onnxruntime also run there with TF32 off
(gated, CUDA vs CPU) and the torch ones once more with TF32 on (informational); without
CUDA those rows are reported as skipped, never left out.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.compare import DEFAULT_TOLERANCES, OutputStats, compare_outputs, tolerance_failures
from runtime.errors import ArtifactError, DataError, EnvironmentProblem, PtychoError
from runtime.manifest import MODEL_FORMATS as RUNNABLE_FORMATS
from runtime.metrics import align_to_reference, reconstruction_errors
from runtime.runner import fill_batch
from runtime.scan import ScanData

REPORT_JSON = "parity.json"
REPORT_PNG = "parity_errors.png"
REPORT_FORMAT = "ptycho-parity-report"
DEFAULT_BATCH = 256
# Stitched object: max |candidate - reference| / max |reference| on the well-lit mask (raw;
# the value after global-phase alignment is reported beside it).
OBJECT_TOLERANCE_KEY = "object_complex_rel_max"
DEFAULT_OBJECT_TOLERANCES: dict[str, float] = {"fp32": 1e-5}
# Artifact formats that map diffraction -> (amplitude, phase); others are listed, not run.
MODEL_FORMATS = tuple(RUNNABLE_FORMATS)
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
    from ptycho_export.parity import eager_runner, pt2_runner, torchscript_runner
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
                runner = pt2_runner(files["pt2"], (INPUT_NAME,), OUTPUT_NAMES,
                                       variant.device)
    runner.name = label
    return runner


def infer_groups(runner: Any, amplitudes: np.ndarray, groups: np.ndarray, input_name: str,
                 batch: int, fixed: bool) -> dict[str, np.ndarray]:
    """All groups through one runner, `batch` at a time (a fixed-batch artifact gets its
    last batch padded by runtime.runner.fill_batch, trimmed again afterwards)."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(groups), batch):
        x = np.ascontiguousarray(amplitudes[groups[start:start + batch]], dtype=np.float32)
        n = len(x)
        if fixed:
            x = fill_batch(x, batch)
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


# ---------------------------------------------------------------- the check
@dataclass
class ParitySetup:
    """What one parity check compares, every input verified before a model runs: the
    reference model and the artifacts (hashes against the bundle), the scan (patch size,
    enough patterns for a group), the batch, the tolerances (and which were loosened)."""

    bundle_path: Path
    data_path: Path
    artifact_dir: Path
    outdir: Path
    reference: Reference
    artifacts: VerifiedArtifacts
    scan: ScanData
    groups: np.ndarray  # (groups, C) pattern indices, channel 0 the anchor
    batch: int
    fixed: bool  # the artifact's batch is fixed
    patch_tol: dict[str, float]
    object_limit: float
    loosened: dict[str, Any]

    @classmethod
    def prepare(cls, bundle: str | os.PathLike, artifact_dir: str | os.PathLike,
                data: str | os.PathLike, outdir: Path, *, batch_size: int = DEFAULT_BATCH,
                tolerances: dict[str, float] | None = None, object_tol: float | None = None,
                log: Log = lambda message: None) -> ParitySetup:
        from runtime.compare import check_tolerances, loosened
        from runtime.grouping import group_neighbours
        from runtime.scan import load_scan

        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        given = dict(tolerances or {})
        check_tolerances(given | ({OBJECT_TOLERANCE_KEY: object_tol}
                                  if object_tol is not None else {}))
        bundle_path, data_path, artifact_dir = Path(bundle), Path(data), Path(artifact_dir)
        config, artifacts = load_reference(bundle_path, artifact_dir)
        log(f"artifacts: {', '.join(p.name for p in artifacts.files.values())} in "
            f"{artifact_dir} (sha256 verified; exported from {config.origin})")
        scan = load_scan(data_path)
        if scan.patch_size != config.patch_size:
            raise DataError(f"{data_path}: patterns are {scan.patch_size}x{scan.patch_size} "
                            f"but the model expects {config.patch_size}x{config.patch_size}")
        if scan.n_patterns < config.channels:
            raise DataError(f"{data_path}: {scan.n_patterns} pattern(s), but gridsize "
                            f"{config.gridsize} groups {config.channels} neighbours per sample")
        default_object = DEFAULT_OBJECT_TOLERANCES.get(artifacts.precision, 1e-5)
        limit = object_tol if object_tol is not None else float(
            artifacts.tolerances.get(OBJECT_TOLERANCE_KEY, default_object))
        looser = loosened(given, dict(artifacts.tolerances)) | loosened(
            {OBJECT_TOLERANCE_KEY: limit} if object_tol is not None else {},
            {OBJECT_TOLERANCE_KEY: default_object})
        for key, facts in looser.items():
            log(f"warning: tolerance {key} loosened to {facts['limit']:g} (the artifact's "
                f"{facts['default']:g}); recorded in parity.json")
        fixed = artifacts.batch is not None
        batch = artifacts.batch if fixed else batch_size
        groups = group_neighbours(scan.positions_px, config.gridsize)
        log(f"scan: {scan.n_patterns} patterns, {len(groups)} groups of {config.channels}, "
            f"batch {batch}{' (fixed by the artifact)' if fixed else ''}")
        return cls(bundle_path, data_path, artifact_dir, outdir, config, artifacts, scan,
                   groups, batch, fixed, dict(artifacts.tolerances) | given, limit, looser)

    def variants(self, cuda: bool = True) -> list[Variant]:
        """Every runner this machine can run (the others kept, marked skipped). torch and
        onnxruntime find CUDA independently: a CPU torch next to onnxruntime-gpu still
        checks the ONNX model on CUDA, and the other way round."""
        import torch

        off = None if cuda else "CUDA turned off by the caller"
        cuda_reason = off or (None if torch.cuda.is_available()
                              else "no CUDA (torch.cuda.is_available() is False)")
        ort_reason = off or (_ort_cuda_reason() if "onnx" in self.artifacts.files else None)
        return plan_variants(list(self.artifacts.files), cuda_reason, ort_reason)


Outputs = dict[str, np.ndarray]


@dataclass
class Comparison:
    """One reference a variant is compared with: its label, the kind of row, whether it
    gates, and a note for the row."""

    against: str
    kind: str
    gated: bool
    note: str = ""


def comparisons_for(variant: Variant) -> list[Comparison]:
    """An artifact against eager fp32 (gated), a CUDA run against the same runner on the
    CPU (gated with TF32 off), everything against eager fp64 (informational)."""
    found = []
    if variant.family != "eager" and not variant.tf32:
        found.append(Comparison(REFERENCE, "export", True))
    if variant.device == "cuda":
        found.append(Comparison(Variant(variant.family, "cpu").label, "device",
                                not variant.tf32, "TF32 on" if variant.tf32 else "TF32 off"))
    if not variant.tf32:
        found.append(Comparison(EXACT, "exact", False))
    return found


class ParityRun:
    """Runs runners over the setup's scan and compares what they give: the runner
    records and :class:`CheckRow` rows a parity report is made of."""

    def __init__(self, setup: ParitySetup, log: Log = lambda message: None) -> None:
        from runtime.grouping import group_offsets
        from runtime.physics_check import OutputChecker

        self.setup, self.log = setup, log
        self.rows: list[CheckRow] = []
        self.runners: list[dict[str, Any]] = []
        self.maps_vs_reference: dict[str, dict[str, np.ndarray]] = {}
        # label -> (outputs, stitched object) of every reference a later row compares with
        self.expected: dict[str, tuple[Outputs, np.ndarray]] = {}
        scan, groups = setup.scan, setup.groups
        self.checker = OutputChecker.open(setup.artifact_dir)
        self.anchors = scan.positions_px[groups[:, 0]]
        self.anchor_amplitudes = scan.amplitudes[groups[:, :1]] if self.checker.physics \
            else None
        self.offsets = (group_offsets(scan.positions_px, groups)
                        if setup.reference.channels > 1 else None)
        self.reference_obj: np.ndarray | None = None
        self.mask: np.ndarray | None = None

    # -- running
    def _residual(self, outputs: Outputs) -> dict[str, Any]:
        """A runner's patches against the measurements (the artifact's physics graph): a
        parity figure that needs no eager model."""
        section = self.checker.check(self.anchor_amplitudes, outputs["amplitude"],
                                     outputs["phase"], self.setup.scan.probe, self.offsets,
                                     self.anchors)
        section.pop("outlier_patterns", None)  # ptycho-run's report lists them
        return section

    def run(self, runner: Any, label: str, tf32: bool = False) -> tuple[Outputs, Any]:
        """Every group through ``runner``; its outputs and, when they are amplitude and
        phase patches, their stitched reconstruction."""
        import torch

        from ptycho_export.export.wrapper import INPUT_NAME
        from ptycho_export.parity import tf32_mode
        from ptycho_export.reconstruct import patch_per_position, stitch_with_probe

        setup = self.setup
        t0 = time.perf_counter()
        with tf32_mode(tf32), torch.inference_mode():
            outputs = infer_groups(runner, setup.scan.amplitudes, setup.groups, INPUT_NAME,
                                   setup.batch, setup.fixed)
        seconds = time.perf_counter() - t0
        recon = None
        if {"amplitude", "phase"} <= set(outputs) and outputs["amplitude"].shape == \
                outputs["phase"].shape and outputs["amplitude"].ndim == 4:
            recon = stitch_with_probe(
                patch_per_position(outputs["amplitude"], outputs["phase"]), setup.scan)
        info = {"runner": label, "status": "ran", "seconds": seconds,
                "groups_per_s": len(setup.groups) / seconds if seconds > 0 else None}
        if recon is not None:
            info["consistency"] = self._residual(outputs)
        self.runners.append(info)
        self.log(f"ran {label}: {len(setup.groups)} groups in {seconds:.2f} s")
        return outputs, recon

    def run_references(self) -> None:
        """Eager fp32 (the gated reference) and fp64 (the exact one) on the CPU, and the
        row of how far fp32 arithmetic alone is from exact."""
        import torch

        from ptycho_export.export.wrapper import INPUT_NAME, OUTPUT_NAMES
        from ptycho_export.parity import eager_runner
        from ptycho_export.reconstruct import patch_per_position, stitch_with_probe

        wrapper = self.setup.reference.wrapper
        outputs, recon = self.run(eager_runner(wrapper, (INPUT_NAME,), OUTPUT_NAMES),
                                  REFERENCE)
        if recon is None:
            raise ArtifactError("the eager model's outputs cannot be stitched")
        self.mask, self.reference_obj = recon.well_lit, recon.stitched.obj
        exact_raw, _ = self.run(eager_runner(wrapper, (INPUT_NAME,), OUTPUT_NAMES,
                                             dtype=torch.float64), EXACT)
        exact = {k: v.astype(np.float32) for k, v in exact_raw.items()}
        del exact_raw
        exact_obj = stitch_with_probe(patch_per_position(exact["amplitude"], exact["phase"]),
                                      self.setup.scan).stitched.obj
        self.expected = {REFERENCE: (outputs, self.reference_obj), EXACT: (exact, exact_obj),
                         Variant("eager", "cpu").label: (outputs, self.reference_obj)}
        self.compare(REFERENCE, outputs, recon, Comparison(EXACT, "exact", False))

    # -- comparing
    def compare(self, label: str, outputs: Outputs, recon: Any, to: Comparison) -> None:
        """The patch row and the object row of ``label`` against ``to``."""
        expected, expected_obj = self.expected[to.against]
        self.rows.append(patch_row(label, to.against, to.kind, to.gated, expected, outputs,
                                   self.setup.patch_tol, to.note))
        if recon is None:
            self.rows.append(CheckRow(
                label, to.against, to.kind, "object", to.gated, FAIL if to.gated else INFO,
                failures=["stitched object: outputs are not amplitude and phase of the "
                          "expected shape"] if to.gated else [],
                worst_ratio=math.inf if to.gated else 0.0, worst_output="object",
                note=to.note))
            return
        metrics, maps = object_errors(recon.stitched.obj, expected_obj, self.mask)
        self.rows.append(object_row(label, to.against, to.kind, to.gated, metrics,
                                    self.setup.object_limit, to.note))
        if to.kind == "export":
            self.maps_vs_reference[label] = maps

    def check(self, variant: Variant) -> None:
        """One variant: built, run and compared, or its rows recorded as skipped (cannot
        run here) or failed (loads but does not run)."""
        label, comparisons = variant.label, comparisons_for(variant)
        cpu_label = Variant(variant.family, "cpu").label
        skip = variant.skip
        if skip is None and variant.device == "cuda" and cpu_label not in self.expected:
            skip = f"{cpu_label} did not run"
        runner, skip = (None, skip) if skip is not None else self._build(variant)
        if runner is None:
            self.runners.append({"runner": label, "status": SKIPPED, "reason": skip})
            self.log(f"skipped {label}: {skip}")
            self.rows += [skipped_row(label, c.against, c.kind, c.gated, skip or "")
                          for c in comparisons if c.kind != "exact"]  # runners list it
            return
        try:
            outputs, recon = self.run(runner, label, variant.tf32)
        except PtychoError:
            raise
        except Exception as err:  # the artifact loads but does not run here: a failed check
            self._record_error(label, comparisons, err)
            return
        finally:
            del runner
        for comparison in comparisons:
            self.compare(label, outputs, recon, comparison)
        if variant.device == "cpu" and recon is not None:
            self.expected[label] = (outputs, recon.stitched.obj)
        self._release(variant)

    def _build(self, variant: Variant) -> tuple[Any, str | None]:
        """(runner, None), or (None, why it cannot run here) for a CUDA variant; a CPU
        artifact that cannot be loaded is an ArtifactError."""
        try:
            return build_runner(variant, self.setup.reference.wrapper,
                                self.setup.artifacts.files), None
        except EnvironmentProblem as err:
            if variant.device == "cpu":
                raise
            return None, str(err)
        except PtychoError:
            raise
        except Exception as err:  # torch.jit / torch.export load errors share no base
            text = " ".join(str(err).split())[:200]
            if variant.device == "cuda":
                return None, f"could not load on CUDA: {text}"
            path = self.setup.artifacts.files[variant.family]
            raise ArtifactError(f"{path}: cannot be loaded ({type(err).__name__}: "
                                f"{text})") from err

    def _record_error(self, label: str, comparisons: list[Comparison],
                      err: Exception) -> None:
        reason = f"inference raised {type(err).__name__}: {' '.join(str(err).split())[:200]}"
        self.runners.append({"runner": label, "status": "error", "reason": reason})
        self.log(f"{label}: {reason}")
        for c in comparisons:
            self.rows.append(CheckRow(label, c.against, c.kind, "-", c.gated,
                                      FAIL if c.gated else INFO,
                                      failures=[reason] if c.gated else [],
                                      worst_ratio=math.inf if c.gated else 0.0,
                                      worst_output="inference", note=c.note or reason))

    @staticmethod
    def _release(variant: Variant) -> None:
        if variant.device == "cuda":
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
