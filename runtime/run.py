"""Reconstruct a scan with an exported ONNX artifact: numpy + onnxruntime only, no torch.

(Where torch is installed, the artifact's model.ts and model.pt2 run the same way through
the ``torchscript_session`` / ``pt2_session`` runner kinds of runtime.runner's registry;
torch is imported only on that path.)

A run is a plan and four stages. :class:`RunPlan` holds what a run needs (artifact, scan,
options, output folder, neighbour groups), every input checked before anything is written;
then :func:`open_engine` (session, batch, warm-up, IO binding, physics graph),
:func:`infer_stage` (batched inference -> probe-weighted stitch, and the data-consistency
residual), :func:`build_report` and :func:`write_stage` (object.npz, amplitude.png,
phase.png, report.json, written to a temp folder and renamed, so an interrupted or failed
run never leaves a half-written output folder behind). :func:`run_scan` runs them in order;
the Dask path (runtime.many) calls it with one session cache per worker.

Memory stays bounded for large scans: the diffraction stack is memory-mapped when the
.npz stores it uncompressed (runtime.scan_stream), and each batch's patches are added to
the stitch canvas as they come (runtime.stitch.StitchAccumulator), so neither all M
patterns nor all M patches are ever held at once. On CUDA the batches go through IO
binding; the batch size of a dynamic-batch artifact is chosen from free memory unless
given (runtime.batching).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from runtime.atomic import ensure_replaceable, output_lock, replace_dir, temp_dir_beside
from runtime.batching import (
    DEFAULT_BATCH,
    MAX_AUTO_BATCH,
    MAX_AUTO_BATCH_CPU,
    auto_batch,
    check_canvas,
    iter_batches,
    resolve_batch,
)
from runtime.consistency import ConsistencyAccumulator
from runtime.consistency_figure import save_consistency_png
from runtime.errors import (
    DataError,
    PtychoError,
    ResidualTooHigh,
    RunUsageError,
    naming,
)
from runtime.grouping import group_neighbours, group_offsets
from runtime.image_quality import (
    WELL_LIT_RULE,
    WELL_LIT_THRESHOLD,
    ground_truth_report,
    well_lit_mask,
)
from runtime.images import amplitude_figure, phase_figure, save_png
from runtime.inputs import (
    InputOptions,
    LoadedInput,
    check_product_options,
    open_input,
    write_ptychodus_product,
)
from runtime.manifest import ArtifactSpec, load_artifact
from runtime.model_session import (
    artifact_facts,
    check_format,
    make_runner,
    open_session,
    raise_if_failed,
    run_self_check,
    self_check_artifact,
    warm_up,
)
from runtime.physics_check import (
    PhysicsSession,
    compare_probes,
    compare_with_training,
    open_physics,
)
from runtime.refine import RefineOptions, refine_object, refine_report
from runtime.report_io import write_json
from runtime.runner import Runner
from runtime.scan import ScanData
from runtime.session import IOBindingRunner, SessionInfo
from runtime.stitch import (
    SUBPIXEL_METHODS,
    StitchAccumulator,
    StitchedObject,
    crop_to,
    has_fractional_positions,
    to_complex,
)

__all__ = ["DEFAULT_BATCH", "MAX_AUTO_BATCH", "MAX_AUTO_BATCH_CPU", "BatchStitcher", "Engine",
           "Inference", "ResidualTooHigh", "RunOptions", "RunPlan", "RunUsageError",
           "build_report", "infer_stage", "open_engine", "run_scan", "self_check_artifact",
           "self_check_stage", "write_stage"]

OUTPUT_FILES = ("object.npz", "amplitude.png", "phase.png", "report.json")
RUN_PRODUCER = "ptycho-run"  # report.json's "producer": marks a folder -o may replace


# --------------------------------------------------------------------------- checks


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


def is_run_folder(folder: Path) -> bool:
    """Written by ptycho-run: its report says so (older reports: report.json beside
    object.npz)."""
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(report, dict):
        return False
    return report.get("producer") == RUN_PRODUCER or (
        "self_check" in report and (folder / "object.npz").is_file())


def check_outdir(outdir: Path, spec: ArtifactSpec, data_path: Path, force: bool = False
                 ) -> None:
    """Replacing the output folder must never delete the run's own inputs, nor a folder
    this tool did not write (unless `force`)."""
    target = outdir.resolve()
    for what, path in (("artifact", spec.folder), ("data file", data_path)):
        if _inside(path.resolve(), target):
            raise RunUsageError(f"-o {outdir}: the {what} {path} is inside it and would be "
                                "replaced; choose another output folder")
    if outdir.exists() and not outdir.is_dir():
        raise RunUsageError(f"-o {outdir}: exists and is not a folder")
    ensure_replaceable(outdir, is_run_folder, "ptycho-run", force)


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
                   report: dict[str, Any], network_obj: np.ndarray | None = None) -> None:
    obj = stitched.obj
    extra = {} if network_obj is None else {"network_object": network_obj}
    np.savez(folder / "object.npz", object=obj, mask=well_lit,
             origin_px=np.asarray(stitched.origin_px, dtype=np.int64), weight=stitched.weight,
             amplitude=np.abs(obj).astype(np.float32),
             phase=np.angle(obj).astype(np.float32), **extra)
    save_png(folder / "amplitude.png", amplitude_figure(obj, well_lit, 512))
    save_png(folder / "phase.png", phase_figure(obj, well_lit, 512))
    write_json(folder / "report.json", report)


# --------------------------------------------------------------------------- quality


def quality_report(stitched: StitchedObject, well_lit: np.ndarray,
                   truth: np.ndarray | None) -> dict[str, Any]:
    """Figures against the scan's ground truth (``objectGuess``), when it has one.

    The truth is cropped to the stitched canvas (runtime.stitch.crop_to) and scored on the
    well-lit mask by runtime.image_quality.ground_truth_report: SSIM, PSNR, correlation,
    RMSE and FRC after removing the global complex factor and a linear phase ramp, next to
    a flat object scored the same way. The eager path (ptycho_export.reconstruct) writes
    the same section. Non-finite values are written as null.
    """
    if truth is None:
        return {"ground_truth": False}
    try:
        cropped = crop_to(truth, stitched)
    except PtychoError as err:
        return {"ground_truth": True, "error": str(err)}
    return ground_truth_report(stitched.obj, cropped, well_lit, WELL_LIT_RULE)


# --------------------------------------------------------------------------- stitching


class BatchStitcher:
    """Feeds inference outputs to a :class:`StitchAccumulator`, in order, either on the
    calling thread or (``overlap``) on one helper thread while the caller runs the next
    batch.

    On a GPU the CPU waits during inference, so stitching batch j while batch j+1 runs
    hides the stitch (sub-pixel FFTs, slice-adds) behind it; at most two batches wait in
    the queue, so memory stays bounded. On the CPU, onnxruntime already keeps every core
    busy and the stitch is a few % of the time, so the default there is not to overlap.
    Batches are added in the order given, so the result is bit-identical either way. An
    error in the helper is raised in the caller at its next ``add`` or at exit.
    """

    def __init__(self, accumulator: StitchAccumulator, overlap: bool) -> None:
        self.accumulator, self.overlap = accumulator, overlap
        self.seconds = 0.0  # spent adding (on whichever thread)
        self.waited = 0.0  # the caller's wait for the helper at the end
        self._queue: queue.Queue[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = \
            queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> BatchStitcher:
        if self.overlap:
            self._thread = threading.Thread(target=self._work, name="stitch-batches",
                                            daemon=True)
            self._thread.start()
        return self

    def _add_now(self, amplitude: np.ndarray, phase: np.ndarray,
                 positions: np.ndarray) -> None:
        t0 = time.perf_counter()
        self.accumulator.add(to_complex(amplitude, phase), positions)
        self.seconds += time.perf_counter() - t0

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:  # after an error, drain without adding
                try:
                    self._add_now(*item)
                except BaseException as err:  # noqa: BLE001 - re-raised in the caller
                    self._error = err

    def add(self, amplitude: np.ndarray, phase: np.ndarray, positions: np.ndarray) -> None:
        if self._error is not None:
            raise self._error
        if self._thread is None:
            self._add_now(amplitude, phase, positions)
        else:  # copies: the runner may reuse its output buffers for the next batch
            self._queue.put((np.array(amplitude), np.array(phase), np.array(positions)))

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            t0 = time.perf_counter()
            self._queue.put(None)
            self._thread.join()
            self.waited = time.perf_counter() - t0
        if self._error is not None and exc[0] is None:
            raise self._error


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class RunOptions:
    """What a run is asked for (ptycho-run's options). ``session_cache`` aside, every run
    of ptycho-run, the Dask path, the demo and the benchmark is described by one of these.

    ``subpixel`` (none | fourier | bilinear, see runtime.stitch) defaults to "fourier" when
    any scan position is fractional and "none" otherwise; ``batch_size`` of a dynamic-batch
    artifact defaults to :func:`auto_batch`'s choice. ``inputs`` says how to read data that
    is not an amplitude npz (counts, HDF5, a ptychodus input folder, other position
    conventions) and whether to write a ptychodus product (see runtime.inputs).
    ``model_format`` ("onnx" | "torchscript" | "pt2") picks the artifact's model file; by
    default the file given as the artifact, else model.onnx. ``overlap_stitch`` stitches
    each batch in a helper thread while the next one is inferred (:class:`BatchStitcher`);
    by default only on a GPU, where the CPU is otherwise idle during inference.
    ``max_residual`` fails the run (exit 6, after writing) above that median R-factor.
    ``refine`` > 0 refines the stitched object through the scan's own measurements for that
    many iterations (runtime.refine) before it is scored and written; the network's own
    object is kept beside it.
    """

    provider: str = "auto"
    batch_size: int | None = None
    threads: int | None = None
    self_check: bool = False
    progress: bool = True
    log_level: int = 3
    subpixel: str | None = None
    device_id: int = 0
    inputs: InputOptions = field(default_factory=InputOptions)
    model_format: str | None = None
    overlap_stitch: bool | None = None
    force: bool = False
    max_residual: float | None = None
    refine: int = 0

    def check(self) -> None:
        """Options wrong on their own, found before anything is read."""
        device_id = self.device_id
        if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
            raise RunUsageError(f"--device-id must be an integer >= 0, got {device_id!r}")
        check_format(self.model_format)
        if self.batch_size is not None and self.batch_size < 1:
            raise RunUsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        try:
            RefineOptions(self.refine).check()
        except ValueError as err:
            raise RunUsageError(f"--refine: {err}") from err
        if self.subpixel is not None and self.subpixel not in SUBPIXEL_METHODS:
            raise RunUsageError(f"--subpixel {self.subpixel!r}: choose one of "
                                f"{', '.join(SUBPIXEL_METHODS)}")


@dataclass
class RunPlan:
    """Everything a run needs, validated before any session or output folder exists:
    artifact hashes, scan contract, patch size, options, output folder, canvas memory.
    Built by :meth:`prepare`; the stages below only read it."""

    spec: ArtifactSpec
    data_path: Path
    outdir: Path
    options: RunOptions
    loaded: LoadedInput
    groups: np.ndarray  # (groups, C) pattern indices; channel 0 anchors the group
    subpixel: str
    subpixel_reason: str
    batch: int | None  # None: chosen from memory once the provider is known

    @classmethod
    def prepare(cls, artifact: str | os.PathLike[str], data_path: str | os.PathLike[str],
                outdir: str | os.PathLike[str], options: RunOptions) -> RunPlan:
        options.check()
        data_path, outdir = Path(data_path), Path(outdir)
        spec = load_artifact(artifact, check_golden=options.self_check,
                             model_format=options.model_format)
        loaded = open_input(data_path, options.inputs, spec.patch_size)
        check_scan(loaded.scan, spec, data_path)
        check_product_options(options.inputs, loaded)
        batch = resolve_batch(spec, options.batch_size)
        method, why = _resolve_subpixel(options.subpixel, loaded.scan.positions_px)
        check_outdir(outdir, spec, data_path, options.force)
        check_canvas(loaded.scan.positions_px, spec.patch_size, data_path)
        groups = group_neighbours(loaded.scan.positions_px, spec.gridsize)
        return cls(spec, data_path, outdir, options, loaded, groups, method, why, batch)

    @property
    def scan(self) -> ScanData:
        return self.loaded.scan

    @property
    def total(self) -> int:
        return len(self.groups)

    @property
    def anchor_positions(self) -> np.ndarray:
        """One patch per group, placed at its anchor pattern's position."""
        return self.scan.positions_px[self.groups[:, 0]]


def _resolve_subpixel(subpixel: str | None, positions: np.ndarray) -> tuple[str, str]:
    """(method, why): the option as given, else Fourier exactly when it changes anything."""
    if subpixel is not None:
        return subpixel, "given"
    if has_fractional_positions(positions):
        return "fourier", "default: some scan positions are not whole pixels"
    return "none", "default: every scan position is a whole pixel"


# --------------------------------------------------------------------------- the stages

SessionCache = dict[tuple, tuple[Any, SessionInfo, dict]]


@dataclass
class Engine:
    """The opened model of a run: its session (and what the warm-up measured), the batch,
    the IO binding on a device, and the physics graph of the data-consistency check."""

    session: Any
    info: SessionInfo
    placement: dict[str, dict[str, int]]  # provider -> op -> nodes
    batch: int
    batch_choice: dict[str, Any]
    runner: Runner  # the session as a protocol runner (IO binding on a CUDA device)
    physics: PhysicsSession | None
    physics_why: str

    @property
    def io_binding(self) -> bool:
        return isinstance(self.runner, IOBindingRunner)

    @property
    def physics_on_device(self) -> bool:
        """The physics graph reads the model's outputs where IO binding left them."""
        return self.physics is not None and self.io_binding


def open_engine(plan: RunPlan, session_cache: SessionCache | None = None) -> Engine:
    """The session (reused from ``session_cache``, a dict owned by the caller, e.g. one
    per Dask worker, keyed by model, hash, provider, threads and device), the batch, one
    warm-up batch that measures where every node runs, IO binding, the physics graph."""
    spec, options = plan.spec, plan.options
    key = (str(spec.model_path), spec.model_sha256, options.provider, options.threads,
           options.device_id)
    cached = session_cache.get(key) if session_cache is not None else None
    if cached is not None:
        session, info, placement = cached
    else:
        session, info = open_session(spec, options.provider, options.threads,
                                     device_id=options.device_id, profile=True,
                                     log_level=options.log_level)
        placement = None
    batch = plan.batch
    if batch is not None:
        batch_choice: dict[str, Any] = {
            "source": "option" if spec.batch is None else "artifact",
            "reason": ("--batch-size" if spec.batch is None
                       else f"the artifact was exported with a fixed batch of {spec.batch}")}
    else:
        batch, batch_choice = auto_batch(spec, info)
    if spec.batch is None and plan.total < batch:
        batch_choice["reason"] += f"; the scan has only {plan.total} patterns"
        batch = plan.total
    if placement is None:
        warm = {spec.input_name: np.zeros((batch, spec.channels, spec.patch_size,
                                           spec.patch_size), dtype=np.float32)}
        placement = warm_up(session, warm, info)
        if session_cache is not None:
            session_cache[key] = (session, info, placement)
    physics, physics_why = open_physics(spec, info.provider, options.threads,
                                        options.device_id)
    if options.max_residual is not None and physics is None:
        raise RunUsageError(f"--max-residual needs the data-consistency check, which this "
                            f"artifact cannot run: {physics_why}")
    return Engine(session, info, placement, batch, batch_choice,
                  make_runner(session, info, spec), physics, physics_why)


def self_check_stage(plan: RunPlan, engine: Engine) -> dict[str, Any] | None:
    """The golden data through the session first (when asked): a mismatch stops the run
    before any scan is inferred."""
    if not plan.options.self_check:
        return None
    check = run_self_check(plan.spec, engine.runner)
    raise_if_failed(check, plan.spec, engine.info)
    return check


@dataclass
class Inference:
    """What the inference stage produced: the stitched object, its well-lit mask, the
    data-consistency figures, and where the time went."""

    stitched: StitchedObject
    well_lit: np.ndarray
    crop: int
    overlap: bool
    seconds: dict[str, float]
    consistency: ConsistencyAccumulator | None
    consistency_report: dict[str, Any]
    # set by refine_stage: the network's own stitched object, and how the refinement went
    network_obj: np.ndarray | None = None
    refine_report: dict[str, Any] | None = None


def infer_stage(plan: RunPlan, engine: Engine) -> Inference:
    """Every group through the model, batch by batch; each batch's anchor patches added to
    the stitch (in a helper thread while the next batch runs, on a GPU) and, with a physics
    graph, its predicted diffraction compared with the measured patterns."""
    spec, scan, groups, anchors = plan.spec, plan.scan, plan.groups, plan.anchor_positions
    weights = np.abs(scan.probe).astype(np.float32) ** 2
    accumulator = StitchAccumulator(anchors, spec.patch_size, weights=weights,
                                    subpixel=plan.subpixel)
    physics, runner = engine.physics, engine.runner
    consistency = ConsistencyAccumulator() if physics is not None else None
    offsets = (group_offsets(scan.positions_px, groups)
               if physics is not None and physics.merges_overlap else None)
    overlap = (engine.info.on_device if plan.options.overlap_stitch is None
               else bool(plan.options.overlap_stitch))
    t0 = time.perf_counter()
    with _progress(plan.options.progress) as bar, \
            BatchStitcher(accumulator, overlap) as stitcher:
        task = bar.add_task(f"inference ({engine.info.provider})", total=plan.total, rate="")
        for start, stop, out in iter_batches(runner, spec, plan.total,
                                             lambda a, b: scan.amplitudes[groups[a:b]],
                                             engine.batch):
            stitcher.add(out["amplitude"][:, 0], out["phase"][:, 0], anchors[start:stop])
            if consistency is not None:
                t_phys = time.perf_counter()
                now = None if offsets is None else offsets[start:stop]
                if engine.physics_on_device:
                    predicted = physics.predict_bound(
                        runner.last_outputs(), scan.probe, now, stop - start, runner.ort,
                        runner.device, runner.device_id)
                else:
                    predicted = physics.predict(out["amplitude"], out["phase"], scan.probe,
                                                now)
                consistency.add(scan.amplitudes[groups[start:stop, :1]], predicted)
                consistency.seconds += time.perf_counter() - t_phys
            elapsed = time.perf_counter() - t0
            bar.update(task, completed=stop,
                       rate=f"{stop / elapsed:,.0f} patterns/s" if elapsed > 0 else "")
    # Overlapped, the stitching hides behind the next batches: only the wait for its
    # last batch is not inference.
    infer_s = time.perf_counter() - t0 - (stitcher.waited if overlap else stitcher.seconds)
    if consistency is not None:
        infer_s -= consistency.seconds
    t1 = time.perf_counter()
    stitched = accumulator.result()
    well_lit = well_lit_mask(stitched.weight)
    stitch_s = time.perf_counter() - t1 + stitcher.seconds
    report = (_consistency_report(plan, engine, consistency, infer_s)
              if consistency is not None
              else {"status": "not computed", "reason": engine.physics_why})
    return Inference(stitched, well_lit, accumulator.crop, overlap,
                     {"inference": infer_s, "stitch": stitch_s}, consistency, report)


def refine_stage(plan: RunPlan, inference: Inference) -> None:
    """With ``--refine N``: the stitched object refined through the measured patterns
    (runtime.refine), in place of the network's, which is kept as ``network_obj``."""
    iterations = plan.options.refine
    if iterations == 0:
        return
    scan, stitched = plan.scan, inference.stitched
    try:
        refined = refine_object(stitched.obj, stitched.weight, stitched.origin_px,
                                scan.amplitudes, scan.probe, scan.positions_px,
                                RefineOptions(iterations))
    except ValueError as err:
        raise DataError(f"{plan.data_path}: cannot refine the object: {err}") from err
    inference.network_obj = stitched.obj
    inference.stitched = replace(stitched, obj=refined.obj)
    inference.seconds["refine"] = refined.seconds
    inference.refine_report = refine_report(refined)


def _consistency_report(plan: RunPlan, engine: Engine, consistency: ConsistencyAccumulator,
                        infer_s: float) -> dict[str, Any]:
    report = consistency.report(plan.anchor_positions)
    report.update(engine.physics.describe(plan.spec.channels))
    report["model_outputs_stay_on_device"] = engine.physics_on_device
    report["seconds_per_inference_second"] = (round(consistency.seconds / infer_s, 4)
                                              if infer_s > 0 else None)
    return report


def _warnings(plan: RunPlan, engine: Engine, inference: Inference,
              quality: dict[str, Any]) -> list[str]:
    """Everything the user should read, in the order the run met it."""
    warnings = list(plan.loaded.warnings)
    info = engine.info
    off_ep = {p: ops for p, ops in engine.placement.items() if p != info.ep}
    if off_ep and info.provider != "cpu":
        warnings.append("nodes not on " + info.ep + ": " + "; ".join(
            f"{p}: {', '.join(f'{op}x{k}' for op, k in ops.items())}"
            for p, ops in off_ep.items()))
    if inference.consistency is not None:
        warnings.extend(compare_with_training(inference.consistency_report,
                                              plan.spec.manifest.get("consistency_reference")))
        warnings.extend(compare_probes(inference.consistency_report, plan.spec,
                                       plan.scan.probe))
    if "error" in quality:
        warnings.append(f"ground truth not scored: {quality['error']}")
    warnings.extend(quality.get("warnings", []))
    return warnings


def build_report(plan: RunPlan, engine: Engine, inference: Inference,
                 check: dict[str, Any] | None) -> dict[str, Any]:
    """report.json: what ran where, how fast, and how good the result is."""
    spec, scan, info, data_path = plan.spec, plan.scan, engine.info, plan.data_path
    stitched, well_lit = inference.stitched, inference.well_lit
    infer_s = inference.seconds["inference"]
    quality = quality_report(stitched, well_lit, scan.object_truth)
    network_quality = (None if inference.network_obj is None else
                       quality_report(replace(stitched, obj=inference.network_obj), well_lit,
                                      scan.object_truth))
    product = plan.options.inputs.ptychodus_product
    return {
        "producer": RUN_PRODUCER,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "artifact": artifact_facts(spec),
        "data": {"file": str(data_path), "name": data_path.name,
                 "size": data_path.stat().st_size, "patterns": scan.n_patterns,
                 "memory_mapped": isinstance(scan.amplitudes, np.memmap),
                 **plan.loaded.report},
        "runtime": info.runtime,
        "provider": info.to_dict(),
        "node_counts": {p: sum(ops.values()) for p, ops in engine.placement.items()},
        "node_ops": engine.placement,
        "warnings": _warnings(plan, engine, inference, quality),
        "patterns": scan.n_patterns,
        "groups": plan.total,
        "batch_size": engine.batch,
        "batch_choice": engine.batch_choice,
        "batches": -(-plan.total // engine.batch),
        "io_binding": engine.io_binding,
        "stitch": {"subpixel": plan.subpixel, "subpixel_reason": plan.subpixel_reason,
                   "crop": inference.crop, "weights": "|probe|^2",
                   "overlapped_with_inference": inference.overlap},
        "seconds": {name: round(value, 4) for name, value in inference.seconds.items()},
        "patterns_per_s": round(plan.total / infer_s, 1) if infer_s > 0 else None,
        "object": {"shape": list(stitched.obj.shape), "origin_px": list(stitched.origin_px),
                   "well_lit_pixels": int(well_lit.sum()),
                   "well_lit_threshold": WELL_LIT_THRESHOLD},
        "self_check": check if check is not None else {"status": "SKIPPED"},
        "quality": quality,
        # the network's object before --refine (the figures above are then the refined one's)
        "quality_network": network_quality,
        "refine": inference.refine_report or {"iterations": 0},
        "consistency": inference.consistency_report,
        "outdir": str(plan.outdir),
        "files": list(OUTPUT_FILES) + (["consistency.png"]
                                       if inference.consistency is not None else []),
        "ptychodus_product": None if product is None else str(product),
    }


def write_stage(plan: RunPlan, inference: Inference, report: dict[str, Any]) -> None:
    """All outputs into a temp folder beside -o, then swapped in: an interrupted or failed
    write leaves the previous output as it was. The ptychodus product comes after the swap,
    so a product path inside the output folder survives it."""
    outdir = plan.outdir
    try:
        tmp = temp_dir_beside(outdir)
    except OSError as err:  # the error names the folder the user asked for
        raise naming(err, outdir) from err
    try:
        _write_outputs(tmp, inference.stitched, inference.well_lit, report,
                       inference.network_obj)
        if inference.consistency is not None:
            stitched = inference.stitched
            save_consistency_png(tmp / "consistency.png", np.abs(stitched.obj),
                                 inference.well_lit, stitched.origin_px,
                                 plan.anchor_positions,
                                 inference.consistency.values()["r_factor"],
                                 inference.consistency_report)
        replace_dir(tmp, outdir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise naming(err, outdir) from err
        raise
    write_ptychodus_product(plan.options.inputs, plan.loaded, inference.stitched,
                            plan.data_path, plan.spec.model_sha256)


def check_residual(plan: RunPlan, report: dict[str, Any]) -> None:
    """--max-residual, after the outputs are written: a pipeline can stop on exit 6."""
    limit = plan.options.max_residual
    median = (report["consistency"].get("r_factor") or {}).get("median")
    if limit is not None and median is not None and not median <= limit:
        raise ResidualTooHigh(f"{plan.data_path}: median R-factor {median:.3f} is above "
                              f"--max-residual {limit:g}; the reconstruction in "
                              f"{plan.outdir} was written, but does not fit its measurements",
                              report)


# --------------------------------------------------------------------------- the run


def run_scan(artifact: str | os.PathLike[str], data_path: str | os.PathLike[str],
             outdir: str | os.PathLike[str], options: RunOptions | None = None, *,
             session_cache: SessionCache | None = None, **option_values: Any
             ) -> dict[str, Any]:
    """Reconstruct ``data_path`` with ``artifact`` into ``outdir``; return the report.

    ``options`` is a :class:`RunOptions`, or its fields given as keywords. Everything that
    can be wrong with the inputs is found (:meth:`RunPlan.prepare`) before the output
    folder is touched, and the output's lock is held throughout: a second run writing the
    same folder at the same time fails at once with one line.
    """
    if options is None:
        options = RunOptions(**option_values)
    elif option_values:
        raise TypeError("run_scan takes RunOptions or option keywords, not both")
    with output_lock(outdir, "ptycho-run"):
        started = time.perf_counter()
        plan = RunPlan.prepare(artifact, data_path, outdir, options)
        engine = open_engine(plan, session_cache)
        check = self_check_stage(plan, engine)
        inference = infer_stage(plan, engine)
        refine_stage(plan, inference)
        report = build_report(plan, engine, inference, check)
        report["seconds"]["total"] = round(time.perf_counter() - started, 4)
        write_stage(plan, inference, report)
    check_residual(plan, report)
    return report
