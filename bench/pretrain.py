"""A starting model pretrained on simulated scans, chained: does it give a head start?

Each stage is one ordinary ``train`` run on a scan from this project's simulator
(``ptycho_export.data.simulate``: dead-leaves, smooth-field and line objects, never the
benchmark's photographs or forward model), started from the previous stage's bundle. The
probe-built front end and the input scale are rebuilt for every scan, so what carries over
is what the U-Net learned about correcting the back-propagated estimate. The probes are
either drawn from the simulator's disc and focused families, or taken from a scan (its
own probe and dose: a beamline knows its probe before the next scan).

Measured with ``python -m bench.warm_start --start pretrained[-scan-probe]``, which
compares the chain's last bundle, fine-tuned on an independent scan, with random weights
(bench/results/warm-start-*-pretrained*.md).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.common import FIGURES, power_radii
from ptycho_export.data.simulate import SimulationConfig, simulate_scan
from runtime.atomic import written_atomic
from runtime.report_io import write_json

# The object kinds in turn: dead leaves (natural-image statistics) twice as often.
STAGE_KINDS = ("leaves", "smooth", "leaves", "lines")


@dataclass(frozen=True)
class PretrainPlan:
    stages: int = 16
    minutes_per_stage: float = 1.5
    steps_per_stage: int | None = None  # fixes each stage's length instead (tests)
    preset: str = "default"
    patch_size: int = 64
    grid: int = 16  # grid x grid patterns per scan
    seed: int = 0


def probe_size_px(probe: np.ndarray) -> float:
    """The probe's diameter for choosing scan steps: twice the radius that holds 80 % of
    its power."""
    return 2.0 * power_radii(probe, (0.8,))[0]


@dataclass(frozen=True)
class MeasuredProbe:
    """A scan's own probe and dose: the stages then simulate objects seen through it."""

    probe: np.ndarray
    photons: float  # mean counts per pattern in the scan
    source: str


def measured_probe(path: str | Path) -> MeasuredProbe:
    from runtime.scan import load_scan

    scan = load_scan(path)
    counts = float(np.mean(np.sum(scan.amplitudes.astype(np.float64) ** 2, axis=(1, 2))))
    return MeasuredProbe(probe=scan.probe, photons=counts, source=Path(path).name)


def stage_scan(stage: int, plan: PretrainPlan, measured: MeasuredProbe | None = None
               ) -> SimulationConfig:
    """The simulated scan of one stage: kind in turn, everything else drawn at random over
    the range real scans span (probe a quarter to half the pattern, both probe kinds, scan
    step 25-45 % of the probe, 1e5-1e7 photons, amplitude down to 0.3, phase 0.15-2.5
    rad). With a measured probe: its size, and its scan's dose within a factor of 3."""
    rng = np.random.default_rng([plan.seed, stage])
    n = plan.patch_size
    diameter = float(rng.uniform(0.25 * n, 0.5 * n))
    probe_kind = ("disc", "focused")[int(rng.integers(2))]
    edge_limit = math.pi * diameter / 4  # the simulator's aliasing limit on disc defocus
    defocus = float(rng.uniform(1.0, min(8.0, edge_limit))) if probe_kind == "disc" \
        else float(rng.uniform(0.0, 4.0))
    photons = float(10 ** rng.uniform(5.0, 7.0))
    step_fraction = float(rng.uniform(0.25, 0.45))
    if measured is not None:
        diameter = min(probe_size_px(measured.probe), float(n))
        photons = measured.photons * float(10 ** rng.uniform(-0.5, 0.5))
    return SimulationConfig(
        patch_size=n, grid_shape=(plan.grid, plan.grid),
        step_px=diameter * step_fraction, jitter_px=1.0,
        probe_diameter_px=diameter, defocus=defocus, probe_kind=probe_kind,
        photons_per_pattern=photons,
        object_kind=STAGE_KINDS[stage % len(STAGE_KINDS)],
        max_phase=float(math.exp(rng.uniform(math.log(0.15), math.log(2.5)))),
        min_amplitude=float(rng.uniform(0.3, 0.8)), seed=int(plan.seed * 1000 + stage))


def pretrain(output: str | Path, plan: PretrainPlan, measured: MeasuredProbe | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Run the stages; write the last stage's bundle to ``output`` and, beside it,
    ``<output>.json`` with every stage's scan and figures. Returns that record."""
    from ptycho_export.train import TrainOptions, train

    if plan.stages < 1:
        raise ValueError(f"a chain needs at least one stage, got {plan.stages}")
    output = Path(output)
    record: dict = {"plan": asdict(plan), "stages": [],
                    "probe_from": measured.source if measured else None}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ptycho-pretrain-") as work:
        previous: Path | None = None
        for stage in range(plan.stages):
            sim = stage_scan(stage, plan, measured)
            scan = simulate_scan(sim, measured.probe if measured else None)
            bundle = Path(work) / f"stage{stage:02d}.zip"
            options = TrainOptions(max_minutes=plan.minutes_per_stage,
                                   steps=plan.steps_per_stage, preset=plan.preset,
                                   accelerator="cpu", devices=1, progress=False, seed=stage,
                                   init_from=str(previous) if previous else None)
            result = train(None, bundle, Path(work) / f"stage{stage:02d}_run", options,
                           scan=scan)
            model = result.quality.get("model", {})
            row = {"stage": stage, "scan": asdict(sim), "steps": result.steps,
                   "seconds": round(result.seconds, 1),
                   **{k: model.get(k) for k in FIGURES}}
            record["stages"].append(row)
            probe = measured.source + "'s" if measured else sim.probe_kind
            log(f"stage {stage + 1}/{plan.stages}: {sim.object_kind}, {probe} probe "
                f"{sim.probe_diameter_px:.0f} px, {sim.photons_per_pattern:.1e} photons: "
                f"{result.steps} steps, amp SSIM {_fmt(row['amplitude_ssim'])} corr "
                f"{_fmt(row['amplitude_corr'])}, phase corr {_fmt(row['phase_corr'])}")
            previous = bundle
        record["seconds"] = round(time.perf_counter() - started, 1)
        with written_atomic(output) as partial:
            shutil.copyfile(previous, partial)
    write_json(output.with_suffix(".json"), record)
    return record


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
