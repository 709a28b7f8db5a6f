"""What limits ``ptycho-run --refine``: the data's noise, or the model of a sub-pixel shift.

A pattern at a fractional position can be modelled on the pixel grid two ways
(runtime/refine.py, ``RefineOptions.shift``): move the object (a window cut wider,
Fourier-shifted, cropped; the default) or move the probe (each pattern's probe
Fourier-shifted, the object cut at whole pixels). For a product P * O band-limited to the
grid the two are the same far field; for objects with content near the grid's Nyquist
frequency (sharp edges, steep phase) they alias differently. Which is closer depends on
how the data were made, so both are run on scans from both of the benchmark's far-field
models (bench/forward_model.py): ``fourier`` (the object Fourier-shifted on the pixel
grid: the object-shift refinement's own model) and ``fine-grid`` (the physical one: a 5x
finer object, the probe moved over it, only the detector's band kept; neither
refinement's model).

Each refinement starts from the true object and runs a fixed number of iterations:
what it loses is what the noise and the shift model cost, not what a start or a network
costs. The figures: amplitude SSIM / correlation, phase correlation on the well-lit
region, and the R-factor (sum |a - p| / sum a) at the truth and after.

    python -m bench.refine_ceiling                       # 5 kinds, 2 models, 1e6 and 1e8
    python -m bench.refine_ceiling --kinds sparse --doses 1e6 --models fine-grid

Writes ``refine-ceiling-<machine>.{json,md}`` under -o (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import QUICK_SCAN, check_kinds, results_header
from bench.forward_model import MODELS, OBJECT_KINDS, ScanSpec, simulate

SHIFTS = ("object", "probe")


RESULTS = Path(__file__).resolve().parent / "results"


def _scored_refinement(data: dict[str, np.ndarray], iterations: int, shift: str
                       ) -> dict[str, Any]:
    """Refine from the true object; figures on the well-lit region."""
    from runtime.image_quality import quality_figures, well_lit_mask
    from runtime.refine import RefineOptions, pattern_corners, refine_object, shifted_probes

    truth, probe = data["objectGuess"], data["probeGuess"]
    positions = np.stack([data["ycoords"], data["xcoords"]], axis=1)
    n = probe.shape[-1]
    base, frac = pattern_corners(positions, n)
    weight = np.zeros(truth.shape)
    for (y, x), p in zip(base, shifted_probes(probe, frac), strict=True):
        weight[y : y + n, x : x + n] += np.abs(p) ** 2
    mask = well_lit_mask(weight)
    started = time.perf_counter()
    refined = refine_object(truth.astype(np.complex64), weight, (0, 0), data["diffraction"],
                            probe, positions,
                            RefineOptions(iterations, tolerance=0.0, shift=shift))
    figures = quality_figures(refined.obj, truth, mask)
    return {"amplitude_ssim": figures["amplitude_ssim"],
            "amplitude_corr": figures["amplitude_corr"],
            "phase_corr": figures["phase_corr"], "phase_ssim": figures["phase_ssim"],
            "r_factor_at_truth": refined.r_factor[0], "r_factor_end": refined.r_factor[-1],
            "seconds": time.perf_counter() - started}


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Refinement ceiling: `{results['machine']}`", "",
             f"`{results['command']}`; CPU: {results['cpu'].get('model', '?')}.", "",
             f"Refinement started from the true object, {results['iterations']} iterations, "
             "fractional positions; amplitude SSIM / amplitude corr / phase corr (R at the "
             "truth -> after; seconds). *fourier*: scans whose object was Fourier-shifted on "
             "the pixel grid; *fine-grid*: the physical model (5x finer object, probe moved, "
             "detector band kept).", "",
             "| model | kind | photons | object shifted (default) | probe shifted |",
             "|---|---|---|---|---|"]
    for case in results["cases"]:
        cells = []
        for shift in SHIFTS:
            c = case[shift]
            cells.append(f"{c['amplitude_ssim']:.3f} / {c['amplitude_corr']:.3f} / "
                         f"{c['phase_corr']:.3f} (R {c['r_factor_at_truth']:.4f} -> "
                         f"{c['r_factor_end']:.4f}; {c['seconds']:.1f} s)")
        lines.append(f"| {case['model']} | {case['kind']} | {case['photons']:.0e} | "
                     f"{cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default=",".join(OBJECT_KINDS))
    parser.add_argument("--doses", default="1e6,1e8", help="mean photons per pattern")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="the forward models the scans are made with")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--quick", action="store_true",
                        help="the benchmark's small scan (64 px object, 32 px patterns)")
    parser.add_argument("-o", "--output", type=Path, default=RESULTS)
    parser.add_argument("--machine", default=None)
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    check_kinds(parser, kinds)
    models = args.models.split(",")
    if any(m not in MODELS for m in models):
        parser.error(f"--models: choose from {', '.join(MODELS)}")
    if args.iterations < 1:
        parser.error("--iterations must be >= 1")
    base = QUICK_SCAN if args.quick else ScanSpec()
    results = results_header("bench.refine_ceiling", args.machine, argv)
    results["iterations"] = args.iterations
    for model in models:
        for kind in kinds:
            for photons in (float(d) for d in args.doses.split(",")):
                spec = ScanSpec(**{**base.to_dict(), "kind": kind, "photons": photons,
                                   "model": model})
                data = simulate(spec)
                case = {"model": model, "kind": kind, "photons": photons,
                        "scan": spec.to_dict(),
                        **{shift: _scored_refinement(data, args.iterations, shift)
                           for shift in SHIFTS}}
                results["cases"].append(case)
                print(f"{model} {kind} {photons:.0e}: SSIM object-shift "
                      f"{case['object']['amplitude_ssim']:.3f}, probe-shift "
                      f"{case['probe']['amplitude_ssim']:.3f}", flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.output / f"refine-ceiling-{results['machine']}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
