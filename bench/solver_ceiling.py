"""The object solve alone, by misfit and learning-rate schedule: the ceiling of the network.

``ptycho-train`` solves the scan's object first (ptycho_export.object_solver) and trains
the network to agree with it, so the solved object bounds what the network can reach on
its training scan. This scores the solve itself on the quality benchmark's scans
(bench/forward_model.py), stitched from its patches and scored like every reconstruction
(runtime.image_quality), for the amplitude least-squares misfit and the Poisson
likelihood, with and without the cosine decay.

    python -m bench.solver_ceiling                        # 5 kinds x 2 doses x 4 variants
    python -m bench.solver_ceiling --kinds natural --doses 1e6

Writes ``solver-ceiling-<machine>.{json,md}`` under -o (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import results_header
from bench.forward_model import OBJECT_KINDS, ScanSpec, save

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = (("amplitude", True), ("amplitude", False), ("poisson", True), ("poisson", False))
FIGURES = ("amplitude_ssim", "amplitude_corr", "phase_ssim", "phase_corr")


def solve_case(spec: ScanSpec, misfit: str, decay: bool, steps: int) -> dict[str, Any]:
    import numpy as np

    from ptycho_export.normalization import compute_normalization
    from ptycho_export.object_solver import patches_at, solve_object
    from ptycho_export.train import object_solve_figures
    from runtime.scan import load_scan

    with tempfile.TemporaryDirectory() as work:
        save(f"{work}/scan.npz", spec)
        scan = load_scan(Path(f"{work}/scan.npz"))
    norm = compute_normalization(scan.amplitudes, scan.probe)
    scaled = scan.amplitudes * np.float32(norm.amplitude_scale)
    probe = scan.probe.astype(np.complex128) * norm.probe_scale
    started = time.perf_counter()
    solved = solve_object(scaled, probe, scan.positions_px, steps, misfit=misfit, decay=decay)
    seconds = time.perf_counter() - started
    model = object_solve_figures(patches_at(solved, scan.positions_px, scan.patch_size), scan)
    return {"kind": spec.kind, "photons": spec.photons, "misfit": misfit, "decay": decay,
            "steps": steps, "seconds": round(seconds, 1),
            **{k: model[k] for k in FIGURES}}


def markdown(results: dict[str, Any]) -> str:
    cpu = results["cpu"]
    lines = [f"# Object solve alone (the network's ceiling): {results['machine']}", "",
             f"CPU: {cpu['model']}, {cpu['usable_cores']} usable cores. torch "
             f"{results['versions'].get('torch')}. Command: `{results['command']}`. Scans of "
             "bench/forward_model.py (the quality benchmark's); the solved object's patches "
             "stitched and scored like a reconstruction.", "",
             "| kind | photons | misfit | lr decay | steps | s | amp SSIM | amp corr | "
             "phase SSIM | phase corr |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        lines.append(f"| {c['kind']} | {c['photons']:.0e} | {c['misfit']} | "
                     f"{'cosine' if c['decay'] else 'constant'} | {c['steps']} | "
                     f"{c['seconds']:.0f} | " + " | ".join(f"{c[k]:.3f}" for k in FIGURES) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default=",".join(OBJECT_KINDS))
    parser.add_argument("--doses", default="1e4,1e6")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("-o", "--output", type=Path, default=RESULTS)
    parser.add_argument("--machine", default=None)
    args = parser.parse_args(argv)
    results = results_header("bench.solver_ceiling", args.machine, argv)
    machine = results["machine"]
    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.output / f"solver-ceiling-{machine}"
    for kind in args.kinds.split(","):
        for photons in (float(d) for d in args.doses.split(",")):
            for misfit, decay in VARIANTS:
                case = solve_case(ScanSpec(kind=kind, photons=photons), misfit, decay,
                                  args.steps)
                print(f"[solver] {kind} {photons:.0e} {misfit} decay={decay}: amp SSIM "
                      f"{case['amplitude_ssim']:.3f} corr {case['amplitude_corr']:.3f}, "
                      f"phase corr {case['phase_corr']:.3f}", flush=True)
                results["cases"].append(case)
                stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
                stem.with_suffix(".md").write_text(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
