"""Quality benchmark: the default chain on scans this project's simulator did not make.

For each case (object kind x dose x gridsize x preset) a scan is written by the
independent forward model (bench/forward_model.py: float64, fractional positions, one
global flux), then the chain a user runs: ``ptycho-train`` with its defaults (only the
preset / gridsize / time budget of the case set), ``ptycho-export --format onnx`` with the
parity gate, ``ptycho-run`` on the CPU provider. The stitched object of ``ptycho-run`` is
scored against the truth with the field's figures (runtime.image_quality: SSIM, PSNR,
correlation, FRC at 1/7), next to a flat object, and the same model is run on a second,
unseen scan of the same kind (other seed; other photographs for ``natural``) without
retraining: the deployment case. Ground-truth-free: the training likelihood over the
data's Poisson floor.

    python -m bench.quality                          # the committed matrix, ~1 h on 2 cores
    python -m bench.quality --kinds natural --doses 1e6 --presets default,small
    python -m bench.quality --quick -o /tmp/q        # seconds: tiny case, checks the wiring

Writes ``quality-<machine>.{json,md}`` and ``quality-<machine>-frc.png`` under -o.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import QUICK_SCAN, QUICK_TRAIN, check_kinds, results_header
from bench.forward_model import OBJECT_KINDS, PROBE_KINDS, ScanSpec, save

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"amplitude_corr": 0.9, "phase_corr": 0.9, "amplitude_ssim": 0.9}


def run_case(work: Path, spec: ScanSpec, preset: str, gridsize: int,
             max_minutes: float | None, train_extra: dict[str, Any],
             refine: int = 0) -> dict[str, Any]:
    """Train, export and run one case; return its figures (no files outside ``work``).
    With ``refine`` > 0 ptycho-run also refines (--refine), and the same refinement from a
    flat start is scored beside it: what the network's estimate is worth as a start."""
    from ptycho_export.export.pipeline import ExportOptions, export_bundle
    from ptycho_export.train import TrainOptions, train
    from runtime.run import run_scan

    scan_path, unseen_path = work / "scan.npz", work / "unseen.npz"
    save(str(scan_path), spec)
    save(str(unseen_path), ScanSpec(**{**spec.to_dict(), "seed": spec.seed + 1}))
    started = time.perf_counter()
    options = TrainOptions(preset=preset, gridsize=gridsize, max_minutes=max_minutes,
                           accelerator="cpu", devices=1, progress=False, **train_extra)
    result = train(scan_path, work / "bundle.zip", work / "run", options)
    train_s = time.perf_counter() - started
    export_bundle(work / "bundle.zip", work / "export", ExportOptions(formats=["onnx"],
                                                                     command="bench.quality"))
    seen = run_scan(work / "export", scan_path, work / "recon", provider="cpu", progress=False,
                    refine=refine)
    unseen = run_scan(work / "export", unseen_path, work / "recon_unseen", provider="cpu",
                      progress=False, refine=refine)
    refined = {} if not refine else {
        "refine": {"max_iterations": refine, "iterations": seen["refine"]["iterations"],
                   "seconds": seen["refine"]["seconds"],
                   "r_factor_start": seen["refine"]["r_factor"]["start"],
                   "r_factor_end": seen["refine"]["r_factor"]["end"],
                   "quality": _figures(seen["quality"]),
                   "unseen": _figures(unseen["quality"]),
                   "flat_start": flat_start_refined(work / "recon", scan_path, refine)}}
    if refine:  # the network's own figures, as without --refine
        seen["quality"], unseen["quality"] = seen["quality_network"], unseen["quality_network"]
    return {
        "kind": spec.kind, "photons": spec.photons, "gridsize": gridsize, "preset": preset,
        "train_s": round(train_s, 1),
        "steps": result.steps, "plan": result.plan_how,
        "fit": result.quality.get("fit"),
        "budget_min": max_minutes,
        "guide": options.guide, "batch_size": options.batch_size,
        "init_from": options.init_from,
        # the training-only object solve, scored the same way: the network's ceiling
        "object_solve": result.quality.get("object_solve"),
        "quality": _figures(seen["quality"], with_curve=True),
        "unseen": _figures(unseen["quality"]),
        "ort_cpu_patterns_per_s": seen["patterns_per_s"],
        # ptycho-train's (fit and ground truth on its eager reconstruction), ptycho-run's
        "warnings": sorted(set(result.quality.get("warnings", [])
                               + seen["quality"].get("warnings", []))),
        **refined,
    }


def flat_start_refined(recon: Path, scan_path: Path, iterations: int) -> dict[str, Any]:
    """The figures of ptycho-run's refinement started from a flat object (1 wherever the
    network's canvas is lit) instead of the network's, with the same cap and stop."""
    from runtime.refine import RefineOptions, refine_object
    from runtime.run import quality_report
    from runtime.scan import load_scan
    from runtime.stitch import StitchedObject

    scan = load_scan(scan_path)
    with np.load(recon / "object.npz") as saved:
        weight, mask = saved["weight"], saved["mask"]
        origin = tuple(int(v) for v in saved["origin_px"])
    flat = np.where(weight > 0, 1.0, 0.0).astype(np.complex64)
    refined = refine_object(flat, weight, origin, scan.amplitudes, scan.probe,
                            scan.positions_px, RefineOptions(iterations))
    stitched = StitchedObject(obj=refined.obj, weight=weight, mask=weight > 0,
                              origin_px=origin)
    quality = quality_report(stitched, mask, scan.object_truth)
    return {**_figures(quality), "r_factor_end": refined.r_factor[-1],
            "iterations": refined.iterations}


def _figures(quality: dict[str, Any], with_curve: bool = False) -> dict[str, Any]:
    model = dict(quality["model"])
    if not with_curve:
        model.pop("frc_curve", None)
    return {"model": model, "flat_baseline": quality["flat_baseline"],
            "verdict": quality["verdict"], "warnings": quality["warnings"]}


def _cell(value: float | None, fmt: str = ".3f") -> str:
    return "–" if value is None else format(value, fmt)


def markdown(results: dict[str, Any]) -> str:
    cpu = results["cpu"]
    lines = [
        f"# Quality benchmark: {results['machine']}",
        "",
        f"CPU: {cpu['model']}, {cpu['usable_cores']} usable cores ({', '.join(cpu['isa_flags'])})."
        f" torch {results['versions'].get('torch')}, onnxruntime "
        f"{results['versions'].get('onnxruntime')}. Command: `{results['command']}`.",
        "",
        "Scans from bench/forward_model.py (independent of the project's simulator): "
        f"{results['scan']['object_px']}² object, N = {results['scan']['patch']}, "
        f"step {results['scan']['step_px']} px with ±{results['scan']['jitter_px']} px "
        "fractional jitter, defocused disc probe, Poisson counts at one global flux. Figures "
        "of `ptycho-run`'s stitched object on the well-lit region after removing the global "
        "complex factor and a phase ramp; *unseen*: the same model on a second scan of the "
        "same kind (other seed / photographs), not trained on. FRC: 1/7 threshold, "
        "half-period in pixels. Targets: amplitude and phase correlation ≥ 0.9 and "
        "amplitude SSIM ≥ 0.9.",
        "",
        "*solve*: the object that the training solves for its guide (training only, never "
        "exported), stitched and scored the same way: what a network that matched it "
        "would reach.",
        "",
        "| kind | photons | grid | preset | train s | steps | amp SSIM | amp PSNR dB | "
        "amp corr | phase SSIM | phase corr | phase RMSE rad (flat) | FRC px | "
        "solve amp SSIM / corr / phase corr | unseen amp corr | unseen phase corr | "
        "loss / floor | ORT CPU patt/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in results["cases"]:
        if "error" in case:
            lines.append(f"| {case['kind']} | {case['photons']:.0e} | {case['gridsize']} | "
                         f"{case['preset']} | failed: {case['error']} |")
            continue
        m, flat = case["quality"]["model"], case["quality"]["flat_baseline"]
        u = case["unseen"]["model"]
        fit = case.get("fit") or {}
        solve = case.get("object_solve") or {}
        solve_cell = " / ".join(_cell(solve.get(k)) for k in
                                ("amplitude_ssim", "amplitude_corr", "phase_corr"))
        lines.append(
            f"| {case['kind']} | {case['photons']:.0e} | {case['gridsize']} | {_preset(case)} "
            f"| {case['train_s']:.0f} | {case.get('steps', '–')} | "
            f"{_cell(m['amplitude_ssim'])} | "
            f"{_cell(m['amplitude_psnr_db'], '.1f')} | {_cell(m['amplitude_corr'])} | "
            f"{_cell(m['phase_ssim'])} | {_cell(m['phase_corr'])} | "
            f"{_cell(m['phase_rmse_rad'])} ({_cell(flat['phase_rmse_rad'])}) | "
            f"{_cell(m['frc_resolution_px'], '.2f')} | {solve_cell} | "
            f"{_cell(u['amplitude_corr'])} | "
            f"{_cell(u['phase_corr'])} | {_cell(fit.get('likelihood_over_floor'), '.1f')} | "
            f"{_cell(case['ort_cpu_patterns_per_s'], '.0f')} |")
    lines += _refine_table(results["cases"])
    warned = [c for c in results["cases"] if c.get("warnings")]
    if warned:
        lines += ["", "Warnings the tools printed:", ""]
        for case in warned:
            for text in case["warnings"]:
                lines.append(f"- {case['kind']} {case['photons']:.0e} gridsize "
                             f"{case['gridsize']} {_preset(case)}: {text}")
    return "\n".join(lines) + "\n"


def _refine_table(cases: list[dict[str, Any]]) -> list[str]:
    """The same cases after `ptycho-run --refine N`, next to the same refinement from a
    flat start."""
    refined = [c for c in cases if c.get("refine")]
    if not refined:
        return []
    keys = ("amplitude_ssim", "amplitude_corr", "phase_corr")
    lines = [
        "", f"## With `ptycho-run --refine {refined[0]['refine']['max_iterations']}`", "",
        "The network's stitched object refined through the scan's own measurements "
        "(runtime/refine.py: parallel error-reduction update with momentum, numpy on the "
        "CPU), scored the same way. *flat start*: the same refinement (the same cap, the same "
        "stop once the R-factor falls by less than 0.1 % over 5 iterations) from a flat "
        "object instead of the network's, what the network's estimate is worth as a start. "
        "R: the whole scan's amplitude R-factor (sum |a - p| / sum a) before and after.",
        "",
        "| kind | photons | grid | preset | iterations | refine s | R start → end | "
        "amp SSIM | amp PSNR dB | amp corr | phase SSIM | phase corr | FRC px | "
        "flat start amp SSIM / corr / phase corr (R, iterations) | "
        "unseen amp SSIM / corr / phase corr |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in refined:
        r = case["refine"]
        m, flat, u = r["quality"]["model"], r["flat_start"]["model"], r["unseen"]["model"]
        lines.append(
            f"| {case['kind']} | {case['photons']:.0e} | {case['gridsize']} | {_preset(case)} "
            f"| {r['iterations']} | {r['seconds']:.1f} | {r['r_factor_start']:.3f} → "
            f"{r['r_factor_end']:.3f} | {_cell(m['amplitude_ssim'])} | "
            f"{_cell(m['amplitude_psnr_db'], '.1f')} | {_cell(m['amplitude_corr'])} | "
            f"{_cell(m['phase_ssim'])} | {_cell(m['phase_corr'])} | "
            f"{_cell(m['frc_resolution_px'], '.2f')} | "
            + " / ".join(_cell(flat[k]) for k in keys)
            + f" ({r['flat_start']['r_factor_end']:.3f}, "
            f"{r['flat_start'].get('iterations', '–')}) | "
            + " / ".join(_cell(u[k]) for k in keys) + " |")
    return lines


def _preset(case: dict[str, Any]) -> str:
    """The preset; 'no guide' where the case trained on the likelihood alone; the start
    bundle where it was warm-started (--init)."""
    return (case["preset"] + (", no guide" if case.get("guide") is False else "")
            + (f", from {Path(case['init_from']).name}" if case.get("init_from") else ""))


def frc_plot(path: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for case in results["cases"]:
        curve = case.get("quality", {}).get("model", {}).get("frc_curve")
        if curve:
            ax.plot(curve["cycles_per_px"], curve["frc"], lw=1.2,
                    label=f"{case['kind']} {case['photons']:.0e} g{case['gridsize']} "
                          f"{case['preset']}")
    ax.axhline(1 / 7, color="k", ls="--", lw=0.8, label="1/7 threshold")
    ax.set_xlabel("spatial frequency (cycles / pixel)")
    ax.set_ylabel("FRC (reconstruction vs truth)")
    ax.set_xlim(0, 0.5)
    ax.set_ylim(-0.1, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def time_curve_plot(path: Path, results: dict[str, Any]) -> None:
    """Quality against training time, one line per figure and case family, with the
    object solve's figures (the network's ceiling) as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families: dict[tuple, list[dict[str, Any]]] = {}
    for case in results["cases"]:
        if "error" not in case:
            key = (case["kind"], case["photons"], case["gridsize"], case["preset"])
            families.setdefault(key, []).append(case)
    figures = (("amplitude_ssim", "amplitude SSIM"), ("amplitude_corr", "amplitude corr"),
               ("phase_corr", "phase corr"))
    fig, axes = plt.subplots(1, len(figures), figsize=(12, 4), dpi=110, sharey=True)
    for (kind, photons, grid, preset), cases in families.items():
        cases = sorted(cases, key=lambda c: c["train_s"])
        label = f"{kind} {photons:.0e} g{grid} {preset}"
        for ax, (key, title) in zip(axes, figures, strict=True):
            line, = ax.plot([c["train_s"] / 60 for c in cases],
                            [c["quality"]["model"][key] for c in cases], "o-", label=label)
            solve = cases[-1].get("object_solve") or {}
            if solve.get(key) is not None:
                ax.axhline(solve[key], color=line.get_color(), ls="--", lw=0.9)
            ax.set_title(title)
    for ax in axes:
        ax.axhline(TARGETS["amplitude_ssim"], color="k", ls=":", lw=0.8)
        ax.set_xlabel("training time (min, object solve included)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("ptycho-run's stitched object vs truth")
    axes[0].legend(fontsize=7, title="dashed: object solve; dotted: target", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default=",".join(OBJECT_KINDS))
    parser.add_argument("--doses", default="1e4,1e6", help="mean photons per pattern")
    parser.add_argument("--gridsizes", default="1")
    parser.add_argument("--presets", default="default")
    parser.add_argument("--max-minutes", default=None,
                        help="training budget per case, minutes; a comma list makes a "
                             "quality-against-training-time curve (default: ptycho-train's "
                             "own)")
    parser.add_argument("--defocus-rad", type=float, default=None,
                        help="probe defocus (pupil-edge phase, rad; default "
                             f"{ScanSpec().defocus_rad}: a bright core; 5: a broad disc)")
    parser.add_argument("--probe-kind", default=None, choices=PROBE_KINDS,
                        help="pupil (default: a focused spot; its far field lights 2 %% of "
                             "the detector) or disc (a sharp disc in the sample plane: a "
                             "broad far field)")
    parser.add_argument("--no-guide", action="store_true",
                        help="train on the likelihood alone (ptycho-train --no-guide): what "
                             "the object guide is worth, and what the overlap constraint adds "
                             "without it")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="training batch (default: ptycho-train's own)")
    parser.add_argument("--init", default=None,
                        help="ptycho-train --init: start every case from this bundle's "
                             "weights (bench.pretrain makes starting models)")
    parser.add_argument("--refine", type=int, default=30,
                        help="ptycho-run --refine iterations scored beside the network "
                             "alone (default 30; 0: the network alone)")
    parser.add_argument("--quick", action="store_true", help="one tiny case, seconds")
    parser.add_argument("-o", "--output", type=Path, default=RESULTS)
    parser.add_argument("--machine", default=None)
    args = parser.parse_args(argv)

    base = ScanSpec()
    extra: dict[str, Any] = {}
    kinds = args.kinds.split(",")
    doses = [float(d) for d in args.doses.split(",")]
    gridsizes = [int(g) for g in args.gridsizes.split(",")]
    presets = args.presets.split(",")
    budgets: list[float | None] = ([float(b) for b in args.max_minutes.split(",")]
                                   if args.max_minutes else [None])
    if args.defocus_rad is not None:
        base = ScanSpec(**{**base.to_dict(), "defocus_rad": args.defocus_rad})
    if args.probe_kind is not None:
        base = ScanSpec(**{**base.to_dict(), "probe_kind": args.probe_kind})
    if args.no_guide:
        extra["guide"] = False
    if args.batch_size is not None:
        extra["batch_size"] = args.batch_size
    if args.init is not None:
        extra["init_from"] = args.init
    if args.quick:
        base, kinds, doses, gridsizes, presets = QUICK_SCAN, ["smooth"], [1e6], [1], ["unet-tiny"]
        extra = {**extra, **QUICK_TRAIN}
    check_kinds(parser, kinds)
    results = results_header("bench.quality", args.machine, argv)
    results |= {"scan": base.to_dict(), "targets": TARGETS}
    machine = results["machine"]
    args.output.mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        for photons in doses:
            for gridsize in gridsizes:
                for preset, budget in ((p, b) for p in presets for b in budgets):
                    spec = ScanSpec(**{**base.to_dict(), "kind": kind, "photons": photons})
                    work = Path(tempfile.mkdtemp(prefix="ptycho-quality-"))
                    label = f"{kind} {photons:.0e} gridsize {gridsize} {preset}" + (
                        f" {budget:g} min" if budget is not None else "")
                    print(f"[quality] {label} ...", flush=True)
                    try:
                        case = run_case(work, spec, preset, gridsize, budget, extra,
                                        args.refine)
                    except Exception as err:  # one failed case must not lose the others
                        case = {"kind": kind, "photons": photons, "gridsize": gridsize,
                                "preset": preset, "error": " ".join(str(err).split())[:300]}
                    finally:
                        shutil.rmtree(work, ignore_errors=True)
                    results["cases"].append(case)
                    if "error" in case:
                        print(f"[quality] {label}: FAILED {case['error']}", flush=True)
                    else:
                        m = case["quality"]["model"]
                        print(f"[quality] {label}: amp SSIM {m['amplitude_ssim']:.3f} corr "
                              f"{m['amplitude_corr']:.3f}, phase corr {m['phase_corr']:.3f}, "
                              f"FRC {m['frc_resolution_px']:.2f} px, {case['train_s']:.0f} s",
                              flush=True)
                        if case.get("refine"):
                            r = case["refine"]["quality"]["model"]
                            print(f"[quality] {label} refined: amp SSIM "
                                  f"{r['amplitude_ssim']:.3f} corr {r['amplitude_corr']:.3f}, "
                                  f"phase corr {r['phase_corr']:.3f}", flush=True)
                    stem = args.output / f"quality-{machine}"
                    (stem.with_suffix(".json")).write_text(json.dumps(results, indent=1,
                                                                      default=str))
                    (stem.with_suffix(".md")).write_text(markdown(results))
    if any(c.get("quality", {}).get("model", {}).get("frc_curve") for c in results["cases"]):
        frc_plot(args.output / f"quality-{machine}-frc.png", results)
    if len(budgets) > 1:
        stem = machine if machine.endswith("-time") else f"{machine}-time"
        time_curve_plot(args.output / f"quality-{stem}.png", results)
    return 0 if all("error" not in c for c in results["cases"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
