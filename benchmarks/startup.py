"""CLI start-up: `bnfold --help` and `bnfold inspect model.onnx` against `python -c "import onnx"`.

Each command is a fresh process of the same interpreter, run in interleaved rounds; wall time from
spawn to exit. `import onnx` is the floor for anything that reads an ONNX file; `import torch` is shown
for scale (the ONNX path never imports it).
"""

from __future__ import annotations

import subprocess
import sys

from benchmarks.common import REPO, fmt_ratio, ratio, table
from bnfold.benchmark import time_interleaved

BASELINE = 'python -c "import onnx"'
TORCH = 'python -c "import torch"'
COMMANDS = {
    BASELINE: ["-c", "import onnx"],
    "bnfold --help": ["-m", "bnfold", "--help"],
    "bnfold inspect cnn.onnx": ["-m", "bnfold", "inspect", "sample_models/cnn.onnx"],
    TORCH: ["-c", "import torch"],
}


def _spawn(args: list[str]):
    def call() -> None:
        subprocess.run([sys.executable, *args], cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    return call


def run(quick: bool = False) -> dict:
    timings = time_interleaved({name: _spawn(args) for name, args in COMMANDS.items()}, runs=3 if quick else 9,
                               warmup=1, sample_seconds=0)
    return {name: {**timing.to_dict(), "vs_import_onnx": ratio(timing, timings[BASELINE])}
            for name, timing in timings.items()}


def markdown(results: dict) -> str:
    rows = [[f"`{name}`", f"{r['median_s'] * 1e3:.0f} ({r['min_s'] * 1e3:.0f}–{r['max_s'] * 1e3:.0f})",
             fmt_ratio(r["vs_import_onnx"])] for name, r in results.items()]
    runs = next(iter(results.values()))["samples"]
    return (f"Wall time of a fresh process, median (min–max) of {runs} interleaved runs:\n\n"
            + table(["command", "ms", f"ratio to `{BASELINE}`"], rows))
