"""The built-in demo: simulate -> train -> bundle -> eager reconstruction -> pictures.

Small enough for a laptop CPU in a few minutes; every stage is the real code path the
commands use, on a simulated scan whose ground truth lets the result be scored.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ptycho_export.bundle import load_predictor
from ptycho_export.data.simulate import SimulationConfig, simulate_scan
from ptycho_export.export.pipeline import ExportOptions, export_bundle
from ptycho_export.reconstruct import quality_report, reconstruct_eager
from ptycho_export.train import TrainOptions, train
from runtime.atomic import write_atomic
from runtime.image_quality import summary_line
from runtime.images import (
    amplitude_figure,
    amplitude_range,
    phase_display,
    phase_figure,
    save_comparison_png,
)
from runtime.inputs import InputOptions
from runtime.metrics import align_to_reference
from runtime.physics_check import residual_summary
from runtime.report_io import write_json
from runtime.run import run_scan
from runtime.scan import ScanData, save_scan
from runtime.stitch import StitchedObject, crop_to


@dataclass(frozen=True)
class DemoSettings:
    patch_size: int = 64
    grid_shape: tuple[int, int] = (20, 20)
    # training length: epochs if set, else the time budget (the tool plans the steps)
    epochs: int | None = None
    max_minutes: float = 3.0
    preset: str = "default"
    batch_size: int = 16
    seed: int = 0
    # Beam geometry of the simulated scan, for the ptychodus product the demo writes.
    pixel_size_m: float = 10e-9
    energy_ev: float = 8000.0
    distance_m: float = 2.0
    # ptycho-run --refine iterations of the demo's refined run
    refine: int = 30

    @classmethod
    def quick(cls) -> DemoSettings:
        """A seconds-long variant for tests: same stages, tiny model and scan."""
        return cls(patch_size=32, grid_shape=(8, 8), epochs=3, preset="unet-tiny")

    def simulation(self) -> SimulationConfig:
        n = self.patch_size
        return SimulationConfig(patch_size=n, grid_shape=self.grid_shape, step_px=n / 8,
                                probe_diameter_px=0.4 * n, defocus=0.1 * n, seed=self.seed)


def object_parity(reference: np.ndarray, candidate: np.ndarray, mask: np.ndarray
                  ) -> dict[str, float]:
    """Stitched-object agreement of two runtimes on the same scan (no alignment: the two
    must agree exactly up to float32 rounding, not merely up to a global factor)."""
    diff = np.abs(candidate.astype(np.complex128) - reference)[mask]
    scale = float(np.abs(reference[mask]).max())
    return {"max_abs": float(diff.max()), "rel_max": float(diff.max()) / scale}


def save_side_by_side(out: Path, obj: np.ndarray, truth: np.ndarray, mask: np.ndarray,
                      prefix: str = "") -> None:
    """amplitude.png and phase.png (after ``prefix``): reconstruction next to truth on ONE
    scale each (the truth's range), with colour bars, so lost contrast shows as lost
    contrast."""
    amp_range = amplitude_range(truth, mask)
    linear = phase_display(truth, mask)  # one centre for both: truth is aligned to obj
    panels = [
        ("reconstruction |O|", amplitude_figure(obj, mask, 256, amp_range)),
        ("ground truth |O|", amplitude_figure(truth, mask, 256, amp_range)),
        ("reconstruction phase", phase_figure(obj, mask, 256, linear)),
        ("ground truth phase", phase_figure(truth, mask, 256, linear)),
    ]
    save_comparison_png(out / f"{prefix}amplitude.png", panels[:2])
    save_comparison_png(out / f"{prefix}phase.png", panels[2:])


def _residual_summary(report: dict[str, Any]) -> dict[str, Any]:
    section = report.get("consistency") or {}
    return residual_summary(section) or {"status": "not computed",
                                         "reason": section.get("reason")}


def demo_consistency(out: Path, settings: DemoSettings, own: dict[str, Any], progress: bool,
                     log) -> dict[str, Any]:  # noqa: ANN001
    """The residual on the training scan and on a scan of the other object kind, which the
    model never saw: the in/out-of-distribution comparison ptycho-run makes on every scan."""
    other_kind = "smooth" if settings.simulation().object_kind != "smooth" else "lines"
    other = simulate_scan(replace(settings.simulation(), object_kind=other_kind,
                                  seed=settings.seed + 1))
    save_scan(out / f"scan_{other_kind}.npz", other)
    unseen = run_scan(out / "export", out / f"scan_{other_kind}.npz", out / f"run_{other_kind}",
                      provider="cpu", progress=progress)
    result = {"training_scan": _residual_summary(own),
              f"{other_kind}_scan": _residual_summary(unseen),
              "picture": str(out / "run_onnx" / "consistency.png")}
    mine, theirs = result["training_scan"], result[f"{other_kind}_scan"]
    if "median_r_factor" in mine and "median_r_factor" in theirs:
        verdict = "flagged out of distribution" if theirs["out_of_distribution"] \
            else "NOT flagged"
        log(f"[data consistency] median R-factor {mine['median_r_factor']:.3f} on the training "
            f"scan, {theirs['median_r_factor']:.3f} on a {other_kind} scan the model never saw "
            f"({verdict}) -> {out / 'run_onnx' / 'consistency.png'}")
    return result


def demo_refine(out: Path, settings: DemoSettings, scan: ScanData, progress: bool,
                log) -> dict[str, Any]:  # noqa: ANN001
    """ptycho-run --refine: the network's object refined through the scan's own
    measurements, scored and drawn beside the truth like the network's own."""
    report = run_scan(out / "export", out / "scan.npz", out / "run_refined", provider="cpu",
                      progress=progress, refine=settings.refine)
    section = report["refine"]
    with np.load(out / "run_refined" / "object.npz", allow_pickle=False) as saved:
        obj, mask = saved["object"], saved["mask"]
        origin = tuple(int(v) for v in saved["origin_px"])
    placed = StitchedObject(obj=obj, weight=mask.astype(np.float32), mask=mask,
                            origin_px=origin)
    truth = align_to_reference(crop_to(scan.object_truth, placed), obj, mask)
    save_side_by_side(out, obj, truth, mask, prefix="refined_")
    quality = report["quality"]
    log(f"[refine] ptycho-run --refine {settings.refine}: {section['iterations']} iterations, "
        f"R-factor {section['r_factor']['start']:.3f} -> {section['r_factor']['end']:.3f} "
        f"(whole scan) in {section['seconds']:.1f} s -> {out / 'refined_amplitude.png'}, "
        f"{out / 'refined_phase.png'}")
    return {"max_iterations": settings.refine, "iterations": section["iterations"],
            "seconds": section["seconds"],
            "r_factor": {k: section["r_factor"][k] for k in ("start", "end")},
            "quality": quality, "run": str(out / "run_refined")}


def run_demo(outdir: str | os.PathLike = "artifacts/demo", settings: DemoSettings | None = None,
             progress: bool = True, log=print) -> dict[str, Any]:  # noqa: ANN001
    settings = settings or DemoSettings()
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    scan = simulate_scan(settings.simulation())
    save_scan(out / "scan.npz", scan)
    timings["simulate_s"] = time.perf_counter() - started
    log(f"[1/5] simulated {scan.n_patterns} patterns of {scan.patch_size}x{scan.patch_size} "
        f"-> {out / 'scan.npz'}")

    started = time.perf_counter()
    options = TrainOptions(epochs=settings.epochs, max_minutes=settings.max_minutes,
                           preset=settings.preset,
                           batch_size=settings.batch_size, seed=settings.seed,
                           accelerator="cpu", devices=1, progress=progress,
                           pixel_size_m=settings.pixel_size_m)
    result = train(out / "scan.npz", out / "bundle.zip", out / "run", options, scan=scan)
    timings["train_s"] = time.perf_counter() - started
    log(f"[2/5] trained {result.steps} steps ({result.plan_how}) in "
        f"{timings['train_s']:.0f} s -> {result.bundle_path}")

    started = time.perf_counter()
    predictor = load_predictor(result.bundle_path, "cpu")
    recon = reconstruct_eager(predictor, scan)
    timings["reconstruct_s"] = time.perf_counter() - started
    quality = quality_report(recon, scan)
    stitched = recon.stitched
    with write_atomic(out / "object_eager.npz") as handle:
        np.savez(handle, object=stitched.obj, mask=recon.well_lit,
                 origin_px=np.asarray(stitched.origin_px))
    truth = align_to_reference(crop_to(scan.object_truth, stitched), stitched.obj, recon.well_lit)
    save_side_by_side(out, stitched.obj, truth, recon.well_lit)
    log(f"[3/5] stitched {stitched.obj.shape[0]}x{stitched.obj.shape[1]} object "
        f"-> {out / 'amplitude.png'}, {out / 'phase.png'}")

    started = time.perf_counter()
    exported = export_bundle(result.bundle_path, out / "export",
                             ExportOptions(formats=["onnx", "torchscript"], with_physics=True,
                                           command="ptycho-demo"))
    timings["export_s"] = time.perf_counter() - started
    gated = [row for row in exported.rows if row.gated]
    log(f"[4/5] exported ONNX + TorchScript with parity gate PASS ({len(gated)} checks) in "
        f"{timings['export_s']:.0f} s -> {out / 'export'}")

    started = time.perf_counter()
    product = out / "run_onnx" / "product.h5"
    run_report = run_scan(out / "export", out / "scan.npz", out / "run_onnx", provider="auto",
                          self_check=True, progress=progress,
                          inputs=InputOptions(pixel_size_m=settings.pixel_size_m,
                                              energy_ev=settings.energy_ev,
                                              distance_m=settings.distance_m,
                                              ptychodus_product=product))
    timings["runtime_s"] = time.perf_counter() - started
    with np.load(out / "run_onnx" / "object.npz", allow_pickle=False) as frozen:
        stitched_parity = object_parity(stitched.obj, frozen["object"], recon.well_lit)
    log(f"[5/5] ptycho-run on {run_report['provider']['provider']}: "
        f"{run_report['patterns_per_s']:,.0f} patterns/s, self-check "
        f"{run_report['self_check']['status']}; stitched object vs eager: max error "
        f"{stitched_parity['rel_max']:.1e} of max -> {out / 'run_onnx'} (with a ptychodus "
        f"product.h5)")

    consistency = demo_consistency(out, settings, run_report, progress, log)
    refined = demo_refine(out, settings, scan, progress, log)

    report = {"settings": asdict(settings), "timings": timings, "quality": quality,
              "refined": refined,
              "stitched_parity_onnx_vs_eager": stitched_parity, "consistency": consistency,
              "bundle": str(result.bundle_path), "final_loss": result.history[-1]
              if result.history else None}
    write_json(out / "demo_report.json", report)
    if quality.get("ground_truth"):
        log(f"quality vs ground truth, the network alone: {summary_line(quality)}")
    if (refined["quality"] or {}).get("model"):
        log(f"quality vs ground truth, refined ({refined['iterations']} iterations): "
            f"{summary_line(refined['quality'])}")
    for text in quality.get("warnings", []):
        log(f"warning: {text}")
    return report
