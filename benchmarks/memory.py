"""Peak memory of `bnfold inspect` and `bnfold fold` on a large model, against its weight size.

SECURITY.md promises memory bounded by about twice the model's weights plus one batch. This builds a
Conv+BN stack with `--megabytes` of float32 weights (default 100) as ONNX (onnx.helper only, no torch)
or, with `--torch`, as a torch.export `.pt2`, runs each command in its own process and reads that
process's peak resident memory. The baseline is the same interpreter importing bnfold and the
framework (onnx and onnxruntime, or torch) without touching a model.

    .venv/bin/python benchmarks/memory.py [--megabytes 100] [--torch]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
CHANNELS = 512
MEASURE = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=False, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""
BASELINE = {"onnx": "import bnfold.cli, bnfold.onnx.model, bnfold.onnx.fold, onnxruntime",
            "torch": "import bnfold.cli, torch"}
SIZES = (100, 300)  # MB of weights
COMMANDS = ("inspect", "fold_no_verify", "fold")


def conv_bn_stack(megabytes: float, seed: int = 0) -> onnx.ModelProto:
    """3x3 convolutions of CHANNELS channels, each followed by BN, until the weights reach `megabytes`."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(_layers(megabytes)):
        weight = (rng.standard_normal((CHANNELS, CHANNELS, 3, 3)) / 48).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        for role, value in (("scale", rng.random(CHANNELS) + 0.5), ("bias", rng.standard_normal(CHANNELS)),
                            ("mean", rng.standard_normal(CHANNELS)), ("var", rng.random(CHANNELS) + 0.5)):
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"bn{i}.{role}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"))
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}", *(f"bn{i}.{r}" for r in ("scale", "bias", "mean",
                                                                                            "var"))],
                                      [f"y{i}"], name=f"bn{i}"))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                             ["batch", CHANNELS, 4, 4])],
                              [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def save_torch_stack(megabytes: float, path: Path, seed: int = 0) -> None:
    """The same stack as an eval-mode torch module, exported with a dynamic batch and saved as `.pt2`."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers = []
    for _ in range(_layers(megabytes)):
        bn = nn.BatchNorm2d(CHANNELS)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 1.5)
        layers += [nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, bias=False), bn]
    program = torch.export.export(nn.Sequential(*layers).eval(), (torch.randn(2, CHANNELS, 4, 4),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, str(path))


def _layers(megabytes: float) -> int:
    return max(1, round(megabytes * 2**20 / (CHANNELS * CHANNELS * 9 * 4)))


def peak_mb(*command: str) -> float:
    """Peak resident memory (MiB) of one process running `command`."""
    completed = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True,
                               check=True, cwd=REPO)
    return int(completed.stdout.strip()) / 1024


def measure(megabytes: float, framework: str = "onnx") -> dict[str, float]:
    """Peak MB of each command (and over the baseline per MB of weights) on a stack of `megabytes`."""
    with tempfile.TemporaryDirectory() as folder:
        suffix = ".onnx" if framework == "onnx" else ".pt2"
        path = Path(folder) / f"stack{suffix}"
        if framework == "onnx":
            onnx.save(conv_bn_stack(megabytes), path)
        else:
            save_torch_stack(megabytes, path)
        weights = path.stat().st_size / 2**20
        bnfold = [sys.executable, "-m", "bnfold"]
        results = {
            "weights_mb": weights,
            "baseline_mb": peak_mb(sys.executable, "-c", BASELINE[framework]),
            "inspect_mb": peak_mb(*bnfold, "inspect", str(path)),
            "fold_no_verify_mb": peak_mb(*bnfold, "fold", str(path), "-o", str(Path(folder) / f"a{suffix}"),
                                         "--no-verify"),
            "fold_mb": peak_mb(*bnfold, "fold", str(path), "-o", str(Path(folder) / f"b{suffix}")),
        }
    for command in COMMANDS:
        results[f"{command}_over_weights"] = (results[f"{command}_mb"] - results["baseline_mb"]) / weights
    return results


def growth(small: dict, large: dict) -> dict[str, float]:
    """MB of peak memory per further MB of weights, per command: the slope between two sizes, free of
    what a command costs whatever the model (code, runtime set-up, the largest layer's arithmetic)."""
    more = large["weights_mb"] - small["weights_mb"]
    return {command: (large[f"{command}_mb"] - small[f"{command}_mb"]) / more for command in COMMANDS}


def run(quick: bool = False) -> dict:
    """`run_all.py`'s section: two model sizes per format show how memory grows (one in `--quick` mode)."""
    megabytes = SIZES[:1] if quick else SIZES
    return {"sizes": [measure(mb) for mb in megabytes], "torch": [measure(mb, "torch") for mb in megabytes]}


def markdown(result: dict) -> str:
    from benchmarks.common import table

    def row(label: str, r: dict) -> list[str]:
        return [label, f"{r['weights_mb']:.0f} MB",
                *(f"{r[command + '_mb']:.0f} MB ({r[command + '_over_weights']:.1f}x)" for command in COMMANDS)]

    formats = (("ONNX", result["sizes"]), ("PyTorch .pt2", result["torch"]))
    text = (f"Peak resident memory per command (baseline: the interpreter with bnfold and the framework imported, "
            f"{result['sizes'][0]['baseline_mb']:.0f} MB for ONNX, {result['torch'][0]['baseline_mb']:.0f} MB for "
            "PyTorch; in parentheses: MB over the baseline per MB of weights):\n\n"
            + table(["model", "weights", "inspect", "fold --no-verify", "fold (verified)"],
                    [row(label, r) for label, sizes in formats for r in sizes]))
    for label, sizes in formats:
        if len(sizes) > 1:
            slopes = growth(sizes[0], sizes[-1])
            text += (f"\n\nEach further MB of {label} weights costs, at the peak: "
                     + ", ".join(f"{name} {slopes[command]:.2f} MB" for name, command in
                                 zip(("inspect", "fold --no-verify", "fold"), COMMANDS))
                     + f" (between {sizes[0]['weights_mb']:.0f} and {sizes[-1]['weights_mb']:.0f} MB).")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=100.0)
    parser.add_argument("--torch", action="store_true", help="a torch.export .pt2 instead of ONNX")
    args = parser.parse_args()
    results = measure(args.megabytes, "torch" if args.torch else "onnx")
    print(json.dumps({key: round(value, 2) for key, value in results.items()}, indent=1))


if __name__ == "__main__":
    main()
