"""One exception tree; every user-facing failure maps to a fixed exit code.

    BnfoldError                      exit 2 unless stated
    ├── UsageError                   bad flags or option combinations
    ├── InputError                   a file that cannot be read
    │   ├── UnsupportedFormatError   a file bnfold does not understand
    │   └── UnsafePickleError        a pickle that needs --allow-pickle
    ├── DataError                    calibration data that cannot be used
    ├── NoBatchNormError             the model has no BN layer to work on
    ├── MissingDependencyError       an optional package is not installed
    ├── OutputError                  an output that cannot be written safely
    ├── DistributedError             another rank failed, or the ranks lost contact (torchrun)
    └── CheckFailed                  exit 1: verification or a policy failed

Anything else escaping the library is a bug and keeps its traceback (exit 3).
"""

from __future__ import annotations

import re
from enum import IntEnum


class ExitCode(IntEnum):
    """The documented exit codes of the `bnfold` command."""

    OK = 0
    CHECK_FAILED = 1
    USAGE = 2
    INTERNAL = 3
    INTERRUPTED = 130


class BnfoldError(Exception):
    """A failure the user can act on: printed as one line plus an optional hint."""

    exit_code: ExitCode = ExitCode.USAGE
    # Under torchrun: rank 0 failed with the same message and prints it, so this rank stays quiet.
    reported_by_root: bool = False

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(BnfoldError):
    """Flags or arguments that do not make sense together."""


class InputError(BnfoldError):
    """A model or data file that cannot be read."""


class UnsupportedFormatError(InputError):
    """A file whose content is no model format bnfold knows."""


class UnsafePickleError(InputError):
    """Loading would execute a pickle, which the user has not allowed."""

    def __init__(self, message: str, hint: str | None = None, imports: list[str] | None = None) -> None:
        super().__init__(message, hint)
        self.imports = imports or []


class DataError(BnfoldError):
    """Calibration or verification data that cannot be used."""


class NoBatchNormError(BnfoldError):
    """The model holds no BatchNorm layer for the command to work on."""


class MissingDependencyError(BnfoldError):
    """An optional package is needed for this input."""


class OutputError(BnfoldError):
    """An output path that cannot be written without risking a file."""


class DistributedError(BnfoldError):
    """A job of several processes failed elsewhere: another rank raised, crashed or stopped answering."""


class CheckFailed(BnfoldError):
    """Verification or a policy failed; the result is reported and nothing is written."""

    exit_code = ExitCode.CHECK_FAILED


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an error's message (at most `limit` characters), or its type's name: what a
    one-line report of a third-party failure quotes. A TorchScript run's error opens with the same line
    for every failure and the script's traceback; the cause comes after them (`_script_cause`)."""
    lines = str(error).strip().splitlines()
    if lines and lines[0] == _SCRIPT_FAILURE:
        lines = [_script_cause(error, lines)]
    return lines[0][:limit] if lines else type(error).__name__


_SCRIPT_FAILURE = "The following operation failed in the TorchScript interpreter."
_RAISED = re.compile(r"(?:\w+\.)*\w+(?:Error|Exception): ")  # `RuntimeError: `, `builtins.ValueError: `


def _script_cause(error: BaseException, lines: list[str]) -> str:
    """The line of a TorchScript error that names what was raised, after the traceback (else its last
    line), without the error's own type (`RuntimeError: `)."""
    cause = next((line for line in reversed(lines) if _RAISED.match(line)), lines[-1])
    return cause.removeprefix(f"{type(error).__name__}: ")
