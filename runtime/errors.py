"""One error type per boundary, each carrying a one-line message for the user.

The CLI maps them to exit codes, so a script driving ptycho-export can tell a bad file
(fix the input) from a broken environment (fix the install) without parsing text.
"""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_ENVIRONMENT = 4
EXIT_PARITY = 5


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


class ParityError(PtychoError):
    """A frozen artifact disagrees with the eager model beyond tolerance."""

    exit_code = EXIT_PARITY
