"""CPU latency: original vs bnfold-folded vs its foldable BN deleted (the physical limit of folding).

PyTorch eager at batch 1 and 8, and the same three models exported to ONNX, in onnxruntime with graph
optimizations off and all on, plus session creation time. All variants of one configuration are
timed in the same interleaved rounds (`bnfold.benchmark.time_interleaved`) with inputs converted once
(PyTorch through the engine's `prepare`: `torch.inference_mode`; onnxruntime through a ready session),
so that what differs is the model alone. "BN deleted" replaces every BN layer that folds exactly (the
zoo's ground truth; in ResNet-50 all of them) by an identity, keeping the activation a BN subclass such as
timm's BatchNormAct2d applies, and keeps the BN layers that no exact fold can remove: it computes
something else, and no exact fold computes less. Where a model has such layers (densenet), eager PyTorch also
times it with every BN deleted, which says what the layers that cannot fold cost. Eager PyTorch also
times two more forms of the same fold: "hand-folded", the BN-deleted model holding the folded weights
and biases (the fold's arithmetic in the original's own code: what the fold costs before any question of
form), and the folded GraphModule as folding leaves it, before `bnfold.pytorch.streamline` turns its
parameterless leaf modules into function calls (what that form costs). A second, identical copy of the
original is timed in the same rounds too: its ratio to the original (A/A) is the noise of the run.

    .venv/bin/python benchmarks/latency.py [--models regnety,densenet] [--eager-only] [--runs 21]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import bnfold  # noqa: E402
from benchmarks.common import fmt_ms, fmt_ratio, ort_session, ratio, set_threads, table  # noqa: E402
from benchmarks.onnx_fold import ResNet50  # noqa: E402
from bnfold.benchmark import time_interleaved  # noqa: E402
from bnfold.formats import as_model  # noqa: E402
from bnfold.pytorch.engine import TorchEngine  # noqa: E402
from tests.zoo import ZOO_BY_NAME, bn_module_names, export_onnx, randomize_bn  # noqa: E402

# (name, input shape at batch 1): zoo models at a larger resolution than their tests use, and ResNet-50.
MODELS = [("resnet_basic", (1, 3, 64, 64)), ("resnet_bottleneck", (1, 3, 64, 64)),
          ("mobilenetv2_timm", (1, 3, 64, 64)), ("efficientnet", (1, 3, 64, 64)), ("regnety", (1, 3, 64, 64)),
          ("unet", (1, 3, 64, 64)), ("densenet", (1, 3, 64, 64)), ("tcn1d", (1, 4, 256)),
          ("video3d", (1, 3, 8, 32, 32)), ("vit_bn", (1, 3, 16, 16)), ("resnet50", (1, 3, 224, 224))]
QUICK_MODELS = ["resnet_basic", "densenet"]
BATCHES = (1, 8)
VARIANTS = ("original", "folded", "deleted")
AGAIN = "original, again"  # the A/A control
EVERY_BN = "every BN deleted"  # only where some BN cannot fold exactly
RAW = "folded, not streamlined"  # the folded GraphModule as folding leaves it (eager only)
HAND = "hand-folded"  # the BN-deleted model with the folded weights and biases (eager only)
SESSION_REPEATS = 3
ORT_LEVELS = {"disabled": "optimizations off", "all": "all optimizations"}


def build(name: str) -> nn.Module:
    if name == "resnet50":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return randomize_bn(ResNet50().eval(), seed=0)
    return ZOO_BY_NAME[name].factory()


def foldable(name: str, model: nn.Module) -> set[str]:
    """The BN layers an exact fold removes: the zoo's ground truth; in ResNet-50 every BN follows its conv."""
    entry = ZOO_BY_NAME.get(name)
    return set(entry.foldable) if entry is not None else bn_module_names(model)


def delete_bn(model: nn.Module, names: set[str]) -> nn.Module:
    """A copy with the named BN layers replaced by identities (a BN subclass keeps its own child modules)."""
    copied = copy.deepcopy(model)
    for name in sorted(names, key=len, reverse=True):
        parent_name, _, leaf = name.rpartition(".")
        parent = copied.get_submodule(parent_name)
        children = list(getattr(parent, leaf).children())
        setattr(parent, leaf, nn.Sequential(*children) if children else nn.Identity())
    return copied


def hand_folded(deleted: nn.Module, folded: nn.Module, example: torch.Tensor) -> nn.Module:
    """The BN-deleted model holding the folded model's conv and linear tensors: the fold's arithmetic in the
    original eager code (the folded tensors keep their module paths)."""
    copied, modules = copy.deepcopy(deleted), dict(deleted.named_modules())
    for name, tensor in folded.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if isinstance(modules.get(owner), (nn.modules.conv._ConvNd, nn.Linear)):
            setattr(copied.get_submodule(owner), leaf, nn.Parameter(tensor.clone(), requires_grad=False))
    with torch.no_grad():
        torch.testing.assert_close(copied(example), folded(example))
    return copied


def _shape_text(shape: tuple[int, ...]) -> str:
    return ",".join(str(d) for d in shape)


def _summary(timings: dict) -> dict:
    summary = {**{name: timing.to_dict() for name, timing in timings.items()},
               "folded/original": ratio(timings["folded"], timings["original"]),
               "folded/deleted": ratio(timings["folded"], timings["deleted"]),
               "deleted/original": ratio(timings["deleted"], timings["original"]),
               "A/A": ratio(timings[AGAIN], timings["original"])}
    if EVERY_BN in timings:
        summary["folded/every BN deleted"] = ratio(timings["folded"], timings[EVERY_BN])
    if RAW in timings:
        summary["not streamlined/deleted"] = ratio(timings[RAW], timings["deleted"])
        summary["hand-folded/deleted"] = ratio(timings[HAND], timings["deleted"])
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


def case(name: str, shape: tuple[int, ...], runs: int, folder: Path, onnx_runtime: bool = True) -> dict:
    module = build(name)
    exact = foldable(name, module)
    deleted = delete_bn(module, exact)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folded = bnfold.fold(module, input_shape=_shape_text((2, *shape[1:])), verify=False).folded_model
        with mock.patch("bnfold.pytorch.engine.streamline", lambda module: None):
            raw = bnfold.fold(module, input_shape=_shape_text((2, *shape[1:])), verify=False).folded_model
    example = torch.from_numpy(_input(shape, 2))
    eager = {"original": as_model(module), "folded": folded, "deleted": as_model(deleted),
             AGAIN: as_model(copy.deepcopy(module)), RAW: raw,
             HAND: as_model(hand_folded(deleted, folded.module, example))}
    if exact != bn_module_names(module):
        eager[EVERY_BN] = as_model(delete_bn(module, bn_module_names(module)))
    result: dict = {"shape": list(shape), "eager": {}, "onnx": {}, "sessions": {}}
    for batch in BATCHES:
        result["eager"][batch] = _time_eager(eager, shape, batch, runs)
    if not onnx_runtime:
        return result

    original_path = export_onnx(module, shape, folder / f"{name}.onnx")
    protos = {"original": onnx.load(str(original_path)),
              "folded": bnfold.fold(original_path, verify=False).folded_model.proto,
              "deleted": onnx.load(str(export_onnx(deleted, shape, folder / f"{name}.deleted.onnx")))}
    protos[AGAIN] = protos["original"]  # timed on a session of its own
    for level, label in ORT_LEVELS.items():
        result["onnx"][label] = {batch: _time_ort(protos, level, shape, batch, runs) for batch in BATCHES}
        result["sessions"][label] = _sessions(protos, level)
    return result


def run(quick: bool = False, models: list[str] | None = None, onnx_runtime: bool = True,
        runs: int | None = None) -> dict:
    """Every model of MODELS (or `models`); `runs` rounds per configuration (default 21, 7 for ResNet-50)."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="bnfold-latency-") as folder:
        for name, shape in MODELS:
            if (quick and name not in QUICK_MODELS) or (models is not None and name not in models):
                continue
            rounds = 3 if quick else runs or (7 if name == "resnet50" else 21)
            results[name] = case(name, shape, rounds, Path(folder), onnx_runtime)
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
            eager_rows.append([*cells, fmt_ratio(summary["hand-folded/deleted"]),
                               fmt_ratio(summary["not streamlined/deleted"])])
        else:
            onnx_rows.append([cells[0], runtime, *cells[1:]])
    header = ["batch", "original ms", "folded ms", "BN deleted ms", "A/A (noise)", "folded / original",
              "folded / BN deleted"]
    parts = ["PyTorch eager (ratios: median of per-round ratios, min–max over rounds; below 1 = folded faster):",
             table(["model", *header, "hand-folded / BN deleted", "not streamlined / BN deleted"], eager_rows)]
    parts += [f"{name}, batch {batch}: folded / every BN deleted {fmt_ratio(summary['folded/every BN deleted'])}, "
              "the cost of the BN layers that no exact fold removes."
              for name, runtime, batch, summary in configurations(results)
              if runtime == "PyTorch eager" and "folded/every BN deleted" in summary]
    if onnx_rows:
        session_rows = [[name, mode, *(f"{result['sessions'][mode][v] * 1e3:.3g}" for v in VARIANTS)]
                        for name, result in results.items() for mode in result["sessions"]]
        parts += [
            "onnxruntime (the same models exported with BN kept; folded by bnfold; BN-deleted export):",
            table(["model", "graph optimizations", *header], onnx_rows),
            f"onnxruntime session creation, ms (median of {SESSION_REPEATS}, interleaved); folded / original, "
            "median over models: "
            + ", ".join(f"{label} {_session_ratio(results, label):.2f}×" for label in ORT_LEVELS.values()) + ":",
            table(["model", "graph optimizations", *VARIANTS], session_rows)]
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated, from: {', '.join(name for name, _ in MODELS)}")
    parser.add_argument("--eager-only", action="store_true", help="PyTorch eager only, no onnxruntime")
    parser.add_argument("--runs", type=int, help="interleaved rounds per configuration")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for PyTorch and onnxruntime")
    args = parser.parse_args()
    models = [name.strip() for name in args.models.split(",")] if args.models else None
    unknown = sorted(set(models or []) - {name for name, _ in MODELS})
    if unknown:
        parser.error(f"unknown models {unknown}")
    warnings.simplefilter("ignore")
    set_threads(args.threads)
    print(markdown(run(models=models, onnx_runtime=not args.eager_only, runs=args.runs)))


if __name__ == "__main__":
    main()
