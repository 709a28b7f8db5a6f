"""Many scans: sequential vs a Dask LocalCluster of 2 workers; a corrupt scan fails alone."""

import numpy as np
import pytest
from typer.testing import CliRunner

from ptycho_export.data.simulate import SimulationConfig, simulate_scan
from runtime.many import expand_inputs, run_many
from runtime.scan import save_scan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def night(tiny_bundle, tmp_path_factory):
    from ptycho_export.export.pipeline import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("night")
    export_bundle(tiny_bundle, root / "art", ExportOptions(formats=["onnx"]))
    (root / "scans").mkdir()
    for seed in range(4):
        scan = simulate_scan(SimulationConfig(patch_size=32, grid_shape=(5, 5), step_px=4,
                                              probe_diameter_px=12, defocus=3, seed=seed))
        save_scan(root / "scans" / f"scan{seed}.npz", scan)
    return root


def _objects(outcomes):
    result = {}
    for outcome in outcomes:
        with np.load(f"{outcome.outdir}/object.npz", allow_pickle=False) as f:
            result[outcome.data.split("/")[-1]] = (f["object"], f["mask"], f["origin_px"])
    return result


def test_local_cluster_matches_the_sequential_run(night, tmp_path):
    files = expand_inputs([str(night / "scans" / "*.npz")])
    assert [f.name for f in files] == [f"scan{i}.npz" for i in range(4)]
    options = {"provider": "cpu", "threads": 1}
    sequential = run_many(night / "art", files, tmp_path / "seq", options, log=lambda _: None)
    parallel = run_many(night / "art", files, tmp_path / "par", options, "local:2",
                        log=lambda _: None)
    assert [o.status for o in sequential] == [o.status for o in parallel] == ["ok"] * 4
    seq, par = _objects(sequential), _objects(parallel)
    for name in seq:
        for a, b in zip(seq[name], par[name], strict=True):
            np.testing.assert_array_equal(a, b)
        # Same PNG bytes too: the pictures are deterministic functions of the object.
        assert (tmp_path / "seq" / f"{name[:-4]}_recon" / "phase.png").read_bytes() == \
            (tmp_path / "par" / f"{name[:-4]}_recon" / "phase.png").read_bytes()


def test_a_corrupt_scan_fails_alone_with_its_reason(night, tmp_path):
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    files = [night / "scans" / "scan0.npz", bad, night / "scans" / "scan1.npz"]
    outcomes = run_many(night / "art", files, tmp_path / "out", {"provider": "cpu"},
                        "local:2", log=lambda _: None)
    assert [o.status for o in outcomes] == ["ok", "failed", "ok"]
    assert "broken.npz" in outcomes[1].error
    assert not (tmp_path / "out" / "broken_recon").exists()


def test_cli_runs_several_scans_and_exits_3_when_one_fails(night, tmp_path):
    from cli.run import app

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"nope")
    result = CliRunner().invoke(app, [str(night / "art"), str(night / "scans" / "scan2.npz"),
                                      str(bad), "-o", str(tmp_path / "out"),
                                      "--provider", "cpu", "--no-progress"])
    assert result.exit_code == 3, result.output
    assert "1 of 2 scans failed" in result.stderr and "bad.npz" in result.stderr
    assert (tmp_path / "out" / "scan2_recon" / "object.npz").is_file()


def test_a_glob_matching_nothing_is_an_error(tmp_path):
    from runtime.many import SchedulerError

    with pytest.raises(SchedulerError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.npz")])


def test_summary_rows_show_each_scans_residual_against_training():
    from runtime.many import SUMMARY_COLUMNS, ScanOutcome, summary_rows

    def outcome(name, consistency):
        return ScanOutcome(name, f"/out/{name}", "ok", patterns=100, patterns_per_s=900.0,
                           seconds=1.5, report={"consistency": consistency})

    rows = summary_rows([
        outcome("a.npz", {"r_factor": {"median": 0.1234}, "outliers": 2,
                          "reference": {"out_of_distribution": False}}),
        outcome("b.npz", {"r_factor": {"median": 0.41}, "outliers": 0,
                          "reference": {"out_of_distribution": True}}),
        outcome("c.npz", {"status": "not computed"}),
        ScanOutcome("d.npz", "/out/d", "failed", error="d.npz: not a zip file"),
    ])
    assert all(len(row) == len(SUMMARY_COLUMNS) for row in rows)
    col = {name: i for i, name in enumerate(SUMMARY_COLUMNS)}
    assert [r[col["median R"]] for r in rows] == ["0.123", "0.410", "", ""]
    assert [r[col["outliers"]] for r in rows] == ["2", "0", "", ""]
    assert [r[col["vs training"]] for r in rows] == ["in range", "OUTSIDE", "", ""]
    assert rows[3][col["output / error"]] == "d.npz: not a zip file"
