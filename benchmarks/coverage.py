"""Fold coverage on the zoo: how many BN layers each tool leaves, and whether its output is still right.

PyTorch: bnfold vs `torch.fx.experimental.optimization.fuse`. ONNX (the zoo exported with BN kept, and
small ONNX models built by hand, one per ONNX-only pattern of issue 4, `tests/onnx_builders.PATTERNS`):
bnfold vs onnxruntime's basic level (the optimized model it writes), onnxoptimizer's `fuse_bn_into_conv`
and onnxslim. A BN layer is "left" when the model still computes it: in PyTorch, when a forward still
runs a batch-norm op or reads the layer's running statistics (look-alikes compute x*scale+shift by
hand; found by content, since tools rename or inline tensors), over inputs that take every data-dependent
branch; in ONNX, a BatchNormalization node. A tool's fold only counts when its output still agrees
with the original (relative error at most `CORRECT`); otherwise it is marked wrong.
"""

from __future__ import annotations

import copy
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

import bnfold
from benchmarks.common import fmt_err, ort_outputs, ort_session, rel_error, table
from tests.onnx_builders import PATTERNS, Pattern, feeds
from tests.zoo import ZOO, ZooModel, export_onnx, onnx_bn_modules, onnx_bn_nodes
from tests.zoo import _bn_tensors as zoo_bn_tensors

CORRECT = 1e-4  # relative output error above which a tool's result is wrong (bnfold's fold tolerance)
TORCH_TOOLS = ("bnfold", "fx.fuse")
ONNX_TOOLS = ("bnfold", "ORT basic", "onnxoptimizer", "onnxslim")


def bn_left(original: torch.nn.Module, candidate: torch.nn.Module, layers: frozenset[str],
            inputs: list[torch.Tensor]) -> int:
    """BN layers that `candidate` still computes on any of `inputs`: ops reading a layer's running
    statistics or its scale (found by content: tools rename tensors, and a symbolic trace bakes a
    look-alike's scale into a constant), plus batch-norm ops on no statistics."""
    from torch.utils._python_dispatch import TorchDispatchMode

    stats = {_fingerprint(tensor): name for name in layers for tensor in _bn_tensors(original.get_submodule(name))}
    owners = {t.data_ptr(): stats[_fingerprint(t)] for t in [*candidate.parameters(), *candidate.buffers()]
              if _fingerprint(t) in stats}
    computed: set[str] = set()
    anonymous = 0

    class Recording(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal anonymous
            read = {owners.get(a.data_ptr()) for a in args if isinstance(a, torch.Tensor)} - {None}
            computed.update(read)
            anonymous += "batch_norm" in func.__name__ and not read
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        for x in inputs:
            with Recording():
                candidate(x)
    return len(computed) + anonymous // len(inputs)


@torch.no_grad()
def _bn_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """A BN layer's running statistics and, when it is affine, its per-channel scale (not its shift: a
    folded bias-free conv's new bias equals it)."""
    mean, var, weight, _ = zoo_bn_tensors(module) or (None,) * 4
    if var is not None and weight is not None:
        return [mean, var, weight * (var + module.eps).rsqrt()]
    return [t for t in (mean, var) if t is not None]


def _fingerprint(tensor: torch.Tensor) -> tuple:
    return str(tensor.dtype), tensor.detach().cpu().contiguous().numpy().tobytes()


def _torch_runnable(model) -> torch.nn.Module:
    return model.program.module() if hasattr(model, "program") else model.module


@torch.no_grad()
def torch_case(entry: ZooModel) -> dict:
    original = entry.factory()
    x = entry.example(batch=3, seed=7)
    inputs = [x, 3 * x, -3 * x]  # data-dependent branches take both ways
    expected = original(x)
    result = {"bn": bn_left(original, original, entry.bn_layers, inputs), "exact": len(entry.foldable)}
    report = bnfold.fold(copy.deepcopy(original), input_shape=entry.shape_text(batch=2), verify=False)
    folded = _torch_runnable(report.folded_model)
    result["bnfold"] = {"left": bn_left(original, folded, entry.bn_layers, inputs),
                        "error": rel_error(expected, folded(x))}
    try:
        from torch.fx.experimental.optimization import fuse

        fused = fuse(copy.deepcopy(original))
        result["fx.fuse"] = {"left": bn_left(original, fused, entry.bn_layers, inputs),
                             "error": rel_error(expected, fused(x))}
    except Exception as error:  # symbolic tracing fails on the model: nothing is fused
        result["fx.fuse"] = {"left": result["bn"], "error": None, "failed": type(error).__name__}
    return result


def onnx_case(entry: ZooModel, folder: Path) -> dict:
    path = export_onnx(entry.factory(), entry.input_shape, folder / f"{entry.name}.onnx",
                       dynamic_batch=entry.onnx_dynamic_batch)
    proto = onnx.load(str(path))
    x = entry.example(batch=3 if entry.onnx_dynamic_batch else None, seed=7).numpy()
    per_module = onnx_bn_modules(proto, entry.bn_layers)
    kept = sum(count for name, count in per_module.items() if name in entry.onnx_expected_kept)
    result = {"bn": len(onnx_bn_nodes(proto)), "exact": len(onnx_bn_nodes(proto)) - kept,
              "nodes": len(proto.graph.node)}
    return {**result, **onnx_tools(path, proto, [{proto.graph.input[0].name: x}], result["bn"])}


def pattern_case(pattern: Pattern, folder: Path) -> dict:
    """One hand-built ONNX pattern: its BN nodes, how many bnfold must fold, and every tool's outcome. A
    boolean input (an If's condition) is fed both ways."""
    proto = pattern.build(np.random.default_rng(0))
    path = folder / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', pattern.name)}.onnx"
    onnx.save(proto, str(path))
    base = feeds(proto, np.random.default_rng(7))
    flags = [name for name, value in base.items() if value.dtype == np.bool_]
    inputs = [{**base, **{name: np.array(value) for name in flags}} for value in (True, False)] if flags else [base]
    bn = len(onnx_bn_nodes(proto))
    result = {"what": pattern.what, "bn": bn, "exact": pattern.foldable, "nodes": len(proto.graph.node)}
    return {**result, **onnx_tools(path, proto, inputs, bn)}


def onnx_tools(path: Path, proto: onnx.ModelProto, inputs: list[dict[str, np.ndarray]], bn: int) -> dict:
    """Each ONNX tool's result on the model at `path` (`proto`, with `bn` BN nodes): BN nodes left, node
    count, and relative error (the worst over every output and every feed of `inputs`)."""
    import onnxoptimizer
    import onnxslim

    expected = [ort_outputs(proto, feed) for feed in inputs]
    outputs = {"bnfold": lambda: bnfold.fold(path, verify=False).folded_model.proto,
               "ORT basic": lambda: _ort_basic(path, path.with_suffix(".basic.onnx")),
               "onnxoptimizer": lambda: onnxoptimizer.optimize(proto, ["fuse_bn_into_conv"]),
               "onnxslim": lambda: onnxslim.slim(copy.deepcopy(proto))}
    result = {}
    for tool, make in outputs.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = make()
            error = max(rel_error(want, got) for feed, wanted in zip(inputs, expected)
                        for want, got in zip(wanted, ort_outputs(out, feed), strict=True))
            result[tool] = {"left": len(onnx_bn_nodes(out)), "error": error, "nodes": len(out.graph.node)}
        except Exception as error:  # a tool that crashes on the model (or writes one that fails) leaves every BN
            result[tool] = {"left": bn, "error": None, "failed": f"{type(error).__name__}: {error}"[:200]}
    return result


def _ort_basic(path: Path, optimized: Path) -> onnx.ModelProto:
    ort_session(path, "basic", optimized)
    return onnx.load(str(optimized))


def run(quick: bool = False) -> dict:
    """{"zoo": {model: {"patterns", "torch", "onnx"}}, "onnx_patterns": {pattern: result}}."""
    entries = ZOO[:4] if quick else ZOO
    results: dict = {"zoo": {}, "onnx_patterns": {}}
    with tempfile.TemporaryDirectory(prefix="bnfold-coverage-") as folder:
        for entry in entries:
            results["zoo"][entry.name] = {"patterns": entry.patterns, "torch": torch_case(entry),
                                          "onnx": onnx_case(entry, Path(folder)) if not entry.onnx_skip else None}
            print(f"  coverage {entry.name}", flush=True)
        for pattern in PATTERNS:
            results["onnx_patterns"][pattern.name] = pattern_case(pattern, Path(folder))
        print(f"  coverage: {len(PATTERNS)} ONNX patterns", flush=True)
    return results


def _cell(result: dict, tool: str) -> str:
    outcome = result[tool]
    if outcome.get("failed"):
        return f"{outcome['left']} (fails)"
    wrong = outcome["error"] is not None and outcome["error"] > CORRECT
    return f"{outcome['left']} ({fmt_err(outcome['error'])}{', **wrong**' if wrong else ''})"


def correct_left(outcome: dict, bn: int) -> int:
    """BN left, counting a wrong result as folding nothing."""
    wrong = outcome.get("failed") or (outcome["error"] is not None and outcome["error"] > CORRECT)
    return bn if wrong else outcome["left"]


FRAMEWORKS = {"torch": "PyTorch", "onnx": "ONNX", "onnx_patterns": "ONNX patterns"}


def _cases(results: dict) -> dict[str, tuple[dict, tuple[str, ...]]]:
    """framework -> (model -> its outcome, the tools compared)."""
    zoo = results["zoo"]
    return {"torch": ({name: r["torch"] for name, r in zoo.items()}, TORCH_TOOLS),
            "onnx": ({name: r["onnx"] for name, r in zoo.items() if r["onnx"]}, ONNX_TOOLS),
            "onnx_patterns": (results["onnx_patterns"], ONNX_TOOLS)}


def summary(results: dict) -> dict:
    """Totals per tool (wrong results count as folding nothing) and where bnfold leaves more than a tool."""
    totals: dict = {}
    behind = []
    for framework, (cases, tools) in _cases(results).items():
        bn = sum(c["bn"] for c in cases.values())
        exact = sum(c["exact"] for c in cases.values())
        totals[framework] = {"models": len(cases), "bn": bn, "exact": exact}
        for tool in tools:
            left = sum(correct_left(c[tool], c["bn"]) for c in cases.values())
            wrong = [name for name, c in cases.items() if c[tool].get("error") is not None and c[tool]["error"] > CORRECT]
            failed = [name for name, c in cases.items() if c[tool].get("failed")]
            max_error = max((c[tool]["error"] for c in cases.values() if c[tool].get("error") is not None), default=None)
            totals[framework][tool] = {"left": left, "folded": bn - left, "wrong": wrong, "failed": failed,
                                       "max_error": max_error}
        for name, case in cases.items():
            mine = correct_left(case["bnfold"], case["bn"])
            for tool in tools[1:]:
                if correct_left(case[tool], case["bn"]) < mine:
                    behind.append(f"{name} ({FRAMEWORKS[framework]}, {tool})")
    totals["bnfold_behind"] = behind
    return totals


def markdown(results: dict) -> str:
    totals = summary(results)
    zoo = results["zoo"]
    torch_rows = [[name, r["torch"]["bn"], r["torch"]["exact"], *(_cell(r["torch"], t) for t in TORCH_TOOLS)]
                  for name, r in zoo.items()]
    onnx_rows = [[name, r["onnx"]["bn"], r["onnx"]["exact"], *(_cell(r["onnx"], t) for t in ONNX_TOOLS)]
                 for name, r in zoo.items() if r["onnx"]]
    total_rows = []
    for key, (_, tools) in _cases(results).items():
        t, framework = totals[key], FRAMEWORKS[key]
        for tool in tools:
            outcome = t[tool]
            notes = ", ".join(filter(None, [f"wrong on {', '.join(outcome['wrong'])}" if outcome["wrong"] else "",
                                            f"fails on {', '.join(outcome['failed'])}" if outcome["failed"] else ""]))
            total_rows.append([framework, tool, f"{outcome['folded']} of {t['exact']} ({t['bn']} BN)",
                               outcome["left"], fmt_err(outcome["max_error"]), notes or "–"])
    return "\n\n".join([
        table(["framework", "tool", "BN folded correctly (of exactly foldable)", "BN left", "max rel. error",
               "notes"], total_rows),
        "Per model, PyTorch (cells: BN left (relative output error)):",
        table(["model", "BN", "exactly foldable", *TORCH_TOOLS], torch_rows),
        "Per model, ONNX export (cells: BatchNormalization nodes left (relative output error)):",
        table(["model", "BN nodes", "exactly foldable", *ONNX_TOOLS], onnx_rows),
    ])


def subsections(results: dict) -> list[str]:
    """The hand-built ONNX patterns: what the table measures, what it shows, and the table."""
    cases = results["onnx_patterns"]
    t = summary(results)["onnx_patterns"]
    keep = [name for name, c in cases.items() if c["exact"] == 0]
    peers = ", ".join(
        f"{tool} {t[tool]['folded']}" + "".join(f" ({label} on {', '.join(t[tool][key])})"
                                                for key, label in (("wrong", "wrong"), ("failed", "fails"))
                                                if t[tool][key])
        for tool in ONNX_TOOLS[1:])
    missed = {tool: [name for name, c in cases.items() if c["exact"] and correct_left(c[tool], c["bn"]) == c["bn"]]
              for tool in ONNX_TOOLS}
    rows = [[f"`{name}`: {c['what']}", c["bn"], c["exact"], *(_cell(c, tool) for tool in ONNX_TOOLS)]
            for name, c in cases.items()]
    return [
        "### ONNX patterns built by hand", "",
        f"What it measures: {len(cases)} small ONNX models (`tests/onnx_builders.PATTERNS`; those named `ort-` "
        "are onnxruntime's own test models from `../shared/conformance`), one per pattern of issue 4 that an "
        "export of the zoo never produces, run through the same tools and counted the same way as the table "
        "above. \"Exactly foldable\" is what bnfold must fold and proves (tests/test_onnx_patterns.py); the "
        f"{len(keep)} models named `keep-` hold a BN whose right answer is to keep it (0 foldable). A boolean "
        "input (the If's condition) is fed both ways.", "",
        f"What it shows: bnfold folds {t['bnfold']['folded']} of {t['exact']} exactly-foldable BN "
        f"(max relative error {fmt_err(t['bnfold']['max_error'])}) and keeps all {len(keep)} it must keep; "
        f"correctly folded by the others: {peers}. Models where a tool folds none of the BN it should: "
        f"onnxruntime's basic level {', '.join(missed['ORT basic']) or 'none'}; onnxoptimizer "
        f"{', '.join(missed['onnxoptimizer']) or 'none'}; onnxslim {', '.join(missed['onnxslim']) or 'none'}. "
        + ("No tool folds a BN that bnfold keeps with a correct output." if not any(
            correct_left(c[tool], c["bn"]) < c["bn"] for c in cases.values() if not c["exact"] for tool in ONNX_TOOLS)
           else "**A tool folds a BN that should be kept, with a correct output: see the table.**"), "",
        "Per pattern (cells: BatchNormalization nodes left (relative output error)):", "",
        table(["pattern", "BN nodes", "exactly foldable", *ONNX_TOOLS], rows), ""]
