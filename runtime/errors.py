"""One error type per boundary, each carrying a one-line message for the user.

The CLI maps them to exit codes, so a script driving ptycho-export can tell a bad file
(fix the input) from a broken environment (fix the install) without parsing text.
"""

from __future__ import annotations

import errno
import os

EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_ENVIRONMENT = 4
EXIT_PARITY = 5
EXIT_RESIDUAL = 6  # ptycho-run --max-residual: the outputs were written, but do not fit


class PtychoError(Exception):
    """Base class: `str(err)` is the single line shown to the user."""

    exit_code = EXIT_BAD_INPUT


class DataError(PtychoError):
    """A scan file (npz/HDF5) breaks the data contract."""


class BundleError(PtychoError):
    """A model bundle is unreadable, tampered with or inconsistent."""


class ArtifactError(PtychoError):
    """An exported artifact or its manifest is unreadable or inconsistent."""


class EnvironmentProblem(PtychoError):
    """The installation cannot do what was asked (missing extra, no CUDA, ...)."""

    exit_code = EXIT_ENVIRONMENT


class RunUsageError(PtychoError):
    """ptycho-run options that contradict each other or the artifact (fix the command
    line)."""

    exit_code = EXIT_USAGE


class ResidualTooHigh(PtychoError):
    """--max-residual: the scan's data-consistency residual is above the pipeline's limit
    (the outputs were written; exit 6 lets a pipeline stop there)."""

    exit_code = EXIT_RESIDUAL

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report or {}  # the written run's report (the many-scan summary)


class ParityError(PtychoError):
    """A frozen artifact disagrees with the eager model beyond tolerance."""

    exit_code = EXIT_PARITY


# An OSError with one of these is the machine's problem, not the input's (exit 4): the disk
# or quota is full, the file system is read-only, the user may not write (or read) there.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                                errno.EPERM})


def naming(err: OSError, target: str | os.PathLike[str]) -> OSError:
    """The same error, naming the output ``target`` (a failed write() names no file, a
    failed temp file names the temp name): what the user chose and can fix."""
    if err.errno is None:
        return err
    return OSError(err.errno, err.strerror or str(err), os.fspath(target))


def os_error_line(err: OSError) -> tuple[str, int]:
    """One line and an exit code for an OSError that reached a command's top level."""
    text = f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err)
    text = " ".join(text.split())
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"{text}; free some space or write elsewhere (-o); nothing half-written was "
                "kept and any previous output is intact", EXIT_ENVIRONMENT)
    if err.errno in ENVIRONMENT_ERRNOS:
        return (f"{text}; check the permissions of that path or choose another output "
                "folder (-o); any previous output is intact", EXIT_ENVIRONMENT)
    return text, EXIT_BAD_INPUT
