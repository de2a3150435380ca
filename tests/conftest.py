"""Shared fixtures: repo paths, a CLI runner with separate stdout/stderr at a fixed width, no colour."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

# `make test` runs one pytest worker per core; torch's default of one thread per core in each worker
# oversubscribes the cores, and its spinning threads then make small models many times slower. Set
# before any test module imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_models"
CONFORMANCE = REPO.parent / "shared" / "conformance"


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture(autouse=True)
def _plain_terminal(monkeypatch):
    """Fixed width, no colour, no debug: CLI output is deterministic."""
    monkeypatch.setenv("COLUMNS", "160")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("TERM", "dumb")
    monkeypatch.delenv("BNFOLD_DEBUG", raising=False)
    monkeypatch.chdir(REPO)


@pytest.fixture
def cli(capsys):
    """Run `bnfold ARGS...` in-process and return its exit code, stdout and stderr."""
    from bnfold.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main([str(a) for a in args])
        out, err = capsys.readouterr()
        return CliResult(int(exited.value.code or 0), out, err)

    return run
