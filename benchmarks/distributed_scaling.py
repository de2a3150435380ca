"""Recalibration wall time with 1 and 2 processes (torchrun, gloo), on this machine's cores.

    .venv/bin/python benchmarks/distributed_scaling.py [--quick]

A small conv net (.pt2: three conv-BN-ReLU layers and a linear head) recalibrated on 20,000 synthetic
3x32x32 samples, `exact` and `fast`. Each configuration is the whole command a user runs, timed from
spawn to exit in interleaved rounds: `python -m bnfold recalibrate` and `torchrun --nproc-per-node 2 -m
bnfold recalibrate`, one intra-op thread per process (torchrun's default). The fixed cost (imports,
loading, joining the process group) is the same command on 64 samples; the rest is the work that
scales with the data. The 2-process result is checked against the 1-process result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import REPO, table  # noqa: E402

SAMPLES, QUICK_SAMPLES, BATCH, SHAPE = 20_000, 4_000, 64, (3, 32, 32)
OVERHEAD_SAMPLES = 64
# name: (processes, intra-op threads per process). One thread each, as torchrun sets it: a second intra-op
# thread in one process was 10x slower, not faster, on this shared machine (oversubscribed cores).
CONFIGS = {"1 process": (1, 1), "2 processes": (2, 1)}


def _model(folder: Path) -> Path:
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers, channels = [], SHAPE[0]
    for out, stride in ((32, 1), (64, 2), (64, 2)):
        layers += [nn.Conv2d(channels, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        channels = out
    module = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)).eval()
    path = folder / "convnet.pt2"
    torch.export.save(torch.export.export(module, (torch.zeros(2, *SHAPE),)), path)
    return path


def _command(processes: int, model: Path, data: Path, output: Path, method: str, samples: int) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] if processes > 1 else []
    return [sys.executable, *launcher, "-m", "bnfold", "recalibrate", str(model), "--data", str(data),
            "-o", str(output), "--force", "--method", method, "--batch-size", str(BATCH),
            "--max-samples", str(samples), "--json"]


def _run(command: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    elapsed = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-2000:]}")
    return elapsed


def _largest_difference(first: Path, second: Path) -> float:
    """Largest relative difference between the BN buffers of two recalibrated .pt2 files."""
    import torch

    a, b = (torch.export.load(path).state_dict for path in (first, second))
    return max(float(((a[k].double() - b[k].double()).abs() / a[k].double().abs().clamp_min(1e-30)).max())
               for k in a if "running_" in k)


def run(quick: bool = False) -> dict:
    samples, rounds = (QUICK_SAMPLES, 1) if quick else (SAMPLES, 3)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        model = _model(folder)
        data = folder / "data.npy"
        np.save(data, np.random.default_rng(0).normal(0.3, 1.2, size=(samples, *SHAPE)).astype(np.float32))
        results: dict = {"samples": samples, "batch": BATCH, "rounds": rounds, "cores": os.cpu_count(),
                         "load_before": os.getloadavg(), "methods": {}}
        for method in ("exact", "fast"):
            times: dict[str, dict[str, list[float]]] = {name: {"total": [], "fixed": []} for name in CONFIGS}
            for number in range(rounds):
                order = list(CONFIGS) if number % 2 == 0 else list(reversed(CONFIGS))
                for name in order:
                    processes, threads = CONFIGS[name]
                    output = folder / f"{processes}x{threads}.pt2"
                    times[name]["total"].append(_run(_command(processes, model, data, output, method, samples),
                                                     threads))
                    times[name]["fixed"].append(_run(_command(processes, model, data, folder / "fixed.pt2", method,
                                                              OVERHEAD_SAMPLES), threads))
            results["methods"][method] = {
                "seconds": {name: {part: statistics.median(values) for part, values in parts.items()}
                            for name, parts in times.items()},
                "spread": {name: [min(parts["total"]), max(parts["total"])] for name, parts in times.items()},
                "largest_relative_difference": _largest_difference(folder / "1x1.pt2", folder / "2x1.pt2")}
        results["load_after"] = os.getloadavg()
    return results


def _speedups(measured: dict) -> tuple[float, float]:
    """How much faster 2 processes were than 1: the whole command, and the work alone (total - fixed)."""
    one, two = (measured["seconds"][name] for name in CONFIGS)
    return one["total"] / two["total"], (one["total"] - one["fixed"]) / (two["total"] - two["fixed"])


def markdown(results: dict) -> str:
    rows = []
    for method, measured in results["methods"].items():
        seconds, difference = measured["seconds"], measured["largest_relative_difference"]
        whole, work = _speedups(measured)
        for name, (processes, _) in CONFIGS.items():
            low, high = measured["spread"][name]
            versus = "" if processes == 1 else f"{whole:.2f}× / {work:.2f}×; buffers " + (
                "identical" if difference == 0 else f"within {difference:.1e}")
            rows.append([method, name, f"{seconds[name]['total']:.1f} ({low:.1f}–{high:.1f})",
                         f"{seconds[name]['fixed']:.1f}", f"{seconds[name]['total'] - seconds[name]['fixed']:.1f}",
                         versus])
    speedups = {method: _speedups(measured) for method, measured in results["methods"].items()}
    works = sorted(work for _, work in speedups.values())
    fixed = [next(iter(results["methods"].values()))["seconds"][name]["fixed"] for name in CONFIGS]
    load = ", ".join(f"{value:.1f}" for value in results["load_before"])
    return (f"{results['samples']:,} samples of {'x'.join(map(str, SHAPE))}, batch {results['batch']}, "
            f"{results['cores']} cores, median (min–max) of {results['rounds']} interleaved rounds; load average "
            f"before the run {load} (1, 5, 15 min). Fixed: the same command on {OVERHEAD_SAMPLES} samples; "
            "work: total minus fixed. Speed-up of 2 processes over 1, whole command / work alone:\n\n"
            + table(["method", "configuration", "total s", "fixed s", "work s", "2 processes vs 1"], rows)
            + f"\n\nTwo processes did the work that grows with the data {works[0]:.2f}–{works[-1]:.2f}× as fast "
            f"as one; the fixed cost went from {fixed[0]:.0f} s to {fixed[1]:.0f} s, so the whole command's "
            "speed-up was " + " and ".join(f"{whole:.2f}× for `{method}`" for method, (whole, _) in speedups.items())
            + ".")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SAMPLES:,} samples, one round")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    arguments = parser.parse_args()
    measured = run(arguments.quick)
    if arguments.json:
        arguments.json.write_text(json.dumps(measured, indent=1) + "\n")
    print(markdown(measured))
