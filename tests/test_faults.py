"""Faults at every stage: Ctrl-C, SIGTERM and a really full disk.

For `ptycho-run`, `ptycho-export` and `ptycho-train`: an interrupt (KeyboardInterrupt, or
SIGTERM turned into `Terminated`) injected at each stage of the command, real signals sent
to a running process, and a tmpfs filled to several levels of free space (skipped where
mounting is not allowed). Every case asserts the same contract: one line, the documented
exit code, nothing partial left, the previous output byte for byte intact.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_robustness import (  # noqa: F401 - fixtures
    error_line,
    invoke,
    leftovers,
    run_args,
    scan_file,
    toy,
)

from cli.common import EXIT_TERMINATED, Terminated
from cli.run import app as run_app
from runtime.errors import EXIT_ENVIRONMENT

EXIT_INTERRUPTED = 130
INTERRUPTS = [(KeyboardInterrupt, EXIT_INTERRUPTED, "interrupted: no partial outputs"),
              (Terminated, EXIT_TERMINATED, "terminated: no partial outputs")]
RUN_STAGES = ["load_artifact", "open_input", "check_canvas", "open_session",
              "StitchAccumulator", "quality_report", "_write_outputs", "replace_dir"]
EXPORT_STAGES = ["read_bundle", "lint_module", "save_onnx", "audit_onnx", "run_parity",
                 "write_json", "replace_dir"]
TRAIN_STAGES = ["ScanDataModule", "build_guide", "plan_training", "fit_interrupted",
                "golden_samples", "write_bundle"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _raiser(error: type[BaseException]) -> Any:
    def stage(*args: Any, **kwargs: Any) -> Any:
        raise error()
    return stage


# ---------------------------------------------------------------- injected, every stage
@pytest.fixture(scope="module")
def previous_run(tmp_path_factory: pytest.TempPathFactory, toy: Path,  # noqa: F811
                 scan_file: Path) -> Path:  # noqa: F811
    outdir = tmp_path_factory.mktemp("prev") / "out"
    result = invoke(run_app, *run_args(toy, scan_file, outdir))
    assert result.exit_code == 0, result.output
    return outdir


@pytest.mark.parametrize("stage", RUN_STAGES)
@pytest.mark.parametrize(("error", "code", "line"), INTERRUPTS, ids=["sigint", "sigterm"])
def test_run_interrupted_at_every_stage(tmp_path: Path, toy: Path, scan_file: Path,  # noqa: F811
                                        previous_run: Path, monkeypatch: pytest.MonkeyPatch,
                                        stage: str, error: type, code: int, line: str
                                        ) -> None:
    import shutil

    import runtime.run as run_module

    outdir = tmp_path / "out"
    shutil.copytree(previous_run, outdir)
    before = _snapshot(outdir)
    monkeypatch.setattr(run_module, stage, _raiser(error))
    result = invoke(run_app, *run_args(toy, scan_file, outdir))
    error_line(result, code, line)
    assert _snapshot(outdir) == before
    assert leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def previous_export(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Path:
    from ptycho_export.export.pipeline import ExportOptions, export_bundle

    outdir = tmp_path_factory.mktemp("prev_export") / "export"
    export_bundle(tiny_bundle, outdir, ExportOptions(formats=["onnx"]))
    return outdir


@pytest.mark.parametrize("stage", EXPORT_STAGES)
@pytest.mark.parametrize(("error", "code", "line"), INTERRUPTS, ids=["sigint", "sigterm"])
def test_export_interrupted_at_every_stage(tmp_path: Path, tiny_bundle: Path,
                                           previous_export: Path,
                                           monkeypatch: pytest.MonkeyPatch, stage: str,
                                           error: type, code: int, line: str) -> None:
    import shutil

    from cli.export import app as export_app
    from ptycho_export.export import pipeline

    outdir = tmp_path / "export"
    shutil.copytree(previous_export, outdir)
    before = _snapshot(outdir)
    monkeypatch.setattr(pipeline, stage, _raiser(error))
    result = invoke(export_app, tiny_bundle, "--format", "onnx", "-o", outdir)
    error_line(result, code, line)
    assert _snapshot(outdir) == before
    assert leftovers(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("stage", TRAIN_STAGES)
def test_train_terminated_at_every_stage(tmp_path: Path, scan_file: Path,  # noqa: F811
                                         monkeypatch: pytest.MonkeyPatch, stage: str) -> None:
    import io
    import logging

    from cli.train import app as train_app
    from ptycho_export import train as train_module

    # Lightning's log handlers keep the stream they met at import; an earlier in-process
    # CLI test may have closed it. Its INFO lines are not what is tested here.
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler):
                monkeypatch.setattr(handler, "stream", io.StringIO())
    bundle = tmp_path / "bundle.zip"
    bundle.write_bytes(b"the previous bundle")
    monkeypatch.setattr(train_module, stage, _raiser(Terminated))
    result = invoke(train_app, scan_file, "-o", bundle, "--steps", "3", "--preset", "tiny",
                    "--no-progress", "--accelerator", "cpu")
    error_line(result, EXIT_TERMINATED, "terminated: no partial outputs")
    assert bundle.read_bytes() == b"the previous bundle"
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- real signals
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("delay", [0.5, 1.0, 1.5, 2.5])
def test_run_signalled_while_running(tmp_path: Path, toy: Path, scan_file: Path,  # noqa: F811
                                     previous_run: Path, signum: int, delay: float) -> None:
    """A real signal at several moments of a running `ptycho-run` (imports, reading,
    inference, writing, or after it finished): exit 0 with a whole new output, or the
    interrupt's code with the old output intact; never a temp folder or lock left."""
    import shutil

    outdir = tmp_path / "out"
    shutil.copytree(previous_run, outdir)
    before = _snapshot(outdir)
    command = [sys.executable, "-c", "from cli.run import main; main()",
               *map(str, run_args(toy, scan_file, outdir))]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    time.sleep(delay)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signum)
    code = proc.wait(timeout=60)
    stderr = proc.stderr.read()
    expected = EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_TERMINATED
    # before our handler is installed (still importing) Python's own defaults apply:
    # KeyboardInterrupt with a traceback (1) or death by the signal (-15); nothing is
    # written at that point either
    assert code in (0, expected, 1, -signum), (code, stderr)
    if code == expected:
        assert stderr.strip().splitlines()[-1].startswith(("interrupted:", "terminated:"))
    after = _snapshot(outdir)
    if code == 0 or after != before:  # a new output: whole (a late signal may still stop
        # the command after the swap, while it prints)
        report = json.loads(after["report.json"])
        assert sorted(report["files"]) == sorted(after)
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- a really full disk
@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 16 MB tmpfs (needs mount rights: root in a container that allows it)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip() or made.returncode})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """A filler file leaving about `leave` bytes free on `disk`."""
    import os

    filler = disk / "filler.bin"
    filler.unlink(missing_ok=True)
    stats = os.statvfs(disk)
    free = stats.f_bavail * stats.f_frsize
    with open(filler, "wb") as handle:  # noqa: PTH123
        handle.write(b"\0" * max(free - leave, 0))
    return filler


FREE_LEVELS = [0, 8 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20]


def test_run_on_a_full_disk_at_several_levels(small_disk: Path, toy: Path,  # noqa: F811
                                              scan_file: Path) -> None:  # noqa: F811
    outdir = small_disk / "out"
    first = invoke(run_app, *run_args(toy, scan_file, outdir))
    assert first.exit_code == 0, first.output
    before = _snapshot(outdir)
    outcomes = []
    for leave in FREE_LEVELS:
        filler = _fill(small_disk, leave)
        result = invoke(run_app, *run_args(toy, scan_file, outdir))
        filler.unlink()
        outcomes.append(result.exit_code)
        if result.exit_code != 0:
            error_line(result, EXIT_ENVIRONMENT, "No space left on device",
                       "previous output is intact")
            assert _snapshot(outdir) == before
        assert leftovers(small_disk) == []
    assert outcomes[0] == EXIT_ENVIRONMENT and outcomes[-1] == 0


def test_export_on_a_full_disk_at_several_levels(small_disk: Path, tiny_bundle: Path) -> None:
    from cli.export import app as export_app

    outdir = small_disk / "export"
    first = invoke(export_app, tiny_bundle, "--format", "onnx", "-o", outdir)
    assert first.exit_code == 0, first.output
    before = _snapshot(outdir)
    outcomes = []
    for leave in FREE_LEVELS:
        filler = _fill(small_disk, leave)
        result = invoke(export_app, tiny_bundle, "--format", "onnx", "-o", outdir)
        filler.unlink()
        outcomes.append(result.exit_code)
        if result.exit_code != 0:
            error_line(result, EXIT_ENVIRONMENT, "No space left on device")
            assert _snapshot(outdir) == before
        assert leftovers(small_disk) == []
    assert outcomes[0] == EXIT_ENVIRONMENT and outcomes[-1] == 0
