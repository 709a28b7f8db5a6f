"""ptycho-export bundle.zip --format onnx|torchscript|pt2|all"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli.common import require_train_extra, run_guarded

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def export_command(
    bundle: Annotated[Path | None, typer.Argument(
        help="Bundle zip written by ptycho-train (or leave out and give --model-class).")
                      ] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="onnx, torchscript, pt2, a "
                                        "comma list, all, or triton (a Triton model "
                                        "repository around the ONNX export).")] = "onnx",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output folder. "
                                                "Default: artifacts/<bundle name>/")] = None,
    batch: Annotated[int | None, typer.Option(min=1, help="Fix the batch size (TensorRT, "
                                              "CUDA graphs). Default: dynamic batch axis.")
                     ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (18-23).")] = 20,
    precision: Annotated[str, typer.Option(help="fp32; fp16 (all formats) or bf16 "
                                           "(torchscript, pt2), each with its own tolerance.")
                         ] = "fp32",
    with_physics: Annotated[bool | None, typer.Option(
        "--with-physics/--no-physics", help="Also export physics.onnx (object patch -> "
        "predicted diffraction amplitude), which ptycho-run uses to check every pattern "
        "against its measurement. Default: on for bundles; not available with "
        "--model-class.")] = None,
    fft_impl: Annotated[str, typer.Option(help="Physics FFT: matmul (every provider) or dft "
                                          "(ONNX DFT op; CPU only in onnxruntime).")
                        ] = "matmul",
    amplitude_tol: Annotated[float | None, typer.Option(help="Override: amplitude max error "
                                                        "relative to max|ref|.")] = None,
    phase_tol: Annotated[float | None, typer.Option(help="Override: amplitude-weighted "
                                                    "wrapped phase error (rad).")] = None,
    model_class: Annotated[str | None, typer.Option(
        rich_help_panel="Models not trained here",
        help="package.module:Class (or path/file.py:Class) of an existing model, exported "
        "instead of a bundle. Importing it runs that module's code.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        rich_help_panel="Models not trained here",
        help="Weights: Lightning .ckpt, state-dict .pt or .safetensors; read with "
        "torch.load(weights_only=True) only, files that need pickled code are refused.")
                          ] = None,
    adapter: Annotated[str | None, typer.Option(
        rich_help_panel="Models not trained here",
        help="package.module:name of an InferenceAdapter; the flags below override it.")
                       ] = None,
    method: Annotated[str | None, typer.Option(
        rich_help_panel="Models not trained here",
        help="Method that predicts, e.g. forward_predict (default: forward).")] = None,
    input_shape: Annotated[str | None, typer.Option(
        rich_help_panel="Models not trained here",
        help="C,N,N of one sample (e.g. 4,64,64), or N for 1,N,N.")] = None,
    input_name: Annotated[str | None, typer.Option(
        rich_help_panel="Models not trained here",
        help="Keyword of the diffraction argument (default: first positional).")] = None,
    model_output: Annotated[str | None, typer.Option(
        "--model-output", rich_help_panel="Models not trained here",
        help="complex (amplitude=abs, phase=angle), amp_phase or re_im (pairs).")] = None,
    output_index: Annotated[int | None, typer.Option(
        rich_help_panel="Models not trained here",
        help="Take this element of a tuple result first.")] = None,
    constants: Annotated[Path | None, typer.Option(
        rich_help_panel="Models not trained here",
        help="npz of constant arguments (probe, positions, scale factors), by keyword; "
        "read without pickle; float64 is cast to float32 with a note.")] = None,
    constant: Annotated[list[str] | None, typer.Option(
        rich_help_panel="Models not trained here",
        help="name=value Python literal constant argument, e.g. scale=0.5 (repeatable).")
                        ] = None,
    init_args: Annotated[str | None, typer.Option(
        rich_help_panel="Models not trained here",
        help="JSON object of constructor arguments.")] = None,
    safe_global: Annotated[list[str] | None, typer.Option(
        rich_help_panel="Models not trained here",
        help="Allow one trusted class (package.module:Name) in torch.load(weights_only=True)"
        " (repeatable).")] = None,
    input_scale: Annotated[list[str] | None, typer.Option(
        rich_help_panel="Models not trained here",
        help="argument=rule: compute that argument per sample from the input inside the "
        "graph, so the artifact takes raw amplitudes at any level. rms: sqrt(N^2 / mean_C "
        "sum x^2); rms-half: sqrt((N/2)^2 / ...) (repeatable).")] = None,
    cast_float64: Annotated[bool, typer.Option(
        rich_help_panel="Models not trained here",
        help="Cast float64 parameters/buffers to float32 (recorded) instead of refusing.")
                            ] = False,
    golden_inputs: Annotated[Path | None, typer.Option(
        rich_help_panel="Models not trained here",
        help="npz with 'diffraction' used as parity inputs (default: seeded synthetic "
        "Poisson amplitudes).")] = None,
    input_max: Annotated[float, typer.Option(
        rich_help_panel="Models not trained here",
        help="Maximum of the synthetic amplitudes (match your data's units).")] = 1.0,
    allow_trace_warning: Annotated[list[str] | None, typer.Option(
        help="FILE:LINE of a TorchScript trace warning you know depends only on fixed sizes "
        "(repeatable; recorded in the manifest). Warnings the exporter can prove harmless "
        "need none.")] = None,
    triton_name: Annotated[str, typer.Option(help="Model name inside the Triton repository.")
                           ] = "ptycho",
    triton_instance: Annotated[str, typer.Option(help="Triton instance kind: gpu or cpu.")
                               ] = "gpu",
    force: Annotated[bool, typer.Option(
        "--force", help="Replace -o even when it is a folder ptycho-export did not write "
        "(default: refused, so no one's files are deleted).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show tracebacks.")] = False,
) -> None:
    """Freeze the bundle's model (eval, float32), audit the files, and gate on parity
    with the eager model. Writes artifacts + manifest.json + golden.npz + parity.md."""

    def body() -> None:
        require_train_extra("ptycho-export", ("torch", "safetensors", "onnx", "onnxscript",
                                              "onnxruntime"))
        from ptycho_export.export.formats import UsageError, parse_formats
        from ptycho_export.export.pipeline import ExportOptions, export_bundle

        tolerances = {}
        if amplitude_tol is not None:
            tolerances["amplitude_rel_max"] = amplitude_tol
        if phase_tol is not None:
            tolerances["phase_weighted_max_rad"] = phase_tol
        if (bundle is None) == (model_class is None):
            raise UsageError("give either a bundle or --model-class (with --checkpoint), "
                             "not both and not neither")
        if model_class is not None:
            from ptycho_export.export.foreign import export_foreign_command

            outdir = output or Path("artifacts") / (
                checkpoint.stem if checkpoint else model_class.rsplit(":", 1)[-1])
            result = export_foreign_command(
                model_class, outdir, checkpoint=checkpoint, adapter=adapter, method=method,
                input_name=input_name, input_shape=input_shape, output=model_output,
                output_index=output_index, constants=constants, constant=constant or (),
                init_args=init_args, safe_global=safe_global or (),
                cast_float64=cast_float64, golden_inputs=golden_inputs, input_max=input_max,
                formats=format, batch=batch, opset=opset, precision=precision,
                with_physics=bool(with_physics), amplitude_tol=amplitude_tol,
                phase_tol=phase_tol,
                allow_trace_warning=allow_trace_warning or (),
                input_scale=input_scale or (), force=force,
                command=shlex.join(["ptycho-export", *sys.argv[1:]]), log=typer.echo)
            _report(result)
            return
        triton = format == "triton"
        options = ExportOptions(formats=["onnx"] if triton else parse_formats(format),
                                batch=batch, opset=opset,
                                precision=precision,
                                with_physics=True if with_physics is None else with_physics,
                                fft_impl=fft_impl, tolerances=tolerances,
                                command=shlex.join(["ptycho-export", *sys.argv[1:]]),
                                allow_trace_warnings=list(allow_trace_warning or ()),
                                force=force)
        outdir = output or Path("artifacts") / (("triton_" if triton else "") + bundle.stem)
        if triton:
            import tempfile

            from ptycho_export.export.triton import check_model_folder, write_triton_repository

            check_model_folder(outdir, triton_name, force)

            with tempfile.TemporaryDirectory(dir=outdir.parent if outdir.parent.exists()
                                             else None) as tmp:
                result = export_bundle(bundle, Path(tmp) / "export", options, log=typer.echo)
                model_dir = write_triton_repository(result.outdir, outdir, triton_name,
                                                    force=force, instance_kind=triton_instance)
            typer.echo(f"Triton repository: {model_dir}/config.pbtxt and {model_dir}/1/; "
                       f"serve with: tritonserver --model-repository={outdir}")
            return
        result = export_bundle(bundle, outdir, options, log=typer.echo)
        _report(result)

    run_guarded(body, verbose)


def _report(result) -> None:  # noqa: ANN001 - an ExportResult
    """The closing lines: the gate's worst numbers, what was written, what to run next."""
    gated = [r for r in result.rows if r.gated]
    worst_amp = max(r.stats["amplitude"].rel_max for r in gated if "amplitude" in r.stats)
    worst_phase = max((r.stats["phase"].weighted_max or 0.0) for r in gated
                      if "phase" in r.stats)
    typer.echo(f"parity PASS: {len(gated)} checks; worst amplitude error "
               f"{worst_amp:.2e} of max, worst weighted phase error {worst_phase:.2e} rad")
    typer.echo(f"wrote {result.outdir}/ in {result.seconds:.1f} s: "
               + ", ".join(sorted(result.manifest["files"])))
    for name, why in result.manifest.get("lint", {}).get("refused_formats", {}).items():
        typer.echo(f"warning: {name} not written: {why}")
    if "onnx" in result.manifest["artifacts"]:
        # a sibling: a folder inside the export would be wiped by the next re-export
        run_dir = result.outdir.with_name(f"{result.outdir.name}_run")
        typer.echo(f"next: ptycho-run {result.outdir} your_scan.npz -o {run_dir} "
                   "--provider auto")

def main() -> None:
    app()
