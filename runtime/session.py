"""onnxruntime sessions that run where the user asked, or say why they cannot (no torch).

onnxruntime's defaults are dangerous for a beamline: asking for CUDA on the CPU wheel, or
with CUDA libraries missing, only warns and quietly runs on the CPU, hundreds of times
slower. Here every such case is an EnvironmentProblem with the fix in one line, the
provider that actually runs is checked after the session is built, and a short profiling
run reports how many graph nodes landed on each provider (partial CPU fallback).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from runtime.errors import ArtifactError, EnvironmentProblem
from runtime.runner import BaseRunner, TensorMeta

__all__ = [
    "AUTO_ORDER",
    "DEVICE_PROVIDERS",
    "PROVIDER_EPS",
    "IOBindingRunner",
    "SessionInfo",
    "available_providers",
    "check_single_distribution",
    "create_session",
    "cuda_free_bytes",
    "import_onnxruntime",
    "measure_node_placement",
    "parse_profile",
]

PROVIDER_EPS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
PROVIDER_CHOICES = (*PROVIDER_EPS, "auto")
AUTO_ORDER = ("tensorrt", "cuda", "cpu")
# Every wheel below installs the same `onnxruntime` import package; the last one wins.
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml",
                     "onnxruntime-openvino", "onnxruntime-qnn")
REINSTALL = ("pip uninstall -y onnxruntime onnxruntime-gpu, then install one: "
             "pip install 'ptycho-export[cpu]' or 'ptycho-export[gpu]'")
# CUDA runs float convs/matmuls in TF32 by default (~1e-3 relative): too coarse for the
# self-check's fp32 tolerances, and a silent accuracy change nobody asked for.
CUDA_OPTIONS = {"use_tf32": "0"}
# Providers whose tensors live in CUDA device memory (IO binding, GPU memory budget).
DEVICE_PROVIDERS = ("cuda", "tensorrt")


@dataclass
class SessionInfo:
    """Which provider a session really uses, and how it got there."""

    requested: str  # cpu | cuda | tensorrt | auto
    provider: str  # short name actually used
    ep: str  # onnxruntime provider name actually used
    providers: list[str]  # session.get_providers()
    available: list[str]  # ort.get_available_providers()
    threads: int | None
    onnxruntime_version: str
    skipped: dict[str, str] = field(default_factory=dict)  # auto: provider -> why not used
    profile_dir: Path | None = None
    device_id: int = 0  # CUDA device ordinal (cuda / tensorrt; ignored on the CPU)
    runtime: str = "onnxruntime"  # or "torchscript" (ptycho_export.torchscript_session, model.ts)
    runtime_version: str | None = None  # e.g. "torch 2.13.0" for TorchScript

    @property
    def on_device(self) -> bool:
        """True when inputs and outputs can live in CUDA memory (IO binding applies)."""
        return self.provider in DEVICE_PROVIDERS

    def to_dict(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "runtime_version": self.runtime_version,
                "requested": self.requested, "provider": self.provider, "ep": self.ep,
                "session_providers": self.providers, "available_providers": self.available,
                "threads": self.threads, "onnxruntime": self.onnxruntime_version,
                "device_id": self.device_id if self.on_device else None,
                "skipped": self.skipped}


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _too_new_for(message: str) -> str | None:
    """What makes a model too new for this onnxruntime (opset, IR version), or None.

    onnxruntime's own text starts with a C++ source location and signature; the user needs
    the number and the fix, so only those are kept."""
    found = re.search(r"Opset (\d+) is under development", message)
    if found:
        return f"the model needs ONNX opset {found.group(1)}"
    found = re.search(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)",
                      message)
    if found:
        return (f"the model has ONNX IR version {found.group(1)} (this onnxruntime reads up to "
                f"{found.group(2)})")
    if "opset" in message.lower() or "ir version" in message.lower():
        return f"the model's ONNX opset or IR version is not supported ({_one_line(message)})"
    return None


def installed_ort_distributions() -> dict[str, str]:
    """Installed onnxruntime wheels, name -> version (usually exactly one)."""
    found = {}
    for name in ORT_DISTRIBUTIONS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def check_single_distribution(found: dict[str, str] | None = None) -> None:
    """Two ORT wheels overwrite each other's files: refuse to guess which one won."""
    found = installed_ort_distributions() if found is None else found
    if len(found) > 1:
        listed = " and ".join(f"{name} {version}" for name, version in found.items())
        raise EnvironmentProblem(f"both {listed} are installed; they share one 'onnxruntime' "
                                 f"package and overwrite each other (CUDA is lost silently). "
                                 f"Fix: {REINSTALL}")


def import_onnxruntime() -> ModuleType:
    """Import onnxruntime after the packaging check, with an install hint if it is absent."""
    check_single_distribution()
    try:
        import onnxruntime
    except ImportError as err:
        raise EnvironmentProblem(
            f"onnxruntime is not importable ({_one_line(str(err))}); install the runtime with "
            "pip install 'ptycho-export[cpu]' (or [gpu] for CUDA)") from err
    return onnxruntime


def available_providers() -> list[str]:
    return list(import_onnxruntime().get_available_providers())


def _missing_provider(requested: str, ort: ModuleType, available: list[str]) -> str:
    dists = installed_ort_distributions()
    have = ", ".join(f"{n} {v}" for n, v in dists.items()) or f"onnxruntime {ort.__version__}"
    if requested == "cuda":
        if "onnxruntime-gpu" not in dists:
            return (f"--provider cuda: the installed {have} is the CPU build (providers: "
                    f"{', '.join(available)}); pip uninstall -y onnxruntime, then "
                    "pip install 'ptycho-export[gpu]'")
        return (f"--provider cuda: {have} reports no CUDAExecutionProvider (providers: "
                f"{', '.join(available)}); reinstall it: {REINSTALL}")
    return (f"--provider {requested}: {PROVIDER_EPS[requested]} is not in this onnxruntime "
            f"({have}; providers: {', '.join(available)}); TensorRT needs onnxruntime-gpu "
            "built with TensorRT plus the TensorRT libraries")


def _provider_list(name: str, available: list[str], device_id: int = 0) -> list[Any]:
    """What to pass as `providers=`: the wanted EP first, CPU last for unsupported nodes."""
    if name == "cpu":
        return ["CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", {**CUDA_OPTIONS, "device_id": str(device_id)})
    if name == "cuda":
        return [cuda, "CPUExecutionProvider"]
    chain: list[Any] = [("TensorrtExecutionProvider", {"device_id": str(device_id)})]
    if "CUDAExecutionProvider" in available:
        chain.append(cuda)
    return [*chain, "CPUExecutionProvider"]


def _preload_cuda(ort: ModuleType) -> None:
    """Let pip-installed CUDA/cuDNN wheels be found (ORT >= 1.21); harmless when absent."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
        preload(directory="")


def _session_options(ort: ModuleType, threads: int | None, profile_dir: Path | None,
                     log_level: int) -> Any:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        if threads < 1:
            raise EnvironmentProblem(f"--threads must be >= 1, got {threads}")
        options.intra_op_num_threads = int(threads)
    # A session that fails to build with profiling on logs a misleading "could not write a
    # profile" error; the failure itself is reported by us, so keep that one quiet.
    options.log_severity_level = 4 if profile_dir is not None and log_level >= 3 else log_level
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_dir / "ort_profile")
    return options


def _build(ort: ModuleType, model_path: Path, name: str, available: list[str],
           threads: int | None, profile: bool, log_level: int,
           device_id: int = 0) -> tuple[Any, Path | None]:
    """One attempt on one provider; any failure or fallback is an EnvironmentProblem."""
    ep = PROVIDER_EPS[name]
    if ep not in available:
        raise EnvironmentProblem(_missing_provider(name, ort, available))
    if name != "cpu":
        _preload_cuda(ort)
    profile_dir = Path(tempfile.mkdtemp(prefix="ptycho-ort-profile-")) if profile else None
    try:
        options = _session_options(ort, threads, profile_dir, log_level)
        try:
            # enable_fallback=0: a provider that fails to initialise raises here with the
            # reason, instead of onnxruntime printing it and retrying on the CPU.
            session = ort.InferenceSession(str(model_path), sess_options=options,
                                           providers=_provider_list(name, available,
                                                                    device_id),
                                           enable_fallback=0)
        except Exception as err:  # onnxruntime's pybind errors do not share a base class
            reason = _one_line(str(err))
            too_new = _too_new_for(str(err))
            if too_new is not None:  # the same on every provider: not a CUDA problem
                raise EnvironmentProblem(
                    f"{model_path}: {too_new}, which onnxruntime {ort.__version__} cannot "
                    "run; upgrade onnxruntime (pip install -U onnxruntime), or re-export with "
                    "ptycho-export's default --opset 20") from err
            if name != "cpu":
                raise EnvironmentProblem(
                    f"--provider {name}: onnxruntime could not start {ep}: {reason} (check "
                    "that the CUDA/cuDNN majors match this onnxruntime-gpu build)") from err
            raise ArtifactError(f"{model_path}: onnxruntime cannot load it: {reason}") from err
        actual = session.get_providers()
        if not actual or actual[0] != ep:
            raise EnvironmentProblem(
                f"--provider {name}: onnxruntime fell back to {actual[0] if actual else 'none'} "
                f"instead of {ep} (its provider library failed to load, usually missing or "
                "mismatched CUDA/cuDNN/TensorRT libraries; run with ORT logging to see which)")
    except BaseException:
        if profile_dir is not None:
            shutil.rmtree(profile_dir, ignore_errors=True)
        raise
    return session, profile_dir


def create_session(model_path: str | os.PathLike[str], provider: str = "auto",
                   threads: int | None = None, profile: bool = False,
                   log_level: int = 3, device_id: int = 0) -> tuple[Any, SessionInfo]:
    """An InferenceSession whose first provider is really the requested one.

    ``auto`` tries TensorRT, CUDA, then CPU among the available providers and records why
    each skipped one was not used. ``profile`` turns on onnxruntime profiling for one
    :func:`measure_node_placement` call (which ends it again). ``device_id`` picks the
    GPU for CUDA/TensorRT (as numbered under CUDA_VISIBLE_DEVICES).
    """
    if provider not in PROVIDER_CHOICES:
        raise EnvironmentProblem(f"--provider {provider!r}: choose one of "
                                 f"{', '.join(PROVIDER_CHOICES)}")
    if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
        raise EnvironmentProblem(f"--device-id must be an integer >= 0, got {device_id!r}")
    ort = import_onnxruntime()
    available = list(ort.get_available_providers())
    path = Path(model_path)
    skipped: dict[str, str] = {}
    candidates = ([p for p in AUTO_ORDER if PROVIDER_EPS[p] in available]
                  if provider == "auto" else [provider])
    for index, name in enumerate(candidates):
        try:
            session, profile_dir = _build(ort, path, name, available, threads, profile,
                                          log_level, device_id)
        except EnvironmentProblem as err:
            if provider != "auto" or index == len(candidates) - 1:
                raise
            skipped[name] = str(err)
            continue
        info = SessionInfo(requested=provider, provider=name, ep=PROVIDER_EPS[name],
                           providers=list(session.get_providers()), available=available,
                           threads=threads, onnxruntime_version=str(ort.__version__),
                           skipped=skipped, profile_dir=profile_dir, device_id=device_id)
        return session, info
    raise EnvironmentProblem(f"no usable onnxruntime provider among {available}")


def parse_profile(events: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """provider -> op type -> node count, from an onnxruntime profiling trace.

    Each executed node emits a "<node>_kernel_time" event (cat "Node") whose args name the
    provider and op; a node is counted once however many runs the trace holds.
    """
    seen: dict[str, tuple[str, str]] = {}
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        args = event.get("args") or {}
        seen[event["name"]] = (str(args.get("provider", "unknown")),
                               str(args.get("op_name", "unknown")))
    placement: dict[str, Counter[str]] = {}
    for provider, op in seen.values():
        placement.setdefault(provider, Counter())[op] += 1
    return {p: dict(sorted(ops.items())) for p, ops in sorted(placement.items())}


def measure_node_placement(session: Any, feed: dict[str, np.ndarray],
                           info: SessionInfo | None = None) -> dict[str, dict[str, int]]:
    """Run ``feed`` once on a profiling session, end profiling, parse and delete the trace."""
    session.run(None, feed)
    trace = session.end_profiling()
    try:
        if not trace:
            return {}
        with open(trace, encoding="utf-8") as handle:
            events = json.load(handle)
        return parse_profile(events if isinstance(events, list) else [])
    finally:
        if trace:
            Path(trace).unlink(missing_ok=True)
        if info is not None and info.profile_dir is not None:
            shutil.rmtree(info.profile_dir, ignore_errors=True)
            info.profile_dir = None


# --------------------------------------------------------------------------- CUDA device


class IOBindingRunner(BaseRunner):
    """A runner (runtime.runner protocol) of a CUDA session with IO binding: one
    host->device copy of the input and one device->host copy of the outputs per batch.

    Without binding, ``session.run`` copies the input to the GPU and every output back
    inside each call, and allocates fresh output buffers each time. Here the input is an
    OrtValue placed on the device, the outputs are bound to OrtValues preallocated on the
    device for each batch shape (reused across batches; a short last batch of a dynamic
    artifact gets its own), and ``copy_outputs_to_cpu`` fetches them once per batch.
    ``ort`` is the onnxruntime module (a stand-in in tests); ``device`` is "cuda" in use
    ("cpu" lets a test drive the same calls through a real CPU session); ``input_shape``
    is the input's (None where any size goes), for the protocol's feed check.
    """

    def __init__(self, session: Any, ort: Any, input_name: str, output_names: Sequence[str],
                 output_shape: Any, device_id: int = 0, output_dtype: Any = np.float32,
                 device: str = "cuda", input_shape: tuple[int | None, ...] | None = None
                 ) -> None:
        super().__init__()
        self.name = f"onnxruntime {device}:{device_id} (IO binding)"
        self.session, self.ort, self.device = session, ort, device
        self.input_shape = input_shape
        self.input_name, self.output_names = input_name, list(output_names)
        self.output_shape = output_shape  # (name, batch) -> full output shape
        self.device_id, self.output_dtype = int(device_id), output_dtype
        self.binding = session.io_binding()
        self._outputs: dict[int, list[Any]] = {}
        self._last_batch = 0

    def _device_outputs(self, batch: int) -> list[Any]:
        outputs = self._outputs.get(batch)
        if outputs is None:
            new = self.ort.OrtValue.ortvalue_from_shape_and_type
            outputs = [new(tuple(self.output_shape(name, batch)), self.output_dtype,
                           self.device, self.device_id) for name in self.output_names]
            self._outputs[batch] = outputs
        return outputs

    def _metadata(self) -> list[TensorMeta]:
        return [TensorMeta(self.input_name, self.input_shape, "float32")]

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = feed[self.input_name]
        value = self.ort.OrtValue.ortvalue_from_numpy(x, self.device, self.device_id)
        self.binding.bind_ortvalue_input(self.input_name, value)
        for name, out in zip(self.output_names, self._device_outputs(len(x)), strict=True):
            self.binding.bind_ortvalue_output(name, out)
        self.session.run_with_iobinding(self.binding)
        self._last_batch = len(x)
        return dict(zip(self.output_names, self.binding.copy_outputs_to_cpu(), strict=True))

    def last_outputs(self) -> dict[str, Any]:
        """The last batch's outputs as the device OrtValues they were computed into (valid
        until the next call): a second graph can read them without a round trip."""
        return dict(zip(self.output_names, self._device_outputs(self._last_batch),
                        strict=True))


def _nvidia_smi_id(device_id: int) -> str:
    """nvidia-smi numbers GPUs physically; ORT's device_id counts CUDA_VISIBLE_DEVICES."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
               if v.strip()]
    return visible[device_id] if device_id < len(visible) else str(device_id)


def cuda_free_bytes(device_id: int = 0, timeout: float = 10.0) -> int | None:
    """Free memory of one GPU from nvidia-smi (no torch, no CUDA bindings); None if unknown."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "--query-gpu=memory.free", "--format=csv,noheader,nounits",
                               "-i", _nvidia_smi_id(device_id)], capture_output=True,
                              text=True, timeout=timeout, check=False)
        mib = float(done.stdout.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return int(mib * (1 << 20)) if done.returncode == 0 and mib >= 0 else None
