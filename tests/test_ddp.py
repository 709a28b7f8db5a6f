"""Lightning's own DDP (gloo on CPU, 2 processes) trains the model; only rank 0 writes."""

import numpy as np
import pytest
import torch

from ptycho_export.data.simulate import SimulationConfig, simulate_scan
from runtime.scan import save_scan

pytestmark = pytest.mark.slow


def _train(tmp_path, name, devices, strategy):
    from ptycho_export.train import TrainOptions, train

    return train(tmp_path / "scan.npz", tmp_path / f"{name}.zip", tmp_path / f"{name}_run",
                 TrainOptions(epochs=2, preset="tiny", batch_size=16, progress=False,
                              accelerator="cpu", devices=devices, strategy=strategy))


def test_two_process_ddp_shards_the_data_and_its_bundle_exports(tmp_path):
    from ptycho_export.bundle import read_bundle
    from ptycho_export.export.pipeline import ExportOptions, export_bundle

    scan = simulate_scan(SimulationConfig(patch_size=32, grid_shape=(6, 6), step_px=4,
                                          probe_diameter_px=12, defocus=3))
    save_scan(tmp_path / "scan.npz", scan)
    ddp = _train(tmp_path, "ddp", 2, "ddp_spawn")
    single = _train(tmp_path, "single", 1, "auto")

    # 36 patterns -> 32 for training: 16 per rank = 1 step of 16 per epoch on each of the
    # two ranks (each pattern once per epoch overall), against 2 steps in one process.
    def steps(result):
        checkpoint = torch.load(result.run_dir / "checkpoints" / "last.ckpt",
                                map_location="cpu", weights_only=False)  # our own run file
        return checkpoint["global_step"]

    assert steps(ddp) == 2
    assert steps(single) == 4
    assert [row["epoch"] for row in ddp.history] == [0.0, 1.0]
    assert all(np.isfinite(row["train_loss"]) for row in ddp.history)
    # Only rank 0 wrote: exactly one bundle, which loads and exports like the single one.
    assert sorted(p.name for p in tmp_path.glob("*.zip")) == ["ddp.zip", "single.zip"]
    bundle = read_bundle(ddp.bundle_path)
    assert bundle.config == read_bundle(single.bundle_path).config
    exported = export_bundle(ddp.bundle_path, tmp_path / "export",
                             ExportOptions(formats=["onnx"]))
    assert exported.manifest["parity"]["status"] == "PASS"
