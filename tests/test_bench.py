"""ptycho-bench in --quick mode: structure and sanity of its numbers, never their speed.

One quick run (tiny model, N = 32, batch 8, one round) goes through the CLI into a temp
folder; the tests read what it wrote. No test compares a timing with a threshold: on a
shared 2-core machine that would only measure the neighbours.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("safetensors")

from typer.testing import CliRunner  # noqa: E402

from cli.bench import app, load_bench, parse_batch_sizes  # noqa: E402

bench = load_bench()
MACHINE = "test-machine"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench-results")
    result = CliRunner().invoke(app, ["--quick", "--no-gpu", "--machine", MACHINE,
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / f"{MACHINE}.json").read_text()), out


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return []


def test_writes_json_and_markdown_atomically(quick_run: tuple[dict[str, Any], Path]) -> None:
    data, out = quick_run
    assert sorted(p.name for p in out.iterdir()) == [f"{MACHINE}.json", f"{MACHINE}.md"]
    assert data["schema"] == bench.SCHEMA and data["machine"] == MACHINE
    for key in ("env", "model", "peak", "cpu", "gpu", "stitch", "end_to_end", "targets",
                "timing", "seconds_total", "peak_rss_mb_process"):
        assert key in data, key
    assert data["gpu"]["status"] == "skipped"
    assert data["env"]["versions"]["torch"] and data["env"]["cpu"]["usable_cores"] >= 1


def test_every_runtime_measured_on_the_same_inputs(quick_run: tuple[dict[str, Any], Path]
                                                   ) -> None:
    data, _ = quick_run
    rows = data["cpu"]["results"]["8"]
    assert list(rows)[0] == bench.BASELINE
    kinds = {data["cpu"]["runners"][name]["kind"] for name in rows}
    assert kinds == {"eager", "torchscript", "pt2", "onnxruntime"}
    assert "eager channels_last" in rows
    assert rows[bench.BASELINE]["ratio_to_baseline"] == 1.0
    for name, row in rows.items():
        assert row["batch"] == 8 and row["rounds"] == 1, name
        for key in ("ms_median", "patterns_per_s", "ratio_to_baseline", "achieved_gflops",
                    "peak_rss_mb"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key)
        assert 0 < row["peak_fraction"] < 1, name  # a quick run is nowhere near peak
        # Same inputs: every runtime agrees with eager (random tiny model, fp32).
        assert row["max_abs_diff_vs_baseline"] < 1e-3, name


def test_all_numbers_finite_and_non_negative(quick_run: tuple[dict[str, Any], Path]) -> None:
    data, _ = quick_run
    values = _numbers({k: v for k, v in data.items() if k != "config"})
    assert values and all(math.isfinite(v) and v >= 0 for v in values)


def test_sweep_stitch_end_to_end_and_targets(quick_run: tuple[dict[str, Any], Path]) -> None:
    data, _ = quick_run
    sweep = data["cpu"]["ort_sweep"]
    assert sweep["best"] in sweep["rows"] and bench.SWEEP_BASELINE in sweep["rows"]
    names = set(sweep["rows"])
    assert {"DISABLE_ALL", "BASIC", "EXTENDED", "ALL, threads 1", "ALL, spinning 0"} <= names
    assert data["cpu"]["ort_best"] == sweep["best"]
    assert data["stitch"]["patches"] == 200 and data["stitch"]["patches_per_s"] > 0
    e2e = data["end_to_end"]
    assert e2e["patterns"] == 36 and e2e["patterns_per_s"] > 0
    assert len(data["targets"]) == 2
    for target in data["targets"]:
        assert isinstance(target["met"], bool) and target["measured"] > 0


def test_markdown_report(quick_run: tuple[dict[str, Any], Path]) -> None:
    _, out = quick_run
    text = (out / f"{MACHINE}.md").read_text()
    assert text.startswith(f"# ptycho-bench: {MACHINE}")
    assert "| " + " | ".join(bench.HEADLINE_COLUMNS) + " |" in text
    assert "## onnxruntime CPU settings" in text and "### Targets" in text
    assert "GPU" in text and "Skipped" in text


def test_conv_flops_of_tiny_model_by_hand() -> None:
    from ptycho_export.model import ModelConfig, PtychoNet

    config = ModelConfig.from_preset("tiny", 32)  # widths (4, 8, 16)

    def conv(cin: int, cout: int, hw: int, k: int = 3) -> int:
        return 2 * cin * cout * k * k * hw * hw

    encoder = (conv(1, 4, 32) + conv(4, 4, 32) + conv(4, 8, 16) + conv(8, 8, 16)
               + conv(8, 16, 8) + conv(16, 16, 8))
    decoder = (conv(16, 8, 8) + conv(8, 8, 8) + conv(8, 4, 16) + conv(4, 4, 16)
               + conv(4, 2, 32) + conv(2, 2, 32) + conv(2, 1, 32, k=1))
    count = bench.conv_flops(PtychoNet(config).eval(), (1, 32, 32))
    assert count.per_pattern == encoder + 2 * decoder
    assert len(count.layers) == 6 + 2 * 7


def test_conv_flops_groups_and_stride() -> None:
    from torch import nn

    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4))
    count = bench.conv_flops(model, (4, 10, 10))
    assert count.per_pattern == 2 * 4 * 8 * 9 * 100 + 2 * 2 * 8 * 9 * 25


def test_cpu_peak_and_machine_name() -> None:
    cpu = {"model": "Intel(R) Xeon(R) Platinum 8480C CPU @ 2.00GHz", "usable_cores": 2,
           "isa_flags": ["avx512f", "avx2", "fma"], "mhz": 2000.0, "mhz_source": "test"}
    assert bench.cpu_peak(cpu, 2)["gflops"] == 64 * 2 * 2.0
    assert bench.cpu_peak({**cpu, "isa_flags": ["avx2", "fma"]}, 4)["gflops"] == 32 * 4 * 2.0
    assert bench.cpu_peak({**cpu, "mhz": None}, 2)["gflops"] is None
    assert bench.default_machine_name(cpu) == "cpu-2core-intel-xeon-platinum-8480c"
    assert bench.default_machine_name(cpu, "NVIDIA H100 80GB HBM3").startswith(
        "gpu-nvidia-h100-80gb-hbm3-")
    assert bench.gpu_peak("NVIDIA H100 PCIe")["fp32_tflops"] == 51.2
    assert bench.gpu_peak("NVIDIA H100 80GB HBM3")["tf32_tflops"] == 494.7
    assert bench.gpu_peak("Some Future GPU")["fp32_tflops"] is None


def test_parse_batch_sizes() -> None:
    import typer

    assert parse_batch_sizes("64, 256,64") == (64, 256)
    for bad in ("", "0", "a,b"):
        with pytest.raises(typer.BadParameter):
            parse_batch_sizes(bad)


@pytest.mark.gpu
def test_gpu_section_quick(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    config = bench.BenchConfig.quick_config(machine=MACHINE, stitch_patches=0, scan_grid=0)
    result, json_path, _ = bench.main(config, tmp_path, log=lambda message: None)
    gpu = result["gpu"]
    assert gpu["status"] == "ran" and gpu["device"]
    rows = gpu["results"]["8"]
    assert {"eager cuda fp32", "eager cuda tf32", "torchscript cuda fp32"} <= set(rows)
    for name, row in rows.items():
        assert row["patterns_per_s"] > 0 and row["max_abs_diff_vs_baseline"] < 1e-2, name
        if row.get("peak_device_mb") is not None:
            assert row["peak_device_mb"] >= 0
    assert json.loads(json_path.read_text())["gpu"]["status"] == "ran"
