"""Reconstruct a scan with an exported ONNX artifact: numpy + onnxruntime only, no torch.

(Where torch is installed, the artifact's model.ts and model.pt2 run the same way through
the ``torchscript_session`` / ``pt2_session`` runner kinds of runtime.runner's registry;
torch is imported only on that path.)

artifact (verified) + scan (validated) -> batched inference -> probe-weighted stitch ->
object.npz, amplitude.png, phase.png, report.json, written to a temp folder and renamed,
so an interrupted or failed run never leaves a half-written output folder behind.

Memory stays bounded for large scans: the diffraction stack is memory-mapped when the
.npz stores it uncompressed (runtime.scan_stream), and each batch's patches are added to
the stitch canvas as they come (runtime.stitch.StitchAccumulator), so neither all M
patterns nor all M patches are ever held at once. On CUDA the batches go through IO
binding; the batch size of a dynamic-batch artifact is chosen from free memory unless
given.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from runtime.atomic import ensure_replaceable, output_lock, replace_dir, temp_dir_beside
from runtime.compare import compare_outputs, tolerance_failures
from runtime.consistency import ConsistencyAccumulator
from runtime.consistency_figure import save_consistency_png
from runtime.errors import (
    EXIT_RESIDUAL,
    EXIT_USAGE,
    ArtifactError,
    DataError,
    EnvironmentProblem,
    ParityError,
    PtychoError,
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
    check_product_options,
    open_input,
    write_ptychodus_product,
)
from runtime.manifest import ArtifactSpec, check_provenance, load_artifact
from runtime.memory import mem_available_bytes
from runtime.physics_check import compare_probes, compare_with_training, open_physics
from runtime.runner import runner_factory
from runtime.scan import ScanData
from runtime.session import (
    IOBindingRunner,
    SessionInfo,
    create_session,
    cuda_free_bytes,
    import_onnxruntime,
    measure_node_placement,
)
from runtime.stitch import (
    SUBPIXEL_METHODS,
    StitchAccumulator,
    StitchedObject,
    crop_to,
    has_fractional_positions,
    to_complex,
)

__all__ = ["BatchStitcher", "DEFAULT_BATCH", "MAX_AUTO_BATCH", "MAX_AUTO_BATCH_CPU",
           "RunUsageError", "auto_batch", "bytes_per_pattern", "check_session_io", "choose_batch",
           "make_runner", "run_scan", "run_self_check", "self_check_artifact"]

# Batch size when it is neither given, fixed by the artifact, nor derivable from memory.
DEFAULT_BATCH = 256
MAX_AUTO_BATCH = 1024
# On the CPU a bigger batch only adds memory traffic: 2-core EPYC VM, ptycho-run,
# patterns/s at batch 16/64/256/1024: demo model 846/872/902/639; default model (2.3 M
# parameters) 85 at 64, 83 at 256, 67 at 576. The Xeon VM's bench had 256 ahead of 64.
MAX_AUTO_BATCH_CPU = 256
# Automatic batch: a quarter of the CPU's MemAvailable (the rest is the OS, the page cache
# that holds a memory-mapped scan, the stitch canvas), or all free GPU memory but 2 GiB
# (CUDA context, cuDNN workspaces, onnxruntime's arena growth).
CPU_MEMORY_FRACTION = 0.25
GPU_HEADROOM_BYTES = 2 << 30
# Activation estimate: this many float32 feature maps per encoder stage, each of the
# stage's width at its resolution (N / 2**stage)^2 (two encoder convs and, in each of the
# two decoders, the upsampled map and two convs at the mirrored stage). For PtychoPINN's
# default widths at N = 64 that is 14.7 MB/pattern, above the 11.5 MB that every
# activation of the graph takes at once: an upper bound, as onnxruntime's memory planner
# reuses buffers. Manifests without model widths get PtychoPINN's default.
ACTIVATION_MAPS = 8
DEFAULT_WIDTHS = (64, 128, 256)
OUTPUT_FILES = ("object.npz", "amplitude.png", "phase.png", "report.json")
RUN_PRODUCER = "ptycho-run"  # report.json's "producer": marks a folder -o may replace


class RunUsageError(PtychoError):
    """Options that contradict each other or the artifact (fix the command line)."""

    exit_code = EXIT_USAGE


# --------------------------------------------------------------------------- batching


def resolve_batch(spec: ArtifactSpec, batch_size: int | None) -> int | None:
    """Batch size to feed: a fixed-batch artifact only takes its own size; None means
    "dynamic artifact, none given": :func:`auto_batch` chooses once the provider is known."""
    if batch_size is not None and batch_size < 1:
        raise RunUsageError(f"--batch-size must be >= 1, got {batch_size}")
    if spec.batch is None:
        return batch_size
    if batch_size is not None and batch_size != spec.batch:
        raise RunUsageError(f"{spec.model_path} was exported with a fixed batch of {spec.batch}; "
                            f"--batch-size {batch_size} cannot be used (leave it out, or "
                            "re-export without --batch for a dynamic batch axis)")
    return spec.batch


def bytes_per_pattern(spec: ArtifactSpec) -> tuple[int, str]:
    """Estimated inference memory per pattern (bytes) and how it was estimated: float32
    input and outputs plus conv activations (see ACTIVATION_MAPS)."""
    c, n = spec.channels, spec.patch_size
    io_bytes = 4 * c * n * n * (1 + len(spec.output_names))
    widths = (spec.manifest.get("model") or {}).get("widths")
    known = isinstance(widths, list) and bool(widths) and all(
        isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)
    used = tuple(widths) if known else DEFAULT_WIDTHS
    maps = sum(w * (n / 2**stage) ** 2 for stage, w in enumerate(used))
    total = io_bytes + int(4 * ACTIVATION_MAPS * maps)
    how = (f"input + {len(spec.output_names)} outputs + {ACTIVATION_MAPS} float32 maps per "
           f"encoder stage, widths {list(used)}"
           + ("" if known else " (manifest lists no model widths: PtychoPINN default)"))
    return total, how


def choose_batch(per_pattern: int, budget: int | None, cap: int = MAX_AUTO_BATCH) -> int:
    """Largest power of two <= ``cap`` whose estimate fits ``budget`` bytes (at least 1);
    DEFAULT_BATCH (at most ``cap``) when the budget is unknown (None)."""
    if budget is None:
        return min(DEFAULT_BATCH, cap)
    batch = cap
    while batch > 1 and batch * per_pattern > budget:
        batch //= 2
    return batch


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


# Per canvas pixel while stitching: the complex64 canvas, the float32 weight sum and its
# FFT-convolution workspace, the complex64 object and the mask written out.
CANVAS_BYTES_PER_PX = 40
# Without /proc/meminfo: refuse a canvas over 2^32 pixels (a 65536^2 object).
CANVAS_PIXEL_CAP = 1 << 32


def check_canvas(positions_px: np.ndarray, n_patch: int, data_path: Path,
                 meminfo: str | os.PathLike[str] = "/proc/meminfo") -> dict[str, Any]:
    """Before any work: the object canvas the positions span must fit in memory. One
    scan position at (3e5, 3e5) asked for 671 GiB, and used to end in a MemoryError."""
    lo, hi = positions_px.min(axis=0), positions_px.max(axis=0)
    h, w = (int(np.ceil(hi[k] - lo[k])) + n_patch + 2 for k in range(2))
    need = h * w * CANVAS_BYTES_PER_PX
    free = mem_available_bytes(meminfo)
    facts = {"shape": [h, w], "bytes": need, "available_bytes": free}
    too_big = need > free if free is not None else h * w > CANVAS_PIXEL_CAP
    if too_big:
        have = (f"the {_gib(free)} available (MemAvailable)" if free is not None
                else f"the {CANVAS_PIXEL_CAP:,}-pixel cap")
        raise DataError(
            f"{data_path}: the scan positions span y {lo[0]:.6g}..{hi[0]:.6g}, x "
            f"{lo[1]:.6g}..{hi[1]:.6g} px: a {h} x {w} object canvas needing {_gib(need)}, "
            f"more than {have}; check the positions (units: --position-units) for outliers")
    return facts


def auto_batch(spec: ArtifactSpec, info: SessionInfo,
               meminfo: str | os.PathLike[str] = "/proc/meminfo",
               gpu_free: Callable[[int], int | None] = cuda_free_bytes
               ) -> tuple[int, dict[str, Any]]:
    """Batch for a dynamic artifact when none was given, with the reason for the report."""
    per, how = bytes_per_pattern(spec)
    cap = MAX_AUTO_BATCH if info.on_device else MAX_AUTO_BATCH_CPU
    if info.on_device:
        free = gpu_free(info.device_id)
        what = f"free memory of GPU {info.device_id} (nvidia-smi)"
        budget = None if free is None else max(free - GPU_HEADROOM_BYTES, 0)
        share = f"{what} {_gib(free or 0)} less {_gib(GPU_HEADROOM_BYTES)} headroom"
    else:
        free = mem_available_bytes(meminfo)
        what = "MemAvailable (/proc/meminfo)"
        budget = None if free is None else int(free * CPU_MEMORY_FRACTION)
        share = f"{CPU_MEMORY_FRACTION:.0%} of {what} {_gib(free or 0)}"
    batch = choose_batch(per, budget, cap)
    if budget is None:
        reason = f"{what} unknown: default batch {min(DEFAULT_BATCH, cap)}"
    else:
        limit = "" if info.on_device else " (CPU: larger batches are slower)"
        reason = (f"largest power of two <= {cap}{limit} at an estimated "
                  f"{per / 1e6:.2f} MB/pattern within {_gib(budget)} = {share}")
    return batch, {"source": "memory" if budget is not None else "default", "reason": reason,
                   "bytes_per_pattern": per, "estimate": how, "budget_bytes": budget}


def _output_shape(spec: ArtifactSpec, name: str, batch: int) -> tuple[int, ...]:
    """An output's shape for ``batch`` patterns: the manifest's, else (B, C, N, N)."""
    for entry in spec.manifest.get("outputs") or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            shape = entry.get("shape")
            if isinstance(shape, list) and len(shape) > 1 and all(
                    isinstance(d, int) and d > 0 for d in shape[1:]):
                return (batch, *shape[1:])
    return (batch, spec.channels, spec.patch_size, spec.patch_size)


def make_runner(session: Any, info: SessionInfo, spec: ArtifactSpec,
                ort: Any = None) -> IOBindingRunner | None:
    """IO binding for onnxruntime sessions on a CUDA device; None (plain session.run) on
    the CPU and for TorchScript (which copies each batch to its device itself)."""
    if not info.on_device or info.runtime != "onnxruntime":
        return None
    return IOBindingRunner(session, ort if ort is not None else import_onnxruntime(),
                           spec.input_name, spec.output_names, partial(_output_shape, spec),
                           info.device_id)


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


def iter_batches(session: Any, spec: ArtifactSpec, total: int,
                 get: Callable[[int, int], np.ndarray], batch: int,
                 runner: Callable[[np.ndarray], list[np.ndarray]] | None = None
                 ) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """Yield (start, stop, outputs) per batch; a short last batch of a fixed-batch model is
    padded with zeros to the fixed size and the padding's outputs are dropped. ``runner``
    (IO binding, see :func:`make_runner`) replaces ``session.run`` when given."""
    names = list(spec.output_names)
    for start in range(0, total, batch):
        stop = min(start + batch, total)
        x = np.ascontiguousarray(get(start, stop), dtype=np.float32)
        real = stop - start
        if spec.batch is not None and real < spec.batch:
            pad = np.zeros((spec.batch - real, *x.shape[1:]), dtype=np.float32)
            x = np.concatenate([x, pad])
        values = runner(x) if runner is not None else session.run(names, {spec.input_name: x})
        yield start, stop, {n: np.asarray(v)[:real] for n, v in zip(names, values, strict=True)}


# --------------------------------------------------------------------------- self-check


def run_self_check(spec: ArtifactSpec, session: Any,
                   runner: Callable[[np.ndarray], list[np.ndarray]] | None = None
                   ) -> dict[str, Any]:
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
    for _, _, values in iter_batches(session, spec, len(x), lambda a, b: x[a:b], batch,
                                     runner):
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
        # a numerical mismatch, as the export gate's: the same exit code (5)
        raise ParityError(f"self-check FAILED on {info.provider} ({spec.model_path}): "
                            f"{'; '.join(result['failures'])}")


def self_check_artifact(artifact: str | os.PathLike[str], provider: str = "auto",
                        threads: int | None = None, device_id: int = 0,
                        model_format: str | None = None) -> dict[str, Any]:
    """The self-check alone: verify hashes, run golden.npz, report PASS/FAIL (never raises
    for FAIL, so a caller can print the table first)."""
    _check_format(model_format)
    spec = load_artifact(artifact, check_golden=True, model_format=model_format)
    session, info = open_session(spec, provider, threads, device_id=device_id, profile=False)
    result = run_self_check(spec, session, make_runner(session, info, spec))
    return {"artifact": _artifact_facts(spec), "provider": info.to_dict(), "self_check": result}


# --------------------------------------------------------------------------- sessions

MODEL_FORMAT_CHOICES = ("onnx", "torchscript", "pt2")
TORCH_FORMATS = ("torchscript", "pt2")  # run by the torch side's "<format>_session" runners


def _check_format(model_format: str | None) -> None:
    if model_format is not None and model_format not in MODEL_FORMAT_CHOICES:
        raise RunUsageError(f"--format {model_format!r}: choose one of "
                            f"{', '.join(MODEL_FORMAT_CHOICES)} (or leave it out)")


def open_session(spec: ArtifactSpec, provider: str, threads: int | None, *,
                 device_id: int = 0, profile: bool = True, log_level: int = 3
                 ) -> tuple[Any, SessionInfo]:
    """A session for the artifact's model, checked against its manifest before any scan is
    fed to it: onnxruntime for model.onnx (graph inputs/outputs, provenance), TorchScript
    for model.ts (the ``torchscript_session`` runner kind, which imports torch only here;
    provenance)."""
    if spec.model_format in TORCH_FORMATS:
        try:
            create_torch_session = runner_factory(f"{spec.model_format}_session")
        except LookupError as err:
            raise EnvironmentProblem(f"{spec.model_path}: a {spec.model_format} model needs "
                                     f"torch: {err}") from None
        session, info = create_torch_session(spec.model_path, spec.input_name,
                                             spec.output_names, provider, threads, device_id)
        check_provenance(spec.model_path, session.metadata, spec.manifest, spec.manifest_path)
        return session, info
    session, info = create_session(spec.model_path, provider, threads, profile=profile,
                                   log_level=log_level, device_id=device_id)
    try:
        check_session_io(session, spec)
    except BaseException:
        _end_profile(session, info)
        raise
    return session, info


def warm_up(session: Any, feed: dict[str, np.ndarray], info: SessionInfo
            ) -> dict[str, dict[str, int]]:
    """One warm-up batch; returns the ops per provider (onnxruntime: measured by profiling
    where each node ran; TorchScript: the aten ops of its graph, all on its device)."""
    if info.runtime in TORCH_FORMATS:
        session.run(None, feed)
        return {info.ep: session.op_counts()}
    return measure_node_placement(session, feed, info)


# --------------------------------------------------------------------------- helpers


def _artifact_facts(spec: ArtifactSpec) -> dict[str, Any]:
    return {"folder": str(spec.folder), "model": spec.model_path.name,
            "format": spec.model_format,
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


ORT_FLOAT = "tensor(float)"


def check_session_io(session: Any, spec: ArtifactSpec) -> None:
    """The model file must have the inputs and outputs its manifest declares: one float32
    input of shape (batch, C, N, N) and float32 amplitude and phase outputs. A file whose
    graph disagrees (a float64 input, another patch size, a model swapped in with the
    manifest rehashed) is refused here, before any scan is fed to it."""
    where = spec.model_path

    def dims(value: Any) -> list[Any]:
        return list(value.shape) if isinstance(value.shape, list | tuple) else []

    inputs = list(session.get_inputs())
    if len(inputs) != 1 or inputs[0].name != spec.input_name:
        names = [i.name for i in inputs]
        raise ArtifactError(f"{where}: the graph's inputs are {names} but {spec.manifest_path.name}"
                            f" declares one input {spec.input_name!r}; re-export the model")
    value = inputs[0]
    if value.type != ORT_FLOAT:
        raise ArtifactError(f"{where}: input {value.name!r} is {value.type} in the file but "
                            f"{spec.manifest_path.name} declares float32; the runtime only "
                            "feeds float32: re-export the model with ptycho-export")
    want = [spec.batch if spec.batch is not None else None, spec.channels, spec.patch_size,
            spec.patch_size]
    got = dims(value)
    fixed = [d if isinstance(d, int) and d > 0 else None for d in got]
    if len(got) != 4 or any(w is not None and f is not None and w != f
                            for w, f in zip(want, fixed, strict=True)):
        raise ArtifactError(f"{where}: input {value.name!r} has shape {got} in the file but "
                            f"{spec.manifest_path.name} declares {list(spec.input_shape)} "
                            "(model swapped or manifest edited?); re-export the model")
    outputs = {o.name: o for o in session.get_outputs()}
    for name in ("amplitude", "phase"):
        out = outputs.get(name)
        if out is None:
            raise ArtifactError(f"{where}: the graph has no output {name!r} (outputs: "
                                f"{sorted(outputs)}) but {spec.manifest_path.name} lists it")
        if out.type != ORT_FLOAT:
            raise ArtifactError(f"{where}: output {name!r} is {out.type} in the file but "
                                f"{spec.manifest_path.name} declares float32; re-export the "
                                "model with ptycho-export")
    get_meta = getattr(session, "get_modelmeta", None)
    if get_meta is not None:  # absent only on test stand-ins
        metadata = dict(get_meta().custom_metadata_map)
        check_provenance(where, metadata, spec.manifest, spec.manifest_path)


def _end_profile(session: Any, info: SessionInfo) -> None:
    """Stop a profiling session that will not run, leaving no trace files behind."""
    with contextlib.suppress(Exception):
        trace = session.end_profiling()
        if trace:
            Path(trace).unlink(missing_ok=True)
    if info.profile_dir is not None:
        shutil.rmtree(info.profile_dir, ignore_errors=True)
        info.profile_dir = None


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
                   report: dict[str, Any]) -> None:
    obj = stitched.obj
    np.savez(folder / "object.npz", object=obj, mask=well_lit,
             origin_px=np.asarray(stitched.origin_px, dtype=np.int64), weight=stitched.weight,
             amplitude=np.abs(obj).astype(np.float32),
             phase=np.angle(obj).astype(np.float32))
    save_png(folder / "amplitude.png", amplitude_figure(obj, well_lit, 512))
    save_png(folder / "phase.png", phase_figure(obj, well_lit, 512))
    (folder / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True,
                                                   default=str) + "\n")


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


# --------------------------------------------------------------------------- the run


def _resolve_subpixel(subpixel: str | None, positions: np.ndarray) -> tuple[str, str]:
    """(method, why): the option as given, else Fourier exactly when it changes anything."""
    if subpixel is not None:
        if subpixel not in SUBPIXEL_METHODS:
            raise RunUsageError(f"--subpixel {subpixel!r}: choose one of "
                                f"{', '.join(SUBPIXEL_METHODS)}")
        return subpixel, "given"
    if has_fractional_positions(positions):
        return "fourier", "default: some scan positions are not whole pixels"
    return "none", "default: every scan position is a whole pixel"


def run_scan(artifact: str | os.PathLike[str], data_path: str | os.PathLike[str],
             outdir: str | os.PathLike[str], **options: Any) -> dict[str, Any]:
    """Reconstruct ``data_path`` with ``artifact`` into ``outdir`` (options: see
    :func:`_run_scan`), holding the output's lock: a second run writing the same folder
    at the same time fails at once with one line."""
    with output_lock(outdir, "ptycho-run"):
        return _run_scan(artifact, data_path, outdir, **options)


class ResidualTooHigh(PtychoError):
    """--max-residual: the scan's data-consistency residual is above the pipeline's limit
    (the outputs were written; exit 6 lets a pipeline stop there)."""

    exit_code = EXIT_RESIDUAL


def _run_scan(artifact: str | os.PathLike[str], data_path: str | os.PathLike[str],
             outdir: str | os.PathLike[str], provider: str = "auto",
             batch_size: int | None = None, threads: int | None = None,
             self_check: bool = False, progress: bool = True,
             log_level: int = 3, subpixel: str | None = None,
             device_id: int = 0,
             session_cache: dict[tuple, tuple[Any, Any, dict]] | None = None,
             inputs: InputOptions | None = None,
             model_format: str | None = None,
             overlap_stitch: bool | None = None, force: bool = False,
             max_residual: float | None = None) -> dict[str, Any]:
    """Reconstruct ``data_path`` with ``artifact`` into ``outdir``; return the report.

    Everything that can be wrong with the inputs is found before the output folder is
    touched: artifact hashes, scan contract, patch size, options, provider, self-check.
    ``subpixel`` (none | fourier | bilinear, see runtime.stitch) defaults to "fourier" when
    any scan position is fractional and "none" otherwise; ``batch_size`` of a
    dynamic-batch artifact defaults to :func:`auto_batch`'s choice. ``session_cache`` (a
    dict owned by the caller, e.g. one per Dask worker) lets many scans reuse one
    onnxruntime session per artifact and provider instead of building one per scan.
    ``inputs`` says how to read data that is not an amplitude npz (counts, HDF5, a
    ptychodus input folder, other position conventions) and whether to write a ptychodus
    product (see runtime.inputs). ``model_format`` ("onnx" | "torchscript" | "pt2") picks the
    artifact's model file; by default the file given as ``artifact`` (model.ts runs with
    TorchScript when torch is installed), else model.onnx. ``overlap_stitch`` stitches
    each batch in a helper thread while the next one is inferred (:class:`BatchStitcher`);
    by default only on a GPU, where the CPU is otherwise idle during inference.
    """
    started = time.perf_counter()
    data_path, outdir = Path(data_path), Path(outdir)
    if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
        raise RunUsageError(f"--device-id must be an integer >= 0, got {device_id!r}")
    _check_format(model_format)
    spec = load_artifact(artifact, check_golden=self_check, model_format=model_format)
    inputs = inputs or InputOptions()
    loaded = open_input(data_path, inputs, spec.patch_size)
    scan = loaded.scan
    check_scan(scan, spec, data_path)
    check_product_options(inputs, loaded)
    batch = resolve_batch(spec, batch_size)
    method, method_why = _resolve_subpixel(subpixel, scan.positions_px)
    check_outdir(outdir, spec, data_path, force)
    check_canvas(scan.positions_px, spec.patch_size, data_path)
    groups = group_neighbours(scan.positions_px, spec.gridsize)
    total = len(groups)
    # Channel 0 of each group is the pattern that anchors it: one patch per position.
    anchor_positions = scan.positions_px[groups[:, 0]]
    weights = np.abs(scan.probe).astype(np.float32) ** 2
    accumulator = StitchAccumulator(anchor_positions, spec.patch_size, weights=weights,
                                    subpixel=method)

    cache_key = (str(spec.model_path), spec.model_sha256, provider, threads, device_id)
    cached = session_cache.get(cache_key) if session_cache is not None else None
    if cached is not None:
        session, info, placement = cached
    else:
        session, info = open_session(spec, provider, threads, device_id=device_id,
                                     profile=True, log_level=log_level)
        placement = None
    if batch is not None:
        batch_choice: dict[str, Any] = {
            "source": "option" if spec.batch is None else "artifact",
            "reason": ("--batch-size" if spec.batch is None
                       else f"the artifact was exported with a fixed batch of {spec.batch}")}
    else:
        batch, batch_choice = auto_batch(spec, info)
    if spec.batch is None and total < batch:
        batch_choice["reason"] += f"; the scan has only {total} patterns"
        batch = total
    warm = {spec.input_name: np.zeros((batch, spec.channels, spec.patch_size, spec.patch_size),
                                      dtype=np.float32)}
    if placement is None:
        placement = warm_up(session, warm, info)
        if session_cache is not None:
            session_cache[cache_key] = (session, info, placement)
    node_counts = {p: sum(ops.values()) for p, ops in placement.items()}
    warnings = list(loaded.warnings)
    off_ep = {p: ops for p, ops in placement.items() if p != info.ep}
    if off_ep and info.provider != "cpu":
        warnings.append("nodes not on " + info.ep + ": " + "; ".join(
            f"{p}: {', '.join(f'{op}x{k}' for op, k in ops.items())}"
            for p, ops in off_ep.items()))
    runner = make_runner(session, info, spec)
    physics, physics_why = open_physics(spec, info.provider, threads, device_id)
    consistency = ConsistencyAccumulator() if physics is not None else None
    offsets = (group_offsets(scan.positions_px, groups)
               if physics is not None and physics.merges_overlap else None)
    bound_physics = physics is not None and runner is not None
    if max_residual is not None and consistency is None:
        raise RunUsageError(f"--max-residual needs the data-consistency check, which this "
                            f"artifact cannot run: {physics_why}")

    check = None
    if self_check:
        check = run_self_check(spec, session, runner)
        _raise_if_failed(check, spec, info)

    overlap = info.on_device if overlap_stitch is None else bool(overlap_stitch)
    t0 = time.perf_counter()
    with _progress(progress) as bar, BatchStitcher(accumulator, overlap) as stitcher:
        task = bar.add_task(f"inference ({info.provider})", total=total, rate="")
        for start, stop, out in iter_batches(session, spec, total,
                                             lambda a, b: scan.amplitudes[groups[a:b]], batch,
                                             runner):
            stitcher.add(out["amplitude"][:, 0], out["phase"][:, 0],
                         anchor_positions[start:stop])
            if consistency is not None:
                t_phys = time.perf_counter()
                group_offsets_now = None if offsets is None else offsets[start:stop]
                if bound_physics:  # the model's outputs stay on the device
                    predicted = physics.predict_bound(
                        runner.last_outputs(), scan.probe, group_offsets_now, stop - start,
                        runner.ort, runner.device, runner.device_id)
                else:
                    predicted = physics.predict(out["amplitude"], out["phase"], scan.probe,
                                                group_offsets_now)
                consistency.add(scan.amplitudes[groups[start:stop, :1]], predicted)
                consistency.seconds += time.perf_counter() - t_phys
            elapsed = time.perf_counter() - t0
            bar.update(task, completed=stop,
                       rate=f"{stop / elapsed:,.0f} patterns/s" if elapsed > 0 else "")
    add_s = stitcher.seconds
    # Overlapped, the stitching hides behind the next batches: only the wait for its
    # last batch is not inference.
    infer_s = time.perf_counter() - t0 - (stitcher.waited if overlap else add_s)
    if consistency is not None:
        infer_s -= consistency.seconds
        consistency_report = consistency.report(anchor_positions)
        consistency_report.update(physics.describe(spec.channels))
        consistency_report["model_outputs_stay_on_device"] = bound_physics
        consistency_report["seconds_per_inference_second"] = round(
            consistency.seconds / infer_s, 4) if infer_s > 0 else None
        warnings.extend(compare_with_training(consistency_report,
                                              spec.manifest.get("consistency_reference")))
        warnings.extend(compare_probes(consistency_report, spec, scan.probe))
    else:
        consistency_report = {"status": "not computed", "reason": physics_why}

    t1 = time.perf_counter()
    stitched = accumulator.result()
    well_lit = well_lit_mask(stitched.weight)
    stitch_s = time.perf_counter() - t1 + add_s
    quality = quality_report(stitched, well_lit, scan.object_truth)
    if "error" in quality:
        warnings.append(f"ground truth not scored: {quality['error']}")
    warnings.extend(quality.get("warnings", []))

    report: dict[str, Any] = {
        "producer": RUN_PRODUCER,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "artifact": _artifact_facts(spec),
        "data": {"file": str(data_path), "name": data_path.name,
                 "size": data_path.stat().st_size, "patterns": scan.n_patterns,
                 "memory_mapped": isinstance(scan.amplitudes, np.memmap), **loaded.report},
        "runtime": info.runtime,
        "provider": info.to_dict(),
        "node_counts": node_counts,
        "node_ops": placement,
        "warnings": warnings,
        "patterns": scan.n_patterns,
        "groups": total,
        "batch_size": batch,
        "batch_choice": batch_choice,
        "batches": -(-total // batch),
        "io_binding": runner is not None,
        "stitch": {"subpixel": method, "subpixel_reason": method_why,
                   "crop": accumulator.crop, "weights": "|probe|^2",
                   "overlapped_with_inference": overlap},
        "seconds": {"inference": round(infer_s, 4), "stitch": round(stitch_s, 4)},
        "patterns_per_s": round(total / infer_s, 1) if infer_s > 0 else None,
        "object": {"shape": list(stitched.obj.shape), "origin_px": list(stitched.origin_px),
                   "well_lit_pixels": int(well_lit.sum()),
                   "well_lit_threshold": WELL_LIT_THRESHOLD},
        "self_check": check if check is not None else {"status": "SKIPPED"},
        "quality": quality,
        "consistency": consistency_report,
        "outdir": str(outdir),
        "files": list(OUTPUT_FILES) + (["consistency.png"] if consistency is not None else []),
        "ptychodus_product": None if inputs.ptychodus_product is None
        else str(inputs.ptychodus_product),
    }

    try:
        tmp = temp_dir_beside(outdir)
    except OSError as err:  # the error names the folder the user asked for
        raise naming(err, outdir) from err
    try:
        report["seconds"]["total"] = round(time.perf_counter() - started, 4)
        _write_outputs(tmp, stitched, well_lit, report)
        if consistency is not None:
            save_consistency_png(tmp / "consistency.png", np.abs(stitched.obj), well_lit,
                                 stitched.origin_px, anchor_positions,
                                 consistency.values()["r_factor"], consistency_report)
        replace_dir(tmp, outdir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise naming(err, outdir) from err
        raise
    # After the swap, so a product path inside the output folder survives it.
    write_ptychodus_product(inputs, loaded, stitched, data_path, spec.model_sha256)
    median = (consistency_report.get("r_factor") or {}).get("median")
    if max_residual is not None and median is not None and not median <= max_residual:
        raise ResidualTooHigh(f"{data_path}: median R-factor {median:.3f} is above "
                              f"--max-residual {max_residual:g}; the reconstruction in "
                              f"{outdir} was written, but does not fit its measurements")
    return report
