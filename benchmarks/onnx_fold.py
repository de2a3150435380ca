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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bnfold-bench-"))
    module = randomize_bn(ResNet50().eval(), seed=0)
    path = export_onnx(module, (1, 3, 224, 224), folder / "resnet50.onnx")
    rows = []
    for _ in range(args.repeat):
        model, load_s = timed(lambda: OnnxModel.load(path))
        engine = OnnxEngine()
        plan, plan_s = timed(lambda: engine.plan(model))
        folded, apply_s = timed(lambda: engine.apply(model, plan))
        batches = random_batches(model.input_specs(), None, count=1)
        difference, verify_s = timed(lambda: compare(engine, model, folded, batches))
        _, save_s = timed(lambda: folded.save(folder / "folded.onnx"))
        rows.append((load_s, plan_s, apply_s, verify_s, save_s))
    best = [min(column) for column in zip(*rows)]
    left, ort_s = ort_basic(path, folder / "ort-basic.onnx")
    bn_before = sum(n.op_type == "BatchNormalization" for n in model.proto.graph.node)
    bn_after = sum(n.op_type == "BatchNormalization" for n in folded.proto.graph.node)
    print(f"ResNet-50 ONNX ({path.stat().st_size / 2**20:.0f} MiB, {model.parameter_count():,} parameters, "
          f"{bn_before} BN), best of {args.repeat} on {torch.get_num_threads()} threads\n")
    print("| step | seconds |\n|---|---|")
    for name, seconds in zip(("load", "plan (analysis)", "apply (rewrite)", "verify (2 ORT runs, batch 2)",
                              "save"), best):
        print(f"| {name} | {seconds:.2f} |")
    print(f"| **fold total (plan + apply)** | **{best[1] + best[2]:.2f}** |")
    print(f"\nBN left: bnfold {bn_after}, onnxruntime basic level {left} (session creation {ort_s:.2f} s); "
          f"max relative output error {difference.max_rel:.2e}")


if __name__ == "__main__":
    main()
