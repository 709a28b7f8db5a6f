"""What every command shares: one-line errors, exit codes, the `train` extra check."""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from runtime.errors import (
    EXIT_BAD_INPUT,
    EXIT_ENVIRONMENT,
    EnvironmentProblem,
    PtychoError,
    os_error_line,
)

T = TypeVar("T")

TRAIN_EXTRA_MODULES = ("torch", "lightning", "safetensors")


def require_train_extra(command: str, modules: tuple[str, ...] = TRAIN_EXTRA_MODULES) -> None:
    """Torch-side commands on a runtime-only install say exactly what to install."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise EnvironmentProblem(
            f"{command} needs the 'train' extra (missing: {', '.join(missing)}); install it with "
            "pip install 'ptycho-export[train,cpu]' (GPU users: install their CUDA torch first)")


EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a killed command


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's kill, a timeout), raised where the program is so that the
    same clean-up as Ctrl-C runs: temp files and folders removed, old outputs intact.
    Python's default for SIGTERM ends the process at once and leaves them behind."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def one_path(positional: Path | None, option: Path | None, what: str,
             option_name: str = "-o/--output") -> Path:
    """The path a command was given either way: the option, or the older positional
    spelling kept as an alias. Both at once must agree; neither is a usage error (exit 2)."""
    import typer

    if positional is not None and option is not None and positional != option:
        raise typer.BadParameter(f"{what} given twice ({positional} and {option}); give "
                                 f"{option_name} only")
    path = option if option is not None else positional
    if path is None:
        raise typer.BadParameter(f"missing {what}: give {option_name} PATH")
    return path


def run_guarded(action: Callable[[], T], verbose: bool = False) -> T:
    """Run a command body; our errors become one stderr line and a distinct exit code."""
    try:
        with terminate_as_interrupt():
            return action()
    except Terminated:
        print("terminated: no partial outputs were kept", file=sys.stderr)
        raise SystemExit(EXIT_TERMINATED) from None
    except PtychoError as err:
        if verbose:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except KeyboardInterrupt:
        print("interrupted: no partial outputs were kept", file=sys.stderr)
        raise SystemExit(130) from None
    except MemoryError as err:  # an allocation no check foresaw: still one line
        if verbose:
            traceback.print_exc()
        detail = " ".join(str(err).split()) or "an allocation failed"
        print(f"error: out of memory ({detail}); the input may ask for more than this "
              "machine has: check its sizes, or use a smaller --batch-size; nothing "
              "half-written was kept", file=sys.stderr)
        raise SystemExit(EXIT_ENVIRONMENT) from None
    except OSError as err:  # disk full / not writable: exit 4; other paths: exit 3
        if verbose:
            traceback.print_exc()
        line, code = os_error_line(err)
        print(f"error: {line}", file=sys.stderr)
        raise SystemExit(code) from None
    except ValueError as err:
        if verbose:
            traceback.print_exc()
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
