"""The artifact's model as a checked session: opened for its format (onnxruntime for
model.onnx; the torch side's ``torchscript_session`` / ``pt2_session`` runner kinds for
model.ts / model.pt2, found through runtime.runner's registry), its inputs and outputs and
provenance checked against the manifest before any scan is fed to it, warmed up, bound to
the device (IO binding on CUDA) and self-checked on the artifact's golden data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from runtime.batching import iter_batches, output_shape
from runtime.compare import compare_outputs, tolerance_failures
from runtime.errors import ArtifactError, EnvironmentProblem, ParityError, RunUsageError
from runtime.manifest import MODEL_FORMATS, ArtifactSpec, check_provenance, load_artifact
from runtime.runner import OrtRunner, Runner, TensorMeta, runner_factory
from runtime.session import (
    IOBindingRunner,
    SessionInfo,
    create_session,
    import_onnxruntime,
    measure_node_placement,
)


def input_meta(spec: ArtifactSpec) -> TensorMeta:
    """The manifest's input: float32 (batch, C, N, N), the batch fixed or any."""
    return TensorMeta(spec.input_name, (spec.batch, spec.channels, spec.patch_size,
                                        spec.patch_size), "float32")


def make_runner(session: Any, info: SessionInfo, spec: ArtifactSpec,
                ort: Any = None) -> Runner:
    """The session as a runner of the protocol, fed and read as the manifest says: with
    IO binding for onnxruntime on a CUDA device (runtime.session.IOBindingRunner), else
    plain ``session.run`` (the CPU; TorchScript and .pt2, which copy each batch to their
    device themselves)."""
    meta = input_meta(spec)
    if not info.on_device or info.runtime != "onnxruntime":
        return OrtRunner(f"{info.runtime} {info.provider}", session=session, inputs=[meta],
                         outputs=list(spec.output_names))
    return IOBindingRunner(session, ort if ort is not None else import_onnxruntime(),
                           spec.input_name, spec.output_names, partial(output_shape, spec),
                           info.device_id, input_shape=meta.shape)



def run_self_check(spec: ArtifactSpec, runner: Runner) -> dict[str, Any]:
    """Golden inputs through the session's runner vs the exporter's eager outputs, per
    output.

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
    for _, _, values in iter_batches(runner, spec, len(x), lambda a, b: x[a:b], batch):
        for name, value in values.items():
            outputs[name].append(value)
    candidate = {name: np.concatenate(parts) for name, parts in outputs.items()}
    stats = compare_outputs(expected, candidate)
    failures = tolerance_failures(stats, spec.tolerances)
    return {"status": "FAIL" if failures else "PASS", "failures": failures,
            "patterns": len(x), "tolerances": spec.tolerances,
            "stats": {name: s.to_dict() for name, s in stats.items()}}


def raise_if_failed(result: dict[str, Any], spec: ArtifactSpec, info: SessionInfo) -> None:
    if result["status"] != "PASS":
        # a numerical mismatch, as the export gate's: the same exit code (5)
        raise ParityError(f"self-check FAILED on {info.provider} ({spec.model_path}): "
                            f"{'; '.join(result['failures'])}")


def self_check_artifact(artifact: str | os.PathLike[str], provider: str = "auto",
                        threads: int | None = None, device_id: int = 0,
                        model_format: str | None = None) -> dict[str, Any]:
    """The self-check alone: verify hashes, run golden.npz, report PASS/FAIL (never raises
    for FAIL, so a caller can print the table first)."""
    check_format(model_format)
    spec = load_artifact(artifact, check_golden=True, model_format=model_format)
    session, info = open_session(spec, provider, threads, device_id=device_id, profile=False)
    result = run_self_check(spec, make_runner(session, info, spec))
    return {"artifact": artifact_facts(spec), "provider": info.to_dict(), "self_check": result}


MODEL_FORMAT_CHOICES = tuple(MODEL_FORMATS)  # the model files an artifact can hold
TORCH_FORMATS = ("torchscript", "pt2")  # run by the torch side's "<format>_session" runners


def check_format(model_format: str | None) -> None:
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
        end_profile(session, info)
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


def artifact_facts(spec: ArtifactSpec) -> dict[str, Any]:
    return {"folder": str(spec.folder), "model": spec.model_path.name,
            "format": spec.model_format,
            "sha256": spec.model_sha256, "patch_size": spec.patch_size,
            "gridsize": spec.gridsize, "batch": spec.batch if spec.batch else "dynamic",
            "precision": spec.precision}



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


def end_profile(session: Any, info: SessionInfo) -> None:
    """Stop a profiling session that will not run, leaving no trace files behind."""
    with contextlib.suppress(Exception):
        trace = session.end_profiling()
        if trace:
            Path(trace).unlink(missing_ok=True)
    if info.profile_dir is not None:
        shutil.rmtree(info.profile_dir, ignore_errors=True)
        info.profile_dir = None
