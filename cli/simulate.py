"""ptycho-simulate -o OUT.npz: a seeded synthetic scan in the npz data contract."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import one_path, run_guarded

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def simulate_command(
    output_arg: Annotated[Path | None, typer.Argument(
        metavar="OUTPUT", help="npz file to write (older spelling of -o).",
        show_default=False)] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="npz file to write.", show_default=False)] = None,
    patch_size: Annotated[int, typer.Option(help="Pattern size N (even).")] = 64,
    rows: Annotated[int, typer.Option(min=1, help="Scan rows.")] = 24,
    cols: Annotated[int, typer.Option(min=1, help="Scan columns.")] = 24,
    step: Annotated[float, typer.Option(help="Scan step in object pixels.")] = 8.0,
    jitter: Annotated[float, typer.Option(help="Position jitter in pixels (rounded).")] = 1.0,
    probe_diameter: Annotated[float, typer.Option(help="Probe disc diameter in pixels.")
                              ] = 24.0,
    defocus: Annotated[float, typer.Option(help="Probe defocus phase at the edge (rad).")
                       ] = 5.0,
    photons: Annotated[float, typer.Option(help="Expected counts per pattern.")] = 1e6,
    object_kind: Annotated[str, typer.Option("--object", help="lines or smooth.")] = "lines",
    seed: int = 0,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show tracebacks.")] = False,
) -> None:
    """Simulate a complex object, a defocused disc probe, a jittered raster scan and
    Poisson counts; write amplitudes (sqrt of counts) with ground truth."""

    target = one_path(output_arg, output, "output file")

    def body() -> None:
        from ptycho_export.data.simulate import SimulationConfig, simulate_scan
        from runtime.scan import save_scan

        config = SimulationConfig(patch_size=patch_size, grid_shape=(rows, cols), step_px=step,
                                  jitter_px=jitter, probe_diameter_px=probe_diameter,
                                  defocus=defocus, photons_per_pattern=photons,
                                  object_kind=object_kind, seed=seed)
        scan = simulate_scan(config)
        save_scan(target, scan)
        typer.echo(f"wrote {target}: {scan.n_patterns} patterns of {patch_size}x{patch_size}, "
                   f"object {scan.object_truth.shape[0]}x{scan.object_truth.shape[1]}")

    run_guarded(body, verbose)


def main() -> None:
    app()
