"""Import a user-named callable (`--model-factory`, `--data-fn`): only what the user named, nothing else."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from bnfold.errors import UsageError


def search_working_directory() -> None:
    """Make the current directory importable, searched last: the user's own packages (a factory, the classes
    of a pickle they allowed) import as under `python -m bnfold`, but a file there (an unpacked model bundle's
    `numpy.py`) cannot replace an installed module."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)


def import_callable(spec: str, option: str) -> Callable[..., Any]:
    """Resolve "package.module:callable", the current directory searched last (`search_working_directory`)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise UsageError(f"{option} must look like package.module:callable, got {spec!r}")
    search_working_directory()
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(f"{option}: cannot import {module_name!r} ({error})",
                         "run bnfold from the directory that holds the package, or install it") from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UsageError(f"{option}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UsageError(f"{option}: {spec!r} is not callable")
    return target
