"""What every quality benchmark records and shares: the machine, the command, the quick case."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from bench.forward_model import OBJECT_KINDS, ScanSpec
from ptycho_export.bench.speed import cpu_facts, default_machine_name, library_versions

# The figures the warm-start and pretraining tables carry.
FIGURES = ("amplitude_ssim", "amplitude_corr", "phase_corr", "frc_resolution_px")

# The seconds-long case of --quick: a tiny scan and a 20-step run, for wiring tests.
QUICK_SCAN = ScanSpec(object_px=64, patch=32, step_px=6, probe_diameter_px=12)
QUICK_TRAIN: dict[str, Any] = {"steps": 20, "solver_steps": 50}


def results_header(module: str, machine: str | None, argv: list[str] | None
                   ) -> dict[str, Any]:
    """The head of a results JSON: machine name (given, or derived from the CPU), CPU facts,
    library versions and the command that reproduces it; ``cases`` to be filled."""
    cpu = cpu_facts()
    return {"machine": machine or default_machine_name(cpu), "cpu": cpu,
            "versions": library_versions(),
            "command": f"python -m {module} " + " ".join(
                argv if argv is not None else sys.argv[1:]),
            "cases": []}


def power_radii(probe: np.ndarray, fractions: tuple[float, ...] = (0.5, 0.8)) -> list[float]:
    """Radii about the probe's centroid that hold the given fractions of its power (a
    focused probe's faint rings count for little, unlike in its support)."""
    power = np.abs(np.asarray(probe, dtype=np.complex128)) ** 2
    yy, xx = np.indices(power.shape)
    total = float(power.sum())
    cy, cx = float((power * yy).sum()) / total, float((power * xx).sum()) / total
    radius = np.hypot(yy - cy, xx - cx).ravel()
    order = np.argsort(radius)
    enclosed = np.cumsum(power.ravel()[order]) / total
    return [float(radius[order][np.searchsorted(enclosed, f)]) for f in fractions]


def check_kinds(parser: argparse.ArgumentParser, kinds: list[str]) -> None:
    """Refuse an object kind the forward model does not make (argparse's usage error)."""
    unknown = [k for k in kinds if k not in OBJECT_KINDS]
    if unknown:
        parser.error(f"unknown kinds {unknown}; choose from {OBJECT_KINDS}")
