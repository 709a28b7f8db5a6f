"""ptycho-bundle inspect|verify: output, exit codes, one-line errors; the train-extra hint."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import BundleParts, rewrite_bundle
from typer.testing import CliRunner

from cli.bundle import app
from cli.common import require_train_extra
from runtime.errors import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EnvironmentProblem

# Literal, not imported from ptycho_export.bundle: this file must collect without torch.
MEMBERS = ("config.json", "weights.safetensors", "probe.npy", "golden.npz")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def corrupted(tmp_path: Path, tiny_bundle: Path) -> Path:
    def mutate(parts: BundleParts) -> None:
        blob = bytearray(parts.members["probe.npy"])
        blob[-1] ^= 0xFF
        parts.members["probe.npy"] = bytes(blob)

    return rewrite_bundle(tiny_bundle, tmp_path / "corrupted.zip", mutate, rehash=False)


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def test_inspect_prints_verified_and_members(runner: CliRunner, tiny_bundle: Path) -> None:
    result = runner.invoke(app, ["inspect", str(tiny_bundle)])
    assert result.exit_code == 0, result.output
    assert "verified" in result.output
    for name in MEMBERS:
        assert name in result.output
    assert "error:" not in result.output


def test_verify_prints_ok(runner: CliRunner, tiny_bundle: Path) -> None:
    result = runner.invoke(app, ["verify", str(tiny_bundle)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK ")
    assert str(tiny_bundle) in result.output


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_corrupted_bundle_is_one_error_line_exit_3(runner: CliRunner, corrupted: Path,
                                                   command: str) -> None:
    result = runner.invoke(app, [command, str(corrupted)])
    assert result.exit_code == EXIT_BAD_INPUT == 3
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:")
    assert "corrupted.zip" in lines[0] and "'probe.npy'" in lines[0]
    assert "sha256" in lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""  # the error goes to stderr only


def test_not_a_zip_is_exit_3(runner: CliRunner, tmp_path: Path) -> None:
    pytest.importorskip("torch")  # without it the command stops earlier, at exit 4
    path = tmp_path / "notes.zip"
    path.write_text("hello")
    result = runner.invoke(app, ["verify", str(path)])
    assert result.exit_code == EXIT_BAD_INPUT
    (line,) = error_lines(result.output)
    assert line.startswith("error:") and "notes.zip" in line


def test_verbose_shows_the_traceback(runner: CliRunner, corrupted: Path) -> None:
    result = runner.invoke(app, ["verify", "--verbose", str(corrupted)])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "Traceback" in result.output
    assert error_lines(result.output)[-1].startswith("error:")


def test_missing_train_extra_says_what_to_install() -> None:
    with pytest.raises(EnvironmentProblem) as info:
        require_train_extra("ptycho-train", modules=("surely_missing_module_xyz",))
    message = str(info.value)
    assert "pip install" in message and "[train" in message
    assert "surely_missing_module_xyz" in message and "ptycho-train" in message
    assert info.value.exit_code == EXIT_ENVIRONMENT
    require_train_extra("ptycho-train", modules=("json",))  # present: no error
