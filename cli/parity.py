"""ptycho-parity BUNDLE ARTIFACT_DIR DATA.npz: every artifact vs the eager model on a scan

For an export of an existing model (--model-class), give its checkpoint instead of a
bundle: the eager model is rebuilt from the manifest (class, constructor arguments,
adapter), the constants saved beside the artifacts and that checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import require_train_extra, run_guarded

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def parity_command(
    bundle: Annotated[Path, typer.Argument(help="Bundle zip the artifacts were exported from "
                                           "(or the checkpoint of a --model-class export).")],
    artifact_dir: Annotated[Path, typer.Argument(help="Folder written by ptycho-export "
                                                 "(manifest.json + model files).")],
    data: Annotated[Path, typer.Argument(help="Scan in the npz data contract.")],
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Report folder for parity.json and parity_errors.png. "
        "Default: <ARTIFACT_DIR>_parity/ next to the artifact folder.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Groups per inference call "
                                            "(fixed-batch artifacts use their own).")] = 256,
    amplitude_tol: Annotated[float | None, typer.Option(
        help="Override the manifest's per-patch amplitude tolerance (max error "
        "relative to max|ref|).")] = None,
    phase_tol: Annotated[float | None, typer.Option(
        help="Override the per-patch phase tolerance (amplitude-weighted wrapped "
        "error, rad).")] = None,
    object_tol: Annotated[float | None, typer.Option(
        help="Stitched-object tolerance: max |candidate - reference| on the well-lit "
        "pixels, without any alignment, relative to max|object| (default 1e-5 for fp32).")
                                  ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show tracebacks.")] = False,
) -> None:
    """Run the eager model (fp32 reference, fp64 exact) and every artifact of ARTIFACT_DIR
    on every available device over all groups of DATA, compare per patch and on the
    stitched object, and fail (exit 5) when any gated difference exceeds its tolerance."""

    def body() -> None:
        require_train_extra("ptycho-parity", ("torch", "safetensors"))
        from rich.console import Console

        from ptycho_export.parity_report import (
            raise_for_status,
            render_table,
            run_parity_check,
            summary_line,
        )

        overrides = {}
        if amplitude_tol is not None:
            overrides["amplitude_rel_max"] = amplitude_tol
        if phase_tol is not None:
            overrides["phase_weighted_max_rad"] = phase_tol
        report = run_parity_check(bundle, artifact_dir, data, output, batch_size=batch_size,
                                  tolerances=overrides, object_tol=object_tol,
                                  log=typer.echo)
        console = Console()
        if not console.is_terminal:
            console = Console(width=max(console.width, 160))
        console.print(render_table(report))
        typer.echo(summary_line(report))
        files = [Path(report["outdir"]) / "parity.json"]
        if report["picture"]:
            files.append(Path(report["outdir"]) / report["picture"]["file"])
        typer.echo("wrote " + ", ".join(str(f) for f in files))
        raise_for_status(report)

    run_guarded(body, verbose)


def main() -> None:
    app()
