"""Shared fixtures. Torch is imported inside the fixtures only, so the torch-free runtime
tests still collect and run on a base install (bundle tests are then skipped)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

TINY_PATCH = 32
GOLDEN_COUNT = 4


@dataclass(frozen=True)
class TinyParts:
    """Everything that went into the tiny bundle, to compare what comes back."""

    config: Any  # ModelConfig
    normalization: Any  # Normalization
    state_dict: dict[str, Any]  # name -> torch.Tensor (float32, cpu)
    probe: np.ndarray
    golden: dict[str, np.ndarray]
    training: dict[str, Any]
    data: dict[str, Any]


def make_probe(n: int) -> np.ndarray:
    """A smooth complex64 disc-like probe with a phase curvature."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) - (n - 1) / 2
    r2 = (yy**2 + xx**2) / (n / 4) ** 2
    return (np.exp(-r2) * np.exp(1j * 0.3 * r2)).astype(np.complex64)


@pytest.fixture(scope="session")
def tiny_parts() -> TinyParts:
    """A seeded, untrained tiny PtychoNet and the rest of a bundle's contents."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from ptycho_export.model.config import ModelConfig
    from ptycho_export.model.generator import PtychoNet
    from ptycho_export.normalization import Normalization

    config = ModelConfig.from_preset("tiny", TINY_PATCH)
    normalization = Normalization(amplitude_scale=0.5, probe_scale=2.0)
    torch.manual_seed(1234)
    net = PtychoNet(config, normalization.amplitude_scale).eval()
    rng = np.random.default_rng(1234)
    amplitudes = rng.uniform(0.0, 4.0, (GOLDEN_COUNT, 1, TINY_PATCH, TINY_PATCH))
    amplitudes = amplitudes.astype(np.float32)
    with torch.no_grad():
        amplitude, phase = net(torch.from_numpy(amplitudes))
    golden = {"amplitudes": amplitudes, "amplitude": amplitude.numpy(), "phase": phase.numpy()}
    state_dict = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return TinyParts(config=config, normalization=normalization, state_dict=state_dict,
                     probe=make_probe(TINY_PATCH), golden=golden,
                     training={"epochs": 1}, data={"source": "test"})


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_parts: TinyParts) -> Path:
    """A valid bundle of the tiny model, written without training (read-only by convention:
    tests that tamper copy it with `helpers.rewrite_bundle`)."""
    from ptycho_export.bundle import write_bundle

    path = tmp_path_factory.mktemp("bundle") / "tiny.zip"
    return write_bundle(path, config=tiny_parts.config, normalization=tiny_parts.normalization,
                        state_dict=tiny_parts.state_dict, probe=tiny_parts.probe,
                        golden=tiny_parts.golden, training=tiny_parts.training,
                        data=tiny_parts.data)


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CNN trained 150 steps (about 5 s on 2 cores) on a simulated 8 x 8 scan: a
    model that responds to its input, for tests of what the parity gate can see (the
    untrained tiny fixture's output barely depends on its input). Measured: amplitude std
    0.024 and phase std 0.58 over its golden patterns, phase correlation 0.80."""
    pytest.importorskip("torch")
    pytest.importorskip("lightning")
    from ptycho_export.data.simulate import SimulationConfig, simulate_scan
    from ptycho_export.train import TrainOptions, train
    from runtime.scan import save_scan

    folder = tmp_path_factory.mktemp("trained")
    scan = simulate_scan(SimulationConfig(
        patch_size=TINY_PATCH, grid_shape=(8, 8), step_px=4, probe_diameter_px=12.8,
        defocus=3.2, object_kind="smooth", seed=3))
    save_scan(folder / "scan.npz", scan)
    options = TrainOptions(preset="small", steps=150, guide=False, seed=0,
                           accelerator="cpu", devices=1, progress=False)
    train(folder / "scan.npz", folder / "trained.zip", folder / "run", options)
    return folder / "trained.zip"
