"""Reconstruct a scan with an exported ONNX artifact: numpy + onnxruntime only, no torch.

artifact (verified) + scan (validated) -> batched inference -> probe-weighted stitch ->
object.npz, amplitude.png, phase.png, report.json, written to a temp folder and renamed,
so an interrupted or failed run never leaves a half-written output folder behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from runtime.compare import compare_outputs, tolerance_failures
from runtime.errors import EXIT_USAGE, ArtifactError, DataError, PtychoError
from runtime.grouping import group_neighbours
from runtime.images import amplitude_rgb, phase_rgb, save_png, upscale_nearest
from runtime.manifest import ArtifactSpec, load_artifact
from runtime.scan import ScanData, load_scan
from runtime.session import SessionInfo, create_session, measure_node_placement
from runtime.stitch import StitchedObject, stitch_patches, to_complex

__all__ = ["DEFAULT_BATCH", "RunUsageError", "run_scan", "run_self_check",
           "self_check_artifact"]

DEFAULT_BATCH = 256
# Same definition as the eager path (ptycho_export.reconstruct): pixels lit by less than
# this fraction of the best-lit pixel's summed probe intensity are poorly determined.
WELL_LIT_FRACTION = 0.1
OUTPUT_FILES = ("object.npz", "amplitude.png", "phase.png", "report.json")


class RunUsageError(PtychoError):
    """Options that contradict each other or the artifact (fix the command line)."""

    exit_code = EXIT_USAGE


# --------------------------------------------------------------------------- batching


def resolve_batch(spec: ArtifactSpec, batch_size: int | None) -> int:
    """Batch size to feed: a fixed-batch artifact only takes its own size."""
    if batch_size is not None and batch_size < 1:
        raise RunUsageError(f"--batch-size must be >= 1, got {batch_size}")
    if spec.batch is None:
        return batch_size or DEFAULT_BATCH
    if batch_size is not None and batch_size != spec.batch:
        raise RunUsageError(f"{spec.model_path} was exported with a fixed batch of {spec.batch}; "
                            f"--batch-size {batch_size} cannot be used (leave it out, or "
                            "re-export without --batch for a dynamic batch axis)")
    return spec.batch


def iter_batches(session: Any, spec: ArtifactSpec, total: int,
                 get: Callable[[int, int], np.ndarray], batch: int
                 ) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """Yield (start, stop, outputs) per batch; a short last batch of a fixed-batch model is
    padded with zeros to the fixed size and the padding's outputs are dropped."""
    names = list(spec.output_names)
    for start in range(0, total, batch):
        stop = min(start + batch, total)
        x = np.ascontiguousarray(get(start, stop), dtype=np.float32)
        real = stop - start
        if spec.batch is not None and real < spec.batch:
            pad = np.zeros((spec.batch - real, *x.shape[1:]), dtype=np.float32)
            x = np.concatenate([x, pad])
        values = session.run(names, {spec.input_name: x})
        yield start, stop, {n: np.asarray(v)[:real] for n, v in zip(names, values, strict=True)}


# --------------------------------------------------------------------------- self-check


def run_self_check(spec: ArtifactSpec, session: Any) -> dict[str, Any]:
    """Golden inputs through this session vs the exporter's eager outputs, per output.

    Catches what the hash cannot: a provider or onnxruntime build that computes this graph
    differently from where it was exported (TF32, a broken kernel, a bad CUDA library).
    """
    if spec.golden_path is None:
        raise ArtifactError(f"{spec.manifest_path}: lists no golden file; cannot self-check")
    try:
        with np.load(spec.golden_path, allow_pickle=False) as golden:
            x = np.asarray(golden[spec.golden_input], dtype=np.float32)
            expected = {name: np.asarray(golden[name]) for name in spec.golden_outputs}
    except (KeyError, ValueError, OSError, EOFError) as err:
        raise ArtifactError(f"{spec.golden_path}: unreadable golden data "
                            f"({type(err).__name__}: {' '.join(str(err).split())})") from err
    want = (spec.channels, spec.patch_size, spec.patch_size)
    if x.ndim != 4 or x.shape[1:] != want or len(x) == 0:
        raise ArtifactError(f"{spec.golden_path}: input has shape {x.shape}, expected "
                            f"(B, {', '.join(map(str, want))})")
    batch = spec.batch or len(x)
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in spec.output_names}
    for _, _, values in iter_batches(session, spec, len(x), lambda a, b: x[a:b], batch):
        for name, value in values.items():
            outputs[name].append(value)
    candidate = {name: np.concatenate(parts) for name, parts in outputs.items()}
    stats = compare_outputs(expected, candidate)
    failures = tolerance_failures(stats, spec.tolerances)
    return {"status": "FAIL" if failures else "PASS", "failures": failures,
            "patterns": len(x), "tolerances": spec.tolerances,
            "stats": {name: s.to_dict() for name, s in stats.items()}}


def _raise_if_failed(result: dict[str, Any], spec: ArtifactSpec, info: SessionInfo) -> None:
    if result["status"] != "PASS":
        raise ArtifactError(f"self-check FAILED on {info.provider} ({spec.model_path}): "
                            f"{'; '.join(result['failures'])}")


def self_check_artifact(artifact: str | os.PathLike[str], provider: str = "auto",
                        threads: int | None = None) -> dict[str, Any]:
    """The self-check alone: verify hashes, run golden.npz, report PASS/FAIL (never raises
    for FAIL, so a caller can print the table first)."""
    spec = load_artifact(artifact, check_golden=True)
    session, info = create_session(spec.model_path, provider, threads)
    result = run_self_check(spec, session)
    return {"artifact": _artifact_facts(spec), "provider": info.to_dict(), "self_check": result}


# --------------------------------------------------------------------------- helpers


def _artifact_facts(spec: ArtifactSpec) -> dict[str, Any]:
    return {"folder": str(spec.folder), "model": spec.model_path.name,
            "sha256": spec.model_sha256, "patch_size": spec.patch_size,
            "gridsize": spec.gridsize, "batch": spec.batch if spec.batch else "dynamic",
            "precision": spec.precision}


def check_scan(scan: ScanData, spec: ArtifactSpec, data_path: Path) -> None:
    """The scan must fit the model before any session or output folder exists."""
    n = scan.patch_size
    if n != spec.patch_size:
        raise DataError(f"{data_path}: patterns are {n}x{n} but the model expects "
                        f"{spec.patch_size}x{spec.patch_size} ({spec.folder})")
    if scan.n_patterns < spec.channels:
        raise DataError(f"{data_path}: {scan.n_patterns} pattern(s), but gridsize "
                        f"{spec.gridsize} groups {spec.channels} neighbours per sample")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_outdir(outdir: Path, spec: ArtifactSpec, data_path: Path) -> None:
    """Replacing the output folder must never delete the run's own inputs."""
    target = outdir.resolve()
    for what, path in (("artifact", spec.folder), ("data file", data_path)):
        if _inside(path.resolve(), target):
            raise RunUsageError(f"-o {outdir}: the {what} {path} is inside it and would be "
                                "replaced; choose another output folder")
    if outdir.exists() and not outdir.is_dir():
        raise RunUsageError(f"-o {outdir}: exists and is not a folder")


def _replace_dir(tmp: Path, outdir: Path) -> None:
    """Swap the finished temp folder in; an older output survives until the swap."""
    backup = None
    if outdir.exists():
        backup = outdir.with_name(f".{outdir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(outdir, backup)
    try:
        os.replace(tmp, outdir)
    except BaseException:
        if backup is not None:
            os.replace(backup, outdir)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)


def _write_outputs(folder: Path, stitched: StitchedObject, well_lit: np.ndarray,
                   report: dict[str, Any]) -> None:
    np.savez(folder / "object.npz", object=stitched.obj, mask=well_lit,
             origin_px=np.asarray(stitched.origin_px, dtype=np.int64), weight=stitched.weight)
    save_png(folder / "amplitude.png", upscale_nearest(amplitude_rgb(stitched.obj, well_lit), 512))
    save_png(folder / "phase.png", upscale_nearest(phase_rgb(stitched.obj, well_lit), 512))
    (folder / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True,
                                                   default=str) + "\n")


# --------------------------------------------------------------------------- the run


def run_scan(artifact: str | os.PathLike[str], data_path: str | os.PathLike[str],
             outdir: str | os.PathLike[str], provider: str = "auto",
             batch_size: int | None = None, threads: int | None = None,
             self_check: bool = False, progress: bool = True,
             log_level: int = 3) -> dict[str, Any]:
    """Reconstruct ``data_path`` with ``artifact`` into ``outdir``; return the report.

    Everything that can be wrong with the inputs is found before the output folder is
    touched: artifact hashes, scan contract, patch size, options, provider, self-check.
    """
    started = time.perf_counter()
    data_path, outdir = Path(data_path), Path(outdir)
    spec = load_artifact(artifact, check_golden=self_check)
    scan = load_scan(data_path)
    check_scan(scan, spec, data_path)
    batch = resolve_batch(spec, batch_size)
    check_outdir(outdir, spec, data_path)
    groups = group_neighbours(scan.positions_px, spec.gridsize)
    total = len(groups)
    if spec.batch is None:
        batch = min(batch, total)

    session, info = create_session(spec.model_path, provider, threads, profile=True,
                                   log_level=log_level)
    warm = {spec.input_name: np.zeros((batch, spec.channels, spec.patch_size, spec.patch_size),
                                      dtype=np.float32)}
    placement = measure_node_placement(session, warm, info)  # also the warm-up run
    node_counts = {p: sum(ops.values()) for p, ops in placement.items()}
    warnings = []
    off_ep = {p: ops for p, ops in placement.items() if p != info.ep}
    if off_ep and info.provider != "cpu":
        warnings.append("nodes not on " + info.ep + ": " + "; ".join(
            f"{p}: {', '.join(f'{op}x{k}' for op, k in ops.items())}"
            for p, ops in off_ep.items()))

    check = None
    if self_check:
        check = run_self_check(spec, session)
        _raise_if_failed(check, spec, info)

    n = spec.patch_size
    patches = np.empty((total, n, n), dtype=np.complex64)
    t0 = time.perf_counter()
    with _progress(progress) as bar:
        task = bar.add_task(f"inference ({info.provider})", total=total, rate="")
        for start, stop, out in iter_batches(session, spec, total,
                                             lambda a, b: scan.amplitudes[groups[a:b]], batch):
            # Channel 0 of each group is the pattern that anchors it: one patch per position.
            patches[start:stop] = to_complex(out["amplitude"][:, 0], out["phase"][:, 0])
            elapsed = time.perf_counter() - t0
            bar.update(task, completed=stop,
                       rate=f"{stop / elapsed:,.0f} patterns/s" if elapsed > 0 else "")
    infer_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    weights = np.abs(scan.probe).astype(np.float32) ** 2
    stitched = stitch_patches(patches, scan.positions_px, weights=weights)
    well_lit = stitched.weight > WELL_LIT_FRACTION * float(stitched.weight.max())
    stitch_s = time.perf_counter() - t1

    report: dict[str, Any] = {
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "artifact": _artifact_facts(spec),
        "data": {"file": str(data_path), "name": data_path.name,
                 "size": data_path.stat().st_size, "patterns": scan.n_patterns},
        "provider": info.to_dict(),
        "node_counts": node_counts,
        "node_ops": placement,
        "warnings": warnings,
        "patterns": scan.n_patterns,
        "groups": total,
        "batch_size": batch,
        "batches": -(-total // batch),
        "seconds": {"inference": round(infer_s, 4), "stitch": round(stitch_s, 4)},
        "patterns_per_s": round(total / infer_s, 1) if infer_s > 0 else None,
        "object": {"shape": list(stitched.obj.shape), "origin_px": list(stitched.origin_px),
                   "well_lit_pixels": int(well_lit.sum()),
                   "well_lit_fraction": WELL_LIT_FRACTION},
        "self_check": check if check is not None else {"status": "SKIPPED"},
        "outdir": str(outdir),
        "files": list(OUTPUT_FILES),
    }

    outdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = outdir.with_name(f".{outdir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        report["seconds"]["total"] = round(time.perf_counter() - started, 4)
        _write_outputs(tmp, stitched, well_lit, report)
        _replace_dir(tmp, outdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
