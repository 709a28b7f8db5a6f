"""The data-consistency check of a run: the artifact's physics graph, the training scan's
reference figures and probe, compared with what a scan gives (runtime.consistency holds
the formulas; this module the sessions and the comparisons ptycho-run, ptycho-parity and
the many-scan summary share)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.consistency import ConsistencyAccumulator, probe_difference
from runtime.manifest import ArtifactSpec, load_artifact, verify_file
from runtime.session import create_session


def compare_with_training(report: dict[str, Any], reference: dict[str, Any] | None
                          ) -> list[str]:
    """Record the training scan's figures beside the scan's, and warn when the scan's
    median R-factor is above the training scan's 95th percentile."""
    if not isinstance(reference, dict) or "r_factor" not in reference:
        report["reference"] = None
        return []
    ref = reference["r_factor"]
    median = report["r_factor"]["median"]
    outside = bool(median > ref["p95"])
    report["reference"] = {"r_factor": ref, "source": reference.get("source"),
                           "rule": "out of distribution when the scan's median R-factor is "
                                   "above the training scan's p95",
                           "out_of_distribution": outside}
    if not outside:
        return []
    return [f"the median R-factor {median:.3f} is above the training scan's 95th percentile "
            f"{ref['p95']:.3f} (its median {ref['median']:.3f}): this scan is out of what the "
            "model saw in training; do not trust the reconstruction without checking it"]


def training_probe(spec: ArtifactSpec) -> np.ndarray | None:
    """The probe the model was trained with (the artifact's probe.npy, hash-checked), or
    None for an artifact without one (a foreign export)."""
    facts = spec.manifest.get("probe")
    if not isinstance(facts, dict) or not isinstance(facts.get("file"), str):
        return None
    verify_file(spec.folder, facts["file"], spec.manifest.get("files") or {},
                spec.manifest_path)
    return np.load(spec.folder / facts["file"], allow_pickle=False)


def compare_probes(report: dict[str, Any], spec: ArtifactSpec, scan_probe: np.ndarray
                   ) -> list[str]:
    """Record how the scan's probe differs from the training probe; warn when its shape
    does: the physics graph predicts with the training probe."""
    trained = training_probe(spec)
    if trained is None:
        report["probe"] = {"status": "not compared",
                           "reason": "the artifact carries no training probe"}
        return []
    report["probe"] = probe_difference(scan_probe, trained)
    if not report["probe"].get("differs"):
        return []
    return [f"the scan's probe differs from the one the model was trained with (1 - overlap "
            f"{report['probe']['mismatch']:.3f}, power ratio "
            f"{report['probe']['power_ratio']:.3g}): the model has not seen this "
            "illumination, and the residual is computed with the training probe"]


@dataclass
class PhysicsSession:
    """physics.onnx of the artifact: predicted diffraction amplitude of each patch."""

    session: Any
    inputs: tuple[str, str]
    output: str
    batch: int | None

    def predict(self, amplitude: np.ndarray, phase: np.ndarray) -> np.ndarray:
        real = len(amplitude)
        if self.batch is not None and real < self.batch:  # a fixed batch: pad, then drop
            amplitude = np.resize(amplitude, (self.batch, *amplitude.shape[1:]))
            phase = np.resize(phase, (self.batch, *phase.shape[1:]))
        feed = {self.inputs[0]: np.ascontiguousarray(amplitude, dtype=np.float32),
                self.inputs[1]: np.ascontiguousarray(phase, dtype=np.float32)}
        return self.session.run([self.output], feed)[0][:real]


def open_physics(spec: ArtifactSpec, provider: str, threads: int | None,
                 device_id: int) -> tuple[PhysicsSession | None, str]:
    """The physics graph on the model's provider, or (None, why not)."""
    facts = (spec.manifest.get("artifacts") or {}).get("physics")
    if not isinstance(facts, dict) or not isinstance(facts.get("file"), str):
        return None, ("the artifact has no physics graph (export with --with-physics to "
                      "check every pattern against its measurement)")
    verify_file(spec.folder, facts["file"], spec.manifest.get("files") or {},
                spec.manifest_path)
    session, _ = create_session(spec.folder / facts["file"], provider, threads,
                                device_id=device_id)
    inputs = tuple(facts.get("inputs") or ("amplitude", "phase"))
    return PhysicsSession(session, inputs, str(facts.get("output", "predicted_diffraction")),
                          spec.batch), ""


@dataclass
class OutputChecker:
    """The artifact's physics graph on the CPU, opened once, for model outputs computed
    elsewhere (ptycho-parity's runners): :meth:`check` gives each its consistency section."""

    spec: ArtifactSpec
    physics: PhysicsSession | None
    why: str

    @classmethod
    def open(cls, artifact: str | os.PathLike[str]) -> OutputChecker:
        spec = load_artifact(artifact)
        physics, why = open_physics(spec, "cpu", None, 0)
        return cls(spec, physics, why)

    def check(self, measured: np.ndarray, amplitude: np.ndarray, phase: np.ndarray,
              positions_px: np.ndarray | None = None, batch: int = 256) -> dict[str, Any]:
        """``measured``: (G, 1, N, N) amplitudes of each group's anchor pattern;
        ``amplitude``/``phase``: the (G, C, N, N) outputs. As in ptycho-run, each group's
        anchor patch (channel 0) is checked against its own pattern."""
        if self.physics is None:
            return {"status": "not computed", "reason": self.why}
        accumulator = ConsistencyAccumulator()
        step = self.spec.batch or batch
        started = time.perf_counter()
        for start in range(0, len(amplitude), step):
            stop = start + step
            accumulator.add(measured[start:stop, :1], self.physics.predict(
                amplitude[start:stop], phase[start:stop])[:, :1])
        accumulator.seconds = time.perf_counter() - started
        report = accumulator.report(positions_px)
        compare_with_training(report, self.spec.manifest.get("consistency_reference"))
        return report


def residual_summary(section: dict[str, Any] | None) -> dict[str, Any] | None:
    """The few figures a summary shows of a consistency section (median and p95 R-factor,
    outliers, whether outside the training scan's range), or None where not computed."""
    section = section or {}
    if "r_factor" not in section:
        return None
    reference = section.get("reference") or {}
    return {"median_r_factor": section["r_factor"]["median"],
            "p95_r_factor": section["r_factor"].get("p95"), "outliers": section.get("outliers"),
            "out_of_distribution": reference.get("out_of_distribution") if reference
            else None}
