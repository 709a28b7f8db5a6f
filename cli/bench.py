"""ptycho-bench [BUNDLE] [--batch-sizes 64,256] [--quick] [-o DIR]: every runtime, one process"""

from __future__ import annotations

import importlib
import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated

import typer

from cli.common import one_path, require_train_extra, run_guarded

app = typer.Typer(add_completion=False, help=__doc__)

def load_bench() -> ModuleType:
    """The benchmark module (torch and the train extra are checked first)."""
    return importlib.import_module("ptycho_export.bench.speed")


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected a comma list of integers, e.g. 64,256"
                                 ) from None
    if not sizes or any(size < 1 for size in sizes):
        raise typer.BadParameter(f"{text!r}: batch sizes must be >= 1")
    return tuple(dict.fromkeys(sizes))


@app.command()
def bench_command(
    bundle_arg: Annotated[Path | None, typer.Argument(
        metavar="BUNDLE", show_default=False,
        help="Bundle to benchmark. Default: a seeded random-weight model of --preset (weights "
             "do not change speed).")] = None,
    bundle: Annotated[Path | None, typer.Option(
        "--bundle", help="Older spelling of the BUNDLE argument.", show_default=False)
    ] = None,
    artifacts: Annotated[Path | None, typer.Option(
        help="Already exported folder (model.onnx, model.ts, model.pt2) of that bundle: "
             "skips the export step.")] = None,
    preset: Annotated[str | None, typer.Option(
        help="pinn (PtychoPINN size, the default here), default, small or tiny (without "
             "--bundle).")] = None,
    patch_size: Annotated[int | None, typer.Option(min=4, help="N (without --bundle).")] = None,
    batch_sizes: Annotated[str | None, typer.Option(help="Comma list, e.g. 64,256.")] = None,
    repeats: Annotated[int | None, typer.Option(min=1, help="Timed rounds per batch size "
                                                "(median reported).")] = None,
    warmup: Annotated[int | None, typer.Option(min=0, help="Untimed calls per runtime first "
                                               "(at least 1 is made).")] = None,
    sweep_batch: Annotated[int | None, typer.Option(
        min=1, help="Batch for the onnxruntime settings sweep (default: smallest).")] = None,
    sweep_repeats: Annotated[int | None, typer.Option(min=1, help="Rounds of the sweep.")
                             ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads (default: usable "
                                                "cores).")] = None,
    max_seconds: Annotated[float | None, typer.Option(
        help="Per batch size: start no new timed round (at least 3 run) after this many "
             "seconds (default 60; 0: no limit).")] = None,
    stitch_patches: Annotated[int | None, typer.Option(min=0, help="Patches for the stitcher "
                                                       "timing (0 skips).")] = None,
    scan_grid: Annotated[int | None, typer.Option(min=0, help="End-to-end scan of G x G "
                                                  "positions (0 skips).")] = None,
    out: Annotated[Path, typer.Option("-o", "--output", "--out", help="Results folder.")
                   ] = Path("bench/results"),
    machine: Annotated[str | None, typer.Option(
        help="Name of the results files (default: cpu-<cores>core-<cpu model>).")] = None,
    gpu: Annotated[bool, typer.Option(help="Run the CUDA section when a device exists.")
                   ] = True,
    quick: Annotated[bool, typer.Option("--quick", help="Seconds: tiny model, N=32, batch 8, "
                                        "one round (a smoke test, not a measurement).")
                     ] = False,
    seed: Annotated[int, typer.Option(help="Seed for weights and inputs.")] = 0,
    malloc_tuned: Annotated[bool, typer.Option(
        "--malloc-tuned", help="glibc only: keep large tensors in the heap instead of mmap + "
        "page faults on every call (mallopt M_MMAP_MAX=0); results get a -malloc-tuned name."
    )] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show tracebacks.")] = False,
) -> None:
    """Throughput, latency, memory of eager / TorchScript / .pt2 / onnxruntime, same inputs."""

    chosen = None if bundle_arg is None and bundle is None else \
        one_path(bundle_arg, bundle, "bundle", "BUNDLE")

    def body() -> None:
        require_train_extra("ptycho-bench")
        bench = load_bench()
        values = dict(preset=preset, patch_size=patch_size,
                      batch_sizes=parse_batch_sizes(batch_sizes) if batch_sizes else None,
                      repeats=repeats, warmup=warmup, sweep_batch=sweep_batch,
                      sweep_repeats=sweep_repeats, threads=threads, max_seconds=max_seconds,
                      stitch_patches=stitch_patches, scan_grid=scan_grid, bundle=chosen,
                      artifacts=artifacts, machine=machine, gpu=gpu, seed=seed,
                      malloc_tuned=malloc_tuned,
                      command=shlex.join(["ptycho-bench", *sys.argv[1:]]))
        if quick:
            config = bench.BenchConfig.quick_config(**values)
        else:
            config = bench.BenchConfig(**{k: v for k, v in values.items() if v is not None})
        bench.main(config, out, log=lambda message: typer.echo(message, err=True))

    run_guarded(body, verbose)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
