"""ptycho-train DATA.npz -o bundle.zip"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import require_train_extra, run_guarded

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def train_command(
    data: Annotated[Path, typer.Argument(help="Scan in the npz data contract "
                                         "(diffraction, probeGuess, xcoords, ycoords).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Bundle zip to write.")] = Path(
        "bundle.zip"),
    epochs: Annotated[int | None, typer.Option(
        min=1, help="Train this many epochs (default: as many steps as fit in "
        "--max-minutes, measured on this machine).")] = None,
    steps: Annotated[int | None, typer.Option(
        min=1, help="Train this many optimizer steps instead.")] = None,
    max_minutes: Annotated[float | None, typer.Option(
        min=0.05, help="Time budget, object solve included (default 4 without "
        "--epochs/--steps; with them a cap).")] = None,
    guide: Annotated[bool, typer.Option(
        help="Object-guided training: solve the scan's object through the physics first, "
        "then train on the likelihood plus agreement with it.")] = True,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    learning_rate: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    preset: Annotated[str, typer.Option(
        help="default (back-propagation U-Net, 0.12M params), pinn (PtychoPINN's CNN, 2.3M), "
        "small, tiny, unet-tiny. Measured trade-offs: bench/results/quality-*.md.")
    ] = "default",
    gridsize: Annotated[int, typer.Option(min=1, max=2, help="1: one pattern per sample; "
                                          "2: four neighbours with the overlap constraint.")] = 1,
    loss: Annotated[str, typer.Option(help="poisson or mae.")] = "poisson",
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9)] = 0.1,
    seed: int = 0,
    accelerator: Annotated[str, typer.Option(help="Lightning accelerator: auto, cpu, gpu.")
                           ] = "auto",
    devices: Annotated[str, typer.Option(help="Lightning devices: auto, 1, 2, ...")] = "auto",
    strategy: Annotated[str, typer.Option(help="Lightning strategy: auto, ddp, ...")] = "auto",
    num_nodes: Annotated[int, typer.Option(min=1)] = 1,
    pixel_size_m: Annotated[float | None, typer.Option(
        help="Object pixel size in metres (lambda z / (N d)); recorded in the bundle and "
        "the export manifest for tools that place the output.")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Checkpoints, logs, loss curve, "
                                                 "quality report. Default: <bundle>_run/")
                       ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from run_dir/checkpoints/last.ckpt."
                                         )] = False,
    init: Annotated[Path | None, typer.Option(
        "--init", help="Start from the learned weights of an earlier bundle (same --preset, "
        "--gridsize and pattern size) instead of random ones: the model of a previous scan "
        "fine-tunes to this one far faster. The probe and scales are this scan's.")] = None,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show tracebacks.")] = False,
) -> None:
    """Train the physics-informed model without labels and write a verified bundle."""

    def body() -> None:
        require_train_extra("ptycho-train")
        from ptycho_export.train import TrainOptions, train

        parsed_devices: str | int = int(devices) if devices.isdigit() else devices
        options = TrainOptions(
            epochs=epochs, steps=steps, max_minutes=max_minutes, guide=guide,
            batch_size=batch_size, learning_rate=learning_rate, preset=preset,
            gridsize=gridsize, loss=loss, val_fraction=val_fraction, seed=seed,
            accelerator=accelerator, devices=parsed_devices, strategy=strategy,
            num_nodes=num_nodes, progress=progress, resume=resume, pixel_size_m=pixel_size_m,
            init_from=str(init) if init is not None else None)
        result = train(data, output, run_dir, options)
        from runtime.image_quality import summary_line

        typer.echo(f"bundle: {result.bundle_path}  ({result.seconds:.0f} s, {result.steps} "
                   f"steps; {result.plan_how})" + (f", started from {init}" if init else ""))
        typer.echo(f"run folder: {result.run_dir} (loss_curve.png, quality.json, checkpoints/)")
        quality = result.quality
        fit = quality.get("fit", {})
        if fit.get("likelihood_over_floor") is not None:
            typer.echo(f"fit: final likelihood {fit['likelihood_over_floor']:.1f}x the data's "
                       "Poisson noise floor")
        if quality.get("ground_truth"):
            typer.echo(f"vs ground truth: {summary_line(quality)}")
            solve = quality.get("object_solve")
            if solve:
                typer.echo(f"the training-only object solve reached amplitude SSIM "
                           f"{solve['amplitude_ssim']:.3f} corr {solve['amplitude_corr']:.3f}, "
                           f"phase corr {solve['phase_corr']:.3f}: the ceiling for this "
                           "network (train longer with --max-minutes to approach it)")
        for text in quality.get("warnings", []):
            typer.secho(f"warning: {text}", fg="yellow", err=True)
        typer.echo(f"next: ptycho-bundle inspect {result.bundle_path}")

    run_guarded(body, verbose)


def main() -> None:
    app()
