"""One convention across commands: the output is -o/--output, the main input positional;
older spellings (ptycho-simulate's bare output, ptycho-bench's --bundle and --out) kept as
aliases."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from cli.bench import app as bench_app
from cli.simulate import app as simulate_app

SMALL = ["--rows", "3", "--cols", "3", "--patch-size", "16", "--probe-diameter", "6",
         "--defocus", "2"]


def _patterns(path: Path) -> int:
    from runtime.scan import load_scan

    return load_scan(path).n_patterns


def test_simulate_takes_dash_o_and_keeps_the_positional_alias(tmp_path: Path) -> None:
    runner = CliRunner()
    new = runner.invoke(simulate_app, ["-o", str(tmp_path / "a.npz"), *SMALL])
    assert new.exit_code == 0, new.output
    old = runner.invoke(simulate_app, [str(tmp_path / "b.npz"), *SMALL])
    assert old.exit_code == 0, old.output
    assert _patterns(tmp_path / "a.npz") == _patterns(tmp_path / "b.npz") == 9
    same = runner.invoke(simulate_app, [str(tmp_path / "c.npz"), "--output",
                                        str(tmp_path / "c.npz"), *SMALL])
    assert same.exit_code == 0, same.output


def test_simulate_refuses_two_outputs_or_none(tmp_path: Path) -> None:
    runner = CliRunner()
    both = runner.invoke(simulate_app, [str(tmp_path / "a.npz"), "-o", str(tmp_path / "b.npz"),
                                        *SMALL])
    assert both.exit_code == 2 and "given twice" in both.output
    assert not (tmp_path / "a.npz").exists() and not (tmp_path / "b.npz").exists()
    neither = runner.invoke(simulate_app, SMALL)
    assert neither.exit_code == 2 and "-o/--output" in neither.output


def test_bench_takes_the_bundle_positionally_and_dash_o() -> None:
    runner = CliRunner()
    shown = runner.invoke(bench_app, ["--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0
    assert "[BUNDLE]" in shown.output and "-o" in shown.output and "--output" in shown.output
    assert "--out" in shown.output and "--bundle" in shown.output  # the older spellings
    clash = runner.invoke(bench_app, ["a.zip", "--bundle", "b.zip"])
    assert clash.exit_code == 2 and "given twice" in clash.output
