"""What limits ``ptycho-run --refine``: the data's noise, or the sub-pixel shift convention.

The refinement (runtime/refine.py) moves the probe by each pattern's fractional position;
the quality benchmark's forward model (bench/forward_model.py) moves the object instead.
For band-limited products the two are the same far field; for objects with content near
the pixel grid's Nyquist frequency (sharp edges, steep phase) the product P * O is not
band-limited and the two conventions alias it differently. This measures both effects:

1. **Convention mismatch**, noise-free: the R-factor (sum |a - b| / sum b) between far
   fields made by shifting the object, by shifting the probe, and a band-exact reference
   (the band-limited probe and object multiplied on a 2x finer grid, the detector's band
   kept: no aliasing).
2. **Refinement ceiling**: the refinement started from the true object, run to a fixed
   number of iterations, on the benchmark's scans with fractional positions and with the
   same positions rounded to whole pixels (where both conventions agree exactly). Started
   at the truth, what it loses is what the data (noise) and the model (convention) cost.

    python -m bench.refine_ceiling                       # 5 kinds, 1e6 and 1e8 photons
    python -m bench.refine_ceiling --kinds sparse --doses 1e6 --iterations 50

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
from bench.forward_model import (
    MARGIN,
    OBJECT_KINDS,
    ScanSpec,
    fourier_patch,
    make_object,
    make_probe,
    scan_positions,
    simulate,
)

RESULTS = Path(__file__).resolve().parent / "results"


def _upsample(field: np.ndarray, factor: int = 2) -> np.ndarray:
    """Band-limited (Fourier zero-padding) upsampling that keeps the sample values."""
    n = field.shape[-1]
    m = n * factor
    spectrum = np.fft.fftshift(np.fft.fft2(field))
    big = np.zeros((m, m), dtype=np.complex128)
    o = (m - n) // 2
    big[o : o + n, o : o + n] = spectrum
    return np.fft.ifft2(np.fft.ifftshift(big)) * factor * factor


def _band(n: int) -> np.ndarray:
    """Indices of a 2n-point FFT's frequencies that an n-pixel detector records, in the
    n-point FFT's order."""
    k = np.fft.fftfreq(2 * n) * 2 * n
    return np.concatenate([np.nonzero((k >= 0) & (k < n / 2))[0],
                           np.nonzero((k < 0) & (k >= -n / 2))[0]])


def convention_mismatch(spec: ScanSpec, patterns: int = 60) -> dict[str, float]:
    """Noise-free R-factors of the object-shift and probe-shift far fields against the
    band-exact one, over the first ``patterns`` positions of the scan."""
    from runtime.refine import pattern_corners, shifted_probes

    obj = make_object(spec.kind, spec.object_px, spec.seed)
    probe = make_probe(spec.patch, spec.probe_diameter_px, spec.defocus_rad)
    positions = scan_positions(spec, np.random.default_rng(spec.seed + 1))[:patterns]
    padded = np.pad(obj, MARGIN, mode="reflect")
    n = spec.patch
    base, frac = pattern_corners(positions, n)
    probes = shifted_probes(probe, frac)
    band = _band(n)
    big_probe = _upsample(probe)
    err_object = err_probe = total = 0.0
    for m, centre in enumerate(positions):
        patch = fourier_patch(padded, centre, n)
        exact = np.abs(np.fft.fft2(big_probe * _upsample(patch))[np.ix_(band, band)] / 4)
        by_object = np.abs(np.fft.fft2(probe * patch))
        y, x = base[m]
        by_probe = np.abs(np.fft.fft2(probes[m] * obj[y : y + n, x : x + n]))
        err_object += float(np.abs(by_object - exact).sum())
        err_probe += float(np.abs(by_probe - exact).sum())
        total += float(exact.sum())
    return {"r_object_shift_vs_exact": err_object / total,
            "r_probe_shift_vs_exact": err_probe / total}


def _scored_refinement(data: dict[str, np.ndarray], iterations: int) -> dict[str, Any]:
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
                            probe, positions, RefineOptions(iterations, tolerance=0.0))
    figures = quality_figures(refined.obj, truth, mask)
    return {"amplitude_ssim": figures["amplitude_ssim"],
            "amplitude_corr": figures["amplitude_corr"],
            "phase_corr": figures["phase_corr"], "phase_ssim": figures["phase_ssim"],
            "r_factor_at_truth": refined.r_factor[0], "r_factor_end": refined.r_factor[-1],
            "seconds": time.perf_counter() - started}


def whole_pixel(spec: ScanSpec) -> dict[str, np.ndarray]:
    """The same scan with its positions rounded to whole pixels (the forward model run again
    there, same counts' seed)."""
    import bench.forward_model as forward

    original = forward.scan_positions
    forward.scan_positions = lambda s, rng: np.round(original(s, rng))
    try:
        return simulate(spec)
    finally:
        forward.scan_positions = original


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Refinement ceiling: `{results['machine']}`", "",
             f"`{results['command']}`; CPU: {results['cpu'].get('model', '?')}.", "",
             "Noise-free far-field mismatch (R-factor) against the band-exact model:", "",
             "| kind | object shifted (the benchmark's model) | probe shifted (the "
             "refinement's) |", "|---|---|---|"]
    for kind, m in results["mismatch"].items():
        lines.append(f"| {kind} | {m['r_object_shift_vs_exact']:.4f} | "
                     f"{m['r_probe_shift_vs_exact']:.4f} |")
    lines += ["", f"Refinement started from the true object, {results['iterations']} "
              "iterations; amplitude SSIM / amplitude corr / phase corr (R at the truth "
              "-> after):", "", "| kind | photons | fractional positions | whole-pixel "
              "positions |", "|---|---|---|---|"]
    for case in results["cases"]:
        cells = []
        for key in ("fractional", "whole_pixel"):
            c = case[key]
            cells.append(f"{c['amplitude_ssim']:.3f} / {c['amplitude_corr']:.3f} / "
                         f"{c['phase_corr']:.3f} (R {c['r_factor_at_truth']:.4f} -> "
                         f"{c['r_factor_end']:.4f})")
        lines.append(f"| {case['kind']} | {case['photons']:.0e} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default=",".join(OBJECT_KINDS))
    parser.add_argument("--doses", default="1e6,1e8", help="mean photons per pattern")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--quick", action="store_true",
                        help="the benchmark's small scan (64 px object, 32 px patterns)")
    parser.add_argument("-o", "--output", type=Path, default=RESULTS)
    parser.add_argument("--machine", default=None)
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    check_kinds(parser, kinds)
    if args.iterations < 1:
        parser.error("--iterations must be >= 1")
    base = QUICK_SCAN if args.quick else ScanSpec()
    results = results_header("bench.refine_ceiling", args.machine, argv)
    results["iterations"] = args.iterations
    results["mismatch"] = {kind: convention_mismatch(ScanSpec(**{**base.to_dict(),
                                                                "kind": kind}))
                           for kind in kinds}
    for kind in kinds:
        for photons in (float(d) for d in args.doses.split(",")):
            spec = ScanSpec(**{**base.to_dict(), "kind": kind, "photons": photons})
            case = {"kind": kind, "photons": photons, "scan": spec.to_dict(),
                    "fractional": _scored_refinement(simulate(spec), args.iterations),
                    "whole_pixel": _scored_refinement(whole_pixel(spec),
                                                      args.iterations)}
            results["cases"].append(case)
            print(f"{kind} {photons:.0e}: fractional SSIM "
                  f"{case['fractional']['amplitude_ssim']:.3f}, whole-pixel "
                  f"{case['whole_pixel']['amplitude_ssim']:.3f}", flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.output / f"refine-ceiling-{results['machine']}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
