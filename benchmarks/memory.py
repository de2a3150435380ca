"""Peak memory of `bnfold inspect` and `bnfold fold` on a large model, against its weight size.

SECURITY.md promises memory bounded by about twice the model's weights plus one batch. This builds a
Conv+BN stack with `--megabytes` of float32 weights (default 100) as ONNX (onnx.helper only, no torch)
or, with `--torch FORMAT`, as a torch.export `.pt2`, a state_dict (built by `stack_factory`) or a
pickled module, runs each command in its own process and reads that process's peak resident memory.
The baseline is the same interpreter importing bnfold and the framework (onnx and onnxruntime, or
torch) without touching a model.

    .venv/bin/python benchmarks/memory.py [--megabytes 100] [--torch {pt2,state_dict,pickle}]
"""

from __future__ import annotations

import argparse
import json
import os
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
            "torch": "import bnfold.cli, torch", "pickle": "import bnfold.cli, torch",
            "state_dict": "import bnfold.cli, torch, benchmarks.memory"}  # the factory's module imports onnx
# Eager formats (the .pt2 is "torch"): file name and the options each command needs to load the model
# and, for fold, an input shape (neither records one).
EAGER = {"state_dict": ("stack.pt", ["--model-factory", "benchmarks.memory:stack_factory"]),
         "pickle": ("stack.pt", ["--allow-pickle"])}
LAYERS_VARIABLE = "BNFOLD_BENCHMARK_LAYERS"  # how many layers `stack_factory` builds
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


def stack_factory(layers: int | None = None):
    """The same stack as an eval-mode torch module (`--model-factory` for the state_dict: its size comes
    from the environment, which the benchmark sets for the command's process)."""
    from torch import nn

    modules = []
    for _ in range(layers or int(os.environ[LAYERS_VARIABLE])):
        modules += [nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, bias=False), nn.BatchNorm2d(CHANNELS)]
    return nn.Sequential(*modules).eval()


def save_torch_stack(megabytes: float, path: Path, framework: str = "torch", seed: int = 0) -> None:
    """The stack with random BN statistics, saved as `.pt2` (exported with a dynamic batch), a state_dict
    or a pickled module."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    module = stack_factory(_layers(megabytes))
    with torch.no_grad():
        for bn in (m for m in module if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 1.5)
    if framework == "torch":
        program = torch.export.export(module, (torch.randn(2, CHANNELS, 4, 4),),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        torch.export.save(program, str(path))
    else:
        torch.save(module.state_dict() if framework == "state_dict" else module, str(path))


def _layers(megabytes: float) -> int:
    return max(1, round(megabytes * 2**20 / (CHANNELS * CHANNELS * 9 * 4)))


def peak_mb(*command: str, env: dict[str, str] | None = None) -> float:
    """Peak resident memory (MiB) of one process running `command`."""
    completed = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True,
                               check=True, cwd=REPO, env=env)
    return int(completed.stdout.strip()) / 1024


def measure(megabytes: float, framework: str = "onnx") -> dict[str, float]:
    """Peak MB of each command (and over the baseline per MB of weights) on a stack of `megabytes`;
    `framework` is "onnx", "torch" (a .pt2) or one of the EAGER formats."""
    name, load = EAGER.get(framework, ("stack.onnx" if framework == "onnx" else "stack.pt2", []))
    shape = ["--input-shape", f"1,{CHANNELS},4,4"] if framework in EAGER else []
    env = {**os.environ, LAYERS_VARIABLE: str(_layers(megabytes))}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        if framework == "onnx":
            onnx.save(conv_bn_stack(megabytes), path)
        else:
            save_torch_stack(megabytes, path, framework)
        weights = path.stat().st_size / 2**20
        bnfold = [sys.executable, "-m", "bnfold"]
        fold = [*bnfold, "fold", str(path), *load, *shape, "-o"]
        results = {
            "weights_mb": weights,
            "baseline_mb": peak_mb(sys.executable, "-c", BASELINE[framework]),
            "inspect_mb": peak_mb(*bnfold, "inspect", str(path), *load, env=env),
            "fold_no_verify_mb": peak_mb(*fold, str(Path(folder) / f"a{path.suffix}"), "--no-verify", env=env),
            "fold_mb": peak_mb(*fold, str(Path(folder) / f"b{path.suffix}"), env=env),
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
    parser.add_argument("--torch", nargs="?", const="pt2", choices=("pt2", *EAGER),
                        help="a PyTorch format instead of ONNX (default: a torch.export .pt2)")
    args = parser.parse_args()
    results = measure(args.megabytes, {None: "onnx", "pt2": "torch"}.get(args.torch, args.torch))
    print(json.dumps({key: round(value, 2) for key, value in results.items()}, indent=1))


if __name__ == "__main__":
    main()
