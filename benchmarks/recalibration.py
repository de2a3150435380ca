"""Recalibration throughput and peak memory, `exact` and `fast`, against plain inference over the same data.

Inference is the engine's own `run` over the same batches (PyTorch eager under no_grad; onnxruntime with
optimizations off, the sessions recalibration itself uses; one intra-op thread for both, as everywhere
here), so the ratio is the price of observing the BN inputs and of the extra passes. `bnfold.recalibrate` is timed whole (copying the model, batching the
data, every pass, writing the statistics into the copy), interleaved with inference. Inference and the
fast method also run on twice the data: the time the second half adds is their steady-state throughput,
and what the first call costs beyond it is the fixed cost of one call (copies, instrumentation, a fresh
onnxruntime session). Timings run on a settled heap (`settle_heap`). Peak memory is measured in a fresh
process per method, with glibc's defaults: the resident-set high-water mark (Linux VmHWM, reset just
before the call) minus the resident set before it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import bnfold
from benchmarks.common import REPO, THREADS, set_threads, table
from bnfold import memory
from bnfold.benchmark import time_interleaved
from bnfold.engine import engine_for
from bnfold.formats import as_model
from tests.zoo import export_onnx, mobilenetv2_timm, resnet_bottleneck

# Enough batches that one-time costs (copying the model, building the instrumented graph) weigh what
# they weigh in real use, where recalibration reads thousands of samples.
SAMPLES, QUICK_SAMPLES, BATCH = 1024, 256, 32
MEMORY_RUNS = 3  # fresh processes per peak-memory measurement (the heap varies between them)
METHODS = ("inference", "exact", "fast")
TARGET = 0.85  # issue 5: fast recalibration's throughput against inference's
DOUBLED = {"inference": "inference, twice the data", "fast": "fast, twice the data"}


class WideCNN(nn.Module):
    """Five conv-BN-ReLU layers in a chain: the convs dominate the time, as in real models, and exact
    recalibration needs one pass per layer (the recalibration author's model, at half the width and
    resolution to fit the time budget)."""

    def __init__(self) -> None:
        super().__init__()
        layers, channels = [], 3
        for out in (16, 32, 32, 64, 64):
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


# name: (factory, input shape of one sample). The MobileNet is the BN-dense case: depthwise convs cost
# little, so observing the BN inputs weighs most there (at 64x64, as the latency section runs the zoo).
MODELS = {"wide CNN": (WideCNN, (3, 32, 32)), "zoo resnet_bottleneck": (resnet_bottleneck, (3, 32, 32)),
          "zoo mobilenetv2_timm 64×64": (mobilenetv2_timm, (3, 64, 64))}


def _setup(name: str, framework: str, folder: Path, samples: int):
    factory, shape = MODELS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = factory().eval()
    data = np.random.default_rng(0).standard_normal((2 * samples, *shape)).astype(np.float32) * 1.5 + 0.2
    if framework == "onnx":
        path = export_onnx(module, (1, *shape), folder / f"{name.replace(' ', '_')}.onnx")
        return as_model(path), data
    return as_model(module), data


def _calls(model, data: np.ndarray, samples: int) -> dict:
    """Each method on the first `samples` of `data`; inference and fast also on all of it (twice as many)."""
    engine = engine_for(model)
    name = model.input_specs()[0].name if model.input_specs() else "input"

    def inference(count: int) -> None:
        for start in range(0, count, BATCH):
            engine.run(model, {name: data[start:start + BATCH]})

    def recalibrate(method: str, count: int) -> None:
        bnfold.recalibrate(model, data[:count], method=method, batch_size=BATCH)

    return {"inference": lambda: inference(samples), "exact": lambda: recalibrate("exact", samples),
            "fast": lambda: recalibrate("fast", samples), DOUBLED["inference"]: lambda: inference(len(data)),
            DOUBLED["fast"]: lambda: recalibrate("fast", len(data))}


def settle_heap() -> None:
    """Serve activations from heap pages that stay, as glibc's malloc settles after a warm-up (its mmap
    threshold rises to the largest block freed, up to 32 MB, and its trim threshold to twice that).
    Left to settle by itself, it settled differently from one process to the next on this virtual
    machine, where a fresh page costs microseconds: the MobileNet's inference over the same 1,024
    samples took 0.26 s in one process and 0.7 s in the next, and a ratio moved by up to 0.5. For the rest
    of the process: glibc has no way back to its dynamic thresholds (later sections run settled too)."""
    memory.map_large_blocks(32 << 20, trim_threshold=64 << 20)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(name: str, framework: str, method: str, samples: int) -> float:
    """MiB above the resident set that one call of `method` needs at its peak (run in a fresh process)."""
    with tempfile.TemporaryDirectory(prefix="bnfold-recal-") as folder:
        model, data = _setup(name, framework, Path(folder), samples)
        call = _calls(model, data, samples)[method]
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (Linux)
        before = _rss_kib("VmRSS")
        call()
        return (_rss_kib("VmHWM") - before) / 1024


def _measure_in_child(name: str, framework: str, method: str, samples: int) -> float:
    completed = subprocess.run([sys.executable, "-m", "benchmarks.recalibration", "--memory", name, framework, method,
                                "--threads", str(THREADS["intra_op"]), "--samples", str(samples)],
                               capture_output=True, text=True, cwd=REPO, check=True, timeout=600)
    return json.loads(completed.stdout.strip().splitlines()[-1])["peak_mib"]


def run(quick: bool = False) -> dict:
    results, samples = {}, QUICK_SAMPLES if quick else SAMPLES
    settle_heap()
    with tempfile.TemporaryDirectory(prefix="bnfold-recal-") as folder:
        for name in MODELS:
            for framework in ("torch", "onnx"):
                model, data = _setup(name, framework, Path(folder), samples)
                timings = time_interleaved(_calls(model, data, samples), runs=2 if quick else 5, warmup=1,
                                           sample_seconds=0)
                result = {"samples": samples, "batch": BATCH}
                for method in METHODS:
                    timing = timings[method]
                    peaks = [_measure_in_child(name, framework, method, samples) for _ in range(MEMORY_RUNS)]
                    result[method] = {"samples_per_s": samples / timing.median,
                                      "spread": [samples / timing.max, samples / timing.min],
                                      "peak_mib": statistics.median(peaks), "peak_mib_max": max(peaks)}
                for method, doubled in DOUBLED.items():  # what the second half of the data adds, and what is left
                    added = statistics.median(twice - once for once, twice in zip(timings[method].samples,
                                                                                   timings[doubled].samples))
                    result[method]["steady_samples_per_s"] = samples / added
                    result[method]["fixed_s"] = timings[method].median - added
                for method in ("exact", "fast"):
                    result[method]["vs_inference"] = result[method]["samples_per_s"] / result["inference"]["samples_per_s"]
                result["fast"]["steady_vs_inference"] = (result["fast"]["steady_samples_per_s"]
                                                         / result["inference"]["steady_samples_per_s"])
                results[f"{name} ({'PyTorch eager' if framework == 'torch' else 'ONNX'})"] = result
                print(f"  recalibration {name} {framework}", flush=True)
    return results


def markdown(results: dict) -> str:
    rows, steady = [], []
    for name, r in results.items():
        cells = [name]
        for method in METHODS:
            spread = r[method]["spread"]
            ratio = f" = {r[method]['vs_inference']:.2f}×" if method != "inference" else ""
            cells.append(f"{r[method]['samples_per_s']:,.0f} ({spread[0]:,.0f}–{spread[1]:,.0f}){ratio}")
        cells += [f"{r[m]['peak_mib']:.0f} ({r[m]['peak_mib_max']:.0f})" for m in METHODS]
        rows.append(cells)
        steady.append([name, f"{r['inference']['steady_samples_per_s']:,.0f}",
                       f"{r['fast']['steady_samples_per_s']:,.0f} = {r['fast']['steady_vs_inference']:.2f}×",
                       f"{r['inference']['fixed_s'] * 1e3:.0f}", f"{r['fast']['fixed_s'] * 1e3:.0f}"])
    first = next(iter(results.values()))
    return (f"{first['samples']:,} samples, batch {first['batch']}; samples/s: median (min–max) of interleaved "
            "runs, and the ratio to inference; peak memory: MiB above the resident set, median (max) of "
            f"{MEMORY_RUNS} fresh processes per method (glibc's malloc moves its mmap threshold as blocks are "
            "freed, so the same call can fragment the heap more in one process than in the next; the CLI "
            "fixes the threshold, `bnfold.memory`):\n\n"
            + table(["model", "inference samples/s", "exact samples/s", "fast samples/s", "inference MiB",
                     "exact MiB", "fast MiB"], rows)
            + f"\n\nSteady-state throughput: the samples per second that the second {first['samples']:,} samples "
            "add (the median over rounds of the difference between the two calls of a round), and the fixed "
            f"cost of one call, what its first {first['samples']:,} samples cost beyond that (a difference of "
            "timings, so within the machine's noise of zero where the fixed cost is small):\n\n"
            + table(["model", "inference samples/s", "fast samples/s", "inference fixed ms", "fast fixed ms"], steady)
            + "\n\n" + _verdict(results))


def below_target(results: dict, ratio: str) -> list[str]:
    """The models whose fast `ratio` ("steady_vs_inference" or "vs_inference") misses TARGET, with it."""
    return [f"{name} ({r['fast'][ratio]:.2f}×)" for name, r in results.items() if r["fast"][ratio] < TARGET]


def _verdict(results: dict) -> str:
    """Which models reach the target of issue 5, in the steady state and in whole calls."""
    def reached(ratio: str) -> str:
        short = below_target(results, ratio)
        return f"{len(results) - len(short)} of {len(results)}" + (f" (not: {'; '.join(short)})" if short else "")

    first = next(iter(results.values()))
    return (f"Target (issue 5): `fast` at {TARGET}× of inference throughput or more. In the steady state: "
            f"{reached('steady_vs_inference')}. In whole calls of {first['samples']:,} samples, fixed costs "
            f"included: {reached('vs_inference')}.")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory", nargs=3, metavar=("MODEL", "FRAMEWORK", "METHOD"), required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=SAMPLES)
    args = parser.parse_args()
    set_threads(args.threads)
    print(json.dumps({"peak_mib": peak_memory(*args.memory, args.samples)}))


if __name__ == "__main__":
    main()
