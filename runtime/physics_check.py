"""The data-consistency check of a run: the artifact's physics graph, the training scan's
reference figures and probe, compared with what a scan gives (runtime.consistency holds
the formulas; this module the sessions and the comparisons ptycho-run, ptycho-parity and
the many-scan summary share)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.consistency import ConsistencyAccumulator, probe_difference
from runtime.manifest import ArtifactSpec, load_artifact, verify_file
from runtime.runner import fill_batch
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
            "illumination"]


def side_feed(inputs: tuple[str, ...], b: int, probe: np.ndarray | None,
              offsets: np.ndarray | None) -> dict[str, np.ndarray]:
    """The physics graph's inputs besides the patches, float32: the scan's probe (N, N,
    broadcast to the b patterns) and, at gridsize > 1, the group's offsets (b, C, 2) from
    its anchor (runtime.grouping.group_offsets)."""
    feed: dict[str, np.ndarray] = {}
    if probe is not None:
        probe = np.asarray(probe)
        feed["probe_re"] = np.broadcast_to(probe.real, (b, *probe.shape))
        feed["probe_im"] = np.broadcast_to(probe.imag, (b, *probe.shape))
    if offsets is not None:
        feed["offsets"] = offsets
    wanted = [name for name in inputs if name not in ("amplitude", "phase")]
    missing = [name for name in wanted if name not in feed]
    if missing:
        raise ValueError(f"the physics graph needs {missing}")
    return {name: np.ascontiguousarray(feed[name], dtype=np.float32) for name in wanted}


def physics_feed(inputs: tuple[str, ...], amplitude: np.ndarray, phase: np.ndarray,
                 probe: np.ndarray | None, offsets: np.ndarray | None) -> dict[str, np.ndarray]:
    """The physics graph's whole float32 feed: a group's patches (B, C, N, N) and
    :func:`side_feed`."""
    feed = {"amplitude": np.ascontiguousarray(amplitude, dtype=np.float32),
            "phase": np.ascontiguousarray(phase, dtype=np.float32)}
    feed |= side_feed(inputs, len(amplitude), probe, offsets)
    return {name: feed[name] for name in inputs}


@dataclass
class PhysicsSession:
    """physics.onnx of the artifact: the predicted diffraction amplitude of each group's
    anchor pattern. Graphs exported before the probe became an input hold the training
    probe and predict every channel without the overlap step (``takes_probe`` False)."""

    session: Any
    inputs: tuple[str, ...]
    output: str
    batch: int | None
    # the scan's probe broadcast to a batch (host arrays, device values), built once per
    # batch size; the probe itself is kept with them so a new probe is never served stale
    host_probe: dict[int, tuple[Any, dict[str, np.ndarray]]] = field(default_factory=dict,
                                                                     repr=False)
    device_probe: dict[int, tuple[Any, dict[str, Any]]] = field(default_factory=dict,
                                                                repr=False)

    @property
    def takes_probe(self) -> bool:
        return "probe_re" in self.inputs

    @property
    def merges_overlap(self) -> bool:
        return "offsets" in self.inputs

    def _side(self, b: int, probe: np.ndarray | None, offsets: np.ndarray | None
              ) -> dict[str, np.ndarray]:
        """The probe and offsets inputs for a batch of ``b`` (the probe's broadcast copy
        made once per batch size)."""
        cached = self.host_probe.get(b)
        if cached is None or cached[0] is not probe:
            probe_names = tuple(n for n in self.inputs if n.startswith("probe_"))
            cached = (probe, side_feed(probe_names, b, probe, None))
            self.host_probe[b] = cached
        wanted = tuple(n for n in self.inputs if n == "offsets")
        return cached[1] | side_feed(wanted, b, None, offsets)

    def predict(self, amplitude: np.ndarray, phase: np.ndarray, probe: np.ndarray | None,
                offsets: np.ndarray | None = None) -> np.ndarray:
        """(B, 1, N, N) predicted amplitudes of each group's anchor pattern."""
        real = len(amplitude)
        if self.batch is not None and real < self.batch:  # a fixed batch: pad, then drop
            amplitude, phase = fill_batch(amplitude, self.batch), fill_batch(phase, self.batch)
            if offsets is not None:
                offsets = fill_batch(offsets, self.batch)
        feed = {self.inputs[0]: np.ascontiguousarray(amplitude, dtype=np.float32),
                self.inputs[1]: np.ascontiguousarray(phase, dtype=np.float32),
                **self._side(len(amplitude), probe, offsets)}
        return self.session.run([self.output], feed)[0][:real, :1]

    def predict_bound(self, model_outputs: dict[str, Any], probe: np.ndarray | None,
                      offsets: np.ndarray | None, real: int, ort: Any, device: str,
                      device_id: int) -> np.ndarray:
        """As :meth:`predict`, from the model's outputs left on the device (the OrtValues of
        runtime.session.IOBindingRunner.last_outputs, padded to a fixed batch already):
        only the offsets go up (the probe once per batch size), only the (B, 1, N, N)
        prediction comes back."""
        amplitude = model_outputs["amplitude"]
        b = int(amplitude.shape()[0])
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.inputs[0], amplitude)
        binding.bind_ortvalue_input(self.inputs[1], model_outputs["phase"])
        if offsets is not None:
            offsets = fill_batch(offsets, b)
        side = self._side(b, probe, offsets)
        cached = self.device_probe.get(b)
        if cached is None or cached[0] is not probe:
            cached = (probe, {name: ort.OrtValue.ortvalue_from_numpy(value, device, device_id)
                              for name, value in side.items() if name.startswith("probe_")})
            self.device_probe[b] = cached
        for name, value in side.items():
            binding.bind_ortvalue_input(name, cached[1][name] if name in cached[1] else
                                        ort.OrtValue.ortvalue_from_numpy(value, device,
                                                                         device_id))
        binding.bind_output(self.output, device, device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0][:real, :1]

    def describe(self, channels: int) -> dict[str, str]:
        """What the check compares, for the report."""
        probe = ("the scan's own probe, scaled to the training probe's power as training "
                 "scales it" if self.takes_probe else
                 "the training probe (this artifact's physics graph predates the probe "
                 "input: re-export for the scan's own)")
        if channels == 1:
            patches = "each pattern's predicted patch"
        elif self.merges_overlap:
            patches = ("each group's anchor patch (channel 0, the one stitched) after the "
                       "training's overlap step with its neighbours")
        else:
            patches = ("each group's anchor patch (channel 0, the one stitched), without the "
                       "training's overlap step (re-export to include it)")
        return {"patches": patches, "probe_used": probe}


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
    inputs = tuple(str(name) for name in facts.get("inputs") or ("amplitude", "phase"))
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
              probe: np.ndarray, offsets: np.ndarray | None = None,
              positions_px: np.ndarray | None = None, batch: int = 256) -> dict[str, Any]:
        """``measured``: (G, 1, N, N) amplitudes of each group's anchor pattern;
        ``amplitude``/``phase``: the (G, C, N, N) outputs; ``probe`` the scan's;
        ``offsets`` (G, C, 2) at gridsize > 1. As in ptycho-run, each group's anchor patch
        is checked against its own pattern."""
        if self.physics is None:
            return {"status": "not computed", "reason": self.why}
        accumulator = ConsistencyAccumulator()
        step = self.spec.batch or batch
        started = time.perf_counter()
        for start in range(0, len(amplitude), step):
            stop = start + step
            accumulator.add(measured[start:stop, :1], self.physics.predict(
                amplitude[start:stop], phase[start:stop], probe,
                None if offsets is None else offsets[start:stop]))
        accumulator.seconds = time.perf_counter() - started
        report = accumulator.report(positions_px)
        report.update(self.physics.describe(amplitude.shape[1]))
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
