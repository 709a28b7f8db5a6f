"""ptycho-bench: every runtime on the same inputs, in one process; ratios to eager first.

What is timed is what a user calls: a float32 numpy batch in host memory goes in, numpy
outputs come back (so CUDA rows include the host<->device copies of ~4 MB per 256 patterns).
Each batch size runs in rounds: every runtime once, back to back, then the next round. A
change of background load on a shared machine then hits all runtimes of a round alike, and
"x eager" is the median over rounds of the paired ratio t_eager / t_runtime.

Nothing here is a unit test with a timing threshold: the targets of the issue are evaluated
and *reported* (``targets`` in the JSON), never asserted.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
import platform
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from runtime.bench import bench_stitch
from runtime.memory import peak_rss_mb, reset_peak_rss, rss_mb
from runtime.report_io import markdown_table, write_json, write_text

SCHEMA = "ptycho-bench/1"
BASELINE = "eager"
SWEEP_BASELINE = "ALL (ptycho-run session)"
FORMATS = ("onnx", "torchscript", "pt2")

# Datasheet dense peaks, TFLOP/s: (fp32 on CUDA cores, TF32 on tensor cores, no sparsity).
# Matched in order against torch.cuda.get_device_name(); first hit wins.
GPU_PEAKS_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 51.2, 378.0),
    ("H100", 66.9, 494.7),  # SXM5; the brief's rounded figure is ~60 / ~490
    ("H200", 66.9, 494.7),
    ("GH200", 66.9, 494.7),
    ("A100", 19.5, 156.0),
    ("L40S", 91.6, 183.0),
    ("L4", 30.3, 60.0),
    ("A10", 31.2, 62.5),
    ("RTX 4090", 82.6, 82.6),
    ("V100", 15.7, 15.7),  # no TF32: TF32 flags change nothing
)


# --------------------------------------------------------------------------- config


@dataclass
class BenchConfig:
    preset: str = "pinn"
    patch_size: int = 64
    batch_sizes: tuple[int, ...] = (64, 256)
    repeats: int = 5
    warmup: int = 2
    sweep_batch: int | None = None  # default: the smallest batch size
    sweep_repeats: int = 3
    threads: int | None = None  # default: the cores this process may use
    stitch_patches: int = 10_000
    scan_grid: int = 24  # end-to-end scan: grid x grid positions
    max_seconds: float | None = 45.0  # per batch size: no new round (min 3) after this
    seed: int = 0
    bundle: Path | None = None
    artifacts: Path | None = None
    machine: str | None = None
    gpu: bool = True
    quick: bool = False
    malloc_tuned: bool = False  # glibc: keep big tensors in the heap (see tune_glibc_malloc)
    command: str = ""

    @classmethod
    def quick_config(cls, **overrides: Any) -> BenchConfig:
        """Seconds, not minutes: the tiny model at N = 32, one batch of 8, one round."""
        values: dict[str, Any] = dict(preset="tiny", patch_size=32, batch_sizes=(8,), repeats=1,
                                      warmup=1, sweep_repeats=1, stitch_patches=200,
                                      scan_grid=6, quick=True)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def validate(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if self.repeats < 1 or self.warmup < 0 or self.sweep_repeats < 1:
            raise ValueError("repeats and sweep repeats must be >= 1, warmup >= 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.stitch_patches < 0 or self.scan_grid < 0:
            raise ValueError("stitch patches and scan grid must be >= 0 (0 skips them)")
        if self.sweep_batch is not None and self.sweep_batch < 1:
            raise ValueError(f"sweep batch must be >= 1, got {self.sweep_batch}")

    @property
    def sweep_at(self) -> int:
        return self.sweep_batch or min(self.batch_sizes)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["batch_sizes"] = list(self.batch_sizes)
        for key in ("bundle", "artifacts"):
            values[key] = str(values[key]) if values[key] is not None else None
        return values


# --------------------------------------------------------------------------- machine facts


def usable_cores() -> int:
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _cpuinfo() -> dict[str, str]:
    """First processor block of /proc/cpuinfo (Linux); empty elsewhere."""
    facts: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                if facts:
                    break
                continue
            key, _, value = line.partition(":")
            facts.setdefault(key.strip(), value.strip())
    return facts


def _max_mhz() -> tuple[float | None, str]:
    with contextlib.suppress(OSError, ValueError):
        khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()
        return float(khz) / 1000.0, "cpufreq cpuinfo_max_freq"
    with contextlib.suppress(OSError, ValueError):
        mhz = [float(line.split(":")[1]) for line in
               Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("cpu MHz")]
        if mhz:
            return max(mhz), "/proc/cpuinfo 'cpu MHz' (nominal; no cpufreq max exposed, e.g. a VM)"
    return None, "unknown"


def cpu_facts() -> dict[str, Any]:
    info = _cpuinfo()
    flags = set(info.get("flags", info.get("Features", "")).split())
    model = info.get("model name") or platform.processor() or platform.machine() or "unknown"
    mhz, mhz_source = _max_mhz()
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "avx2", "fma", "avx", "asimd",
                       "sve") if f in flags]
    return {"model": model, "arch": platform.machine(), "logical_cpus": os.cpu_count(),
            "usable_cores": usable_cores(), "mhz": mhz, "mhz_source": mhz_source,
            "isa_flags": isa}


def cpu_peak(cpu: dict[str, Any], cores: int) -> dict[str, Any]:
    """fp32 peak = FLOP/cycle/core x cores x clock, with the assumption written down."""
    flags = set(cpu["isa_flags"])
    if "avx512f" in flags:
        per_cycle, why = 64, "AVX-512: 16 fp32 lanes x 2 (FMA) x 2 FMA units"
    elif {"avx2", "fma"} <= flags:
        per_cycle, why = 32, "AVX2: 8 fp32 lanes x 2 (FMA) x 2 FMA units"
    elif "avx" in flags:
        per_cycle, why = 16, "AVX: 8 fp32 lanes, separate mul + add units"
    elif "asimd" in flags:
        per_cycle, why = 16, "NEON: 4 fp32 lanes x 2 (FMA) x 2 pipes"
    else:
        per_cycle, why = 8, "SSE: 4 fp32 lanes, separate mul + add units"
    if not cpu["mhz"]:
        return {"gflops": None, "assumption": f"{why}; clock unknown, no peak"}
    gflops = per_cycle * cores * cpu["mhz"] / 1000.0
    return {"gflops": round(gflops, 1), "flop_per_cycle_per_core": per_cycle,
            "cores": cores, "mhz": cpu["mhz"],
            "assumption": f"{why} x {cores} cores x {cpu['mhz']:.0f} MHz ({cpu['mhz_source']}); "
                          "parts with one AVX-512 FMA unit peak at half this, turbo above it"}


def gpu_peak(name: str) -> dict[str, Any]:
    for key, fp32, tf32 in GPU_PEAKS_TFLOPS:
        if key.lower() in name.lower():
            return {"fp32_tflops": fp32, "tf32_tflops": tf32, "matched": key,
                    "assumption": "datasheet dense peak (no sparsity); fp32 = CUDA cores, "
                                  "TF32 = tensor cores"}
    return {"fp32_tflops": None, "tf32_tflops": None, "matched": None,
            "assumption": f"{name!r} is not in the peak table (bench.GPU_PEAKS_TFLOPS)"}


def slug(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    text = re.sub(r"\b(cpu|processor|@.*)$", "", text.strip())
    text = re.sub(r"\bcpu\b|@\s*[\d.]+\s*ghz", "", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def default_machine_name(cpu: dict[str, Any], gpu_name: str | None = None) -> str:
    name = f"cpu-{cpu['usable_cores']}core-{slug(cpu['model'])}"
    return f"gpu-{slug(gpu_name)}-{name}" if gpu_name else name


def loadavg() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(v, 2) for v in os.getloadavg()]
    return None


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("ptycho-export", "torch", "onnxruntime", "onnxruntime-gpu", "onnx", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


# --------------------------------------------------------------------------- memory


def tune_glibc_malloc() -> bool:
    """mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=INT_MAX) for the rest of the process.

    By default glibc serves every block over the (at most 32 MiB) mmap threshold with a
    fresh mmap and returns it on free, so eager PyTorch page-faults its hundreds of MB of
    activations in again on every call. Same as starting Python with MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=2147483647. Returns False where this is not glibc.
    """
    import ctypes

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0) == 1
                and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1)


# --------------------------------------------------------------------------- FLOPs


@dataclass
class FlopCount:
    per_pattern: int
    layers: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"per_pattern": self.per_pattern, "gflop_per_pattern": self.per_pattern / 1e9,
                "convs": len(self.layers), "layers": self.layers,
                "counted": "Conv2d only: 2 * Cin/groups * Cout * kh * kw * Hout * Wout per "
                           "sample (bias, activations, pooling, upsampling left out: < 1 %)"}


def conv_flops(module: Any, input_shape: tuple[int, ...]) -> FlopCount:
    """Analytic FLOPs of one sample through every Conv2d (forward hooks record shapes).

    ``input_shape`` is one sample's (C, H, W); a pattern is one sample on the batch axis.
    """
    import torch
    from torch import nn

    layers: list[dict[str, Any]] = []

    def hook(name: str) -> Callable[..., None]:
        def record(conv: nn.Conv2d, _inputs: Any, output: torch.Tensor) -> None:
            kh, kw = conv.kernel_size
            h, w = output.shape[-2:]
            flops = 2 * (conv.in_channels // conv.groups) * conv.out_channels * kh * kw * h * w
            layers.append({"layer": name, "cin": conv.in_channels, "cout": conv.out_channels,
                           "kernel": [kh, kw], "out_hw": [int(h), int(w)], "flops": int(flops)})
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in module.named_modules()
               if isinstance(m, nn.Conv2d)]
    try:
        with torch.inference_mode():
            module(torch.zeros((1, *input_shape), dtype=torch.float32))
    finally:
        for handle in handles:
            handle.remove()
    return FlopCount(sum(layer["flops"] for layer in layers), layers)


# --------------------------------------------------------------------------- inputs, bundle


def simulation_config(n: int, grid: int, seed: int) -> Any:
    from ptycho_export.data.simulate import SimulationConfig

    diameter = 3 * n / 8
    return SimulationConfig(patch_size=n, grid_shape=(grid, grid), step_px=n / 8,
                            probe_diameter_px=diameter,
                            defocus=min(5.0, 0.9 * math.pi * diameter / 4), seed=seed)


def make_inputs(count: int, n: int, gridsize: int, seed: int) -> np.ndarray:
    """Simulated sqrt(Poisson counts) patterns (1e6 photons each): realistic value range."""
    from ptycho_export.data.simulate import simulate_scan
    from runtime.grouping import group_neighbours

    grid = max(math.ceil(math.sqrt(count)), gridsize + 1)
    scan = simulate_scan(simulation_config(n, grid, seed))
    groups = group_neighbours(scan.positions_px, gridsize)[:count]
    return np.ascontiguousarray(scan.amplitudes[groups], dtype=np.float32)


def make_random_bundle(path: Path, preset: str, patch_size: int, inputs: np.ndarray,
                       seed: int = 0) -> Path:
    """A bundle with seeded random weights: speed does not depend on the weight values."""
    import torch

    from ptycho_export.bundle import write_bundle
    from ptycho_export.data.simulate import probe_disc
    from ptycho_export.model import ModelConfig, PtychoNet
    from ptycho_export.normalization import compute_normalization

    config = ModelConfig.from_preset(preset, patch_size)
    probe = probe_disc(patch_size, 3 * patch_size / 8, 2.0, 1e6)
    normalization = compute_normalization(inputs, probe)
    torch.manual_seed(seed)
    net = PtychoNet(config, normalization.amplitude_scale).eval()
    golden_in = np.ascontiguousarray(inputs[:4], dtype=np.float32)
    with torch.inference_mode():
        amplitude, phase = net(torch.from_numpy(golden_in))
    golden = {"amplitudes": golden_in, "amplitude": amplitude.numpy(), "phase": phase.numpy()}
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return write_bundle(path, config=config, normalization=normalization, state_dict=state,
                        probe=probe, golden=golden,
                        training={"note": f"untrained, torch.manual_seed({seed}), ptycho-bench"},
                        data={"source": "ptycho-bench simulated patterns"})


# --------------------------------------------------------------------------- runners


@dataclass
class TimedRunner:
    """A runner of the one protocol (runtime.runner) with what the benchmark records
    about it; :meth:`call` is what is timed: one float32 batch in, its outputs back."""

    runner: Any  # runtime.runner.Runner
    input_name: str
    kind: str  # eager | torchscript | pt2 | onnxruntime
    device: str
    options: dict[str, Any] = field(default_factory=dict)
    setup_s: float = 0.0
    device_memory: str | None = None  # "torch" | "cuda-free" | None

    @property
    def name(self) -> str:
        return self.runner.name

    def call(self, x: np.ndarray) -> list[np.ndarray]:
        return list(self.runner.infer({self.input_name: x}).values())


def torch_runner(name: str, kind: str, module: Any, device: str = "cpu",
                 channels_last: bool = False, tf32: bool | None = None,
                 options: dict[str, Any] | None = None) -> TimedRunner:
    import torch

    from ptycho_export.export.wrapper import INPUT_NAME, OUTPUT_NAMES
    from ptycho_export.parity import TorchRunner

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    runner = TorchRunner(name, module, (INPUT_NAME,), OUTPUT_NAMES, device,
                         memory_format=memory_format, tf32=tf32)
    opts = {"inference_mode": True, "memory_format": "channels_last" if channels_last
            else "NCHW", **({"tf32": tf32} if tf32 is not None else {}), **(options or {})}
    return TimedRunner(runner, INPUT_NAME, kind, device, opts,
                       device_memory="torch" if device != "cpu" else None)


ORT_LEVELS = ("DISABLE_ALL", "BASIC", "EXTENDED", "ALL")


@dataclass(frozen=True)
class OrtSetting:
    """One onnxruntime configuration; None leaves onnxruntime's own default."""

    name: str
    level: str = "ALL"
    threads: int | None = None
    spinning: bool | None = None
    disabled: tuple[str, ...] = ()
    note: str = ""

    @property
    def level_name(self) -> str:
        return "ORT_DISABLE_ALL" if self.level == "DISABLE_ALL" else f"ORT_ENABLE_{self.level}"

    def to_dict(self) -> dict[str, Any]:
        return {"graph_optimization_level": self.level_name,
                "intra_op_num_threads": self.threads or "default",
                "allow_spinning": "default (1)" if self.spinning is None else int(self.spinning),
                "disabled_optimizers": list(self.disabled), "note": self.note}


def ort_sweep_settings(cores: int) -> list[OrtSetting]:
    """One factor at a time, away from what ptycho-run builds (ORT_ENABLE_ALL, defaults).

    Level ALL vs EXTENDED isolates the NCHWc blocked layout (its nchwc Conv also carries
    the activation); EXTENDED vs BASIC isolates fused Conv+activation (FusedConv vs Conv
    then Relu); ``graph_ops`` in the JSON lists what each level left in the graph. Disabling
    ConvActivationFusion under ALL changes nothing (NCHWc fuses the activation itself).
    """
    threads = sorted({1, max(cores // 2, 1), cores})
    return [
        OrtSetting(SWEEP_BASELINE, note="runtime.session.create_session(provider='cpu')"),
        OrtSetting("DISABLE_ALL", level="DISABLE_ALL", note="no graph optimisation"),
        OrtSetting("BASIC", level="BASIC", note="constant folding etc.; Conv, then Relu"),
        OrtSetting("EXTENDED", level="EXTENDED",
                   note="+ fused Conv+activation (FusedConv), NCHW layout"),
        *(OrtSetting(f"ALL, threads {t}", threads=t,
                     note="explicit intra_op_num_threads (no thread pinning)")
          for t in threads),
        OrtSetting("ALL, spinning 0", spinning=False,
                   note="session.intra_op.allow_spinning=0: workers sleep between ops"),
    ]


def ort_graph_ops(model_path: Path, workdir: Path) -> dict[str, dict[str, int]]:
    """Op types left in the graph after each optimisation level (domain:op -> count)."""
    import onnx

    from runtime.session import import_onnxruntime

    ort = import_onnxruntime()
    found = {}
    for level in ORT_LEVELS:
        setting = OrtSetting(level, level=level)
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                                   setting.level_name)
        options.log_severity_level = 3
        target = workdir / f"optimized_{level}.onnx"
        options.optimized_model_filepath = str(target)
        ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        counts: dict[str, int] = {}
        for node in onnx.load(str(target)).graph.node:
            key = f"{node.domain}:{node.op_type}" if node.domain else node.op_type
            counts[key] = counts.get(key, 0) + 1
        found[setting.level_name] = dict(sorted(counts.items()))
        target.unlink(missing_ok=True)
    return found


def ort_session(model_path: Path, setting: OrtSetting, provider: str = "cpu",
                tf32: bool = False) -> Any:
    from runtime.session import import_onnxruntime

    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, setting.level_name)
    options.log_severity_level = 3
    if setting.threads is not None:
        options.intra_op_num_threads = setting.threads
    if setting.spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning",
                                         "1" if setting.spinning else "0")
    providers: list[Any] = ["CPUExecutionProvider"]
    if provider == "cuda":
        providers = [("CUDAExecutionProvider", {"use_tf32": "1" if tf32 else "0"}),
                     "CPUExecutionProvider"]
    kwargs = {"disabled_optimizers": list(setting.disabled)} if setting.disabled else {}
    session = ort.InferenceSession(str(model_path), options, providers=providers, **kwargs)
    want = "CUDAExecutionProvider" if provider == "cuda" else "CPUExecutionProvider"
    if session.get_providers()[0] != want:
        raise RuntimeError(f"onnxruntime fell back to {session.get_providers()} instead of {want}")
    return session


def ort_runner(name: str, model_path: Path, setting: OrtSetting, provider: str = "cpu",
               tf32: bool = False) -> TimedRunner:
    t0 = time.perf_counter()
    if setting.name == SWEEP_BASELINE and provider == "cpu":
        from runtime.session import create_session

        session, _ = create_session(model_path, "cpu")  # exactly what ptycho-run builds
    else:
        session = ort_session(model_path, setting, provider, tf32)
    setup = time.perf_counter() - t0
    from runtime.runner import OrtRunner

    runner = OrtRunner(name, session=session)
    opts = {**setting.to_dict(), "provider": provider}
    if provider == "cuda":
        opts["use_tf32"] = int(tf32)
    return TimedRunner(runner, session.get_inputs()[0].name, "onnxruntime", provider, opts,
                       setup, device_memory="cuda-free" if provider == "cuda" else None)


# --------------------------------------------------------------------------- timing


def _gpu_memory_start(runner: TimedRunner) -> int | None:
    if runner.device_memory is None:
        return None
    import torch

    torch.cuda.synchronize()
    if runner.device_memory == "torch":
        torch.cuda.reset_peak_memory_stats()
        return 0
    return int(torch.cuda.mem_get_info()[0])


def _gpu_memory_end(runner: TimedRunner, start: int | None) -> dict[str, Any]:
    if runner.device_memory is None or start is None:
        return {}
    import torch

    torch.cuda.synchronize()
    if runner.device_memory == "torch":
        return {"peak_device_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                "device_memory_source": "torch.cuda.max_memory_allocated"}
    used = (start - int(torch.cuda.mem_get_info()[0])) / 2**20
    return {"peak_device_mb": round(used, 1),
            "device_memory_source": "drop in cudaMemGetInfo free bytes (arena growth)"}


def _max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(max(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
                     for x, y in zip(a, b, strict=True)))


SETTLE_S = 0.02


def measure(runners: list[TimedRunner], x: np.ndarray, warmup: int, repeats: int,
            baseline: str | None = None, max_seconds: float | None = None,
            flops_per_pattern: int | None = None, peak_gflops: Callable[[TimedRunner], float | None]
            | None = None) -> dict[str, dict[str, Any]]:
    """Warm every runner (memory measured there), then time them in interleaved rounds.

    Before each timed call the process sleeps SETTLE_S (untimed): onnxruntime's and
    OpenMP's worker threads spin for a while after a call, and on a 2-core machine the
    previous runtime's spinning threads would otherwise steal the next one's cores.
    """
    batch = len(x)
    rows: dict[str, dict[str, Any]] = {}
    outputs: dict[str, list[np.ndarray]] = {}
    for runner in runners:
        gc.collect()
        before = rss_mb()
        exact = reset_peak_rss()
        device_start = _gpu_memory_start(runner)
        t0 = time.perf_counter()
        for _ in range(max(warmup, 1)):
            outputs[runner.name] = runner.call(x)
        rows[runner.name] = {
            "warmup_s": round(time.perf_counter() - t0, 4),
            "rss_before_mb": round(before, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_rss_delta_mb": round(max(peak_rss_mb() - before, 0.0), 1) if exact else None,
            "peak_rss_source": "VmHWM reset per runner" if exact else "ru_maxrss (monotonic)",
            **_gpu_memory_end(runner, device_start),
        }
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    busy: dict[str, list[float]] = {r.name: [] for r in runners}
    kernel: dict[str, list[float]] = {r.name: [] for r in runners}
    started = time.perf_counter()
    for index in range(repeats):
        for runner in runners:
            time.sleep(SETTLE_S)
            c0 = resource.getrusage(resource.RUSAGE_SELF)  # microsecond resolution, unlike
            t0 = time.perf_counter()  # os.times() (clock ticks)
            runner.call(x)
            wall = time.perf_counter() - t0
            c1 = resource.getrusage(resource.RUSAGE_SELF)
            user, system = c1.ru_utime - c0.ru_utime, c1.ru_stime - c0.ru_stime
            times[runner.name].append(wall)
            busy[runner.name].append((user + system) / wall)
            kernel[runner.name].append(system / max(user + system, 1e-9))
        over = bool(max_seconds) and time.perf_counter() - started > max_seconds
        if over and index + 1 >= min(3, repeats):
            break
    base = baseline if baseline in times else None
    for runner in runners:
        t = times[runner.name]
        median = statistics.median(t)
        row = rows[runner.name]
        row.update({"batch": batch, "rounds": len(t), "ms_median": round(median * 1e3, 3),
                    "ms_min": round(min(t) * 1e3, 3), "ms_max": round(max(t) * 1e3, 3),
                    "ms_all": [round(v * 1e3, 3) for v in t],
                    "patterns_per_s": round(batch / median, 2),
                    "patterns_per_s_best_round": round(batch / min(t), 2),
                    "cores_busy": round(statistics.median(busy[runner.name]), 2),
                    "kernel_share": round(statistics.median(kernel[runner.name]), 3)})
        if base is not None:
            paired = [tb / tr for tb, tr in zip(times[base], t, strict=True)]
            row["ratio_to_baseline"] = round(statistics.median(paired), 3)
            row["max_abs_diff_vs_baseline"] = _max_abs_diff(outputs[runner.name],
                                                            outputs[base])
        if flops_per_pattern:
            achieved = flops_per_pattern * batch / median / 1e9
            row["achieved_gflops"] = round(achieved, 2)
            peak = peak_gflops(runner) if peak_gflops else None
            row["peak_fraction"] = round(achieved / peak, 4) if peak else None
    return rows


# --------------------------------------------------------------------------- sections


def warmup_for(config: BenchConfig, index: int) -> int:
    """--warmup calls at the first batch size; one at each later size (already warm, only
    the new shape's buffers and kernels to set up)."""
    return max(config.warmup, 1) if index == 0 else 1


def _log_rows(log: Callable[[str], None], rows: dict[str, dict[str, Any]]) -> None:
    for name, row in rows.items():
        ratio = row.get("ratio_to_baseline")
        log(f"  {name:<34} {row['ms_median']:>10.1f} ms  {row['patterns_per_s']:>9.1f} pat/s"
            + (f"  x{ratio:.2f}" if ratio is not None else ""))


BEST_MARGIN = 1.05  # a setting replaces ptycho-run's session only if >= 5 % faster


def bench_ort_sweep(model_path: Path, x: np.ndarray, cores: int, warmup: int, repeats: int,
                    flops: int, peak: float | None, log: Callable[[str], None],
                    workdir: Path | None = None) -> dict[str, Any]:
    settings = ort_sweep_settings(cores)
    runners = [ort_runner(s.name, model_path, s) for s in settings]
    rows = measure(runners, x, warmup, repeats, baseline=SWEEP_BASELINE,
                   flops_per_pattern=flops, peak_gflops=lambda _r: peak)
    for runner in runners:
        rows[runner.name]["session_s"] = round(runner.setup_s, 3)
        rows[runner.name]["options"] = runner.options
    fastest = max(rows, key=lambda name: rows[name]["ratio_to_baseline"])
    best = fastest if rows[fastest]["ratio_to_baseline"] >= BEST_MARGIN else SWEEP_BASELINE
    _log_rows(log, rows)
    del runners
    gc.collect()
    graph_ops = ort_graph_ops(model_path, workdir) if workdir is not None else None
    return {"batch": len(x), "baseline": SWEEP_BASELINE, "best": best, "fastest": fastest,
            "best_rule": f"fastest paired ratio, if >= {BEST_MARGIN}x the ptycho-run session",
            "settings": {s.name: s for s in settings}, "rows": rows, "graph_ops": graph_ops}


def cpu_runners(net: Any, artifacts: Path, best: OrtSetting) -> list[TimedRunner]:
    import torch

    from ptycho_export.parity import load_pt2, load_torchscript

    runners = [torch_runner(BASELINE, "eager", net)]
    cl = copy.deepcopy(net).to(memory_format=torch.channels_last).eval()
    runners.append(torch_runner("eager channels_last", "eager", cl, channels_last=True))
    t0 = time.perf_counter()
    scripted = load_torchscript(artifacts / "model.ts")
    setup = time.perf_counter() - t0
    runners.append(torch_runner("torchscript", "torchscript", scripted,
                                options={"file": "model.ts (trace)"}))
    runners[-1].setup_s = setup
    t0 = time.perf_counter()
    program = load_pt2(artifacts / "model.pt2")
    runners.append(torch_runner("pt2", "pt2", program,
                                options={"file": "model.pt2 (torch.export.load().module())"}))
    runners[-1].setup_s = time.perf_counter() - t0
    runners.append(ort_runner(f"onnxruntime cpu [{best.name}]", artifacts / "model.onnx", best))
    return runners


def gpu_section(net: Any, artifacts: Path, inputs: np.ndarray, config: BenchConfig,
                flops: int, log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from ptycho_export.parity import load_torchscript

    if not config.gpu:
        return {"status": "skipped", "reason": "--no-gpu"}
    if not torch.cuda.is_available():
        return {"status": "skipped",
                "reason": f"torch {torch.__version__} sees no CUDA device"}
    name = torch.cuda.get_device_name(0)
    peak = gpu_peak(name)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark)
    torch.backends.cudnn.benchmark = True
    try:
        net_gpu = copy.deepcopy(net).to("cuda").eval()
        net_cl = copy.deepcopy(net).to("cuda", memory_format=torch.channels_last).eval()
        scripted = load_torchscript(artifacts / "model.ts", "cuda")
        runners: list[TimedRunner] = []
        from runtime.session import available_providers

        has_ort_cuda = "CUDAExecutionProvider" in available_providers()
        for tf32 in (False, True):
            tag = "tf32" if tf32 else "fp32"
            runners += [torch_runner(f"eager cuda {tag}", "eager", net_gpu, "cuda", tf32=tf32),
                        torch_runner(f"eager cuda channels_last {tag}", "eager", net_cl, "cuda",
                                     channels_last=True, tf32=tf32),
                        torch_runner(f"torchscript cuda {tag}", "torchscript", scripted, "cuda",
                                     tf32=tf32)]
            if has_ort_cuda:
                runners.append(ort_runner(f"onnxruntime cuda {tag}", artifacts / "model.onnx",
                                          OrtSetting(f"cuda {tag}"), "cuda", tf32))

        def peak_of(runner: TimedRunner) -> float | None:
            tflops = peak["tf32_tflops"] if runner.options.get("tf32") or runner.options.get(
                "use_tf32") else peak["fp32_tflops"]
            return tflops * 1e3 if tflops else None

        results = {}
        for index, batch in enumerate(config.batch_sizes):
            log(f"GPU, batch {batch}:")
            rows = measure(runners, inputs[:batch], warmup_for(config, index), config.repeats,
                           baseline="eager cuda fp32", max_seconds=config.max_seconds,
                           flops_per_pattern=flops, peak_gflops=peak_of)
            _log_rows(log, rows)
            results[str(batch)] = rows
        return {"status": "ran", "device": name, "peak": peak,
                "cudnn_benchmark": True, "ort_cuda": has_ort_cuda,
                "runners": {r.name: {"kind": r.kind, "device": r.device, "options": r.options,
                                     "setup_s": round(r.setup_s, 3)} for r in runners},
                "baseline": "eager cuda fp32", "results": results,
                "note": "numpy in host memory -> numpy out: includes H2D/D2H copies"}
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


def bench_end_to_end(artifacts: Path, n: int, grid: int, batch: int, seed: int,
                     workdir: Path) -> dict[str, Any]:
    """ptycho-run's run_scan on a simulated scan (CPU provider, its default session)."""
    from ptycho_export.data.simulate import simulate_scan
    from runtime.run import run_scan
    from runtime.scan import save_scan

    scan = simulate_scan(simulation_config(n, grid, seed + 1))
    data = workdir / "scan.npz"
    save_scan(data, scan)
    t0 = time.perf_counter()
    report = run_scan(artifacts, data, workdir / "recon", provider="cpu", batch_size=batch,
                      self_check=False, progress=False)
    wall = time.perf_counter() - t0
    seconds = report["seconds"]
    return {"patterns": report["patterns"], "batch": report["batch_size"],
            "provider": report["provider"]["ep"], "threads": "onnxruntime default",
            "wall_s": round(wall, 3), "patterns_per_s": round(report["patterns"] / wall, 1),
            "inference_s": seconds["inference"], "stitch_s": seconds["stitch"],
            "inference_patterns_per_s": report["patterns_per_s"],
            "includes": "artifact hash check, scan load + validation, session build, "
                        "profiling warm-up batch, inference, stitching, PNG + npz writing"}


# --------------------------------------------------------------------------- targets


def evaluate_targets(cpu_results: dict[str, dict[str, Any]], peak: float | None,
                     ort_name: str) -> list[dict[str, Any]]:
    batch = "256" if "256" in cpu_results else max(cpu_results, key=int)
    rows = cpu_results[batch]
    eager = rows[BASELINE]
    ceiling = None
    if peak and eager.get("achieved_gflops"):
        ceiling = round(peak / eager["achieved_gflops"], 2)
    targets = []
    for what, name, want in (("onnxruntime >= 3x eager patterns/s", ort_name, 3.0),
                             ("TorchScript >= 1x eager patterns/s", "torchscript", 1.0)):
        got = rows[name]["ratio_to_baseline"]
        targets.append({"target": f"CPU, batch {batch}: {what}", "runner": name,
                        "batch": int(batch), "want": want, "measured": got,
                        "met": bool(got >= want),
                        "ceiling_ratio_at_peak": ceiling})
    return targets


# --------------------------------------------------------------------------- the run


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ptycho-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_bench(config: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    config.validate()
    started = time.perf_counter()
    if config.malloc_tuned and not tune_glibc_malloc():
        raise ValueError("--malloc-tuned needs glibc (Linux); this libc has no mallopt")
    cores = usable_cores()
    threads = config.threads or cores
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _workdir() as work:
            return _run(config, log, started, cores, threads, work)
    finally:
        torch.set_num_threads(saved_threads)


def _guarded(log: Callable[[str], None], section: Callable[..., dict[str, Any]],
             *args: Any) -> dict[str, Any]:
    """A failing stitch / end-to-end section is recorded, not fatal: the model timings
    (minutes of CPU) are still written."""
    try:
        return section(*args)
    except Exception as err:  # noqa: BLE001 - reported in the results
        message = " ".join(f"{type(err).__name__}: {err}".split())[:500]
        log(f"  failed: {message}")
        return {"status": "failed", "error": message}


def _run(config: BenchConfig, log: Callable[[str], None], started: float, cores: int,
         threads: int, work: Path) -> dict[str, Any]:
    import torch

    from ptycho_export.bundle import build_net, read_bundle
    from ptycho_export.export.pipeline import ExportOptions, export_bundle
    from ptycho_export.model import count_parameters

    load_start = loadavg()
    cpu = cpu_facts()
    peak = cpu_peak(cpu, cores)
    gpu_name = torch.cuda.get_device_name(0) if config.gpu and torch.cuda.is_available() \
        else None
    machine = config.machine or (default_machine_name(cpu, gpu_name)
                                 + ("-malloc-tuned" if config.malloc_tuned else ""))
    n_inputs = max(*config.batch_sizes, config.sweep_at)
    log(f"machine {machine}: {cpu['model']}, {cores} usable cores, torch threads {threads}")

    t0 = time.perf_counter()
    gridsize = 1
    if config.bundle is not None:
        bundle_path = Path(config.bundle)
        source = f"{bundle_path.name} (given)"
        given = read_bundle(bundle_path).config
        gridsize, n = given.gridsize, given.patch_size
        inputs = make_inputs(n_inputs, n, gridsize, config.seed)
    else:
        n = config.patch_size
        inputs = make_inputs(n_inputs, n, gridsize, config.seed)
        bundle_path = make_random_bundle(work / "bench.zip", config.preset, n, inputs,
                                         config.seed)
        source = (f"preset {config.preset!r}, random weights (torch.manual_seed({config.seed}));"
                  " real weights do not change speed")
    bundle = read_bundle(bundle_path)
    net = build_net(bundle)
    model_config = bundle.config
    inputs_s = time.perf_counter() - t0

    export_s = None
    if config.artifacts is not None:
        artifacts = Path(config.artifacts)
        missing = [f for f in ("model.onnx", "model.ts", "model.pt2")
                   if not (artifacts / f).is_file()]
        if missing:
            raise ValueError(f"{artifacts}: missing {missing}; export with --format all")
    else:
        log("exporting onnx, torchscript, pt2 (lint, audit, parity gate) ...")
        t0 = time.perf_counter()
        artifacts = work / "artifacts"
        export_bundle(bundle_path, artifacts, ExportOptions(formats=list(FORMATS),
                                                           command="ptycho-bench"))
        export_s = round(time.perf_counter() - t0, 2)
        log(f"  exported in {export_s:.1f} s")

    flops = conv_flops(net, tuple(inputs.shape[1:]))
    log(f"model: {count_parameters(net):,} parameters, "
        f"{flops.per_pattern / 1e9:.3f} GFLOP/pattern; CPU peak {peak['gflops']} GFLOP/s")

    log(f"onnxruntime settings sweep, batch {config.sweep_at}:")
    sweep = bench_ort_sweep(artifacts / "model.onnx", inputs[:config.sweep_at], cores,
                            min(config.warmup, 1), config.sweep_repeats, flops.per_pattern,
                            peak["gflops"], log, work)
    best = sweep["settings"][sweep["best"]]
    runners = cpu_runners(net, artifacts, best)
    ort_name = runners[-1].name
    cpu_results = {}
    for index, batch in enumerate(config.batch_sizes):
        log(f"CPU, batch {batch}:")
        rows = measure(runners, inputs[:batch], warmup_for(config, index), config.repeats,
                       baseline=BASELINE, max_seconds=config.max_seconds,
                       flops_per_pattern=flops.per_pattern,
                       peak_gflops=lambda _r: peak["gflops"])
        _log_rows(log, rows)
        cpu_results[str(batch)] = rows
    cpu_runner_facts = {r.name: {"kind": r.kind, "device": r.device, "options": r.options,
                                 "setup_s": round(r.setup_s, 3)} for r in runners}
    del runners
    gc.collect()

    gpu = gpu_section(net, artifacts, inputs, config, flops.per_pattern, log)

    stitch = None
    if config.stitch_patches:
        log(f"stitcher: {config.stitch_patches} patches ...")
        stitch = _guarded(log, bench_stitch, config.stitch_patches, n, config.seed)
        if stitch.get("status") != "failed":
            log(f"  {stitch['s_median']:.3f} s ({stitch['patches_per_s']:,.0f} patches/s)")
    end_to_end = None
    if config.scan_grid:
        log(f"end-to-end ptycho-run, {config.scan_grid}x{config.scan_grid} scan ...")
        end_to_end = _guarded(log, bench_end_to_end, artifacts, n, config.scan_grid,
                              max(config.batch_sizes), config.seed, work)
        if end_to_end.get("status") != "failed":
            log(f"  {end_to_end['wall_s']:.2f} s wall, {end_to_end['patterns_per_s']:.1f} "
                "patterns/s end to end")

    sweep_out = {k: v for k, v in sweep.items() if k != "settings"}
    result = {
        "schema": SCHEMA,
        "machine": machine,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": config.command,
        "config": config.to_dict(),
        "env": {"versions": library_versions(), "platform": platform.platform(),
                "cpu": cpu, "torch_threads": threads,
                "torch_mkldnn": bool(torch.backends.mkldnn.is_available()),
                "onnxruntime_providers": _ort_providers(),
                "env_vars": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
                             if k in os.environ},
                "gpu": gpu_name, "loadavg_start": load_start, "loadavg_end": loadavg(),
                "malloc": ("glibc tuned: mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=INT_MAX)"
                           if config.malloc_tuned else "default")},
        "model": {"source": source, **model_config.to_dict(),
                  "parameters": count_parameters(net), "flops": flops.to_dict()},
        "inputs": {"what": "simulated sqrt(Poisson counts), 1e6 photons/pattern (same arrays "
                           "for every runtime)", "shape": list(inputs.shape),
                   "mean": round(float(inputs.mean()), 3), "max": round(float(inputs.max()), 3),
                   "seed": config.seed},
        "peak": {"cpu": peak},
        "setup_s": {"bundle_and_inputs": round(inputs_s, 2), "export": export_s},
        "timing": {"warmup_calls": {str(b): warmup_for(config, i)
                                    for i, b in enumerate(config.batch_sizes)},
                   "rounds": config.repeats, "settle_s": SETTLE_S,
                   "max_seconds_per_batch": config.max_seconds,
                   "statistic": "median ms per batch; x eager = median over rounds of "
                                "t_eager / t_runtime (interleaved rounds)",
                   "io": "numpy float32 in host memory -> numpy outputs"},
        "cpu": {"baseline": BASELINE, "runners": cpu_runner_facts, "results": cpu_results,
                "ort_sweep": sweep_out, "ort_best": sweep["best"]},
        "gpu": gpu,
        "stitch": stitch,
        "end_to_end": end_to_end,
        "targets": evaluate_targets(cpu_results, peak["gflops"], ort_name),
        "peak_rss_mb_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                     / (2**20 if sys.platform == "darwin" else 1024), 1),
    }
    result["seconds_total"] = round(time.perf_counter() - started, 1)
    return result


def _ort_providers() -> list[str]:
    try:
        from runtime.session import available_providers

        return available_providers()
    except Exception as err:  # noqa: BLE001 - facts only
        return [f"unavailable: {err}"]


# --------------------------------------------------------------------------- reports


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def headline_rows(result: dict[str, Any], section: str = "cpu") -> list[list[str]]:
    rows = []
    for batch, by_runner in result[section]["results"].items():
        for name, row in by_runner.items():
            frac = row.get("peak_fraction")
            mem = row.get("peak_device_mb") if section == "gpu" else row.get("peak_rss_mb")
            rows.append([name, batch, _fmt(row["ms_median"]), _fmt(row["patterns_per_s"]),
                         f"{row['ratio_to_baseline']:.2f}x", _fmt(row.get("achieved_gflops")),
                         f"{100 * frac:.0f} %" if frac is not None else "–",
                         _fmt(row.get("patterns_per_s_best_round")), _fmt(row.get("cores_busy"), 2),
                         _fmt(mem, 0), _fmt(row.get("peak_rss_delta_mb"), 0)])
    return rows


HEADLINE_COLUMNS = ["runtime", "batch", "ms/batch (median)", "patterns/s", "x eager",
                    "GFLOP/s", "% of peak", "patterns/s best round", "cores busy",
                    "peak RSS MB", "Δ RSS MB"]
GPU_COLUMNS = [*HEADLINE_COLUMNS[:4], "x eager fp32", *HEADLINE_COLUMNS[5:9],
               "peak device MB", "Δ RSS MB"]


def sweep_rows(result: dict[str, Any]) -> list[list[str]]:
    sweep = result["cpu"]["ort_sweep"]
    rows = []
    for name, row in sweep["rows"].items():
        mark = " (best)" if name == sweep["best"] else ""
        rows.append([name + mark, _fmt(row["ms_median"]), _fmt(row["patterns_per_s"]),
                     f"{row['ratio_to_baseline']:.2f}x", _fmt(row.get("cores_busy"), 2),
                     _fmt(row["session_s"], 2), row["options"].get("note", "")])
    return rows


SWEEP_COLUMNS = ["setting", "ms/batch", "patterns/s", "x ptycho-run session", "cores busy",
                 "session build s", "what it changes"]


def findings(result: dict[str, Any]) -> list[str]:
    """What each onnxruntime knob gave, and where eager's time goes, from the numbers."""
    rows = result["cpu"]["ort_sweep"]["rows"]
    ratio = {name: row["ratio_to_baseline"] for name, row in rows.items()}
    lines = []

    def gain(a: str, b: str, what: str) -> None:
        if a in ratio and b in ratio and ratio[b]:
            lines.append(f"- {what}: {ratio[a] / ratio[b]:.2f}x ({a} vs {b}).")

    gain(SWEEP_BASELINE, "EXTENDED", "NCHWc blocked layout (level ALL over EXTENDED)")
    gain("EXTENDED", "BASIC", "fused Conv+activation (EXTENDED over BASIC)")
    gain("BASIC", "DISABLE_ALL", "basic graph clean-up (BASIC over DISABLE_ALL)")
    threads = sorted((int(n.rsplit(" ", 1)[1]), n) for n in ratio if n.startswith("ALL, threads"))
    if len(threads) > 1:
        gain(threads[-1][1], threads[0][1], f"{threads[-1][0]} threads over {threads[0][0]}")
    gain("ALL, spinning 0", SWEEP_BASELINE, "allow_spinning 0 over the default 1")
    ops = result["cpu"]["ort_sweep"].get("graph_ops") or {}
    for level, counts in ops.items():
        lines.append(f"- graph after {level}: "
                     + ", ".join(f"{op} x{k}" for op, k in counts.items()) + ".")
    last = list(result["cpu"]["results"].values())[-1]
    shares = ", ".join(f"{name} {100 * row['kernel_share']:.0f} %"
                       for name, row in last.items() if row.get("kernel_share") is not None)
    if shares:
        lines.append(f"- share of CPU time spent in the kernel (page faults, thread wake-ups) "
                     f"at batch {list(result['cpu']['results'])[-1]}: {shares}.")
    return lines


def contention_note(result: dict[str, Any]) -> list[str]:
    """A warning line when other processes shared the CPU during the run."""
    threads = result["env"]["torch_threads"]
    busy = [row["cores_busy"] for rows in result["cpu"]["results"].values()
            for name, row in rows.items() if name == BASELINE]
    load = result["env"].get("loadavg_start") or [0.0]
    if (busy and min(busy) < 0.75 * threads) or load[0] > 0.5 * threads:
        return [f"**Shared machine:** load average {load[0]} at the start, eager used "
                f"{min(busy) if busy else '?'} of {threads} cores per call: absolute numbers "
                "are low and noisy; the paired ratios are the robust part.", ""]
    return []


def markdown_report(result: dict[str, Any]) -> str:
    env, model, cpu = result["env"], result["model"], result["env"]["cpu"]
    peak = result["peak"]["cpu"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    out = [f"# ptycho-bench: {result['machine']}", "",
           f"{result['created_utc']} · {cpu['model']} · {cpu['usable_cores']} usable cores · "
           f"torch threads {env['torch_threads']} · malloc {env.get('malloc', 'default')} · "
           f"{versions}", "",
           f"Model: {model['source']}; widths {model['widths']}, N = {model['patch_size']}, "
           f"gridsize {model['gridsize']}, {model['parameters']:,} parameters, "
           f"{model['flops']['gflop_per_pattern']:.3f} GFLOP per pattern (convs). "
           f"CPU peak {_fmt(peak['gflops'])} GFLOP/s ({peak['assumption']}).", "",
           "## Headline: CPU, ratios to eager PyTorch (NCHW, inference_mode)", "",
           markdown_table(HEADLINE_COLUMNS, headline_rows(result)), "",
           f"Median of up to {result['config']['repeats']} interleaved rounds (at least "
           f"{min(3, result['config']['repeats'])}, "
           f"fewer past {result['config']['max_seconds']} s per batch size; see 'rounds' in "
           "the JSON) after warm-up calls "
           f"({', '.join(f'batch {b}: {w}' for b, w in result['timing']['warmup_calls'].items())}"
           "); x eager is the median of the "
           "per-round paired ratios. cores busy = process CPU time / wall time per call "
           f"(about {env['torch_threads']} when the machine is not shared). peak RSS = process "
           "VmHWM during that runtime's warm-up (reset per runtime), Δ = above the RSS "
           "before it.", "", *contention_note(result),
           "### Targets", ""]
    for target in result["targets"]:
        ceiling = target["ceiling_ratio_at_peak"]
        out.append(f"- {target['target']}: measured {target['measured']:.2f}x, "
                   f"**{'met' if target['met'] else 'not met'}**"
                   + (f" (a runtime at 100 % of peak would be {ceiling:.2f}x eager)"
                      if ceiling else ""))
    sweep = result["cpu"]["ort_sweep"]
    out += ["", f"## onnxruntime CPU settings (batch {sweep['batch']}, "
            f"{result['config']['sweep_repeats']} rounds)", "",
            markdown_table(SWEEP_COLUMNS, sweep_rows(result)), "",
            f"Used for the headline row: **{sweep['best']}** ({sweep['best_rule']}). "
            "Each factor against its neighbour (paired ratios):", "", *findings(result), ""]
    gpu = result["gpu"]
    out += ["## GPU", ""]
    if gpu["status"] != "ran":
        out.append(f"Skipped: {gpu['reason']}.")
    else:
        out += [f"{gpu['device']}; peak {gpu['peak']['fp32_tflops']} TFLOP/s fp32, "
                f"{gpu['peak']['tf32_tflops']} TF32 ({gpu['peak']['assumption']}); "
                f"cudnn.benchmark on; {gpu['note']}.", "",
                markdown_table(GPU_COLUMNS, headline_rows(result, "gpu"))]
    out += ["", "## Stitching and end to end", ""]
    for section in ("stitch", "end_to_end"):
        if result[section] and result[section].get("status") == "failed":
            out.append(f"- {section}: failed ({result[section]['error']}).")
    if result["stitch"] and result["stitch"].get("status") != "failed":
        s = result["stitch"]
        out.append(f"- `stitch_patches`: {s['patches']:,} complex64 {s['patch_size']}x"
                   f"{s['patch_size']} patches ({s['input_mb']} MB) onto {s['canvas']}, "
                   "integer placement: " + "; ".join(
                       f"{mode} {m['s_median']:.3f} s ({m['patches_per_s']:,.0f} patches/s, "
                       f"{m['repeats']} run{'s' if m['repeats'] > 1 else ''})"
                       for mode, m in s["modes"].items()).removeprefix("integer ") + ".")
    if result["end_to_end"] and result["end_to_end"].get("status") != "failed":
        e = result["end_to_end"]
        out.append(f"- `ptycho-run` (`run_scan`, {e['provider']}, batch {e['batch']}): "
                   f"{e['patterns']} patterns in {e['wall_s']:.2f} s wall = "
                   f"**{e['patterns_per_s']:.1f} patterns/s end to end** (inference "
                   f"{e['inference_s']:.2f} s = {e['inference_patterns_per_s']} patterns/s, "
                   f"stitch {e['stitch_s']:.3f} s); includes {e['includes']}.")
    export_s = result["setup_s"]["export"]
    out += ["", f"Bench took {result['seconds_total']:.0f} s"
            + (f" (export {export_s:.0f} s)" if export_s else "")
            + f"; process peak RSS {result['peak_rss_mb_process']:.0f} MB. "
            f"Command: `{result['command'] or 'ptycho-bench'}`.", ""]
    return "\n".join(out)


def write_results(result: dict[str, Any], outdir: Path) -> tuple[Path, Path]:
    outdir = Path(outdir)
    json_path = outdir / f"{result['machine']}.json"
    md_path = outdir / f"{result['machine']}.md"
    write_json(json_path, result, sort_keys=False)
    write_text(md_path, markdown_report(result))
    return json_path, md_path


def print_report(result: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # rich falls back to 80 columns: too narrow here
            console = Console(width=160)

    def table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
        t = Table(title=title, title_justify="left")
        for i, column in enumerate(columns):
            t.add_column(column, justify="left" if i == 0 else "right")
        for row in rows:
            t.add_row(*row)
        return t

    console.print(table(f"CPU ({result['machine']}): ratios to eager", HEADLINE_COLUMNS,
                        headline_rows(result)))
    console.print(table(f"onnxruntime settings, batch {result['cpu']['ort_sweep']['batch']}",
                        SWEEP_COLUMNS[:-1], [row[:-1] for row in sweep_rows(result)]))
    if result["gpu"]["status"] == "ran":
        console.print(table(f"GPU ({result['gpu']['device']})", GPU_COLUMNS,
                            headline_rows(result, "gpu")))
    for target in result["targets"]:
        verdict = "[green]met[/]" if target["met"] else "[red]not met[/]"
        console.print(f"{target['target']}: {target['measured']:.2f}x {verdict}")


def main(config: BenchConfig, outdir: Path, log: Callable[[str], None] = print
         ) -> tuple[dict[str, Any], Path, Path]:
    """Run, write <outdir>/<machine>.{json,md}, print the tables."""
    result = run_bench(config, log)
    json_path, md_path = write_results(result, outdir)
    print_report(result)
    log(f"wrote {json_path} and {md_path} ({result['seconds_total']:.0f} s)")
    return result, json_path, md_path
