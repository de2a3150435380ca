"""Run every benchmark and regenerate BENCHMARKS.md (and benchmarks/results.json with the raw numbers).

    .venv/bin/python benchmarks/run_all.py [--quick] [--only coverage,latency,...] [--threads 1]

Needs the `bench` extra (onnxoptimizer, onnxslim): `pip install -e '.[dev,bench]'`, or `make bench`.
About 20-25 minutes on 2 cores (the 1 vs 2 process scaling alone about 10); `--quick` runs a few models
with fewer repetitions (a smoke test; its numbers are not worth publishing). `--only` reruns some sections
and keeps the others' numbers from results.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import (  # noqa: E402
    coverage, distributed_scaling, latency, memory, numerics, onnx_fold, recalibration, startup)
from benchmarks.common import REPO, set_threads  # noqa: E402
from benchmarks.report import render  # noqa: E402

SECTIONS = {"coverage": coverage.run, "latency": latency.run, "numerics": numerics.run,
            "recalibration": recalibration.run, "startup": startup.run,
            "onnx_fold": lambda quick: onnx_fold.run(repeat=1 if quick else 2),
            "distributed": distributed_scaling.run, "memory": memory.run}
RESULTS = REPO / "benchmarks" / "results.json"


def machine(threads: int) -> dict:
    """What the numbers were measured on."""
    import onnx
    import onnxoptimizer
    import onnxruntime
    import onnxslim
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next((int(line.split()[1]) / 2**20 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory, "os": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnxoptimizer": onnxoptimizer.__version__,
            "onnxslim": onnxslim.__version__, "bnfold_commit": commit, "threads": threads,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few models, few repetitions (smoke test)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for PyTorch and onnxruntime")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {sorted(SECTIONS)}")

    warnings.simplefilter("ignore")
    logging.getLogger("torch").setLevel(logging.CRITICAL)  # torch.export logs every capture it gives up on
    set_threads(args.threads)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() and set(only) != set(SECTIONS) else {}
    results["machine"] = machine(args.threads)
    results["quick"] = args.quick
    results.setdefault("seconds", {})
    results["machine"]["load_before"] = os.getloadavg()
    for name in only:
        print(f"{name} ...", flush=True)
        start = time.perf_counter()
        results[name] = SECTIONS[name](args.quick)
        results["seconds"][name] = time.perf_counter() - start
        print(f"{name}: {results['seconds'][name]:.0f} s", flush=True)
    results["machine"]["load_after"] = os.getloadavg()
    text = json.dumps(results, indent=1, default=str)
    RESULTS.write_text(text + "\n")
    args.output.write_text(render(json.loads(text)))  # rendered from the JSON, as `--only` reruns see it
    print(f"wrote {args.output} and {RESULTS} ({sum(results['seconds'].values()) / 60:.1f} min)")


if __name__ == "__main__":
    main()
