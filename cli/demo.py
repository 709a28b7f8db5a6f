"""ptycho-demo: simulate -> train -> bundle -> reconstruct, on the CPU, in minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import require_train_extra, run_guarded

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def demo_command(
    outdir: Annotated[Path, typer.Option("-o", "--outdir", help="Where everything goes.")
                      ] = Path("artifacts/demo"),
    epochs: Annotated[int | None, typer.Option(min=1, help="Override the training epochs.")
                      ] = None,
    quick: Annotated[bool, typer.Option(help="Seconds-long smoke run (tiny model).")] = False,
    progress: Annotated[bool, typer.Option(help="Show the training progress bar.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show tracebacks.")] = False,
) -> None:
    """Run the whole pipeline on a simulated scan and write pictures to OUTDIR."""

    def body() -> None:
        require_train_extra("ptycho-demo")
        from dataclasses import replace

        from ptycho_export.demo import DemoSettings, run_demo

        settings = DemoSettings.quick() if quick else DemoSettings()
        if epochs is not None:
            settings = replace(settings, epochs=epochs)
        run_demo(outdir, settings, progress=progress, log=typer.echo)

    run_guarded(body, verbose)


def main() -> None:
    app()
