"""What one pattern's linear estimate gives, by probe: the network's starting point, scored.

The default network (``backprop-unet``) starts from the back-propagated estimate of each
patch (ptycho_export/model/backprop.py): the measured amplitude given the phase of the
probe's own far field, propagated back. Where the probe's far field is bright that is the
in-line hologram of the patch; where it is dark (outside the pupil of a focused probe) the
phase it gets is meaningless. This scores, on the benchmark's independent scans, the
patches of that estimate stitched like the network's, and the same estimate with the dark
field left out, next to the probe's figures: the fraction of the detector its far field
lights (above 1e-3 of its peak) and the radii that hold 50 % and 80 % of its power.

    python -m bench.linear_estimate             # natural; pupil and disc probes; defocus 2, 5
    python -m bench.linear_estimate --kinds natural,smooth --probe-kinds pupil

Writes ``linear-estimate-<machine>.{json,md}`` under -o (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import FIGURES, check_kinds, power_radii, results_header
from bench.forward_model import PROBE_KINDS, ScanSpec, save

RESULTS = Path(__file__).resolve().parent / "results"
DARK = 1e-3  # far-field amplitude below this fraction of its peak counts as dark


def score_estimates(scan_path: Path) -> dict[str, Any]:
    import torch

    from ptycho_export.model.backprop import BackPropagation
    from ptycho_export.normalization import compute_normalization
    from ptycho_export.physics import shifted_dft_matrix
    from ptycho_export.reconstruct import quality_report, stitch_with_probe
    from runtime.scan import load_scan

    scan = load_scan(scan_path)
    norm = compute_normalization(scan.amplitudes, scan.probe)
    probe = scan.probe.astype(np.complex128) * norm.probe_scale
    a = shifted_dft_matrix(probe.shape[-1])
    far = np.abs(a @ probe @ a.T)
    bright = far >= DARK * far.max()
    frontend = BackPropagation(probe.shape[-1])
    frontend.set_probe(probe)  # exactly the network's first layer
    scaled = torch.from_numpy(scan.amplitudes * np.float32(norm.amplitude_scale))
    r50, r80 = power_radii(probe)
    row: dict[str, Any] = {"bright_fraction": float(bright.mean()), "r50_px": r50,
                           "r80_px": r80}
    for name in ("all", "bright_field_only"):
        if name == "bright_field_only":
            with torch.no_grad():
                keep = torch.from_numpy(bright.astype(np.float32))
                frontend.phase_re.mul_(keep)
                frontend.phase_im.mul_(keep)
        with torch.no_grad():
            re, im = frontend(scaled)
            empty_re, empty_im = frontend(torch.from_numpy(far.astype(np.float32))[None])
        # the linear estimate of the object: 1 plus the layer's response to the pattern
        # minus its response to an empty object's (so it is 1, not 0, where nothing is lit)
        patches = (1.0 + (re - empty_re).numpy() + 1j * (im - empty_im).numpy())
        patches = patches.astype(np.complex64)
        report = quality_report(stitch_with_probe(patches, scan), scan)["model"]
        row[name] = {k: report[k] for k in FIGURES}
    return row


def markdown(results: dict[str, Any]) -> str:
    cpu = results["cpu"]
    lines = [f"# One pattern's linear estimate, by probe: {results['machine']}", "",
             f"CPU: {cpu['model']}. Command: `{results['command']}`.", "",
             "The default network's first layer (the back-propagated estimate of each patch), "
             "stitched and scored like the network on bench/forward_model.py scans; "
             "*bright field only*: the same with the detector pixels where the probe's far "
             f"field is below {DARK:g} of its peak left out. *lit*: the fraction of the "
             "detector above that level.", "",
             "| kind | probe | defocus rad | probe r50 / r80 px | lit | estimate amp SSIM / "
             "corr / phase corr | bright field only |", "|---|---|---|---|---|---|---|"]
    for case in results["cases"]:
        cells = [" / ".join(f"{case[k][f]:.3f}" for f in FIGURES[:3])
                 for k in ("all", "bright_field_only")]
        lines.append(f"| {case['kind']} | {case['probe_kind']} | {case['defocus_rad']:g} | "
                     f"{case['r50_px']:.1f} / {case['r80_px']:.1f} | "
                     f"{case['bright_fraction']:.3f} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="natural")
    parser.add_argument("--defocus", default="2,5", help="probe defocus, rad (pupil edge)")
    parser.add_argument("--probe-kinds", default="pupil,disc",
                        help=f"forward-model probes, of {', '.join(PROBE_KINDS)}")
    parser.add_argument("--photons", type=float, default=1e6)
    parser.add_argument("-o", "--output", type=Path, default=RESULTS)
    parser.add_argument("--machine", default=None)
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    check_kinds(parser, kinds)
    results = results_header("bench.linear_estimate", args.machine, argv)
    with tempfile.TemporaryDirectory(prefix="ptycho-linear-") as work:
        cases = [(k, p, float(d)) for k in kinds for p in args.probe_kinds.split(",")
                 for d in args.defocus.split(",")]
        for kind, probe_kind, defocus in cases:
            path = Path(work) / "scan.npz"
            save(str(path), ScanSpec(kind=kind, photons=args.photons, defocus_rad=defocus,
                                     probe_kind=probe_kind))
            case = {"kind": kind, "probe_kind": probe_kind, "defocus_rad": defocus,
                    **score_estimates(path)}
            results["cases"].append(case)
            print(f"[linear] {kind} {probe_kind} defocus {defocus:g}: lit "
                  f"{case['bright_fraction']:.3f}, estimate amp SSIM "
                  f"{case['all']['amplitude_ssim']:.3f}, bright field only "
                  f"{case['bright_field_only']['amplitude_ssim']:.3f}", flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.output / f"linear-estimate-{results['machine']}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    stem.with_suffix(".md").write_text(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
