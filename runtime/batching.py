"""How many patterns go through the model at once, and the loop that feeds them.

A fixed-batch artifact takes only its own batch; a dynamic one takes the option, else the
largest power of two whose memory estimate fits the free memory of the device that runs it
(:func:`auto_batch`, with its reason for the report). The object canvas the scan positions
span is checked against the memory before any work (:func:`check_canvas`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import DataError, RunUsageError
from runtime.manifest import ArtifactSpec
from runtime.memory import mem_available_bytes
from runtime.runner import Runner, fill_batch
from runtime.session import SessionInfo, cuda_free_bytes

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


def resolve_batch(spec: ArtifactSpec, batch_size: int | None) -> int | None:
    """Batch size to feed: a fixed-batch artifact only takes its own size; None means
    "dynamic artifact, none given": :func:`auto_batch` chooses once the provider is known."""
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


def output_shape(spec: ArtifactSpec, name: str, batch: int) -> tuple[int, ...]:
    """An output's shape for ``batch`` patterns: the manifest's, else (B, C, N, N)."""
    for entry in spec.manifest.get("outputs") or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            shape = entry.get("shape")
            if isinstance(shape, list) and len(shape) > 1 and all(
                    isinstance(d, int) and d > 0 for d in shape[1:]):
                return (batch, *shape[1:])
    return (batch, spec.channels, spec.patch_size, spec.patch_size)


def iter_batches(runner: Runner, spec: ArtifactSpec, total: int,
                 get: Callable[[int, int], np.ndarray], batch: int
                 ) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """Yield (start, stop, outputs) per batch of ``get(start, stop)`` through ``runner``
    (runtime.model_session.make_runner); a short last batch of a fixed-batch model is
    padded to the fixed size (runtime.runner.fill_batch) and the padding's outputs are
    dropped."""
    for start in range(0, total, batch):
        stop = min(start + batch, total)
        x = np.ascontiguousarray(get(start, stop), dtype=np.float32)
        real = stop - start
        if spec.batch is not None:
            x = fill_batch(x, spec.batch)
        values = runner.infer({spec.input_name: x})
        yield start, stop, {n: np.asarray(values[n])[:real] for n in spec.output_names}
