"""One exception family; the CLI turns each into one line and the exit code below.

Exit codes: 0 ok; 1 a check failed (parity, validation, a target missed); 2 bad input (file, flag,
shape, value); 3 missing dependency or hardware (TensorRT, GPU, server); 70 an internal error (a bug:
the line asks for --debug); 130 interrupted.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_MISSING = 3
EXIT_INTERNAL = 70  # EX_SOFTWARE in sysexits.h
EXIT_INTERRUPTED = 130


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none): for one-line reports."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class DeployToolError(Exception):
    """Base of every error deploytool raises on purpose; the message is one line meant for a user."""

    exit_code = EXIT_BAD_INPUT


class BadInput(DeployToolError, ValueError):
    """A file, flag, shape or value the user gave is wrong."""

    exit_code = EXIT_BAD_INPUT


class CheckFailed(DeployToolError):
    """A parity check, a validation or a target did not pass; `report` carries the details."""

    exit_code = EXIT_CHECK_FAILED

    def __init__(self, message: str, report: object | None = None):
        super().__init__(message)
        self.report = report


class MissingDependency(DeployToolError, ImportError):
    """An optional package or the hardware it needs (TensorRT, a GPU, a server) is not here."""

    exit_code = EXIT_MISSING
