"""Export models we did not train: any nn.Module / LightningModule plus an InferenceAdapter.

The module goes through the same gate as our own bundles (`pipeline.export_module`):

    dry run (Trainer / self.log / float64 / output checks)
    -> lint (train mode, dtypes, torch.export dry run, strict trace: every TracerWarning
       is a refusal naming its source line)
    -> complex rewrite of the exported program (`complex_ops`: exp, complex scalar, pad)
    -> freeze (ONNX / TorchScript / .pt2) -> audit of the saved files
    -> parity gate against the eager module -> manifest.json + golden.npz + parity.md

Checkpoints are read with `torch.load(weights_only=True)` only: a file that needs pickled
code is refused with one line naming it; there is no unsafe fallback.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import math
import os
import pickle
import re
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ptycho_export.bundle import sha256_file
from ptycho_export.export.adapter import (
    AdaptedModule,
    InferenceAdapter,
    detached_from_trainer,
    dry_run,
    prepare_model,
)
from ptycho_export.export.complex_ops import (
    RewriteReport,
    explain_onnx_failure,
    record_complex_ops,
    rewrite_complex,
    user_frame,
)
from ptycho_export.export.formats import UsageError, parse_formats
from ptycho_export.export.lint import lint_module
from ptycho_export.export.pipeline import (
    COMPLEX_LAYOUT,
    ExportOptions,
    ExportResult,
    _example_batch,
    batch_dim,
    export_module,
)
from ptycho_export.export.upstream_bundle import is_upstream_bundle, read_upstream_bundle
from ptycho_export.export.wrapper import INPUT_NAME, OUTPUT_NAMES
from ptycho_export.parity import TorchRunner
from runtime.errors import PtychoError

SYNTHETIC_COUNT = 4
# Globals never worth allow-listing: they call code rather than build data.
_NEVER_ALLOW = ("builtins", "os", "posix", "nt", "subprocess", "sys", "shutil", "pathlib",
                "importlib", "runpy", "pickle", "codecs", "functools", "operator", "eval")
SYNTHETIC_PEAK_COUNTS = 1000.0
CONSTANTS_FILE = "constants.npz"  # the adapter's tensor constants, beside the artifacts
SCALE_CASES = (1e-3, 1e3)  # gated inputs at other levels when the graph scales its input


class CheckpointError(PtychoError):
    """A checkpoint cannot be loaded safely, or does not fit the named model class."""


# ---------------------------------------------------------------- loading
def import_object(spec: str) -> Any:
    """'package.module:Name' (or 'path/to/file.py:Name'; dotted names reach nested
    attributes). Importing runs that module's code: the user names it, nothing from a
    checkpoint is executed."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{spec!r}: give it as package.module:Name")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            if loader_spec is None or loader_spec.loader is None or not path.is_file():
                raise ImportError(f"no Python file {path}")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        obj: Any = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except ModuleNotFoundError as err:
        missing = (err.name or "").split(".")[0]
        if missing and missing != module_name.split(".")[0]:
            raise UsageError(
                f"cannot import {spec}: importing {module_name} needs the package "
                f"'{missing}', which is not installed here (pip install {missing}); importing "
                "a model's module runs all its imports, even ones inference never uses"
            ) from None
        raise UsageError(f"cannot import {spec}: no module named {err.name!r} (is it "
                         "installed, or on PYTHONPATH?)") from None
    except (ImportError, AttributeError) as err:
        raise UsageError(f"cannot import {spec}: {type(err).__name__}: {err}") from None
    except Exception as err:  # noqa: BLE001 - the user's module failed while importing
        frame = user_frame(traceback.extract_tb(err.__traceback__))
        raise UsageError(f"cannot import {spec}: importing it raised {type(err).__name__}"
                         f"{' at ' + frame if frame else ''}: {str(err).strip()[:200]}"
                         ) from None
    return obj


def _safe_objects(safe_globals: Iterable[Any]) -> list[Any]:
    return [import_object(g) if isinstance(g, str) else g for g in safe_globals]


def load_checkpoint(path: str | os.PathLike, safe_globals: Iterable[Any] = (), *,
                    data: bytes | None = None) -> Any:
    """torch.load(weights_only=True) (or safetensors); refusals are one line naming the file.
    `data`: the file's bytes when it is a member of an archive (`path` then names it)."""
    import io

    path = Path(path)
    if data is None and not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load, load_file

        return load(data) if data is not None else load_file(str(path), device="cpu")
    allowed = _safe_objects(safe_globals)
    try:
        with torch.serialization.safe_globals(allowed):
            source = io.BytesIO(data) if data is not None else str(path)
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        name = found.group(1) if found else ""
        what = (f"it pickles {name}, which weights_only does not allow" if name
                else str(err).strip().splitlines()[-1][:200])
        module, _, attr = name.rpartition(".")
        if module and module.split(".")[0] not in _NEVER_ALLOW:
            allow = f"; if you trust that class, allow it with --safe-global {module}:{attr}"
        else:
            allow = " (a function that can run code: do not allow-list it)" if name else ""
        raise CheckpointError(
            f"{path}: cannot be loaded safely: torch.load(weights_only=True) refuses it "
            f"({what}); it was not loaded, and there is no unsafe fallback. If you trust the "
            f"file, re-save only its weights (torch.save(model.state_dict(), ...)){allow}"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({first})") from None


def _state_dict_of(checkpoint: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, hyper_parameters) of a Lightning checkpoint or a plain state dict."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        hparams = checkpoint.get("hyper_parameters") or {}
        return checkpoint["state_dict"], dict(hparams) if isinstance(hparams, dict) else {}
    if isinstance(checkpoint, dict) and checkpoint and all(
            isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint, {}
    raise CheckpointError(f"{path}: holds {type(checkpoint).__name__}, neither a Lightning "
                          "checkpoint (with 'state_dict') nor a state dict of tensors")


def load_model(model_class: str | type, checkpoint: str | os.PathLike | None = None, *,
               init_args: dict[str, Any] | None = None, safe_globals: Iterable[Any] = ()
               ) -> tuple[nn.Module, dict[str, Any]]:
    """Build `model_class` (from the checkpoint's hyper_parameters, overridden by
    `init_args`) and load the weights strictly. Returns the module and the manifest's
    "source" record."""
    cls = import_object(model_class) if isinstance(model_class, str) else model_class
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise UsageError(f"{model_class}: not a torch.nn.Module class")
    class_name = f"{cls.__module__}.{cls.__qualname__}"
    spec = model_class if isinstance(model_class, str) else \
        f"{cls.__module__}:{cls.__qualname__}"
    source: dict[str, Any] = {"kind": "module", "class": class_name, "spec": spec,
                              "checkpoint": None, "init_args": _json_or_none(init_args)}
    if init_args and source["init_args"] is None:
        source["init_args_not_plain"] = True
    state_dict, hparams = None, {}
    if checkpoint is not None and is_upstream_bundle(checkpoint):
        path = Path(checkpoint)
        bundle = read_upstream_bundle(path, lambda name, blob: load_checkpoint(
            f"{path}:{name}", safe_globals, data=blob))
        state_dict, hparams = _state_dict_of(bundle.weights, path)
        source["checkpoint"] = {"file": path.name, "sha256": sha256_file(path),
                                "loader": f"upstream bundle: {bundle.member}/model.pth with "
                                          "torch.load(weights_only=True)",
                                "member": bundle.member, "members": bundle.models}
        source["bundle_config"] = bundle.config
        source["notes"] = [bundle.note()]
    elif checkpoint is not None:
        path = Path(checkpoint)
        state_dict, hparams = _state_dict_of(load_checkpoint(path, safe_globals), path)
        source["checkpoint"] = {"file": path.name, "sha256": sha256_file(path),
                                "loader": "safetensors" if path.suffix == ".safetensors"
                                else "torch.load(weights_only=True)"}
    kwargs = {**hparams, **(init_args or {})}
    try:
        model = cls(**kwargs)
    except Exception as err:  # noqa: BLE001 - user code; report it in one line
        given = ", ".join(sorted(kwargs)) or "no arguments"
        raise CheckpointError(f"cannot construct {class_name}({given}): {type(err).__name__}: "
                              f"{str(err).strip()[:200]} -- pass constructor arguments with "
                              "--init-args '{\"name\": value}'") from None
    if state_dict is not None:
        result = model.load_state_dict(state_dict, strict=False)
        if result.missing_keys or result.unexpected_keys:
            parts = []
            if result.missing_keys:
                parts.append(f"{len(result.missing_keys)} missing (e.g. "
                             f"{', '.join(result.missing_keys[:3])})")
            if result.unexpected_keys:
                parts.append(f"{len(result.unexpected_keys)} unexpected (e.g. "
                             f"{', '.join(result.unexpected_keys[:3])})")
            raise CheckpointError(f"{checkpoint}: weights do not fit {class_name}: "
                                  + "; ".join(parts))
        source["hyper_parameters"] = sorted(hparams)
    return model, source


def _json_or_none(value: Any) -> Any:
    """`value` when it survives JSON unchanged (the manifest can rebuild the model), else
    None (the manifest then says the constructor arguments were not plain data)."""
    if value is None:
        return None
    try:
        return value if json.loads(json.dumps(value)) == value else None
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------- inputs
def synthetic_inputs(shape: tuple[int, int, int], count: int = SYNTHETIC_COUNT,
                     input_max: float = 1.0, seed: int = 0) -> np.ndarray:
    """Seeded Poisson-like diffraction amplitudes (count, C, N, N), float32, max input_max.

    Each pattern: a centred bright disc of random width with fully developed speckle
    (exponential intensity), drawn as Poisson counts at a 1000-count peak, then sqrt and
    scaled so the brightest pixel of the set equals `input_max` (the data's units).
    """
    rng = np.random.default_rng(seed)
    c, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r2 = ((yy - h / 2) / h) ** 2 + ((xx - w / 2) / w) ** 2
    sigma = rng.uniform(0.05, 0.2, size=(count, c, 1, 1))
    level = rng.uniform(0.5, 1.0, size=(count, c, 1, 1))
    mean = SYNTHETIC_PEAK_COUNTS * level * (np.exp(-r2 / (2 * sigma**2)) + 0.01)
    speckle = rng.exponential(1.0, size=(count, c, h, w))
    amplitudes = np.sqrt(rng.poisson(mean * speckle).astype(np.float64))
    top = amplitudes.max()
    return (amplitudes * (input_max / top if top > 0 else 1.0)).astype(np.float32)


def load_inputs(path: str | os.PathLike, channels: int | None = None) -> np.ndarray:
    """Golden inputs from an npz (`diffraction` or `diff3d`, (n, N, N) or (n, C, N, N));
    never with pickle."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            key = next((k for k in ("diffraction", "diff3d") if k in data.files), None)
            if key is None:
                raise UsageError(f"{path}: no 'diffraction' (or 'diff3d') array; has "
                                 f"{', '.join(data.files) or 'nothing'}")
            array = np.asarray(data[key])
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: cannot read it as npz without pickle ({err})") from None
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4 or array.shape[0] < 1:
        raise UsageError(f"{path}: '{key}' has shape {array.shape}; expected (n, N, N) or "
                         "(n, C, N, N)")
    if channels is not None and array.shape[1] == 1 and channels > 1:
        raise UsageError(f"{path}: single-channel patterns, but the model takes {channels} "
                         "channels (group neighbours first)")
    if not np.isfinite(array).all():
        raise UsageError(f"{path}: '{key}' holds NaN or Inf")
    return np.ascontiguousarray(array[:16], dtype=np.float32)


# ---------------------------------------------------------------- fp64 reference
def _eager_fp32_runner(wrapper: nn.Module) -> TorchRunner:
    """The fp32 reference: a copy as it is (`eager_runner` casts with `Module.to(float32)`,
    which would drop the imaginary part of a complex buffer such as a probe)."""
    import copy

    return TorchRunner("eager fp32 cpu", copy.deepcopy(wrapper).eval(), (INPUT_NAME,),
                       OUTPUT_NAMES, "cpu", torch.float32)


def _float64_runner(wrapper: nn.Module, sample: np.ndarray) -> tuple[TorchRunner | None, str]:
    """fp64 eager copy for the informational rows, each tensor widened by kind (float64,
    complex128)."""
    import copy

    clone = copy.deepcopy(wrapper)
    clone._apply(lambda t: t.to(torch.float64) if t.is_floating_point()  # noqa: SLF001
                 else t.to(torch.complex128) if t.is_complex() else t)
    runner = TorchRunner("eager fp64 cpu", clone.eval(), (INPUT_NAME,), OUTPUT_NAMES,
                         "cpu", torch.float64)
    try:
        runner.infer({INPUT_NAME: sample.astype(np.float64)})
    except Exception as err:  # noqa: BLE001 - informational only
        return None, (f"no float64 reference rows: the module does not run in float64 "
                      f"({type(err).__name__}: {str(err).strip()[:120]})")
    return runner, ""


# ---------------------------------------------------------------- export
def _check_options(options: ExportOptions) -> None:
    options.validate()
    if options.precision != "fp32":
        raise UsageError("foreign modules are exported in fp32 only (a reduced-precision "
                         "copy would need per-model tolerances)")
    if options.with_physics:
        raise UsageError("--with-physics needs a bundle's probe and normalisation; it is not "
                         "available for foreign modules")


def export_foreign(module: nn.Module, adapter: InferenceAdapter, outdir: str | os.PathLike,
                   options: ExportOptions | None = None, *, golden: np.ndarray | None = None,
                   input_max: float = 1.0, source: dict[str, Any] | None = None,
                   log=None) -> ExportResult:  # noqa: ANN001
    """Freeze `module` (called through `adapter`) like a bundle's model: same artifact
    folder, manifest (with "source" instead of "source_bundle"), parity gate.

    `golden`: inputs (n, C, N, N) in the data's units; default seeded synthetic Poisson
    amplitudes with maximum `input_max`. Refusals raise ExportLintError / UsageError /
    CheckpointError (one line each); a parity failure raises ParityError and leaves only
    the failure report in `outdir`.
    """
    options = options or ExportOptions()
    _check_options(options)
    options.check_output(outdir)
    adapter.validate()
    log = log or (lambda message: None)
    started = time.perf_counter()
    c, n, _ = adapter.input_shape
    notes: list[str] = []
    if golden is None:
        golden = synthetic_inputs(adapter.input_shape, input_max=input_max)
        golden_kind = (f"synthetic: {len(golden)} seeded Poisson-like amplitude patterns, "
                       f"max {input_max:g}")
    else:
        golden = np.asarray(golden)
        if golden.ndim != 4 or tuple(golden.shape[1:]) != adapter.input_shape:
            raise UsageError(f"golden inputs have shape {golden.shape}; the adapter says "
                             f"(n, {c}, {n}, {n})")
        if golden.dtype != np.float32:
            notes.append(f"golden inputs were {golden.dtype}: cast to float32")
        golden = np.ascontiguousarray(golden, dtype=np.float32)
        golden_kind = f"given: {len(golden)} patterns"

    notes += list((source or {}).get("notes") or [])
    model, model_notes = prepare_model(module, adapter)
    notes += model_notes
    wrapper = AdaptedModule(model, adapter).eval()
    notes += wrapper.notes
    dynamic = options.batch is None
    example_np = _example_batch(golden, options.batch)
    example = (torch.from_numpy(example_np),)
    label = f"{type(model).__qualname__}.{adapter.method}"
    log(f"dry run: {label} on a float32 batch {tuple(example_np.shape)}")
    sample_out, ranges = dry_run(wrapper, example)

    log("lint: dtypes, determinism, batch independence, torch.export, trace proof, "
        "float64 in the graphs")
    with detached_from_trainer():
        linted = lint_module(wrapper, example, dynamic, allow_complex=True,
                             formats=options.formats,
                             allow_trace_warnings=options.allow_trace_warnings)
    notes += linted.notes()
    program, rewrites = (rewrite_complex(linted.exported) if linted.exported is not None
                         else (None, RewriteReport()))
    where: dict[str, str] = {}
    if rewrites.counts:
        where = record_complex_ops(wrapper, example)
        notes += rewrites.notes(where)
        log("rewrote complex ops for ONNX: " + ", ".join(
            f"{op} x{k}" for op, k in rewrites.counts.items()))

    gridsize = math.isqrt(c) if math.isqrt(c) ** 2 == c else None
    if gridsize is None:
        notes.append(f"{c} input channels is not gridsize**2: ptycho-run cannot group "
                     "patterns for this artifact")
    if tuple(sample_out) != adapter.input_shape:
        notes.append(f"outputs are {tuple(sample_out)} per sample, inputs "
                     f"{adapter.input_shape}: ptycho-run stitches (C, N, N) patches")
    exact, exact_note = _float64_runner(wrapper, golden[:1])
    if exact_note:
        notes.append(exact_note)
    source = dict(source or {"kind": "module",
                             "class": f"{type(module).__module__}.{type(module).__qualname__}",
                             "checkpoint": None})
    checkpoint = source.get("checkpoint") or {}
    b = batch_dim(options)
    in_shape, out_shape = [b, c, n, n], [b, *sample_out]
    metadata = {
        "producer": "ptycho-export", "patch_size": str(n), "gridsize": str(gridsize or ""),
        "channels": str(c), "input": INPUT_NAME, "outputs": ",".join(OUTPUT_NAMES),
        "complex_layout": COMPLEX_LAYOUT, "source_class": str(source.get("class")),
        "source_checkpoint_sha256": str(checkpoint.get("sha256", "")),
        "adapter_method": adapter.method, "precision": options.precision,
    }
    manifest_fields = {
        "source": source,
        "model": {"patch_size": n, "gridsize": gridsize, "channels": c,
                  "class": source.get("class"),
                  "parameters": sum(p.numel() for p in model.parameters())},
        "adapter": adapter.describe(),
        "notes": notes,
        "golden_inputs": golden_kind,
        "inputs": [{"name": INPUT_NAME, "shape": in_shape, "dtype": "float32",
                    "meaning": ("raw diffraction amplitudes at any level: the graph "
                                "computes " + ", ".join(adapter.input_scale) +
                                " per sample from the input itself") if adapter.input_scale
                    else ("diffraction amplitudes in the units the source model expects "
                          "(its own scaling, if any, is inside the graph)")}],
        "outputs": [{"name": name, "shape": out_shape, "dtype": "float32",
                     "observed_range": ranges[name]} for name in OUTPUT_NAMES],
        "complex_layout": COMPLEX_LAYOUT,
        "complex_rewrites": rewrites.notes(where),
    }
    for note in notes:
        log(f"note: {note}")
    def explain_onnx(err: Exception) -> str | None:
        """A complex op without ONNX translation refuses ONNX alone (one line)."""
        nonlocal where
        if isinstance(err, PtychoError | KeyboardInterrupt):
            return None
        if not where:
            where = record_complex_ops(wrapper, example)
        reason = explain_onnx_failure(err, where)
        if reason is None and isinstance(err, torch.onnx.errors.OnnxExporterError):
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            reason = f"ONNX export failed: {lines[0][:300] if lines else type(err).__name__}"
        return reason

    # An artifact that scales its own input must give the same answer at any level.
    extra_cases = {f"golden x{k:g}": golden * np.float32(k) for k in SCALE_CASES} \
        if adapter.input_scale else None
    return export_module(wrapper, linted, golden, outdir, options, metadata=metadata,
                         manifest_fields=manifest_fields, exact=exact,
                         eager=_eager_fp32_runner(wrapper), program=program,
                         output_sample_shape=tuple(sample_out), log=log, started=started,
                         explain_onnx=explain_onnx, extra_cases=extra_cases,
                         extra_files={CONSTANTS_FILE: _constants_npz(wrapper)})


def _constants_npz(wrapper: AdaptedModule) -> bytes:
    """The tensor constants as the artifacts use them (after casts), for ptycho-parity to
    rebuild the eager reference; npz without pickle."""
    import io

    arrays = {name: getattr(wrapper, buffer).numpy()
              for name, buffer in wrapper.buffer_names.items()}
    blob = io.BytesIO()
    np.savez(blob, **arrays)
    return blob.getvalue()


def rebuild_reference(artifact_dir: str | os.PathLike, manifest: dict[str, Any],
                      checkpoint: str | os.PathLike) -> AdaptedModule:
    """The eager fp32 module a --model-class export was made from, rebuilt from its
    manifest (class, constructor arguments, adapter), its constants.npz and `checkpoint`,
    whose sha256 must be the one recorded. Errors are one line naming what is missing."""
    folder = Path(artifact_dir)
    source = manifest.get("source") or {}
    recorded = (source.get("checkpoint") or {}).get("sha256")
    path = Path(checkpoint)
    if not recorded:
        raise CheckpointError(f"{folder}: was exported without a checkpoint (random weights), "
                              "so its eager model cannot be rebuilt; export it with "
                              "--checkpoint to compare it with ptycho-parity")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    actual = sha256_file(path)
    if actual != recorded:
        origin = (source.get("checkpoint") or {}).get("file", "another checkpoint")
        raise CheckpointError(f"{folder} was exported from {origin} (sha256 {recorded[:12]}...),"
                              f" not from {path} (sha256 {actual[:12]}...); pass the "
                              "checkpoint it came from")
    adapter_record = manifest.get("adapter") or {}
    output = adapter_record.get("output")
    if not isinstance(output, str) or output not in ("complex", "amp_phase", "re_im"):
        raise CheckpointError(f"{folder}: the adapter maps outputs with {output!r}, which the "
                              "manifest cannot rebuild; compare with the Python API instead")
    if "spec" not in source:
        raise CheckpointError(f"{folder}: its manifest predates rebuildable exports; "
                              "re-export it with ptycho-export")
    if source.get("init_args_not_plain"):
        raise CheckpointError(f"{folder}: its constructor arguments were not plain data, so "
                              "the manifest cannot rebuild the model")
    model, _ = load_model(source["spec"], path, init_args=source.get("init_args"))
    constants: dict[str, Any] = {}
    for name, facts in (adapter_record.get("constants") or {}).items():
        if "python" in facts:
            constants[name] = ast.literal_eval(facts["python"])
    constants_path = folder / CONSTANTS_FILE
    if constants_path.is_file():
        with np.load(constants_path, allow_pickle=False) as data:
            constants.update({k: np.asarray(data[k]) for k in data.files})
    missing = sorted(set(adapter_record.get("constants") or {}) - set(constants))
    if missing:
        raise CheckpointError(f"{constants_path}: lacks constant(s) {', '.join(missing)}")
    adapter = InferenceAdapter(
        input_shape=tuple(adapter_record["input_shape"]),  # type: ignore[arg-type]
        method=adapter_record.get("method", "forward"),
        input_name=adapter_record.get("input_name"), constants=constants, output=output,
        output_index=adapter_record.get("output_index"),
        cast_float64=bool(adapter_record.get("cast_float64")),
        input_scale={k: v["rule"] for k, v in (adapter_record.get("input_scale") or {}).items()})
    adapter.validate()
    prepared, _ = prepare_model(model, adapter)
    return AdaptedModule(prepared, adapter).eval()


# ---------------------------------------------------------------- CLI-facing
def _parse_shape(text: str) -> tuple[int, int, int]:
    parts = [p for p in re.split(r"[,x× ]+", text.strip()) if p]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) == 1:
        dims = (1, dims[0], dims[0])
    if len(dims) != 3:
        raise UsageError(f"--input-shape {text!r}: give C,N,N (e.g. 1,64,64) or N")
    return dims  # type: ignore[return-value]


def _parse_constant(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise UsageError(f"--constant {text!r}: give name=value (a Python number, e.g. "
                         "scale=0.5 or phase_factor=1j)")
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        raise UsageError(f"--constant {text!r}: {value!r} is not a Python literal") from None
    return name.strip(), parsed


def _bundle_shape(source: dict[str, Any]) -> tuple[int, int, int] | None:
    """(gridsize**2, N, N) from an upstream bundle's config, when it records both."""
    config = source.get("bundle_config") or {}
    n, gridsize = config.get("N"), config.get("gridsize")
    if isinstance(n, int) and isinstance(gridsize, int) and n > 0 and gridsize > 0:
        return (gridsize * gridsize, n, n)
    return None


def _parse_input_scale(text: str) -> tuple[str, str]:
    name, sep, rule = text.partition("=")
    if not sep or not name.strip() or not rule.strip():
        raise UsageError(f"--input-scale {text!r}: give argument=rule, e.g. "
                         "input_scale_factor=rms")
    return name.strip(), rule.strip()


def export_foreign_command(
    model_class: str, outdir: str | os.PathLike, *,
    checkpoint: str | os.PathLike | None = None,
    adapter: str | None = None,
    method: str | None = None,
    input_name: str | None = None,
    input_shape: str | None = None,
    output: str | None = None,
    output_index: int | None = None,
    constants: str | os.PathLike | None = None,
    constant: Iterable[str] = (),
    init_args: str | None = None,
    safe_global: Iterable[str] = (),
    cast_float64: bool = False,
    golden_inputs: str | os.PathLike | None = None,
    input_max: float = 1.0,
    formats: str = "onnx",
    batch: int | None = None,
    opset: int = 20,
    precision: str = "fp32",
    with_physics: bool = False,
    amplitude_tol: float | None = None,
    phase_tol: float | None = None,
    allow_trace_warning: Iterable[str] = (),
    input_scale: Iterable[str] = (),
    force: bool = False,
    command: str = "",
    log=None,  # noqa: ANN001
) -> ExportResult:
    """What `ptycho-export --model-class ...` calls: strings in, ExportResult out.

    precision / with_physics exist so that the CLI can pass its flags through: anything
    but fp32 / False is refused with a one-line UsageError."""
    tolerances = {}
    if amplitude_tol is not None:
        tolerances["amplitude_rel_max"] = amplitude_tol
    if phase_tol is not None:
        tolerances["phase_weighted_max_rad"] = phase_tol
    options = ExportOptions(formats=parse_formats(formats), batch=batch, opset=opset,
                            precision=precision, with_physics=with_physics,
                            tolerances=tolerances, command=command,
                            allow_trace_warnings=list(allow_trace_warning), force=force)
    _check_options(options)
    options.check_output(outdir)
    if adapter is not None:
        made = import_object(adapter)
        try:
            base = made() if callable(made) and not isinstance(made, InferenceAdapter) \
                else made
        except Exception as err:  # noqa: BLE001 - user code; one line
            raise UsageError(f"--adapter {adapter}: calling it failed: {type(err).__name__}: "
                             f"{str(err).strip()[:200]}") from None
        if not isinstance(base, InferenceAdapter):
            raise UsageError(f"--adapter {adapter}: expected an InferenceAdapter (or a "
                             f"function returning one), got {type(base).__name__}")
    else:
        base = None
    init = None
    if init_args:
        try:
            init = json.loads(init_args)
        except json.JSONDecodeError as err:
            raise UsageError(f"--init-args: not JSON ({err.msg})") from None
        if not isinstance(init, dict):
            raise UsageError("--init-args: give a JSON object, e.g. '{\"n_filters\": 32}'")
    model, source = load_model(model_class, checkpoint, init_args=init,
                               safe_globals=list(safe_global))

    golden = load_inputs(golden_inputs) if golden_inputs is not None else None
    values: dict[str, Any] = dict(base.constants) if base is not None else {}
    if constants is not None:
        with np.load(constants, allow_pickle=False) as data:
            values.update({k: np.asarray(data[k]) for k in data.files})
    values.update(dict(_parse_constant(c) for c in constant))
    if input_shape is not None:
        shape = _parse_shape(input_shape)
    elif base is not None:
        shape = tuple(base.input_shape)
    elif golden is not None:
        shape = tuple(golden.shape[1:])
    elif _bundle_shape(source) is not None:
        shape = _bundle_shape(source)
    else:
        raise UsageError("--input-shape C,N,N is required (or --golden-inputs to take it "
                         "from data)")
    spec = InferenceAdapter(
        input_shape=shape,  # type: ignore[arg-type]
        method=method or (base.method if base else "forward"),
        input_name=input_name if input_name is not None else (base.input_name if base
                                                               else None),
        constants=values,
        output=output or (base.output if base else "complex"),
        output_index=output_index if output_index is not None else (
            base.output_index if base else None),
        cast_float64=cast_float64 or (base.cast_float64 if base else False),
        input_scale={**(base.input_scale if base else {}),
                     **dict(_parse_input_scale(t) for t in input_scale)},
    )
    return export_foreign(model, spec, outdir, options, golden=golden, input_max=input_max,
                          source=source, log=log)


__all__ = ["CheckpointError", "InferenceAdapter", "export_foreign", "export_foreign_command",
           "load_checkpoint", "load_model", "synthetic_inputs"]
