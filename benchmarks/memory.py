"""Peak memory of `bnfold inspect` and `bnfold fold` on a large ONNX model, against its weight size.

SECURITY.md promises memory bounded by about twice the model's weights plus one batch. This builds a
Conv+BN stack with `--megabytes` of float32 weights (default 100; onnx.helper only, no torch), runs each
command in its own process and reads that process's peak resident memory. The baseline is the same
interpreter importing bnfold, onnx and onnxruntime without touching a model.

    .venv/bin/python benchmarks/memory.py [--megabytes 100]
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
BASELINE = "import bnfold.cli, bnfold.onnx.model, bnfold.onnx.fold, onnxruntime"
SIZES = (100, 300)  # MB of weights


def conv_bn_stack(megabytes: float, seed: int = 0) -> onnx.ModelProto:
    """3x3 convolutions of CHANNELS channels, each followed by BN, until the weights reach `megabytes`."""
    rng = np.random.default_rng(seed)
    layers = max(1, round(megabytes * 2**20 / (CHANNELS * CHANNELS * 9 * 4)))
    nodes, inits, x = [], [], "x"
    for i in range(layers):
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


def peak_mb(*command: str) -> float:
    """Peak resident memory (MiB) of one process running `command`."""
    completed = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True,
                               check=True, cwd=REPO)
    return int(completed.stdout.strip()) / 1024


def measure(megabytes: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "stack.onnx"
        onnx.save(conv_bn_stack(megabytes), path)
        weights = path.stat().st_size / 2**20
        bnfold = [sys.executable, "-m", "bnfold"]
        results = {
            "weights_mb": weights,
            "baseline_mb": peak_mb(sys.executable, "-c", BASELINE),
            "inspect_mb": peak_mb(*bnfold, "inspect", str(path)),
            "fold_no_verify_mb": peak_mb(*bnfold, "fold", str(path), "-o", str(Path(folder) / "a.onnx"), "--no-verify"),
            "fold_mb": peak_mb(*bnfold, "fold", str(path), "-o", str(Path(folder) / "b.onnx")),
        }
    for key in ("inspect_mb", "fold_no_verify_mb", "fold_mb"):
        results[key.replace("_mb", "_over_weights")] = (results[key] - results["baseline_mb"]) / weights
    return results


def run(quick: bool = False) -> dict:
    """`run_all.py`'s section: two model sizes show how memory grows (one in `--quick` mode)."""
    return {"sizes": [measure(megabytes) for megabytes in (SIZES[:1] if quick else SIZES)]}


def markdown(result: dict) -> str:
    from benchmarks.common import table

    rows = [[f"{r['weights_mb']:.0f} MB", *(f"{r[key + '_mb']:.0f} MB ({r[key + '_over_weights']:.1f}x)"
                                            for key in ("inspect", "fold_no_verify", "fold"))]
            for r in result["sizes"]]
    baseline = result["sizes"][0]["baseline_mb"]
    return (f"Peak resident memory per command (baseline: the interpreter with bnfold, onnx and onnxruntime "
            f"imported, {baseline:.0f} MB; in parentheses: MB over the baseline per MB of weights):\n\n"
            + table(["weights", "inspect", "fold --no-verify", "fold (verified)"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=100.0)
    results = measure(parser.parse_args().megabytes)
    print(json.dumps({key: round(value, 2) for key, value in results.items()}, indent=1))


if __name__ == "__main__":
    main()
