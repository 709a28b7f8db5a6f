"""ptycho-bundle inspect|verify bundle.zip"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import require_train_extra, run_guarded

app = typer.Typer(add_completion=False, help="Look inside and verify model bundles.",
                  no_args_is_help=True)


@app.command()
def inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle zip written by ptycho-train.")],
    verbose: Annotated[bool, typer.Option("--verbose", help="Show tracebacks.")] = False,
) -> None:
    """Verify the bundle and print its manifest, model and training facts as tables."""

    def body() -> None:
        require_train_extra("ptycho-bundle inspect")
        from rich.console import Console
        from rich.table import Table

        from ptycho_export.bundle import read_bundle
        from ptycho_export.model.generator import count_parameters

        loaded = read_bundle(bundle)
        from ptycho_export.bundle import build_net

        net = build_net(loaded)
        console = Console()
        facts = Table(title=f"{bundle.name}: verified (every member's sha256 matches)",
                      show_header=False)
        manifest = loaded.manifest
        rows = [
            ("format", f"{manifest['format']} v{manifest['format_version']}"),
            ("created (UTC)", manifest.get("created_utc", "?")),
            *[(f"version: {k}", v) for k, v in manifest.get("versions", {}).items()],
            ("patch size N", str(loaded.config.patch_size)),
            ("gridsize / channels", f"{loaded.config.gridsize} / {loaded.config.channels}"),
            ("widths", str(list(loaded.config.widths))),
            ("parameters", f"{count_parameters(net):,}"),
            ("amplitude scale", f"{loaded.normalization.amplitude_scale:.6g}"),
            ("probe scale", f"{loaded.normalization.probe_scale:.6g}"),
            ("trained on", f"{loaded.data.get('source')} ({loaded.data.get('n_patterns')} "
                           "patterns)"),
            ("epochs", str(loaded.training.get("epochs_run", loaded.training.get("epochs")))),
            ("golden samples", str(len(loaded.golden.get("amplitudes", [])))),
        ]
        for key, value in rows:
            facts.add_row(key, str(value))
        console.print(facts)
        members = Table(title="members")
        for column in ("name", "bytes", "sha256"):
            members.add_column(column)
        for name, entry in sorted(manifest["members"].items()):
            members.add_row(name, f"{entry['size']:,}", entry["sha256"][:16] + "…")
        console.print(members)

    run_guarded(body, verbose)


@app.command()
def verify(
    bundle: Annotated[Path, typer.Argument(help="Bundle zip to check.")],
    verbose: Annotated[bool, typer.Option("--verbose", help="Show tracebacks.")] = False,
) -> None:
    """Check integrity and that the model rebuilds; prints OK or one error line."""

    def body() -> None:
        require_train_extra("ptycho-bundle verify")
        from ptycho_export.bundle import load_predictor

        load_predictor(bundle, "cpu")
        typer.echo(f"OK {bundle}")

    run_guarded(body, verbose)


def main() -> None:
    app()
