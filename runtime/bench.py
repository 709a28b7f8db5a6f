"""The torch-free parts of the benchmarks: the stitcher and the runtime's cold start.

They time what a runtime-only install has (numpy, onnxruntime, this package), so they live
here, in the wheel, rather than beside the torch benchmark: ptycho-bench
(ptycho_export.bench.speed) reports :func:`bench_stitch`, and bench/runtime_bench.py the
10k-patch, streamed and cold-start figures. Timings are returned, never asserted.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from runtime.memory import peak_rss_mb, reset_peak_rss, rss_mb

STITCH_TARGET_S = 0.1  # 10k 64x64 patches, integer placement
COLD_START_TARGET_S = 1.0
# The folder that holds the runtime package (a source checkout or site-packages): a cold
# start's child process imports it from there.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- stitcher


def raster(count: int, n: int, seed: int, whole_pixels: bool = True) -> np.ndarray:
    """(count, 2) positions on a jittered raster, step n / 5 (about 25 overlapping
    patches per pixel), rounded to whole pixels unless ``whole_pixels`` is False."""
    rng = np.random.default_rng(seed)
    side = math.ceil(math.sqrt(count))
    step = max(n // 5, 1)
    yy, xx = np.divmod(np.arange(count), side)
    pos = np.stack([yy, xx], 1) * float(step) + n / 2
    pos = pos + rng.uniform(-1.0, 1.0, pos.shape)
    return np.rint(pos) if whole_pixels else pos


def random_patches(count: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    patches = np.empty((count, n, n), dtype=np.complex64)
    patches.real = rng.standard_normal((count, n, n), dtype=np.float32)
    patches.imag = rng.standard_normal((count, n, n), dtype=np.float32)
    return patches


def probe_weights(n: int) -> np.ndarray:
    """|probe|^2-like weights: a Gaussian spot (what ptycho-run passes is |probe|^2)."""
    c = np.arange(n) - n / 2
    return np.exp(-(c[:, None] ** 2 + c[None, :] ** 2) / (n / 4) ** 2).astype(np.float32)


def _load_stitch_module(path: Path) -> Any:
    """Another version of runtime/stitch.py, imported from a file (for before/after)."""
    name = f"stitch_baseline_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: cannot import")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def bench_stitch_10k(count: int, n: int, rounds: int, seed: int,
                     baseline: Path | None, log: Callable[[str], None]) -> dict[str, Any]:
    from runtime.stitch import StitchAccumulator, stitch_patches

    patches = random_patches(count, n, seed)
    positions = raster(count, n, seed)
    weights = probe_weights(n)

    # Real scans have fractional positions: ptycho-run then stitches with sub-pixel
    # placement (Fourier by default), which costs FFTs per patch.
    fractional = positions + np.random.default_rng(seed + 1).uniform(-0.5, 0.5,
                                                                      positions.shape)

    def ours(where: np.ndarray = positions, **options: Any) -> Callable[[], Any]:
        def run() -> Any:
            acc = StitchAccumulator(where, n, weights=weights, **options)
            acc.add(patches, where)
            return acc.result()
        return run

    configs: dict[str, Callable[[], Any]] = {
        "float32 + prefetch (default)": ours(),
        "float32, no prefetch": ours(prefetch=False),
        "float64 canvas, no prefetch": ours(accumulate="float64", prefetch=False),
        "fractional positions, subpixel fourier": ours(fractional, subpixel="fourier"),
        "fractional positions, subpixel bilinear": ours(fractional, subpixel="bilinear"),
    }
    if baseline is not None:
        module = _load_stitch_module(baseline)
        configs[f"baseline {baseline.name}"] = lambda: module.stitch_patches(
            patches, positions, weights=weights)
    out: dict[str, Any] = {}
    # Rounds interleaved over the configurations: a neighbour's load hits all alike.
    spent: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(rounds):
        for name, fn in configs.items():
            gc.collect()
            t0 = time.perf_counter()
            fn()
            spent[name].append(time.perf_counter() - t0)
    for name, values in spent.items():
        out[name] = {"s_min": round(min(values), 4),
                     "s_median": round(statistics.median(values), 4), "rounds": rounds,
                     "patches_per_s_best": round(count / min(values), 1),
                     "s_all": [round(s, 4) for s in values]}
        log(f"  {name}: best {min(values):.3f} s, median {statistics.median(values):.3f} s")
    # Accuracy of the float32 canvas against the float64 one, on these random patches.
    a = stitch_patches(patches, positions, weights=weights)
    b = stitch_patches(patches, positions, weights=weights, accumulate="float64")
    diff = float(np.abs(a.obj.astype(np.complex128) - b.obj).max())
    default = out["float32 + prefetch (default)"]
    return {"patches": count, "patch_size": n, "placement": "integer (subpixel none)",
            "positions": f"jittered raster, step {max(n // 5, 1)} px",
            "weights": "gaussian (|probe|^2-like)", "canvas": list(a.obj.shape),
            "input_mb": round(patches.nbytes / 2**20, 1), "configs": out,
            "float32_vs_float64_max_abs_over_max": diff / float(np.abs(b.obj).max()),
            "target_s": STITCH_TARGET_S, "meets_target_best": default["s_min"]
            <= STITCH_TARGET_S}


def _stream(count: int, n: int, batch: int, seed: int
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(patches, positions) batches of a count-patch scan; the patch values cycle through
    one pool of `batch` random patches, so nothing of size count is ever held."""
    pool = random_patches(batch, n, seed)
    positions = raster(count, n, seed)
    for start in range(0, count, batch):
        stop = min(start + batch, count)
        yield pool[: stop - start], positions[start:stop]


def bench_stitch_stream(count: int, n: int, batch: int, seed: int,
                        log: Callable[[str], None]) -> dict[str, Any]:
    from runtime.stitch import StitchAccumulator

    weights = probe_weights(n)
    positions = raster(count, n, seed)
    gc.collect()
    rss_before = rss_mb()
    resettable = reset_peak_rss()
    t0 = time.perf_counter()
    acc = StitchAccumulator(positions, n, weights=weights)
    feed_s = 0.0
    t_feed = time.perf_counter()
    for patches, where in _stream(count, n, batch, seed):
        feed_s += time.perf_counter() - t_feed
        acc.add(patches, where)
        t_feed = time.perf_counter()
    stitched = acc.result()
    total = time.perf_counter() - t0 - feed_s
    peak = peak_rss_mb()
    canvas_mb = acc.nbytes / 2**20
    out_mb = (stitched.obj.nbytes + stitched.weight.nbytes + stitched.mask.nbytes) / 2**20
    log(f"  {count:,} patches in {total:.2f} s ({count / total:,.0f} patches/s), peak RSS "
        f"{peak:.0f} MB (canvas {canvas_mb:.0f} MB)")
    return {"patches": count, "patch_size": n, "batch": batch, "s": round(total, 3),
            "patches_per_s": round(count / total, 1), "canvas": list(stitched.obj.shape),
            "canvas_mb": round(canvas_mb, 1), "result_mb": round(out_mb, 1),
            "input_if_held_mb": round(count * n * n * 8 / 2**20, 1),
            "rss_before_mb": round(rss_before, 1), "peak_rss_mb": round(peak, 1),
            "peak_rss_source": "VmHWM reset before" if resettable else "ru_maxrss (process)",
            "peak_above_before_mb": round(peak - rss_before, 1),
            "excludes": "generating the batches (a reused pool: ~0 s)"}


def bench_stitch(count: int, n: int, seed: int, repeats: int = 3) -> dict[str, Any]:
    """stitch_patches on `count` random complex64 N x N patches on a jittered raster.

    Integer placement (the default path) is timed ``repeats`` times, each sub-pixel mode
    once on the same patches at fractional positions.
    """
    from runtime.stitch import SUBPIXEL_METHODS, stitch_patches

    step = max(n // 5, 1)
    fractional = raster(count, n, seed, whole_pixels=False)
    patches = random_patches(count, n, seed)
    weights = probe_weights(n)
    modes: dict[str, dict[str, Any]] = {}

    def timed(positions: np.ndarray, times: int, **kwargs: Any) -> dict[str, Any]:
        spent = []
        for _ in range(times):
            t0 = time.perf_counter()
            stitched = stitch_patches(patches, positions, weights=weights, **kwargs)
            spent.append(time.perf_counter() - t0)
        median = statistics.median(spent)
        return {"s_median": round(median, 4), "s_min": round(min(spent), 4), "repeats": times,
                "patches_per_s": round(count / median, 1), "canvas": list(stitched.obj.shape)}

    modes["integer"] = timed(np.rint(fractional), repeats)
    for mode in SUBPIXEL_METHODS:
        if mode != "none":
            modes[f"subpixel {mode}"] = timed(fractional, 1, subpixel=mode)
    main = modes["integer"]
    return {"patches": count, "patch_size": n, "step_px": step, "weights": "gaussian",
            "input_mb": round(count * n * n * 8 / 2**20, 1), **main, "modes": modes}


# --------------------------------------------------------------------------- cold start

COLD_START_CODE = r"""
import time
t0 = time.perf_counter()
import json, sys
import numpy as np
import runtime.run
from runtime.manifest import load_artifact
from runtime.session import create_session
t_import = time.perf_counter()
spec = load_artifact(sys.argv[1])
t_verify = time.perf_counter()
session, info = create_session(spec.model_path, "cpu")
t_session = time.perf_counter()
x = np.load(sys.argv[2])
out = session.run(list(spec.output_names), {spec.input_name: x})
t_batch = time.perf_counter()
print(json.dumps({"import_s": t_import - t0, "verify_s": t_verify - t_import,
                  "session_s": t_session - t_verify, "first_batch_s": t_batch - t_session,
                  "in_process_s": t_batch - t0, "batch": int(x.shape[0]),
                  "torch_imported": "torch" in sys.modules,
                  "modules": len(sys.modules)}))
"""


def bench_cold_start(artifact: Path, batch_file: Path, rounds: int,
                     log: Callable[[str], None]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    runs = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", COLD_START_CODE, str(artifact),
                               str(batch_file)], capture_output=True, text=True, env=env,
                              cwd=PACKAGE_ROOT, timeout=300, check=False)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"cold start failed: {done.stderr.strip()[-500:]}")
        facts = json.loads(done.stdout.strip().splitlines()[-1])
        facts["process_wall_s"] = wall
        runs.append(facts)
    keys = ("process_wall_s", "in_process_s", "import_s", "verify_s", "session_s",
            "first_batch_s")
    summary = {k: {"median": round(statistics.median(r[k] for r in runs), 4),
                   "min": round(min(r[k] for r in runs), 4)} for k in keys}
    log(f"  {artifact.name}: process {summary['process_wall_s']['median']:.2f} s median "
        f"(import {summary['import_s']['median']:.2f}, verify "
        f"{summary['verify_s']['median']:.3f}, session {summary['session_s']['median']:.2f}, "
        f"first batch of {runs[0]['batch']} {summary['first_batch_s']['median']:.2f})")
    return {"artifact": artifact.name, "model_bytes": (artifact / "model.onnx").stat().st_size,
            "batch": runs[0]["batch"], "rounds": rounds, "summary": summary,
            "torch_imported": any(r["torch_imported"] for r in runs),
            "runs": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                     for r in runs],
            "target_s": COLD_START_TARGET_S,
            "meets_target_median": summary["process_wall_s"]["median"] <= COLD_START_TARGET_S}
