"""lint -> freeze -> audit -> parity gate -> manifest, written to a temp folder and renamed.

A failed gate leaves the output folder as it was and writes its report beside it
(`<output>.failed/`); -o onto a folder this tool did not write is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn

from ptycho_export.bundle import Bundle, build_net, read_bundle, sha256_file
from ptycho_export.export.audit import audit_onnx, audit_torch_file
from ptycho_export.export.formats import FORMATS, PRECISIONS, UsageError
from ptycho_export.export.lint import ExportLintError, LintResult, lint_module
from ptycho_export.export.wrapper import (
    INPUT_NAME,
    OUTPUT_NAMES,
    PHYSICS_OUTPUT_NAME,
    InferenceWrapper,
    ReducedPrecisionWrapper,
    physics_wrapper,
)
from ptycho_export.parity import (
    ParityRow,
    eager_runner,
    parity_cases,
    parity_table,
    pt2_runner,
    run_parity,
    torchscript_runner,
)
from runtime.atomic import (
    ensure_replaceable,
    failed_beside,
    output_lock,
    replace_dir,
    temp_dir_beside,
)
from runtime.compare import DEFAULT_TOLERANCES, check_tolerances, loosened
from runtime.errors import ParityError, naming
from runtime.manifest import is_export_folder
from runtime.report_io import write_json
from runtime.runner import FixedBatchRunner, OrtRunner, Runner

MANIFEST_FORMAT = "ptycho-export-artifacts"
MANIFEST_VERSION = 1
COMPLEX_LAYOUT = "object = amplitude * exp(1j * phase); two real float32 outputs"
ORIGIN_CONVENTION = ("positions are patch centres in object pixels; patch pixel (i, j) covers "
                     "object pixel (y - N/2 + i, x - N/2 + j)")
FFT_IMPLS = ("matmul", "dft")
REDUCED_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ExportOptions:
    formats: list[str] = field(default_factory=lambda: ["onnx"])
    batch: int | None = None  # None: dynamic batch axis; an int fixes it
    opset: int = 20
    precision: str = "fp32"
    with_physics: bool = False
    fft_impl: str = "matmul"
    tolerances: dict[str, float] = field(default_factory=dict)
    command: str = ""
    # FILE:LINE of trace warnings the user vouches for (recorded in the manifest)
    allow_trace_warnings: list[str] = field(default_factory=list)
    force: bool = False  # replace an output folder this tool did not write

    def check_output(self, outdir: str | os.PathLike) -> None:
        """Before any work: -o must be new, empty, or an export folder of ours."""
        ensure_replaceable(outdir, is_export_folder, "ptycho-export", self.force)

    def validate(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise UsageError(f"unknown format(s) {unknown}; choose from {list(FORMATS)}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision {self.precision!r} is not supported "
                             f"(available: {', '.join(PRECISIONS)})")
        if self.precision == "bf16" and "onnx" in self.formats:
            raise UsageError("bf16 ONNX is refused: onnxruntime's CPU provider has no bfloat16 "
                             "Conv kernel, so the parity gate could not run it; use fp16 for "
                             "ONNX, or bf16 with --format torchscript/pt2")
        if self.fft_impl not in FFT_IMPLS:
            raise UsageError(f"fft implementation {self.fft_impl!r}: choose from {FFT_IMPLS}")
        if self.batch is not None and self.batch < 1:
            raise UsageError(f"--batch must be >= 1, got {self.batch}")
        check_tolerances(self.tolerances)
        if not 18 <= self.opset <= 23:
            raise UsageError(f"--opset {self.opset}: the dynamo exporter supports 18 to 23")
        for entry in self.allow_trace_warnings:
            file, _, line = entry.rpartition(":")
            if not file or not line.isdigit():
                raise UsageError(f"--allow-trace-warning {entry!r}: give FILE:LINE as the "
                                 "refusal printed it, e.g. ptycho_torch/model.py:658")


@dataclass
class ExportResult:
    outdir: Path
    manifest: dict[str, Any]
    rows: list[ParityRow]
    seconds: float


@contextlib.contextmanager
def quiet_exporter():
    """The exporter logs torchvision notices and FutureWarnings on every call."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")
        try:
            yield
        finally:
            logger.setLevel(level)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("ptycho-export", "torch", "onnx", "onnxscript", "onnxruntime",
                 "onnxruntime-gpu", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def _example_batch(golden: np.ndarray, batch: int | None) -> np.ndarray:
    """Dynamic batch needs an example batch >= 2 (a batch-1 example silently freezes 1)."""
    size = batch if batch is not None else 2
    reps = math.ceil(size / max(len(golden), 1))
    return np.ascontiguousarray(np.concatenate([golden] * reps)[:size], dtype=np.float32)


def save_onnx(program_or_module: Any, example: tuple[torch.Tensor, ...], path: Path,
              opset: int, input_names: list[str], output_names: list[str],
              metadata: dict[str, str]) -> None:
    import onnx

    with quiet_exporter():
        program = torch.onnx.export(program_or_module, example, dynamo=True,
                                    opset_version=opset, input_names=input_names,
                                    output_names=output_names, external_data=False,
                                    verbose=False)
    model = program.model_proto
    for value in [*model.graph.input, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = "batch"
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(model, str(path), save_as_external_data=False)


def _gate(rows: list[ParityRow]) -> list[str]:
    return [f"{r.candidate} [{r.case}] {f}" for r in rows if r.gated for f in r.failures]


def golden_offsets(bundle: Bundle) -> np.ndarray | None:
    """(G, C, 2) offsets of the golden groups (None at gridsize 1). Bundles written before
    the golden data kept them get an illustrative grid instead: a step of N/4 + 0.37 px,
    so the overlap step still meets whole and fractional parts."""
    c = bundle.config.channels
    if c == 1:
        return None
    if "offsets" in bundle.golden:
        return np.asarray(bundle.golden["offsets"], dtype=np.float32)
    g, step = bundle.config.gridsize, bundle.config.patch_size / 4 + 0.37
    grid = np.array([[i * step, j * step] for i in range(g) for j in range(g)], np.float32)
    return np.broadcast_to(grid, (len(bundle.golden["amplitudes"]), c, 2)).copy()


def _physics_parity(bundle: Bundle, tmp: Path, options: ExportOptions, tolerance: float,
                    metadata: dict[str, str], outputs: dict[str, np.ndarray]
                    ) -> tuple[dict[str, Any], list[ParityRow]]:
    from runtime.physics_check import physics_feed

    n, c = bundle.config.patch_size, bundle.config.channels
    physics = physics_wrapper(options.fft_impl, bundle.probe, bundle.normalization, c)
    names = physics.input_names()
    offsets = golden_offsets(bundle)
    feeds = physics_feed(names, outputs["amplitude"], outputs["phase"], bundle.probe, offsets)
    example = tuple(torch.from_numpy(_example_batch(feeds[name], options.batch))
                    for name in names)
    # Both impls go through the lint: exporting the bare module would freeze the batch axis.
    linted = lint_module(physics, example, options.batch is None, formats=("onnx",))
    path = tmp / "physics.onnx"
    save_onnx(linted.exported, example, path, options.opset, list(names),
              [PHYSICS_OUTPUT_NAME], metadata)
    b = "batch" if options.batch is None else options.batch
    shapes = {"amplitude": [b, c, n, n], "phase": [b, c, n, n], "probe_re": [b, n, n],
              "probe_im": [b, n, n], "offsets": [b, c, 2]}
    facts = audit_onnx(path, {name: shapes[name] for name in names},
                       {PHYSICS_OUTPUT_NAME: [b, 1, n, n]}, options.opset)
    reference = eager_runner(physics, names, (PHYSICS_OUTPUT_NAME,))
    exact = eager_runner(physics, names, (PHYSICS_OUTPUT_NAME,), dtype=torch.float64)
    candidate: Runner = OrtRunner("onnxruntime cpu (physics)", path)
    if options.batch is not None:
        candidate = FixedBatchRunner(candidate, options.batch)
    tolerances = {f"{PHYSICS_OUTPUT_NAME}_rel_max": tolerance}
    from runtime.compare import compare_outputs, tolerance_failures

    rows = []
    expected = reference.infer(feeds)
    stats = compare_outputs(expected, candidate.infer(feeds))
    rows.append(ParityRow(candidate.name, reference.name, "golden", stats,
                          tolerance_failures(stats, tolerances), True))
    exact_out = {k: v.astype(np.float32) for k, v in exact.infer(
        {k: v.astype(np.float64) for k, v in feeds.items()}).items()}
    rows.append(ParityRow(reference.name, exact.name, "golden",
                          compare_outputs(exact_out, expected), [], False))
    facts.update({"file": path.name, "fft_impl": options.fft_impl, "inputs": list(names),
                  "output": PHYSICS_OUTPUT_NAME,
                  "units": "measured amplitudes (sqrt counts), same units as the input data",
                  "predicts": "each group's anchor pattern (channel 0)"
                              + (", after the training's overlap step" if c > 1 else ""),
                  "probe_power": float(physics.probe_power),
                  "tolerance_rel_max": tolerance})
    return facts, rows


PhysicsHook = Callable[[Path, dict[str, np.ndarray], dict[str, str]],
                      tuple[str, dict[str, Any], list[ParityRow]]]


def batch_dim(options: ExportOptions) -> int | str:
    """The batch entry of every declared shape: "batch" (dynamic) or the fixed size."""
    return "batch" if options.batch is None else options.batch


def export_module(reference: nn.Module, linted: LintResult, golden: np.ndarray,
                  outdir: str | os.PathLike, options: ExportOptions,
                  **kwargs: Any) -> ExportResult:
    """:func:`_export_module` holding the output's lock (two exports into one folder at
    once: the second fails at once with one line)."""
    with output_lock(outdir, "ptycho-export"):
        return _export_module(reference, linted, golden, outdir, options, **kwargs)


@dataclass
class Frozen:
    """What the freeze stage made: per format its audit facts, the runners the gate
    compares with eager, and the formats refused (with why)."""

    artifacts: dict[str, dict[str, Any]]
    candidates: list[Runner]
    refused: dict[str, str]


def _freeze_formats(program: torch.export.ExportedProgram, linted: LintResult,
                    example_np: np.ndarray, tmp: Path, options: ExportOptions,
                    metadata: dict[str, str], sample_out: tuple[int, ...],
                    explain_onnx: Callable[[Exception], str | None] | None,
                    log: Callable[[str], None]) -> Frozen:
    """Each asked-for format frozen into ``tmp`` and audited as a file (not as the Python
    object it came from); the lint's refusals, and an ONNX exporter failure that
    ``explain_onnx`` explains, refuse that format alone."""
    b = batch_dim(options)
    shape, out_shape = [b, *example_np.shape[1:]], [b, *sample_out]
    output_shapes = [(example_np.shape[0], *sample_out)] * len(OUTPUT_NAMES)
    example = (torch.from_numpy(example_np),)
    frozen = Frozen({}, [], dict(linted.refused))
    for name, why in frozen.refused.items():
        log(f"refused {name}: {why}")
    for name in options.formats:
        if name in linted.refused:
            continue
        fmt = FORMATS[name]
        path = tmp / fmt.filename
        t0 = time.perf_counter()
        if name == "onnx":
            try:
                save_onnx(program, example, path, options.opset, [INPUT_NAME],
                          list(OUTPUT_NAMES), metadata)
            except Exception as err:
                reason = explain_onnx(err) if explain_onnx is not None else None
                if reason is None:
                    raise
                frozen.refused["onnx"] = reason
                log(f"refused onnx: {reason}")
                path.unlink(missing_ok=True)
                continue
            facts = audit_onnx(path, {INPUT_NAME: shape}, {o: out_shape for o in OUTPUT_NAMES},
                               options.opset, options.precision)
            runner: Runner = OrtRunner("onnxruntime cpu", path)
        elif name == "torchscript":
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                torch.jit.save(linted.traced, str(path), _extra_files={
                    "ptycho_export.json": json.dumps(metadata, sort_keys=True)})
                facts = audit_torch_file(path, "torchscript", (example_np,), output_shapes)
                runner = torchscript_runner(path, (INPUT_NAME,), OUTPUT_NAMES)
        else:
            torch.export.save(program, str(path), extra_files={
                "ptycho_export.json": json.dumps(metadata, sort_keys=True)})
            facts = audit_torch_file(path, "pt2", (example_np,), output_shapes)
            runner = pt2_runner(path, (INPUT_NAME,), OUTPUT_NAMES)
        frozen.candidates.append(runner)
        facts["seconds"] = round(time.perf_counter() - t0, 3)
        frozen.artifacts[name] = {"file": fmt.filename, **facts}
        log(f"froze {name}: {fmt.filename} ({path.stat().st_size / 1e6:.2f} MB, "
            f"{facts['seconds']:.1f} s), audit passed")
    if not frozen.candidates:
        raise ExportLintError("; ".join(f"{k}: {v}" for k, v in frozen.refused.items()))
    return frozen


def _gate_rows(eager: Runner, exact: Runner | None, candidates: list[Runner],
               cases: dict[str, np.ndarray], options: ExportOptions,
               tolerances: dict[str, float]
               ) -> tuple[list[ParityRow], dict[str, np.ndarray]]:
    """The gate's loop: every case through eager (and fp64, informational) and through
    every frozen runner, compared per output; with a fixed batch each case goes whole, in
    chunks of that batch. Returns the rows and eager's golden outputs."""
    if options.batch is not None:
        candidates = [FixedBatchRunner(c, options.batch) for c in candidates]
        eager = FixedBatchRunner(eager, options.batch)
        exact = FixedBatchRunner(exact, options.batch) if exact is not None else None
    rows = run_parity(eager, candidates, cases, INPUT_NAME, tolerances, exact)
    return rows, eager.infer({INPUT_NAME: cases["golden"]})


def _refuse(tmp: Path, outdir: Path, rows: list[ParityRow], failures: list[str],
            tolerances: dict[str, float], options: ExportOptions) -> NoReturn:
    """A failed gate: its report goes beside the output (a failed re-export never costs
    the last working deployment), and the export stops with exit 5."""
    report = {"status": "FAIL", "failures": failures, "tolerances": tolerances,
              "rows": [r.to_dict() for r in rows], "command": options.command,
              "output": str(outdir)}
    shutil.rmtree(tmp)
    tmp.mkdir()
    write_json(tmp / "parity_failure.json", report)
    (tmp / "parity_failure.md").write_text(
        "# Export parity FAILED\n\n" + "\n".join(f"- {f}" for f in failures) + "\n\n"
        + parity_table(rows) + "\n\nNext: inspect the failing node with "
        "torch.onnx.verification.verify_onnx_program(..., compare_intermediates=True)\n")
    failed = failed_beside(outdir)
    replace_dir(tmp, failed)
    kept = (f"the previous export in {outdir} is intact" if outdir.exists()
            else f"nothing was written to {outdir}")
    raise ParityError(f"parity gate failed ({len(failures)} check(s)); worst: {failures[0]}; "
                      f"{kept}; report in {failed / 'parity_failure.md'}")


def _export_module(reference: nn.Module, linted: LintResult, golden: np.ndarray,
                   outdir: str | os.PathLike, options: ExportOptions, *,
                   metadata: dict[str, str], manifest_fields: dict[str, Any],
                   exact: Runner | None = None, eager: Runner | None = None,
                   program: torch.export.ExportedProgram | None = None,
                   output_sample_shape: tuple[int, ...] | None = None,
                   extra: PhysicsHook | None = None, log=None,  # noqa: ANN001
                   started: float | None = None,
                   extra_files: dict[str, bytes] | None = None,
                   explain_onnx: Callable[[Exception], str | None] | None = None,
                   extra_cases: dict[str, np.ndarray] | None = None) -> ExportResult:
    """freeze -> audit -> parity gate -> manifest for any linted float32 module with one
    input (`INPUT_NAME`) and the outputs `OUTPUT_NAMES`, written atomically to `outdir`.

    `reference` is the fp32 eager module the artifacts must match (run through `eager`,
    default `eager_runner(reference)`), `exact` an optional float64 runner (informational
    rows), `program` what ONNX and .pt2 are made from
    (default: `linted.exported`; a rewritten program for foreign modules), `extra` a hook
    that adds one more artifact with its own parity rows (the physics graph),
    `extra_files` files written beside the artifacts (hashed in the manifest like them),
    `explain_onnx` turns an ONNX exporter failure into a reason to refuse ONNX alone
    (None: re-raise it), `extra_cases` are more gated parity inputs (name -> batch).
    `manifest_fields` (source, model, inputs, outputs, ...) are merged into the manifest.
    """
    log = log or (lambda message: None)
    started = time.perf_counter() if started is None else started
    outdir = Path(outdir)
    tolerances = DEFAULT_TOLERANCES[options.precision] | options.tolerances
    looser = loosened(options.tolerances, DEFAULT_TOLERANCES[options.precision])
    for key, facts in looser.items():
        log(f"warning: tolerance {key} loosened to {facts['limit']:g} (default "
            f"{facts['default']:g}); recorded in the manifest")
    golden = np.asarray(golden, dtype=np.float32)
    sample_out = tuple(golden.shape[1:]) if output_sample_shape is None else output_sample_shape
    options.check_output(outdir)
    try:
        tmp = temp_dir_beside(outdir)
    except OSError as err:  # the error names the folder the user asked for
        raise naming(err, outdir) from err
    try:
        frozen = _freeze_formats(linted.exported if program is None else program, linted,
                                 _example_batch(golden, options.batch), tmp, options,
                                 metadata, sample_out, explain_onnx, log)
        cases = parity_cases(golden, n_random=8, seed=0) | (extra_cases or {})
        eager = eager or eager_runner(reference, (INPUT_NAME,), OUTPUT_NAMES)
        rows, golden_out = _gate_rows(eager, exact, frozen.candidates, cases, options,
                                      tolerances)
        if extra is not None:
            key, extra_facts, extra_rows = extra(tmp, golden_out, metadata)
            rows += extra_rows
            frozen.artifacts[key] = extra_facts
        failures = _gate(rows)
        if failures:
            _refuse(tmp, outdir, rows, failures, tolerances, options)
        np.savez(tmp / "golden.npz", **{INPUT_NAME: cases["golden"]},
                 **{k: v.astype(np.float32) for k, v in golden_out.items()})
        (tmp / "parity.md").write_text(parity_table(rows) + "\n")
        for name, blob in (extra_files or {}).items():
            (tmp / name).write_bytes(blob)
        manifest = {
            "format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION,
            "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": options.command,
            "versions": versions(),
            "precision": options.precision,
            **manifest_fields,
            "artifacts": frozen.artifacts,
            "lint": {**linted.record(), "refused_formats": frozen.refused},
            "golden": {"file": "golden.npz", "input": INPUT_NAME,
                       "outputs": list(OUTPUT_NAMES)},
            "tolerances": tolerances,
            "tolerances_loosened": looser,
            "parity": {"status": "PASS", "rows": [r.to_dict() for r in rows]},
        }
        manifest["files"] = {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
                             for p in sorted(tmp.iterdir()) if p.is_file()}
        write_json(tmp / "manifest.json", manifest)
        replace_dir(tmp, outdir)
        stale = failed_beside(outdir)
        if stale.is_dir() and is_export_folder(stale):  # an older failure, now superseded
            shutil.rmtree(stale, ignore_errors=True)
    except BaseException as err:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):  # disk full mid-write: name the output, not a temp file
            raise naming(err, outdir) from err
        raise
    return ExportResult(outdir=outdir, manifest=manifest, rows=rows,
                        seconds=time.perf_counter() - started)


def export_bundle(bundle_path: str | os.PathLike, outdir: str | os.PathLike,
                  options: ExportOptions | None = None, log=None) -> ExportResult:  # noqa: ANN001
    options = options or ExportOptions()
    options.validate()
    options.check_output(outdir)
    log = log or (lambda message: None)
    started = time.perf_counter()
    bundle = read_bundle(bundle_path)
    net = build_net(bundle)  # eval, float32, CPU: the only model this function freezes
    config = bundle.config
    n, c = config.patch_size, config.channels
    dynamic = options.batch is None
    b = batch_dim(options)
    tolerances = DEFAULT_TOLERANCES[options.precision] | options.tolerances
    golden = np.asarray(bundle.golden["amplitudes"], dtype=np.float32)

    wrapper = InferenceWrapper(net).eval()  # the fp32 reference in every case
    frozen = wrapper
    allowed = (torch.float32,)
    if options.precision != "fp32":
        import copy

        dtype = REDUCED_DTYPES[options.precision]
        frozen = ReducedPrecisionWrapper(copy.deepcopy(net), dtype).eval()
        allowed = (torch.float32, dtype)
    example_np = _example_batch(golden, options.batch)
    example = (torch.from_numpy(example_np),)
    log("lint: dtypes, determinism, batch independence, torch.export, trace proof, "
        "float64 in the graphs")
    linted = lint_module(frozen, example, dynamic, allowed, formats=options.formats,
                         allow_trace_warnings=options.allow_trace_warnings)

    bundle_sha = sha256_file(bundle_path)
    metadata = {
        "producer": "ptycho-export", "patch_size": str(n), "gridsize": str(config.gridsize),
        "channels": str(c), "input": INPUT_NAME, "outputs": ",".join(OUTPUT_NAMES),
        "amplitude_scale": repr(bundle.normalization.amplitude_scale),
        "complex_layout": COMPLEX_LAYOUT, "origin_convention": ORIGIN_CONVENTION,
        "source_bundle_sha256": bundle_sha, "precision": options.precision,
    }
    shape = [b, c, n, n]

    physics = None
    if options.with_physics:
        def physics(tmp: Path, golden_out: dict[str, np.ndarray], meta: dict[str, str]
                    ) -> tuple[str, dict[str, Any], list[ParityRow]]:
            pow2 = n & (n - 1) == 0
            tol = tolerances.get(f"{PHYSICS_OUTPUT_NAME}_rel_max", 1e-5 if pow2 else 1e-4)
            if not pow2:
                log(f"warning: patch size {n} is not a power of two; physics tolerance "
                    f"loosened to {tol:g}")
            facts, rows = _physics_parity(bundle, tmp, options, tol, meta, golden_out)
            return "physics", facts, rows

    manifest_fields = {
        "source_bundle": {"file": Path(bundle_path).name, "sha256": bundle_sha},
        "model": config.to_dict(),
        "normalization": bundle.normalization.to_dict(),
        "inputs": [{"name": INPUT_NAME, "shape": shape, "dtype": "float32",
                    "meaning": "measured diffraction amplitudes (sqrt counts, as in the "
                               "training data); the graph applies amplitude_scale itself"}],
        "outputs": [{"name": "amplitude", "shape": shape, "dtype": "float32",
                     "range": [0.0, config.amp_max]},
                    {"name": "phase", "shape": shape, "dtype": "float32",
                     "range": [-math.pi, math.pi]}],
        "complex_layout": COMPLEX_LAYOUT,
        "origin_convention": ORIGIN_CONVENTION,
        "fft": {"implementation": "dft-matmul (training physics)", "norm": "ortho",
                "shift": "centred (fftshift)"},
        "consistency_reference": (bundle.training.get("consistency_reference")
                                  if options.with_physics else None),
        "probe_sha256": hashlib.sha256(bundle.probe.tobytes()).hexdigest(),
        "probe": {"file": "probe.npy", "dtype": "complex64", "shape": [n, n],
                  "sha256_of_values": hashlib.sha256(bundle.probe.tobytes()).hexdigest(),
                  "meaning": "probeGuess the model was trained with; the training physics "
                             "used it times normalization.probe_scale"},
        "geometry": {"patch_size": n, "origin_convention": ORIGIN_CONVENTION,
                     "object_pixel_size_m": bundle.data.get("pixel_size_m"),
                     "pixel_size_note": "object pixel = lambda z / (N * detector pixel); "
                                        "null when training did not record it"},
    }
    probe_buffer = io.BytesIO()
    np.save(probe_buffer, bundle.probe.astype(np.complex64), allow_pickle=False)
    exact = eager_runner(wrapper, (INPUT_NAME,), OUTPUT_NAMES, dtype=torch.float64)
    return export_module(wrapper, linted, golden, outdir, options, metadata=metadata,
                         manifest_fields=manifest_fields, exact=exact, extra=physics,
                         log=log, started=started,
                         extra_files={"probe.npy": probe_buffer.getvalue()})
