"""End-to-end: simulate -> train (Lightning) -> bundle -> eager reconstruction beats a baseline."""

import json
import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

from ptycho_export.data.simulate import SimulationConfig, simulate_scan
from runtime.scan import save_scan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from ptycho_export.train import TrainOptions, train

    folder = tmp_path_factory.mktemp("train")
    scan = simulate_scan(SimulationConfig(
        patch_size=32, grid_shape=(16, 16), step_px=4, probe_diameter_px=12.8, defocus=3.2,
        object_kind="smooth", seed=1))
    save_scan(folder / "scan.npz", scan)
    # the default preset and object guide, as a user gets them; 30 epochs = 480 steps
    options = TrainOptions(epochs=30, batch_size=16, seed=0,
                           accelerator="cpu", devices=1, progress=False)
    result = train(folder / "scan.npz", folder / "bundle.zip", folder / "run", options)
    return folder, scan, result


def test_reconstruction_beats_flat_baseline_by_a_clear_margin(trained):
    _, _, result = trained
    model, flat = result.quality["model"], result.quality["flat_baseline"]
    # Stated margins (measured: phase RMSE 0.24 vs 0.75 rad, complex NRMSE 0.26 vs 0.66,
    # phase correlation 0.96; the small CNN without the guide: 0.46 rad, 0.44, 0.82).
    assert model["phase_rmse_rad"] < 0.5 * flat["phase_rmse_rad"]
    assert model["complex_nrmse"] < 0.6 * flat["complex_nrmse"]
    assert model["phase_corr"] > 0.85
    assert result.quality["verdict"]["phase_beats_flat"]


def test_report_scores_the_object_solve_as_the_networks_ceiling(trained):
    """The training-only object solve is scored like the network: on this scan it is at
    least as good as the network that was trained to agree with it."""
    _, _, result = trained
    solve, model = result.quality["object_solve"], result.quality["model"]
    assert set(solve) >= {"amplitude_ssim", "amplitude_corr", "phase_corr"}
    assert solve["phase_corr"] > 0.95
    assert solve["phase_corr"] >= model["phase_corr"] - 0.01
    assert solve["amplitude_ssim"] >= model["amplitude_ssim"] - 0.01


def test_training_lowers_the_loss_and_writes_the_run_folder(trained):
    folder, _, result = trained
    losses = [row["train_loss"] for row in result.history]
    assert len(losses) == 30
    assert losses[-1] < 0.7 * losses[0]
    run = folder / "run"
    for name in ("loss_curve.png", "quality.json", "history.json", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    quality = json.loads((run / "quality.json").read_text())
    assert quality["model"]["phase_corr"] == pytest.approx(result.quality["model"]["phase_corr"])


def test_bundle_reproduces_its_golden_outputs_and_normalisation(trained):
    from ptycho_export.bundle import load_predictor, read_bundle
    from ptycho_export.normalization import compute_normalization

    folder, scan, _ = trained
    bundle = read_bundle(folder / "bundle.zip")
    expected = compute_normalization(scan.amplitudes, scan.probe)
    assert bundle.normalization == expected
    predictor = load_predictor(bundle, "cpu")
    amplitude, phase = predictor.predict(bundle.golden["amplitudes"])
    np.testing.assert_array_equal(amplitude, bundle.golden["amplitude"])
    np.testing.assert_array_equal(phase, bundle.golden["phase"])
    # float64 input from a careless caller gives the same answer: the loader casts once.
    amp64, _ = predictor.predict(bundle.golden["amplitudes"].astype(np.float64))
    np.testing.assert_array_equal(amp64, amplitude)
    assert bundle.data["n_patterns"] == scan.n_patterns


def test_resume_continues_from_the_last_checkpoint(trained, tmp_path):
    from ptycho_export.train import TrainOptions, train

    folder, scan, _ = trained
    options = TrainOptions(epochs=32, batch_size=16, accelerator="cpu",
                           devices=1, progress=False, resume=True)
    result = train(folder / "scan.npz", tmp_path / "resumed.zip", folder / "run", options,
                   scan=scan)
    # Only the two missing epochs ran.
    assert len(result.history) == 2


def test_train_cli_tiny_run_and_bad_input(tmp_path, capfd):
    from cli.train import app

    scan = simulate_scan(SimulationConfig(patch_size=32, grid_shape=(4, 4), step_px=4,
                                          probe_diameter_px=12, defocus=3))
    save_scan(tmp_path / "scan.npz", scan)
    runner = CliRunner()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = runner.invoke(app, [str(tmp_path / "scan.npz"), "-o",
                                     str(tmp_path / "b.zip"), "--epochs", "1", "--preset",
                                     "tiny", "--no-progress", "--accelerator", "cpu",
                                     "--devices", "1"])
    assert result.exit_code == 0, result.output
    # No advert and no torch-vs-Lightning deprecation noise reaches the user.
    printed = result.output + "".join(capfd.readouterr())
    assert "litlogger" not in printed and "LeafSpec" not in printed
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
    assert (tmp_path / "b.zip").is_file()
    assert "phase SSIM" in result.output and "FRC" in result.output
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    bad = runner.invoke(app, [str(tmp_path / "bad.npz"), "-o", str(tmp_path / "c.zip")])
    assert bad.exit_code == 3
    assert "bad.npz" in bad.stderr and bad.stderr.count("\n") == 1
    assert not (tmp_path / "c.zip").exists()


def test_gridsize_two_trains_and_exports_four_channels(tmp_path):
    from ptycho_export.bundle import read_bundle
    from ptycho_export.train import TrainOptions, train

    scan = simulate_scan(SimulationConfig(patch_size=32, grid_shape=(5, 5), step_px=4,
                                          probe_diameter_px=12, defocus=3))
    save_scan(tmp_path / "scan.npz", scan)
    result = train(tmp_path / "scan.npz", tmp_path / "b.zip", None,
                   TrainOptions(epochs=1, preset="tiny", gridsize=2, progress=False,
                                accelerator="cpu", devices=1))
    bundle = read_bundle(result.bundle_path)
    assert bundle.config.channels == 4
    assert bundle.golden["amplitudes"].shape[1:] == (4, 32, 32)
    assert np.isfinite(result.history[-1]["train_loss"])


def test_quick_demo_runs_every_stage(tmp_path):
    from ptycho_export.demo import DemoSettings, run_demo

    lines = []
    report = run_demo(tmp_path / "demo", DemoSettings.quick(), progress=False,
                      log=lines.append)
    for name in ("scan.npz", "bundle.zip", "amplitude.png", "phase.png", "object_eager.npz",
                 "demo_report.json", "export/model.onnx", "export/manifest.json",
                 "run_onnx/object.npz", "run_onnx/product.h5", "export/probe.npy",
                 "run_onnx/amplitude.png", "run_onnx/consistency.png",
                 "run_smooth/consistency.png", "refined_amplitude.png", "refined_phase.png",
                 "run_refined/object.npz"):
        assert (tmp_path / "demo" / name).is_file(), name
    consistency = report["consistency"]
    assert consistency["training_scan"]["median_r_factor"] > 0
    assert consistency["smooth_scan"]["median_r_factor"] > 0
    assert any("[data consistency] median R-factor" in line for line in lines)
    assert report["quality"]["ground_truth"] is True
    assert any("parity gate PASS" in line for line in lines)
    assert any("self-check PASS" in line for line in lines)
    assert report["stitched_parity_onnx_vs_eager"]["rel_max"] < 1e-5
    # ptycho-run --refine: the fit to the measurements improves, and is scored
    refined = report["refined"]
    assert refined["max_iterations"] == 30 and 5 <= refined["iterations"] <= 30
    assert refined["r_factor"]["end"] < 0.8 * refined["r_factor"]["start"]
    assert refined["quality"]["model"]["phase_corr"] > report["quality"]["model"]["phase_corr"]
    assert any("[refine] ptycho-run --refine 30" in line for line in lines)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_train_asking_for_a_missing_gpu_is_one_line_exit_4(tmp_path):
    """Lightning's MisconfigurationException used to escape as a traceback (exit 1)."""
    from cli.train import app

    scan = simulate_scan(SimulationConfig(patch_size=32, grid_shape=(3, 3), step_px=4,
                                          probe_diameter_px=12, defocus=3))
    save_scan(tmp_path / "scan.npz", scan)
    result = CliRunner().invoke(app, [str(tmp_path / "scan.npz"), "-o", str(tmp_path / "b.zip"),
                                      "--accelerator", "gpu", "--epochs", "1", "--no-progress"])
    assert result.exit_code == 4, result.output
    assert result.stderr.count("\n") == 1
    assert "--accelerator gpu" in result.stderr and "--accelerator cpu" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.npz"]  # no bundle, no run folder


def test_plan_steps_divides_the_budget_by_the_measured_step_time():
    from ptycho_export.train import LIGHTNING_OVERHEAD, MAX_STEPS, MIN_STEPS, plan_steps

    assert plan_steps(100.0, 0.1) == int(100.0 / (0.1 * LIGHTNING_OVERHEAD))
    assert plan_steps(1.0, 1.0) == MIN_STEPS
    assert plan_steps(1e9, 1e-3) == MAX_STEPS


def test_time_budget_plans_the_steps_and_reports_the_fit(tmp_path):
    """No epochs or steps: the tool times a step, plans what fits in --max-minutes, trains
    exactly that many steps, and compares the final likelihood with the Poisson floor."""
    from ptycho_export.train import TrainOptions, train

    scan = simulate_scan(SimulationConfig(patch_size=32, grid_shape=(5, 5), step_px=4,
                                          probe_diameter_px=12, defocus=3))
    save_scan(tmp_path / "scan.npz", scan)
    result = train(tmp_path / "scan.npz", tmp_path / "b.zip", None,
                   TrainOptions(max_minutes=0.2, preset="unet-tiny", solver_steps=100,
                                progress=False, accelerator="cpu", devices=1))
    assert "fits in" in result.plan_how and "ms per step" in result.plan_how
    planned = int(result.plan_how.split()[0])
    assert result.steps == planned >= 200
    assert result.seconds < 0.2 * 60 * 1.25 + 30 + 20  # the cap, plus reporting
    fit = result.quality["fit"]
    assert fit["poisson_floor"] > 0 and fit["likelihood_over_floor"] > 1


def test_unknown_preset_is_one_line_exit_2_and_writes_nothing(tmp_path):
    from cli.train import app

    scan = simulate_scan(SimulationConfig(patch_size=32, grid_shape=(4, 4), step_px=4,
                                          probe_diameter_px=12, defocus=3))
    save_scan(tmp_path / "scan.npz", scan)
    result = CliRunner().invoke(app, [str(tmp_path / "scan.npz"), "-o", str(tmp_path / "b.zip"),
                                      "--preset", "huge"])
    assert result.exit_code == 2
    assert "unknown preset 'huge'" in result.stderr and result.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.npz"]
