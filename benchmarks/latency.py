"""CPU latency: original vs bnfold-folded vs every BN deleted (the physical limit of folding).

PyTorch eager at batch 1 and 8, and the same three models exported to ONNX, in onnxruntime with graph
optimizations off and all on, plus session creation time. All three variants of one configuration are
timed in the same interleaved rounds (`bnfold.benchmark.time_interleaved`) with inputs converted once
(PyTorch through the engine's `prepare`: `torch.inference_mode`; onnxruntime through a ready session),
so that what differs is the model alone. "BN deleted" replaces every BN layer by an identity (keeping the activation a BN subclass
such as timm's BatchNormAct2d applies): it computes something else, but it is as fast as any fold can be.
bnfold's folded eager model is a torch.fx GraphModule, so eager PyTorch also times the BN-deleted model
traced into one (`torch.fx.symbolic_trace`, where it traces): the same arithmetic in the same form, which
separates what folding leaves from what the GraphModule form costs. A second, identical copy of the
original is timed in the same rounds too: its ratio to the original (A/A) is the noise of the run.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

import bnfold
from benchmarks.common import fmt_ms, fmt_ratio, ort_session, ratio, table
from benchmarks.onnx_fold import ResNet50
from bnfold.benchmark import time_interleaved
from bnfold.formats import as_model
from bnfold.pytorch.engine import TorchEngine
from tests.zoo import ZOO_BY_NAME, bn_module_names, export_onnx, randomize_bn

# (name, input shape at batch 1): zoo models at a larger resolution than their tests use, and ResNet-50.
MODELS = [("resnet_basic", (1, 3, 64, 64)), ("resnet_bottleneck", (1, 3, 64, 64)),
          ("mobilenetv2_timm", (1, 3, 64, 64)), ("efficientnet", (1, 3, 64, 64)), ("regnety", (1, 3, 64, 64)),
          ("unet", (1, 3, 64, 64)), ("densenet", (1, 3, 64, 64)), ("tcn1d", (1, 4, 256)),
          ("video3d", (1, 3, 8, 32, 32)), ("vit_bn", (1, 3, 16, 16)), ("resnet50", (1, 3, 224, 224))]
QUICK_MODELS = ["resnet_basic", "densenet"]
BATCHES = (1, 8)
VARIANTS = ("original", "folded", "deleted")
AGAIN = "original, again"  # the A/A control
SESSION_REPEATS = 3
ORT_LEVELS = {"disabled": "optimizations off", "all": "all optimizations"}


def build(name: str) -> nn.Module:
    if name == "resnet50":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return randomize_bn(ResNet50().eval(), seed=0)
    return ZOO_BY_NAME[name].factory()


def delete_bn(model: nn.Module) -> nn.Module:
    """A copy with every BN layer replaced by an identity (a BN subclass keeps its own child modules)."""
    copied = copy.deepcopy(model)
    for name in sorted(bn_module_names(copied), key=len, reverse=True):
        parent_name, _, leaf = name.rpartition(".")
        parent = copied.get_submodule(parent_name)
        children = list(getattr(parent, leaf).children())
        setattr(parent, leaf, nn.Sequential(*children) if children else nn.Identity())
    return copied


def _shape_text(shape: tuple[int, ...]) -> str:
    return ",".join(str(d) for d in shape)


def _summary(timings: dict) -> dict:
    summary = {**{name: timing.to_dict() for name, timing in timings.items()},
               "folded/original": ratio(timings["folded"], timings["original"]),
               "folded/deleted": ratio(timings["folded"], timings["deleted"]),
               "deleted/original": ratio(timings["deleted"], timings["original"]),
               "A/A": ratio(timings[AGAIN], timings["original"])}
    if "deleted, traced" in timings:
        summary["folded/deleted, traced"] = ratio(timings["folded"], timings["deleted, traced"])
    return summary


def _input(shape: tuple[int, ...], batch: int) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, *shape[1:])).astype(np.float32)


def _time_eager(models: dict, shape: tuple[int, ...], batch: int, runs: int) -> dict:
    engine = TorchEngine()
    calls = {name: engine.prepare(model, {"input": _input(shape, batch)}) for name, model in models.items()}
    return _summary(time_interleaved(calls, runs))


def _time_ort(protos: dict, level: str, shape: tuple[int, ...], batch: int, runs: int) -> dict:
    feed = {"input": _input(shape, batch)}
    calls = {}
    for name, proto in protos.items():
        sess = ort_session(proto, level)
        calls[name] = lambda sess=sess: sess.run(None, feed)
    return _summary(time_interleaved(calls, runs))


def _sessions(protos: dict, level: str) -> dict:
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(SESSION_REPEATS):
        for name in VARIANTS:
            start = time.perf_counter()
            ort_session(protos[name], level)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def case(name: str, shape: tuple[int, ...], runs: int, folder: Path) -> dict:
    module = build(name)
    deleted = delete_bn(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folded = bnfold.fold(module, input_shape=_shape_text((2, *shape[1:])), verify=False).folded_model
    eager = {"original": as_model(module), "folded": folded, "deleted": as_model(deleted),
             AGAIN: as_model(copy.deepcopy(module))}
    try:
        eager["deleted, traced"] = as_model(torch.fx.symbolic_trace(deleted))
    except Exception:  # Python control flow on sizes: the BN-deleted model does not trace
        pass
    result: dict = {"shape": list(shape), "eager": {}, "onnx": {}, "sessions": {}}
    for batch in BATCHES:
        result["eager"][batch] = _time_eager(eager, shape, batch, runs)

    original_path = export_onnx(module, shape, folder / f"{name}.onnx")
    protos = {"original": onnx.load(str(original_path)),
              "folded": bnfold.fold(original_path, verify=False).folded_model.proto,
              "deleted": onnx.load(str(export_onnx(deleted, shape, folder / f"{name}.deleted.onnx")))}
    protos[AGAIN] = protos["original"]  # timed on a session of its own
    for level, label in ORT_LEVELS.items():
        result["onnx"][label] = {batch: _time_ort(protos, level, shape, batch, runs) for batch in BATCHES}
        result["sessions"][label] = _sessions(protos, level)
    return result


def run(quick: bool = False) -> dict:
    results = {}
    with tempfile.TemporaryDirectory(prefix="bnfold-latency-") as folder:
        for name, shape in MODELS:
            if quick and name not in QUICK_MODELS:
                continue
            runs = 7 if name == "resnet50" else 21
            results[name] = case(name, shape, 3 if quick else runs, Path(folder))
            print(f"  latency {name}", flush=True)
    return results


def _session_ratio(results: dict, label: str) -> float:
    return statistics.median(r["sessions"][label]["folded"] / r["sessions"][label]["original"] for r in results.values())


def configurations(results: dict):
    """(model, runtime label, batch, summary) for every timed configuration."""
    for name, result in results.items():
        for batch, summary in result["eager"].items():
            yield name, "PyTorch eager", int(batch), summary
        for mode, by_batch in result["onnx"].items():
            for batch, summary in by_batch.items():
                yield name, mode, int(batch), summary


def markdown(results: dict) -> str:
    eager_rows, onnx_rows = [], []
    for name, runtime, batch, summary in configurations(results):
        cells = [name, batch, fmt_ms(summary["original"]), fmt_ms(summary["folded"]), fmt_ms(summary["deleted"]),
                 fmt_ratio(summary["A/A"]), fmt_ratio(summary["folded/original"]), fmt_ratio(summary["folded/deleted"])]
        if runtime == "PyTorch eager":
            traced = summary.get("folded/deleted, traced")
            eager_rows.append([*cells, fmt_ratio(traced) if traced else "does not trace"])
        else:
            onnx_rows.append([cells[0], runtime, *cells[1:]])
    session_rows = [[name, mode,
                     *(f"{result['sessions'][mode][v] * 1e3:.3g}" for v in VARIANTS)]
                    for name, result in results.items() for mode in result["sessions"]]
    header = ["batch", "original ms", "folded ms", "BN deleted ms", "A/A (noise)", "folded / original",
              "folded / BN deleted"]
    return "\n\n".join([
        "PyTorch eager (ratios: median of per-round ratios, min–max over rounds; below 1 = folded faster):",
        table(["model", *header, "folded / BN deleted as GraphModule"], eager_rows),
        "onnxruntime (the same models exported with BN kept; folded by bnfold; BN-deleted export):",
        table(["model", "graph optimizations", *header], onnx_rows),
        f"onnxruntime session creation, ms (median of {SESSION_REPEATS}, interleaved); folded / original, median "
        "over models: " + ", ".join(f"{label} {_session_ratio(results, label):.2f}×" for label in ORT_LEVELS.values())
        + ":",
        table(["model", "graph optimizations", *(f"{v}" for v in VARIANTS)], session_rows),
    ])
