"""ptycho-parity: every exported artifact against the eager model on a real scan.

The export gate checks a handful of patterns; this check runs a whole scan (every group,
batched) through the bundle's eager model and through each artifact of an export folder,
on every device this machine has, and compares at two levels:

1. per patch, with the export gate's metrics (`runtime.compare`) and the manifest's
   tolerances;
2. on the stitched object, stitched exactly as the eager path does
   (`reconstruct.stitch_with_probe`): amplitude and phase error maps on the well-lit mask,
   PSNR, and the gated number, max |candidate - reference| relative to max |reference
   object| with no alignment (two runtimes must agree pixel for pixel); the same number
   after removing the global complex factor (`runtime.metrics.align_to_reference`) is
   reported beside it.

The computing lives in ptycho_export.parity_check (setup, runners, rows); this module is
the loop over runners (:func:`run_parity_check`) and the reporting: `parity.json` (every
number, runtime.report_io), `parity_errors.png` (error maps of the worst artifact), each
written atomically, the terminal tables, and `raise_for_status`, which turns a failed
report into a ParityError (exit 5).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ptycho_export.parity_check import (
    DEFAULT_BATCH,
    FAIL,
    INFO,
    KIND_TITLES,
    OBJECT_TOLERANCE_KEY,
    PASS,
    REFERENCE,
    REPORT_FORMAT,
    REPORT_JSON,
    REPORT_PNG,
    SKIPPED,
    Log,
    ParityRun,
    ParitySetup,
    is_foreign,
)
from runtime.errors import ParityError, PtychoError
from runtime.images import (
    UNVISITED_RGB,
    amplitude_rgb,
    phase_rgb,
    save_comparison_png,
    upscale_nearest,
)
from runtime.report_io import write_json

# ---------------------------------------------------------------- picture
# White (no error) through yellow and orange to dark red (the map's own max): readable in
# print, and zero never looks like UNVISITED_RGB (dark blue-grey) outside the mask.
_ERROR_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_ERROR_RGB = np.array([(255, 255, 255), (254, 227, 145), (254, 153, 41), (217, 72, 1),
                       (103, 0, 13)], dtype=np.float64)
ERROR_LUT = np.stack([np.interp(np.linspace(0, 1, 256), _ERROR_STOPS, _ERROR_RGB[:, c])
                      for c in range(3)], axis=1).round().astype(np.uint8)


def error_rgb(error: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float]:
    """(H, W, 3) uint8 of a non-negative error map scaled by its own max (returned), so the
    largest error is always the darkest red; UNVISITED_RGB outside the mask."""
    error = np.asarray(error, dtype=np.float64)
    valid = np.asarray(mask, dtype=bool) & np.isfinite(error)
    top = float(error[valid].max()) if valid.any() else 0.0
    rgb = np.empty((*error.shape, 3), dtype=np.uint8)
    rgb[...] = UNVISITED_RGB
    scaled = error[valid] / top if top > 0 else np.zeros(int(valid.sum()))
    rgb[valid] = ERROR_LUT[np.clip(np.rint(scaled * 255), 0, 255).astype(np.int64)]
    bad = np.asarray(mask, dtype=bool) & ~np.isfinite(error)
    rgb[bad] = (0, 0, 0)  # NaN/Inf where the mask says there should be a value
    return rgb, top


def colour_bar(height: int, width: int = 80) -> np.ndarray:
    ramp = np.linspace(255, 0, max(height, 2)).round().astype(np.int64)
    return np.repeat(ERROR_LUT[ramp][:, None, :], width, axis=1)


def save_error_png(path: Path, reference: np.ndarray, maps: dict[str, np.ndarray],
                   mask: np.ndarray, runner: str, upscale_to: int = 256) -> dict[str, float]:
    """Eager amplitude and phase (for orientation), then the worst runner's amplitude and
    phase error maps, each normalised by its own max (printed in its title)."""
    amp_rgb, amp_max = error_rgb(maps["amplitude"], mask)
    phase_rgb_, phase_max = error_rgb(maps["phase"], mask)

    def big(rgb: np.ndarray) -> np.ndarray:
        return upscale_nearest(rgb, upscale_to)

    panels = [
        (f"{REFERENCE}\namplitude", big(amplitude_rgb(np.abs(reference), mask))),
        (f"{REFERENCE}\nphase (rad)", big(phase_rgb(np.angle(reference), mask))),
        (f"|amplitude error|\n{runner}\nmax {amp_max:.2e}", big(amp_rgb)),
        (f"|phase error| (rad)\n{runner}\nmax {phase_max:.2e}", big(phase_rgb_)),
    ]
    panels.append(("colour scale\ntop: panel max\nbottom: 0", colour_bar(panels[-1][1].shape[0])))
    save_comparison_png(path, panels)
    return {"amplitude_error_max": amp_max, "phase_error_max_rad": phase_max}


# ---------------------------------------------------------------- output
def default_outdir(artifact_dir: Path) -> Path:
    folder = Path(artifact_dir).resolve()  # "." has no name of its own
    return folder.parent / f"{folder.name}_parity"


def _environment() -> dict[str, Any]:
    import torch

    from ptycho_export.export.pipeline import versions

    env: dict[str, Any] = {"versions": versions(), "cuda_available": torch.cuda.is_available()}
    if env["cuda_available"]:
        env["cuda_device"] = torch.cuda.get_device_name(0)
        env["torch_cuda"] = torch.version.cuda
    with contextlib.suppress(PtychoError, ImportError):
        from runtime.session import available_providers

        env["onnxruntime_providers"] = available_providers()
    return env


# ---------------------------------------------------------------- the check
def run_parity_check(bundle: str | os.PathLike, artifact_dir: str | os.PathLike,
                     data: str | os.PathLike, outdir: str | os.PathLike | None = None, *,
                     batch_size: int = DEFAULT_BATCH,
                     tolerances: dict[str, float] | None = None,
                     object_tol: float | None = None, cuda: bool = True,
                     log: Log | None = None) -> dict[str, Any]:
    """Run the whole check, write parity.json + parity_errors.png, return the report.

    `tolerances` override the manifest's per-patch ones (keys as in runtime.compare),
    `object_tol` the stitched-object one; `cuda=False` skips the CUDA runners (default:
    each runs where torch / onnxruntime sees CUDA). A failed comparison does not raise
    here: pass the report to `raise_for_status`.
    """
    log = log or (lambda message: None)
    started = time.perf_counter()
    outdir = Path(outdir) if outdir is not None else default_outdir(Path(artifact_dir))
    setup = ParitySetup.prepare(bundle, artifact_dir, data, outdir, batch_size=batch_size,
                                tolerances=tolerances, object_tol=object_tol, log=log)
    check = ParityRun(setup, log)
    check.run_references()
    for variant in setup.variants(cuda):
        check.check(variant)
    report = build_report(setup, check, started)
    write_json(outdir / REPORT_JSON, report, non_finite="text")
    return report


def build_report(setup: ParitySetup, check: ParityRun, started: float) -> dict[str, Any]:
    """The verdict (every gated row passed), the worst row, the error picture of the worst
    artifact (written to the output folder) and every number, as parity.json holds it."""
    from ptycho_export.bundle import sha256_file

    rows, artifacts, scan = check.rows, setup.artifacts, setup.scan
    gated_rows = [r for r in rows if r.gated and r.status in (PASS, FAIL)]
    failed = [r for r in gated_rows if r.status == FAIL]
    worst = max(gated_rows, key=lambda r: r.worst_ratio, default=None)
    export_objects = [r for r in rows if r.kind == "export" and r.level == "object"
                      and r.status in (PASS, FAIL) and r.runner in check.maps_vs_reference]
    picture: dict[str, Any] = {}
    setup.outdir.mkdir(parents=True, exist_ok=True)
    if export_objects:
        shown = max(export_objects, key=lambda r: r.worst_ratio)
        saved = save_error_png(setup.outdir / REPORT_PNG, check.reference_obj,
                               check.maps_vs_reference[shown.runner], check.mask,
                               shown.runner)
        picture = {"file": REPORT_PNG, "runner": shown.runner, **saved}
    foreign = is_foreign(artifacts.manifest)
    return {
        "format": REPORT_FORMAT,
        "format_version": 1,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "status": FAIL if failed else PASS,
        "bundle": {"file": str(setup.bundle_path), "sha256": sha256_file(setup.bundle_path),
                   "kind": "checkpoint" if foreign else "bundle"},
        "artifact": {"folder": str(setup.artifact_dir),
                     "files": {p.name: artifacts.sha256[p.name]
                               for p in artifacts.files.values()},
                     "formats": list(artifacts.files), "not_compared": artifacts.not_compared,
                     "source_verified": True, "source_bundle_verified": not foreign},
        "scan": {"file": str(setup.data_path), "patterns": scan.n_patterns,
                 "groups": len(setup.groups), "patch_size": scan.patch_size,
                 "gridsize": setup.reference.gridsize, "batch_size": setup.batch,
                 "fixed_batch": setup.fixed, "object_shape": list(check.reference_obj.shape),
                 "well_lit_pixels": int(check.mask.sum())},
        "tolerances": {"patch": setup.patch_tol,
                       "object": {OBJECT_TOLERANCE_KEY: setup.object_limit},
                       "loosened": setup.loosened,
                       "object_metric": "max |candidate - reference| / max |reference| on "
                                        "the well-lit mask, no alignment"},
        "environment": _environment(),
        "runners": check.runners,
        "rows": [r.to_dict() for r in rows],
        "failures": [f"{r.runner} vs {r.reference} [{r.level}] {f}" for r in failed
                     for f in r.failures],
        "worst": None if worst is None else {
            "runner": worst.runner, "reference": worst.reference, "level": worst.level,
            "output": worst.worst_output, "ratio_to_limit": worst.worst_ratio},
        "picture": picture,
        "outdir": str(setup.outdir),
        "seconds": time.perf_counter() - started,
    }


def raise_for_status(report: dict[str, Any]) -> None:
    """ParityError (exit 5) naming the worst failing runner and output, in one line."""
    if report["status"] != FAIL:
        return
    failed = [r for r in report["rows"] if r["gated"] and r["status"] == FAIL]
    worst = max(failed, key=lambda r: r["worst_ratio"])
    reason = next((f for f in worst["failures"] if f.startswith(worst["worst_output"])),
                  worst["failures"][0])
    where = f"per-patch {reason}" if worst["level"] == "patch" else reason
    raise ParityError(f"parity FAILED ({len(report['failures'])} check(s)); worst: "
                      f"{worst['runner']} vs {worst['reference']}, {where}; report in "
                      f"{Path(report['outdir']) / REPORT_JSON}")


# ---------------------------------------------------------------- terminal table
def _fmt(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        return value
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return "0" if value == 0 else f"{value:.2e}"


def consistency_table(report: dict[str, Any]) -> Any:
    """rich Table: each runner's patches against the measured patterns (median and p95
    R-factor, outliers), or the one line saying why that was not computed."""
    from rich.table import Table

    ran = [r for r in report["runners"] if isinstance(r.get("consistency"), dict)]
    computed = [r for r in ran if "r_factor" in r["consistency"]]
    if not computed:
        reason = next((r["consistency"].get("reason") for r in ran), None)
        return f"data consistency: not computed ({reason or 'no runner produced patches'})"
    table = Table(title="data consistency: each runner's patches against the measured "
                        "patterns", title_justify="left", title_style="bold")
    for name in ("runner", "median R", "p95 R", "outliers", "deviance / px", "vs training"):
        table.add_column(name, justify="left" if name == "runner" else "right")
    for r in computed:
        c = r["consistency"]
        reference = c.get("reference") or {}
        table.add_row(r["runner"], f"{c['r_factor']['median']:.4f}",
                      f"{c['r_factor']['p95']:.4f}", str(c["outliers"]),
                      f"{c['deviance_per_pixel']['median']:.3g}",
                      "" if not reference else "OUTSIDE" if reference["out_of_distribution"]
                      else "in range")
    return table


def render_table(report: dict[str, Any]) -> Any:
    """rich renderables: one table per comparison kind, one row per runner x level with its
    worst numbers and verdict (the full numbers are in parity.json)."""
    from rich.console import Group
    from rich.table import Table

    patch_tol = report["tolerances"]["patch"]
    object_tol = report["tolerances"]["object"][OBJECT_TOLERANCE_KEY]
    styles = {PASS: "green", FAIL: "bold red", INFO: "dim", SKIPPED: "yellow"}
    tables = []
    for kind, title in KIND_TITLES.items():
        rows = [r for r in report["rows"] if r["kind"] == kind]
        if not rows:
            continue
        table = Table(title=title, title_justify="left", title_style="bold")
        for name, justify in (("runner", "left"), ("vs", "left"), ("level", "left"),
                              ("amplitude", "right"), ("phase rad", "right"),
                              ("object |err|", "right"), ("PSNR dB", "right"),
                              ("NaN/Inf", "right"), ("status", "left")):
            table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
        table.add_column("note", overflow="ellipsis", no_wrap=True, max_width=40)
        for row in rows:
            m = row["metrics"]
            bad = m.get("nan_count", 0) + m.get("inf_count", 0) if row["level"] == "patch" \
                else m.get("nonfinite_pixels")
            style = styles[row["status"]]
            table.add_row(
                row["runner"], row["reference"], row["level"],
                _fmt(m.get("amplitude_rel_max")), _fmt(m.get("phase_weighted_max_rad")),
                _fmt(m.get("complex_rel_max_unaligned")), _fmt(m.get("amplitude_psnr_db")),
                "" if bad is None else str(bad), f"[{style}]{row['status']}[/{style}]",
                row["note"].split(" (")[0])  # parity.json has the whole reason
        tables.append(table)
    tables.append(consistency_table(report))
    tables.append(
        f"gates: per patch, amplitude max error <= {patch_tol.get('amplitude_rel_max'):g} of "
        f"max|ref| and amplitude-weighted phase error <= "
        f"{patch_tol.get('phase_weighted_max_rad'):g} rad; stitched object, max |error| "
        f"<= {object_tol:g} of max|object| (well-lit pixels, no alignment)")
    return Group(*tables)


def summary_line(report: dict[str, Any]) -> str:
    gated = [r for r in report["rows"] if r["gated"] and r["status"] in (PASS, FAIL)]
    skipped = [r for r in report["rows"] if r["status"] == SKIPPED]
    worst = report.get("worst") or {}
    text = (f"parity {report['status']}: {len(gated)} gated checks on "
            f"{report['scan']['groups']} groups")
    if worst:
        ratio = worst["ratio_to_limit"]
        share = ("inf x" if not math.isfinite(ratio) else
                 f"{ratio:.3g} x" if ratio >= 1 else f"{ratio:.1%} of")
        text += (f"; worst {worst['runner']} ({worst['level']} {worst['output']}) at "
                 f"{share} its limit")
    if skipped:
        text += f"; {len(skipped)} CUDA comparisons skipped (see note)"
    return text
