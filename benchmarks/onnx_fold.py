"""Time `bnfold fold` on a ResNet-50-sized ONNX export (BN kept) and compare with onnxruntime's basic level.

    .venv/bin/python benchmarks/onnx_fold.py [--repeat 3]

Builds torchvision's ResNet-50 layout (3-4-6-3 bottlenecks, 25.6 M parameters, 53 BN) from the zoo's
Bottleneck block with randomized BN statistics, exports it with the TorchScript exporter and no constant
folding, then times planning, rewriting, verification and writing separately. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnfold.folding import compare  # noqa: E402
from bnfold.onnx.engine import OnnxEngine  # noqa: E402
from bnfold.onnx.model import OnnxModel  # noqa: E402
from bnfold.verify import random_batches  # noqa: E402
from tests.zoo import Bottleneck, export_onnx, randomize_bn  # noqa: E402


class ResNet50(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for planes, count, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for index in range(count):
                blocks.append(Bottleneck(cin, planes, stride if index == 0 else 1))
                cin = planes * Bottleneck.expansion
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def ort_basic(path: Path, target: Path) -> tuple[int, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    _, seconds = timed(lambda: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(target)).graph.node), seconds


STEPS = ("load", "plan (analysis: passes until nothing changes, on a scratch copy)",
         "apply (replay on a fresh copy, float64 fold math, prune)",
         "verify (original and folded in ORT, optimizations off, batch 2)", "save")


def run(repeat: int = 3) -> dict:
    """Best-of-`repeat` seconds per step, BN left by bnfold and by onnxruntime's basic level."""
    with tempfile.TemporaryDirectory(prefix="bnfold-bench-") as name:
        folder = Path(name)
        module = randomize_bn(ResNet50().eval(), seed=0)
        path = export_onnx(module, (1, 3, 224, 224), folder / "resnet50.onnx")
        rows = []
        for _ in range(repeat):
            model, load_s = timed(lambda: OnnxModel.load(path))
            engine = OnnxEngine()
            plan, plan_s = timed(lambda: engine.plan(model))
            folded, apply_s = timed(lambda: engine.apply(model, plan))
            batches = random_batches(model.input_specs(), None, count=1)
            difference, verify_s = timed(lambda: compare(engine, model, folded, batches))
            _, save_s = timed(lambda: folded.save(folder / "folded.onnx"))
            rows.append((load_s, plan_s, apply_s, verify_s, save_s))
        left, ort_s = ort_basic(path, folder / "ort-basic.onnx")
        size_mib = path.stat().st_size / 2**20
    return {"repeat": repeat, "size_mib": size_mib, "parameters": model.parameter_count(),
            "threads": torch.get_num_threads(), "steps": dict(zip(STEPS, (min(column) for column in zip(*rows)))),
            "bn_before": sum(n.op_type == "BatchNormalization" for n in model.proto.graph.node),
            "bn_after": sum(n.op_type == "BatchNormalization" for n in folded.proto.graph.node),
            "ort_basic_left": left, "ort_basic_session_s": ort_s, "max_rel_error": difference.max_rel}


def markdown(result: dict) -> str:
    steps = result["steps"]
    lines = ["| step | seconds |", "|---|---|", *(f"| {name} | {seconds:.2f} |" for name, seconds in steps.items())]
    total = steps[STEPS[1]] + steps[STEPS[2]]
    lines.append(f"| **fold total (plan + apply)** | **{total:.2f}** |")
    return (f"ResNet-50 ONNX ({result['size_mib']:.0f} MiB, {result['parameters']:,} parameters, "
            f"{result['bn_before']} BN), best of {result['repeat']} on {result['threads']} threads:\n\n"
            + "\n".join(lines)
            + f"\n\nBN left: bnfold {result['bn_after']}, onnxruntime's basic level {result['ort_basic_left']} "
              f"(session creation {result['ort_basic_session_s']:.2f} s). Maximum relative output error "
              f"{result['max_rel_error']:.1e} (float32).")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    print(markdown(run(parser.parse_args().repeat)))


if __name__ == "__main__":
    main()
