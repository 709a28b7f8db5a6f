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
    bundle: Annotated[Path, typer.Argument(help="Bundle zip written by ptycho-train.")],
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
    with_physics: Annotated[bool, typer.Option(help="Also export physics.onnx: object patch "
                                               "-> predicted diffraction amplitude.")] = False,
    fft_impl: Annotated[str, typer.Option(help="Physics FFT: matmul (every provider) or dft "
                                          "(ONNX DFT op; CPU only in onnxruntime).")
                        ] = "matmul",
    amplitude_tol: Annotated[float | None, typer.Option(help="Override: amplitude max error "
                                                        "relative to max|ref|.")] = None,
    phase_tol: Annotated[float | None, typer.Option(help="Override: amplitude-weighted "
                                                    "wrapped phase error (rad).")] = None,
    triton_name: Annotated[str, typer.Option(help="Model name inside the Triton repository.")
                           ] = "ptycho",
    triton_instance: Annotated[str, typer.Option(help="Triton instance kind: gpu or cpu.")
                               ] = "gpu",
    verbose: Annotated[bool, typer.Option("--verbose", help="Show tracebacks.")] = False,
) -> None:
    """Freeze the bundle's model (eval, float32), audit the files, and gate on parity
    with the eager model. Writes artifacts + manifest.json + golden.npz + parity.md."""

    def body() -> None:
        require_train_extra("ptycho-export", ("torch", "safetensors", "onnx", "onnxscript",
                                              "onnxruntime"))
        from ptycho_export.export.formats import parse_formats
        from ptycho_export.export.pipeline import ExportOptions, export_bundle

        tolerances = {}
        if amplitude_tol is not None:
            tolerances["amplitude_rel_max"] = amplitude_tol
        if phase_tol is not None:
            tolerances["phase_weighted_max_rad"] = phase_tol
        triton = format == "triton"
        options = ExportOptions(formats=["onnx"] if triton else parse_formats(format),
                                batch=batch, opset=opset,
                                precision=precision, with_physics=with_physics,
                                fft_impl=fft_impl, tolerances=tolerances,
                                command=shlex.join(["ptycho-export", *sys.argv[1:]]))
        outdir = output or Path("artifacts") / (("triton_" if triton else "") + bundle.stem)
        if triton:
            import tempfile

            from ptycho_export.export.triton import write_triton_repository

            with tempfile.TemporaryDirectory(dir=outdir.parent if outdir.parent.exists()
                                             else None) as tmp:
                result = export_bundle(bundle, Path(tmp) / "export", options, log=typer.echo)
                model_dir = write_triton_repository(result.outdir, outdir, triton_name,
                                                    instance_kind=triton_instance)
            typer.echo(f"Triton repository: {model_dir}/config.pbtxt and {model_dir}/1/; "
                       f"serve with: tritonserver --model-repository={outdir}")
            return
        result = export_bundle(bundle, outdir, options, log=typer.echo)
        gated = [r for r in result.rows if r.gated]
        worst_amp = max(r.stats["amplitude"].rel_max for r in gated if "amplitude" in r.stats)
        worst_phase = max((r.stats["phase"].weighted_max or 0.0) for r in gated
                          if "phase" in r.stats)
        typer.echo(f"parity PASS: {len(gated)} checks; worst amplitude error "
                   f"{worst_amp:.2e} of max, worst weighted phase error {worst_phase:.2e} rad")
        typer.echo(f"wrote {result.outdir}/ in {result.seconds:.1f} s: "
                   + ", ".join(sorted(result.manifest["files"])))
        if "onnx" in result.manifest["artifacts"]:
            typer.echo(f"next: ptycho-run {result.outdir} your_scan.npz -o "
                       f"{result.outdir}/run --provider auto")

    run_guarded(body, verbose)


def main() -> None:
    app()
