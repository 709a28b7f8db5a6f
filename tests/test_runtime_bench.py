"""bench/runtime_bench.py in quick mode: structure and sanity of what it writes, never speed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import runtime.bench as runtime_bench_parts
from bench import runtime_bench


def test_quick_run_writes_json_and_markdown(tmp_path: Path) -> None:
    assert runtime_bench.main(["--quick", "--skip-install", "--skip-cold-start",
                               "--machine", "test", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runtime-test.json",
                                                          "runtime-test.md"]
    data = json.loads((tmp_path / "runtime-test.json").read_text())
    assert data["schema"] == runtime_bench.SCHEMA
    s = data["stitch_10k"]
    assert s["patches"] == 1000 and set(s["configs"]) >= {"float32 + prefetch (default)",
                                                          "float64 canvas, no prefetch"}
    assert all(row["s_min"] > 0 for row in s["configs"].values())
    assert s["float32_vs_float64_max_abs_over_max"] < 1e-6
    t = data["stitch_stream"]
    assert t["patches"] == 5000 and t["peak_rss_mb"] >= t["rss_before_mb"] > 0
    text = (tmp_path / "runtime-test.md").read_text()
    assert "Stitcher: 1,000 patches" in text and "streamed in batches of 1000" in text


def test_stream_is_bounded_and_covers_the_scan() -> None:
    batches = list(runtime_bench_parts._stream(2500, 16, 1000, 0))
    assert [len(p) for p, _ in batches] == [1000, 1000, 500]
    positions = np.concatenate([q for _, q in batches])
    np.testing.assert_array_equal(positions, runtime_bench_parts.raster(2500, 16, 0))
    assert np.shares_memory(batches[0][0], batches[2][0])  # one reused pool


def test_cold_start_on_a_tiny_artifact(tmp_path: Path, tiny_bundle: Path) -> None:
    pytest.importorskip("onnx")
    from ptycho_export.export import ExportOptions, export_bundle

    artifact = tmp_path / "artifact"
    export_bundle(tiny_bundle, artifact, ExportOptions(formats=["onnx"]))
    batch = tmp_path / "batch.npy"
    np.save(batch, np.ones((4, 1, 32, 32), np.float32))
    result = runtime_bench_parts.bench_cold_start(artifact, batch, 1, log=lambda _: None)
    assert result["batch"] == 4 and result["torch_imported"] is False
    summary = result["summary"]
    assert summary["process_wall_s"]["median"] >= summary["in_process_s"]["median"] > 0
