"""Upstream's wts.h5.zip: weights through torch.load(weights_only=True), config read from
its dill pickles without unpickling them (plain_pickle), and exported like a checkpoint."""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ptycho_export.export.plain_pickle import PlainPickleError, read_plain_pickle

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


class _RunsCode:
    """Unpickling this would create a file: the reader must never do it."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # noqa: ANN204
        return (os.makedirs, (str(self.target),))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_plain_values_are_read_and_code_is_skipped_never_run(tmp_path: Path, protocol: int
                                                             ) -> None:
    sentinel = tmp_path / "ran"
    config = {"N": 64, "gridsize": 2, "nphotons": 1e9, "name": "fly64", "flag": True,
              "none": None, "nested": [1.5, ("a", 2)], "table": {"k": [1, 2]},
              "path": pathlib.Path("/data/x"), "code": _RunsCode(sentinel),
              "array": np.zeros(3)}
    value, skipped = read_plain_pickle(pickle.dumps(config, protocol=protocol))
    assert value == {k: config[k] for k in ("N", "gridsize", "nphotons", "name", "flag",
                                            "none", "nested", "table")}
    assert any(s.startswith("'path' (pathlib.") for s in skipped)
    assert any(s.startswith("'code' (") and "makedirs" in s for s in skipped)
    assert any(s.startswith("'array' (") for s in skipped)
    assert not sentinel.exists()


def test_numpy_scalars_are_decoded_from_bytes() -> None:
    value, skipped = read_plain_pickle(pickle.dumps(
        {"scale": np.float64(2.5), "count": np.int32(7), "c": np.complex64(1 - 2j)},
        protocol=4))
    assert value == {"scale": 2.5, "count": 7, "c": 1 - 2j} and skipped == []
    assert isinstance(value["scale"], float)


def test_non_dict_values_and_damage() -> None:
    assert read_plain_pickle(pickle.dumps([1, "a"])) == ([1, "a"], [])
    value, skipped = read_plain_pickle(pickle.dumps(pathlib.Path("/x")))
    assert value is None and skipped[0].startswith("the whole value (pathlib.")
    blob = pickle.dumps({"a": list(range(50))})
    with pytest.raises(PlainPickleError, match="not a readable pickle"):
        read_plain_pickle(blob[: len(blob) // 2])


# ---------------------------------------------------------------- the bundle
def _tiny_model():  # noqa: ANN202
    from test_export_foreign import ComplexExp

    return ComplexExp().eval()


def _bundle(path: Path, weights: bytes, params: dict, models=("autoencoder",  # noqa: ANN001
                                                               "diffraction_to_obj")) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("manifest.dill", pickle.dumps({"models": list(models),
                                                        "version": "2.0-pytorch"}))
        for name in models:
            archive.writestr(f"{name}/model.pth", weights)
            archive.writestr(f"{name}/params.dill", pickle.dumps(params))
    return path


def _weights(state: dict) -> bytes:
    blob = io.BytesIO()
    torch.save(state, blob)
    return blob.getvalue()


def test_upstream_bundle_exports_and_is_parity_checked(tmp_path: Path) -> None:
    from ptycho_export.data.simulate import SimulationConfig, simulate_scan
    from ptycho_export.export.foreign import export_foreign_command
    from ptycho_export.parity_report import run_parity_check
    from runtime.scan import save_scan

    model = _tiny_model()
    sentinel = tmp_path / "ran"
    bundle = _bundle(tmp_path / "wts.h5.zip", _weights(model.state_dict()),
                     {"N": 16, "gridsize": 1, "intensity_scale": np.float64(12.5),
                      "output_prefix": pathlib.Path("/runs/a"), "hook": _RunsCode(sentinel)})
    out = tmp_path / "art"
    result = export_foreign_command("test_export_foreign:ComplexExp", out, checkpoint=bundle,
                                    formats="onnx,pt2")
    source = result.manifest["source"]
    assert result.manifest["adapter"]["input_shape"] == [1, 16, 16]  # from the config
    assert source["checkpoint"]["member"] == "diffraction_to_obj"
    assert source["bundle_config"] == {"N": 16, "gridsize": 1, "intensity_scale": 12.5}
    (note,) = [n for n in result.manifest["notes"] if "upstream bundle" in n]
    assert "without unpickling" in note and "not used: autoencoder" in note
    assert "'output_prefix' (pathlib." in note and "'hook' (" in note
    assert not sentinel.exists()
    scan_path = tmp_path / "scan.npz"
    save_scan(scan_path, simulate_scan(SimulationConfig(
        patch_size=16, grid_shape=(4, 4), step_px=3, probe_diameter_px=8, defocus=2)))
    report = run_parity_check(bundle, out, scan_path, tmp_path / "parity", cuda=False)
    assert report["status"] == "PASS"


def test_bundle_weights_that_need_code_are_refused(tmp_path: Path) -> None:
    from ptycho_export.export.foreign import CheckpointError, load_model

    blob = io.BytesIO()
    torch.save({"weights": torch.zeros(2), "when": pathlib.Path("/x")}, blob)
    bundle = _bundle(tmp_path / "wts.h5.zip", blob.getvalue(), {"N": 16},
                     models=("diffraction_to_obj",))
    with pytest.raises(CheckpointError) as caught:
        load_model("test_export_foreign:ComplexExp", bundle)
    message = str(caught.value)
    assert message.startswith(f"{bundle}:diffraction_to_obj/model.pth: cannot be loaded safely")
    assert "pathlib" in message
