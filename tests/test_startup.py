"""Start-up discipline: `bnfold --help` and every command on an ONNX model never import torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, SAMPLES

PROBE = """
import sys
from bnfold.cli import main
try:
    main(sys.argv[1:])
except SystemExit as done:
    code = done.code
leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("TORCH-MODULES:", len(leaked), file=sys.stderr)
sys.exit(code)
"""


def run_probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


@pytest.mark.parametrize("args", [
    ("--help",),
    ("inspect", "--help"),
    ("inspect", str(SAMPLES / "cnn.onnx")),
    ("inspect", str(SAMPLES / "mixed.onnx"), "--json"),
    ("fold", str(SAMPLES / "cnn.onnx")),
    ("inspect", str(SAMPLES / "cnn.onnx"), "--data", str(SAMPLES / "calib.npy")),
    ("check", str(SAMPLES / "cnn.onnx"), "--data", str(SAMPLES / "calib.npy"), "--require-folded"),
    ("recalibrate", str(SAMPLES / "cnn.onnx"), "--data", str(SAMPLES / "calib.npy"), "-o", "{tmp}/out.onnx"),
    ("bench", str(SAMPLES / "cnn.onnx"), "--runs", "2", "--warmup", "1"),
], ids=lambda args: " ".join(arg for arg in args if not arg.startswith(("/", "{"))))
def test_onnx_paths_never_import_torch(args, tmp_path):
    completed = run_probe(*(arg.format(tmp=tmp_path) for arg in args))
    assert completed.returncode in (0, 1), completed.stderr
    assert "TORCH-MODULES: 0" in completed.stderr, completed.stderr


def test_the_probe_would_notice_torch():
    completed = run_probe("inspect", str(SAMPLES / "cnn.pt2"))
    assert "TORCH-MODULES: 0" not in completed.stderr
