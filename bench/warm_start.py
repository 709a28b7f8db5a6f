"""Warm start against a cold one: what ``ptycho-train --init`` buys on a scan it has not seen.

For each object kind, the independent forward model (bench/forward_model.py) writes two
scans of the same kind (other seed; other photographs for ``natural``). Scan A is trained
with ptycho-train's defaults. Scan B is then trained for each budget twice: from A's
bundle (``--init``) and from random weights, and A's model is also run on B untrained. Each
result is scored on ptycho-train's own reconstruction of B against B's truth
(runtime.image_quality, the figures of bench/quality.py; the exported graph's object
matches it to float32 rounding).

    python -m bench.warm_start                         # natural, 1e6, budgets 1 and 2 min
    python -m bench.warm_start --kinds natural,smooth --budgets 1,2,4
    python -m bench.warm_start --kinds natural --a-kind smooth   # A of another kind
    python -m bench.warm_start --start pretrained-scan-probe     # A: bench.pretrain's chain

Writes ``warm-start-<machine>.{json,md}`` under -o (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import FIGURES, QUICK_SCAN, QUICK_TRAIN, check_kinds, results_header
from bench.forward_model import OBJECT_KINDS, ScanSpec, save
from bench.pretrain import PretrainPlan, measured_probe, pretrain

RESULTS = Path(__file__).resolve().parent / "results"
START_CHOICES = ("scan-a", "pretrained", "pretrained-scan-probe")


def _train(work: Path, scan: str, name: str, minutes: float | None, extra: dict[str, Any],
           init: Path | None = None) -> dict[str, Any]:
    from ptycho_export.train import TrainOptions, train

    started = time.perf_counter()
    result = train(work / scan, work / f"{name}.zip", work / f"{name}_run",
                   TrainOptions(max_minutes=minutes, accelerator="cpu", devices=1,
                                progress=False, init_from=str(init) if init else None,
                                **extra))
    return {"start": "warm" if init else "cold", "budget_min": minutes,
            "train_s": round(time.perf_counter() - started, 1), "steps": result.steps,
            **{k: result.quality["model"][k] for k in FIGURES}}


def _untrained(work: Path, bundle: Path, scan: str) -> dict[str, Any]:
    """A's model on B as it is: the deployment case with no training at all."""
    from ptycho_export.bundle import load_predictor
    from ptycho_export.reconstruct import quality_report, reconstruct_eager
    from runtime.scan import load_scan

    data = load_scan(work / scan)
    report = quality_report(reconstruct_eager(load_predictor(bundle, "cpu"), data), data)
    return {"start": "A's model, not trained on B", "budget_min": 0.0, "train_s": 0.0,
            "steps": 0, **{k: report["model"][k] for k in FIGURES},
            "flat_baseline": {k: report["flat_baseline"][k] for k in FIGURES}}


def _pretrained(work: Path, start: str, plan: PretrainPlan) -> dict[str, Any]:
    """A := the last bundle of a chain of simulated scans (bench.pretrain); with
    ``pretrained-scan-probe`` every stage uses scan B's own probe and dose."""
    measured = measured_probe(work / "b.npz") if start == "pretrained-scan-probe" else None
    record = pretrain(work / "a.zip", plan, measured, log=lambda line: print(
        f"[warm] pretraining {line}", flush=True))
    last = record["stages"][-1]
    return {"start": f"{start} start, on its last simulated scan", "budget_min": None,
            "steps": sum(row["steps"] for row in record["stages"]),
            "train_s": record["seconds"], "pretraining": record,
            **{k: last[k] for k in FIGURES}}


def run_kind(kind: str, photons: float, budgets: list[float | None], base: ScanSpec,
             extra: dict[str, Any], a_kind: str | None = None, start: str = "scan-a",
             plan: PretrainPlan | None = None) -> dict[str, Any]:
    """Train A (of ``a_kind``, default the same kind; or pretrain it, ``start``), then B
    warm and cold for each budget (None: ``extra`` fixes the length)."""
    work = Path(tempfile.mkdtemp(prefix="ptycho-warm-"))
    try:
        spec = ScanSpec(**{**base.to_dict(), "kind": kind, "photons": photons})
        save(str(work / "a.npz"), ScanSpec(**{**spec.to_dict(), "kind": a_kind or kind}))
        save(str(work / "b.npz"), ScanSpec(**{**spec.to_dict(), "seed": spec.seed + 1}))
        first = (_train(work, "a.npz", "a", None, extra) if start == "scan-a"
                 else _pretrained(work, start, plan or PretrainPlan()))
        rows = [_untrained(work, work / "a.zip", "b.npz")]
        for minutes in budgets:
            for init in (work / "a.zip", None):
                rows.append(_train(work, "b.npz", f"b-{minutes}-{bool(init)}", minutes, extra,
                                   init))
                print(f"[warm] {kind} {photons:.0e} B {rows[-1]['start']} {minutes} min: amp "
                      f"SSIM {rows[-1]['amplitude_ssim']:.3f} corr "
                      f"{rows[-1]['amplitude_corr']:.3f}, phase corr "
                      f"{rows[-1]['phase_corr']:.3f}", flush=True)
        return {"kind": kind, "a_kind": a_kind or kind, "photons": photons, "start": start,
                "scan_a": first, "scan_b": rows}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def markdown(results: dict[str, Any]) -> str:
    cpu = results["cpu"]
    chain = next((c["scan_a"]["pretraining"] for c in results["cases"]
                  if "pretraining" in c["scan_a"]), None)
    lines = [
        f"# Warm start (`ptycho-train --init`): {results['machine']}", "",
        f"CPU: {cpu['model']}, {cpu['usable_cores']} usable cores. torch "
        f"{results['versions'].get('torch')}. Command: `{results['command']}`.", "",
        "Scans A and B of each kind from bench/forward_model.py (B: other seed; other "
        "photographs for natural). A trained with ptycho-train's defaults; B trained for "
        "each budget from A's bundle (*warm*) and from random weights (*cold*), scored on "
        "B's truth. Budgets include the object solve. *flat object*: a constant object "
        "scored the same way, the baseline; where its amplitude SSIM beats the models, B's "
        "amplitude is nearly flat and its amplitude corr is the figure to read.", "",
        *([f"Here *A's model* is not a model of scan A: it is the last bundle of a "
           f"bench.pretrain chain of {chain['plan']['stages']} training runs "
           f"({chain['plan']['minutes_per_stage']:g} min each) over simulated scans "
           "(dead-leaves, smooth and line objects"
           + (", through B's own probe and dose)." if chain["probe_from"] else
              ", simulated disc and focused probes).")
           + " Its figures on the chain's last scan head the table.", ""] if chain else []),
        "| kind | photons | model of B | budget min | steps | amp SSIM | amp corr | "
        "phase corr | FRC px |", "|---|---|---|---|---|---|---|---|---|"]
    for case in results["cases"]:
        flat = case["scan_b"][0]["flat_baseline"]
        a = case["scan_a"]
        a_kind = case.get("a_kind", case["kind"])
        own = (f"scan A's own model, on A ({a_kind})" if case.get("start", "scan-a") ==
               "scan-a" else a["start"])
        rows = [{**a, "start": own}] + case["scan_b"] + [
            {**flat, "start": "flat object", "budget_min": None, "steps": None}]
        for row in rows:
            budget = "–" if row["budget_min"] is None else f"{row['budget_min']:g}"
            if row["start"] in ("warm", "cold") and row["budget_min"] is None:
                budget = "steps"
            steps = "–" if row.get("steps") is None else str(row["steps"])
            lines.append(
                f"| {case['kind']} | {case['photons']:.0e} | {row['start']} | {budget} | "
                f"{steps} | {row['amplitude_ssim']:.3f} | {row['amplitude_corr']:.3f} | "
                f"{row['phase_corr']:.3f} | {row['frc_resolution_px']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="natural")
    parser.add_argument("--doses", default="1e6", help="mean photons per pattern")
    parser.add_argument("--budgets", default="1,2", help="minutes of training on scan B")
    parser.add_argument("--a-kind", default=None, choices=OBJECT_KINDS,
                        help="object kind of scan A (default: B's kind): does a model of "
                             "one kind give a head start on another?")
    parser.add_argument("--start", default="scan-a", choices=START_CHOICES,
                        help="the model B warm-starts from: scan-a (A trained with the "
                             "defaults), pretrained (bench.pretrain's chain of simulated "
                             "scans, simulated probes), pretrained-scan-probe (the chain "
                             "through B's own probe and dose)")
    parser.add_argument("--stages", type=int, default=PretrainPlan.stages,
                        help="pretraining stages (--start pretrained*)")
    parser.add_argument("--minutes-per-stage", type=float,
                        default=PretrainPlan.minutes_per_stage)
    parser.add_argument("--quick", action="store_true", help="tiny case, seconds")
    parser.add_argument("-o", "--output", type=Path, default=RESULTS)
    parser.add_argument("--machine", default=None)
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    check_kinds(parser, kinds)
    results = results_header("bench.warm_start", args.machine, argv)
    machine = results["machine"]
    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.output / f"warm-start-{machine}"
    budgets: list[float | None] = [float(b) for b in args.budgets.split(",")]
    doses = [float(d) for d in args.doses.split(",")]
    base, extra = ScanSpec(), {}
    plan = PretrainPlan(stages=args.stages, minutes_per_stage=args.minutes_per_stage)
    if args.quick:
        base, kinds, doses, budgets = QUICK_SCAN, ["smooth"], [1e6], [None]
        extra = {"preset": "unet-tiny", **QUICK_TRAIN}
        plan = PretrainPlan(stages=2, steps_per_stage=QUICK_TRAIN["steps"],
                            preset="unet-tiny", patch_size=QUICK_SCAN.patch, grid=5)
    for kind in kinds:
        for photons in doses:
            results["cases"].append(run_kind(kind, photons, budgets, base, extra,
                                             args.a_kind, args.start, plan))
            stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
            stem.with_suffix(".md").write_text(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
