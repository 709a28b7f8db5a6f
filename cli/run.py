"""ptycho-run ARTIFACT DATA.npz -o OUTDIR  (torch-free: numpy + onnxruntime only; an
artifact's model.ts runs with TorchScript where torch is installed)"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import run_guarded
from runtime.errors import DataError, ParityError, ResidualTooHigh, RunUsageError
from runtime.inputs import InputOptions

app = typer.Typer(add_completion=False, help=__doc__)


def _echo_self_check(result: dict[str, Any]) -> None:
    status = result["status"]
    typer.echo(f"self-check: {status} ({result['patterns']} golden patterns)")
    for name, stats in result.get("stats", {}).items():
        value = stats.get("weighted_max") if name == "phase" else stats.get("rel_max")
        label = "weighted max rad" if name == "phase" else "rel max"
        typer.echo(f"  {name}: {label} {value:.3g}")
    for failure in result.get("failures", []):
        typer.echo(f"  FAIL {failure}")


def _echo_quality(quality: dict[str, Any]) -> None:
    """One line against objectGuess, when the scan has one (report.json has every figure),
    and a warning for each channel no better than a flat object."""
    if not quality.get("model") or not quality.get("flat_baseline"):
        return
    from runtime.image_quality import summary_line

    typer.echo(f"vs objectGuess (global factor and phase ramp removed, "
               f"{quality['scored_pixels']} well-lit px): {summary_line(quality)}")
    for text in quality.get("warnings", []):
        typer.secho(f"warning: {text}", fg="yellow", err=True)


@app.command()
def run_command(
    artifact: Annotated[Path, typer.Argument(help="Exported artifact folder with manifest.json, "
                                             "or its model.onnx, or its model.ts (TorchScript, "
                                             "needs torch).")],
    data: Annotated[list[str] | None, typer.Argument(
        help="Scan(s) in the npz data contract: one file, several, or quoted globs "
        "('night/*.npz'). Leave out to run only the self-check.")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Output folder (replaced atomically). Default: <data>_recon/ "
        "next to the data file. With several scans: the folder that receives one "
        "<scan>_recon/ per scan (default: the current folder).")] = None,
    scheduler: Annotated[str | None, typer.Option(
        help="Several scans on Dask: local:N (N worker processes here) or "
        "dask://HOST:PORT (a running scheduler). Default: one after another.")] = None,
    retries: Annotated[int, typer.Option(min=0, help="Retries of a failed scan before it is "
                                         "reported failed (several scans).")] = 1,
    provider: Annotated[str, typer.Option(help="cpu, cuda, tensorrt or auto (best available; "
                                          "the report says which ran). TorchScript: cpu, "
                                          "cuda or auto.")] = "auto",
    model_format: Annotated[str, typer.Option(
        "--format", help="Which model file of the artifact to run: onnx (model.onnx, "
        "onnxruntime), torchscript (model.ts) or pt2 (model.pt2; both need torch). auto: the "
        "file given as ARTIFACT, else onnx.")] = "auto",
    batch_size: Annotated[int | None, typer.Option(
        min=1, help="Patterns per inference call (dynamic-batch artifacts). Default: the "
        "largest power of two that fits the free memory, at most 1024 on a GPU and 256 on "
        "the CPU, where larger batches run slower (report.json says why).")
                          ] = None,
    subpixel: Annotated[str | None, typer.Option(
        help="Sub-pixel patch placement when stitching: none (round to whole pixels), "
        "fourier (FFT shift, 2 px border trimmed) or bilinear. Default: fourier when any "
        "scan position is fractional, else none.")] = None,
    device_id: Annotated[int, typer.Option(
        min=0, help="GPU for --provider cuda/tensorrt (numbered as in "
        "CUDA_VISIBLE_DEVICES).")] = 0,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads per inference "
                                                "(default: onnxruntime's choice).")] = None,
    self_check: Annotated[bool, typer.Option(help="Run golden.npz through the session first "
                                             "and stop on a mismatch.")] = True,
    data_kind: Annotated[str | None, typer.Option(
        rich_help_panel="Input data",
        help="What the frames hold: counts (raw detector counts; cast to float, then sqrt) "
        "or amplitude (sqrt of counts, the npz contract). Default: amplitude for npz, "
        "counts for a ptychodus input folder; required for HDF5.")] = None,
    hdf5_diffraction: Annotated[str, typer.Option(
        rich_help_panel="Input data", help="HDF5 dataset of the frames (P, H, W).")
                                ] = "/entry/data/data",
    hdf5_x: Annotated[str | None, typer.Option(
        rich_help_panel="Input data", help="HDF5 dataset of x positions.")] = None,
    hdf5_y: Annotated[str | None, typer.Option(
        rich_help_panel="Input data", help="HDF5 dataset of y positions.")] = None,
    hdf5_probe: Annotated[str | None, typer.Option(
        rich_help_panel="Input data", help="HDF5 dataset of the complex probe (optional).")
                          ] = None,
    hdf5_bad_pixels: Annotated[str | None, typer.Option(
        rich_help_panel="Input data", help="HDF5 bad-pixel mask (H, W); set to 0.")] = None,
    position_units: Annotated[str, typer.Option(
        rich_help_panel="Input data", help="HDF5 positions in px (object pixels) or m.")
                              ] = "px",
    origin_convention: Annotated[str, typer.Option(
        rich_help_panel="Input data",
        help="What a position marks: centre (patch pixel N/2, this project's contract), "
        "corner (top-left pixel) or centre-half ((N-1)/2).")] = "centre",
    pixel_size_m: Annotated[float | None, typer.Option(
        rich_help_panel="Input data", help="Object pixel size in metres.")] = None,
    energy_ev: Annotated[float | None, typer.Option(
        rich_help_panel="Input data",
        help="Photon energy; with --distance-m and --detector-pixel-m gives the object "
        "pixel size lambda z / (N d).")] = None,
    distance_m: Annotated[float | None, typer.Option(
        rich_help_panel="Input data", help="Sample-detector distance in metres.")] = None,
    detector_pixel_m: Annotated[float | None, typer.Option(
        rich_help_panel="Input data", help="Detector pixel size in metres.")] = None,
    ptychodus_product: Annotated[Path | None, typer.Option(
        rich_help_panel="ptychodus",
        help="Also write a ptychodus product (.h5 or .npz): object with its pixel geometry "
        "and centre, probe, positions, metadata. Needs the pixel size (and energy/distance "
        "unless the input is a ptychodus folder).")] = None,
    max_residual: Annotated[float | None, typer.Option(
        help="Exit 6 (after writing the outputs) when the scan's median data-consistency "
        "R-factor is above this; needs an artifact with physics.onnx. With several scans, "
        "each one above it is reported failed.")] = None,
    refine: Annotated[int, typer.Option(
        min=0, metavar="ITERATIONS",
        help="Refine the network's stitched object through the scan's own measurements for "
        "at most this many iterations, stopping once the R-factor has stopped falling (0.1 % "
        "over 5); numpy, on the CPU: 20-50 reach the data's noise floor on a "
        "well-overlapped scan. object.npz keeps the network's object as network_object; "
        "report.json scores both.")] = 0,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace -o even when it is a folder ptycho-run did not write "
        "(default: refused, so no one's files are deleted).")] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show tracebacks and "
                                          "onnxruntime warnings.")] = False,
) -> None:
    """Reconstruct a scan with an exported model, without torch."""
    inputs = InputOptions(
        data_kind=data_kind, hdf5_diffraction=hdf5_diffraction, hdf5_x=hdf5_x, hdf5_y=hdf5_y,
        hdf5_probe=hdf5_probe, hdf5_bad_pixels=hdf5_bad_pixels, position_units=position_units,
        origin_convention=origin_convention, pixel_size_m=pixel_size_m, energy_ev=energy_ev,
        distance_m=distance_m, detector_pixel_m=detector_pixel_m,
        ptychodus_product=ptychodus_product)
    fmt = None if model_format == "auto" else model_format
    options = {"provider": provider, "batch_size": batch_size, "threads": threads,
               "self_check": self_check, "subpixel": subpixel, "device_id": device_id,
               "inputs": inputs, "model_format": fmt, "force": force,
               "max_residual": max_residual, "refine": refine}

    def body() -> None:
        from runtime.many import expand_inputs
        from runtime.run import RunOptions, run_scan

        if data is None:
            _self_check_only(artifact, provider, threads, device_id, fmt)
            return
        files = expand_inputs(data)
        if len(files) > 1 or scheduler is not None:
            _run_several(artifact, files, output, options, scheduler, retries)
            return
        outdir = output or files[0].with_name(f"{files[0].stem}_recon")
        report = run_scan(artifact, files[0], outdir, RunOptions(
            **options, progress=progress, log_level=2 if verbose else 3))
        _echo_run(report, outdir)

    run_guarded(body, verbose)


def _self_check_only(artifact: Path, provider: str, threads: int | None, device_id: int,
                     model_format: str | None) -> None:
    from runtime.run import self_check_artifact

    result = self_check_artifact(artifact, provider, threads, device_id, model_format)
    info, facts = result["provider"], result["artifact"]
    typer.echo(f"artifact: {facts['folder']} ({facts['model']} sha256 verified)")
    typer.echo(f"provider: {info['provider']} ({info['ep']})")
    _echo_self_check(result["self_check"])
    if result["self_check"]["status"] != "PASS":
        raise ParityError("self-check FAILED: " + "; ".join(result["self_check"]["failures"]))


def _run_several(artifact: Path, files: list[Path], output: Path | None,
                 options: dict[str, Any], scheduler: str | None, retries: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from runtime.many import SUMMARY_COLUMNS, run_many, summary_rows

    if options["inputs"].ptychodus_product is not None:
        raise RunUsageError("--ptychodus-product names one file: use it with one scan")
    outcomes = run_many(artifact, files, output or Path("."), options, scheduler, retries,
                        log=typer.echo)
    table = Table(title=f"{len(outcomes)} scans"
                  + (f" on {scheduler}" if scheduler else " (sequential)"))
    for column in SUMMARY_COLUMNS:
        table.add_column(column)
    for row in summary_rows(outcomes):
        table.add_row(*row)
    Console().print(table)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        raise DataError(f"{len(failed)} of {len(outcomes)} scans failed; first: "
                        f"{Path(failed[0].data).name}: {failed[0].error}")
    above = [o for o in outcomes if o.status == "residual"]
    if above:  # every scan written; exit 6 as for one scan
        raise ResidualTooHigh(f"{len(above)} of {len(outcomes)} scans above --max-residual "
                              f"(written all the same); first: {above[0].error}")


def _echo_run(report: dict[str, Any], outdir: Path) -> None:
    """What ran where and how fast, then the quality lines; report.json has the rest."""
    info = report["provider"]
    counts = ", ".join(f"{k}: {v}" for k, v in report["node_counts"].items())
    runtime_name = "" if info.get("runtime", "onnxruntime") == "onnxruntime" else \
        f"{info['runtime_version']}, "
    typer.echo(f"provider: {info['provider']} ({runtime_name}{info['ep']}; nodes {counts})")
    for name, why in info.get("skipped", {}).items():
        typer.echo(f"  skipped {name}: {why}")
    for warning in report["warnings"]:
        typer.echo(f"warning: {warning}")
    typer.echo(f"{report['patterns']} patterns in {report['seconds']['inference']:.2f} s: "
               f"{report['patterns_per_s']:,.0f} patterns/s (batch {report['batch_size']}: "
               f"{report['batch_choice']['reason']})")
    stitch = report["stitch"]
    typer.echo(f"stitched in {report['seconds']['stitch']:.2f} s: subpixel "
               f"{stitch['subpixel']} ({stitch['subpixel_reason']}), crop {stitch['crop']}")
    if report["self_check"].get("status") != "SKIPPED":
        _echo_self_check(report["self_check"])
    refined = report.get("refine") or {}
    if refined.get("iterations"):
        r = refined["r_factor"]
        typer.echo(f"refined {refined['iterations']} iterations in {refined['seconds']:.2f} s "
                   f"({refined['stopped']}): R-factor {r['start']:.3f} -> {r['end']:.3f} "
                   "(whole scan)")
        network = report.get("quality_network") or {}
        if network.get("model"):
            from runtime.image_quality import summary_line

            typer.echo(f"network alone, vs objectGuess: {summary_line(network)}")
        typer.echo("refined:")
    else:
        typer.echo("the network's object as it came; --refine 30 refines it through the "
                   "scan's own measurements (seconds on the CPU)")
    _echo_quality(report.get("quality") or {})
    consistency = report.get("consistency") or {}
    if "r_factor" in consistency:
        from runtime.consistency import summary_line as consistency_line

        prefix = "network's patches, " if refined.get("iterations") else ""
        typer.echo(prefix + consistency_line(consistency))
    typer.echo(f"wrote {outdir}/ ({', '.join(report['files'])})")
    if report.get("ptychodus_product"):
        typer.echo(f"ptychodus product: {report['ptychodus_product']} (a product.h5 in "
                   "ptychodus's watched output folder is opened automatically)")


def main() -> None:
    app()
