"""ptycho-train --init: an earlier bundle's learned weights, the new scan's probe and scales."""

import numpy as np
import pytest
from typer.testing import CliRunner

from ptycho_export.data.simulate import SimulationConfig, simulate_scan
from runtime.scan import save_scan

pytest.importorskip("lightning")


def _scan(seed: int, diameter: float, photons: float):
    return simulate_scan(SimulationConfig(
        patch_size=32, grid_shape=(10, 10), step_px=4, probe_diameter_px=diameter,
        defocus=3.0, object_kind="smooth", photons_per_pattern=photons, seed=seed))


def _options(**values):
    from ptycho_export.train import TrainOptions

    return TrainOptions(**{"preset": "unet-tiny", "batch_size": 16, "seed": 0,
                           "accelerator": "cpu", "devices": 1, "progress": False,
                           "golden_count": 4, **values})


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Scan A and its trained bundle; scan B: another object, probe and dose."""
    from ptycho_export.train import train

    folder = tmp_path_factory.mktemp("warm")
    save_scan(folder / "a.npz", _scan(1, 12.0, 1e6))
    save_scan(folder / "b.npz", _scan(2, 10.0, 1e5))
    train(folder / "a.npz", folder / "a.zip", folder / "a_run", _options(steps=240))
    return folder


def test_init_carries_the_weights_and_keeps_the_new_scans_probe_and_scale(scans, tmp_path):
    from ptycho_export.bundle import read_bundle, sha256_file
    from ptycho_export.train import train

    # learning rate 0: the run changes nothing, so the new bundle shows what was loaded
    train(scans / "b.npz", tmp_path / "warm.zip", tmp_path / "warm_run",
          _options(steps=1, learning_rate=0.0, init_from=str(scans / "a.zip")))
    train(scans / "b.npz", tmp_path / "cold.zip", tmp_path / "cold_run",
          _options(steps=1, learning_rate=0.0))
    a, warm, cold = (read_bundle(p) for p in (scans / "a.zip", tmp_path / "warm.zip",
                                               tmp_path / "cold.zip"))
    from ptycho_export.model.generator import PtychoNet

    learned = {name for name, _ in PtychoNet(a.config).named_parameters()}
    buffers = set(a.state_dict) - learned
    assert learned and buffers >= {"amplitude_scale"}
    for name in learned:
        np.testing.assert_array_equal(warm.state_dict[name].numpy(), a.state_dict[name].numpy())
    for name in buffers:  # B's probe and flux, as a cold start on B computes them
        np.testing.assert_array_equal(warm.state_dict[name].numpy(),
                                      cold.state_dict[name].numpy())
    assert not np.allclose(warm.state_dict["amplitude_scale"].numpy(),
                           a.state_dict["amplitude_scale"].numpy())
    assert warm.training["init_from"] == {"bundle": "a.zip",
                                          "sha256": sha256_file(scans / "a.zip")}
    assert cold.training["init_from"] is None


def test_a_warm_start_begins_where_the_earlier_model_left_off(scans, tmp_path):
    """On another scan of the same kind, the first epoch from A's weights has a far lower
    loss than from random ones, and the end of the same short run is better too."""
    from ptycho_export.train import train

    warm = train(scans / "b.npz", tmp_path / "w.zip", tmp_path / "w_run",
                 _options(epochs=4, init_from=str(scans / "a.zip")))
    cold = train(scans / "b.npz", tmp_path / "c.zip", tmp_path / "c_run", _options(epochs=4))
    first_warm, first_cold = warm.history[0]["train_loss"], cold.history[0]["train_loss"]
    # measured: 0.250 against 1.148 in the first epoch, 0.224 against 1.050 after four;
    # phase corr of the reconstruction 0.68 against 0.29
    assert first_warm < 0.35 * first_cold
    assert warm.history[-1]["train_loss"] < 0.4 * cold.history[-1]["train_loss"]
    assert warm.quality["model"]["phase_corr"] > cold.quality["model"]["phase_corr"] + 0.2


def test_init_from_another_model_is_one_line_exit_2_and_writes_nothing(scans, tmp_path):
    from cli.train import app

    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(app, [str(scans / "b.npz"), "-o", str(out / "b.zip"),
                                      "--init", str(scans / "a.zip"), "--preset", "default"])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert line.count("\n") == 0 and str(scans / "a.zip") in line
    assert "widths [4, 8, 16]" in line and "widths [16, 32, 64]" in line
    assert list(out.iterdir()) == []


def test_init_and_resume_together_are_refused(scans, tmp_path):
    from ptycho_export.export.formats import UsageError
    from ptycho_export.train import train

    with pytest.raises(UsageError, match="--init and --resume"):
        train(scans / "b.npz", tmp_path / "b.zip", tmp_path / "run",
              _options(steps=1, resume=True, init_from=str(scans / "a.zip")))
    assert not (tmp_path / "run").exists()
