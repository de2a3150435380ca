"""Acceptance tests for folding (issues 3 and 4): every zoo architecture, PyTorch and ONNX.

For each architecture of `tests/zoo.py`, bnfold must fold exactly the hand-derived set of exactly-foldable
BN layers, keep every other one with a reason, leave no BN computation behind for the folded ones, and
compute the same function (relative output error <= 1e-5 in float32). PyTorch models go in as modules
in memory, `.pt2` files (dynamic and static batch), pickled modules and state_dicts with a model factory
(folded into `.pt2` programs that are loaded back and run); ONNX models are exports with BN kept, compared
with what onnxruntime's basic-level optimizer leaves.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import bnfold
from bnfold.errors import UsageError
from bnfold.formats import FileKind, sniff
from bnfold.layers import FoldStatus
from bnfold.model import ModelFormat
from bnfold.reports.fold import FoldReport
from tests.zoo import (
    ZOO,
    ZOO_BY_NAME,
    ZooModel,
    bn_calls,
    bn_module_names,
    export_onnx,
    onnx_bn_module,
    onnx_bn_modules,
    onnx_bn_nodes,
    stat_reads,
)

REL_TOLERANCE = 1e-5
STATIC_PT2 = ["mobilenetv2_timm", "vit_bn", "token_mlp", "frozen_backbone", "fold_forward"]
# A state_dict fold writes a .pt2 program exported from the folded graph (dynamic batch); where torch.export
# cannot capture the model (`pt2_skip`), a pickle of the module-by-module fold instead, the notes saying why.
STATE_DICT_PT2 = [entry for entry in ZOO if not entry.pt2_skip]
STATE_DICT_PICKLE = [entry for entry in ZOO if entry.pt2_skip]


def zoo_params(entries: list[ZooModel] | None = None, *, skip_pt2: bool = False,
               skip_onnx: bool = False) -> list:
    params = []
    for entry in entries if entries is not None else ZOO:
        marks = []
        if skip_pt2 and entry.pt2_skip:
            marks.append(pytest.mark.skip(reason=entry.pt2_skip))
        if skip_onnx and entry.onnx_skip:
            marks.append(pytest.mark.skip(reason=entry.onnx_skip))
        params.append(pytest.param(entry, id=entry.name, marks=marks))
    return params


def marked_params(by_name: dict[str, ZooModel], names: list[str] | None = None, **marked: dict[str, str]) -> list:
    """The entries of `by_name` named (default: all); `skip={name: why}` skips one, `xfail={name: why}`
    marks it strict xfail."""
    make = {"skip": pytest.mark.skip, "xfail": lambda reason: pytest.mark.xfail(strict=True, reason=reason)}
    return [pytest.param(by_name[name], id=name, marks=[make[kind](reason=why[name]) for kind, why in marked.items()
                                                        if name in why])
            for name in names or by_name]


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")


# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------


def rel_error(expected, actual) -> float:
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    assert expected.shape == actual.shape
    assert np.isfinite(actual).all()
    return float(np.abs(expected - actual).max() / np.abs(expected).max())


def runnable(model) -> torch.nn.Module:
    """The eager callable behind a torch Model adapter (ExportedProgram: its unlifted module)."""
    if hasattr(model, "program"):
        return model.program.module()
    return model.module


@torch.no_grad()
def forward(module, x: torch.Tensor) -> np.ndarray:
    return module(x).numpy()


def assert_decisions(report, entry: ZooModel) -> None:
    """Folded decisions are exactly the foldable set; kept ones are exactly the rest, each with a reason."""
    folded = sorted(d.layer for d in report.folded)
    kept = sorted(d.layer for d in report.kept)
    assert folded == sorted(entry.foldable), (
        f"folded {sorted(set(folded) - entry.foldable)} that must be kept; "
        f"kept {sorted(entry.foldable - set(folded))} that fold exactly")
    assert kept == sorted(entry.kept)
    for decision in report.kept:
        assert decision.reason and decision.reason.strip(), f"{decision.layer} kept without a reason"
    for decision in report.folded:
        assert decision.status is FoldStatus.FOLDED
        assert decision.targets, f"{decision.layer} folded into nothing"


def assert_verified(report) -> None:
    assert report.verify_error is None, report.verify_error
    assert report.verified, report.difference
    assert report.difference.max_rel <= REL_TOLERANCE, report.difference


def assert_bn_gone(entry: ZooModel, original: torch.nn.Module, folded: torch.nn.Module, x: torch.Tensor) -> None:
    """No op of the folded model reads a folded layer's statistics, and only kept layers' BN ops remain."""
    reads = stat_reads(folded, x)
    leftover = sorted(set(reads) & entry.foldable)
    assert not leftover, f"the folded model still computes {leftover}"
    before = bn_calls(original, x)
    expected = sum(count for layer, count in before.items() if layer in entry.kept)
    assert sum(bn_calls(folded, x).values()) == expected


def check_torch_fold(report, entry: ZooModel, original: torch.nn.Module) -> None:
    assert_decisions(report, entry)
    assert_verified(report)
    folded = runnable(report.folded_model)
    x = entry.example(batch=3, seed=7)
    assert rel_error(forward(original, x), forward(folded, x)) <= REL_TOLERANCE
    assert_bn_gone(entry, original, folded, x)


def assert_written_model_computes(entry: ZooModel, original: torch.nn.Module, written: torch.nn.Module) -> None:
    """A folded model loaded back from its file: same outputs at two batch sizes (the batch stays dynamic),
    no folded BN left."""
    for batch in (1, 5):
        x = entry.example(batch=batch, seed=batch)
        assert rel_error(forward(original, x), forward(written, x)) <= REL_TOLERANCE
    assert_bn_gone(entry, original, written, entry.example(batch=2, seed=3))


# --------------------------------------------------------------------------------------------------------
# The zoo itself (pass without any fold engine): the ground truth covers every BN, models are sound
# --------------------------------------------------------------------------------------------------------


def test_zoo_is_varied() -> None:
    assert len(ZOO) >= 14
    assert len({entry.name for entry in ZOO}) == len(ZOO)
    assert sum(len(entry.foldable) for entry in ZOO) >= 100
    assert sum(len(entry.kept) for entry in ZOO) >= 15


@pytest.mark.parametrize("entry", zoo_params())
def test_zoo_ground_truth_covers_every_bn(entry: ZooModel) -> None:
    model = entry.factory()
    assert bn_module_names(model) == set(entry.bn_layers)
    assert not entry.foldable & set(entry.kept)
    assert not model.training and not any(m.training for m in model.modules())
    # deterministic, with non-trivial statistics that differ from layer to layer
    again = entry.factory().state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, again[key]), key
    for name, tensor in model.named_buffers():
        if name.endswith(("running_mean", ".mu")):
            assert tensor.abs().max() > 0.05, name
    x = entry.example(batch=2)
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all() and out.abs().max() > 1e-2
    assert set(bn_calls(model, x)) <= set(entry.bn_layers)


# --------------------------------------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", zoo_params())
def test_fold_module_in_memory(entry: ZooModel) -> None:
    model = entry.factory()
    before = copy.deepcopy(model.state_dict())
    report = bnfold.fold(model, input_shape=entry.shape_text(batch=2))
    check_torch_fold(report, entry, model)
    after = model.state_dict()  # the caller's model is never changed
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _export_pt2(entry: ZooModel, directory: Path, dynamic: bool) -> Path:
    model = entry.factory()
    shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic else None
    program = torch.export.export(model, (entry.example(batch=2),), dynamic_shapes=shapes)
    path = directory / f"{entry.name}{'' if dynamic else '_static'}.pt2"
    torch.export.save(program, str(path))
    return path


@pytest.mark.parametrize("entry", zoo_params(skip_pt2=True))
def test_fold_pt2_dynamic_batch(entry: ZooModel, zoo_dir: Path) -> None:
    source = _export_pt2(entry, zoo_dir, dynamic=True)
    output = zoo_dir / f"{entry.name}.folded.pt2"
    report = bnfold.fold(source, output)  # input shapes come from the program's signature
    original = entry.factory()
    check_torch_fold(report, entry, original)
    assert output.exists()
    assert_written_model_computes(entry, original, torch.export.load(str(output)).module())


@pytest.mark.parametrize("entry", zoo_params([ZOO_BY_NAME[name] for name in STATIC_PT2], skip_pt2=True))
def test_fold_pt2_static_batch(entry: ZooModel, zoo_dir: Path) -> None:
    source = _export_pt2(entry, zoo_dir, dynamic=False)
    report = bnfold.fold(source)
    assert_decisions(report, entry)
    assert_verified(report)
    original, folded = entry.factory(), runnable(report.folded_model)
    x = entry.example(batch=2, seed=11)
    assert rel_error(forward(original, x), forward(folded, x)) <= REL_TOLERANCE
    assert_bn_gone(entry, original, folded, x)


@pytest.mark.parametrize("entry", zoo_params())
def test_fold_pickled_module(entry: ZooModel, zoo_dir: Path) -> None:
    from bnfold.pickle_scan import archive_pickle_imports

    source, output = zoo_dir / f"{entry.name}_pickle.pt", zoo_dir / f"{entry.name}_pickle.folded.pt"
    torch.save(entry.factory(), str(source))
    report = bnfold.fold(source, output, allow_pickle=True, input_shape=entry.shape_text())
    original = entry.factory()
    check_torch_fold(report, entry, original)
    imports = archive_pickle_imports(output)
    assert not [name for name in imports if name.startswith("bnfold")], "the folded pickle needs bnfold to load"
    reloaded = torch.load(str(output), weights_only=False).eval()
    x = entry.example(batch=2, seed=5)
    assert rel_error(forward(original, x), forward(reloaded, x)) <= REL_TOLERANCE
    assert_bn_gone(entry, original, reloaded, x)


def _fold_state_dict(entry: ZooModel, directory: Path, suffix: str = ".pt2") -> tuple[FoldReport, Path]:
    """Fold a saved state_dict of `entry` with its factory into an output named `suffix`; the report and
    the output."""
    source = directory / f"{entry.name}_state_dict.pt"
    output = directory / f"{entry.name}_state_dict.folded{suffix}"
    torch.save(entry.factory().state_dict(), str(source))
    report = bnfold.fold(source, output, model_factory=entry.factory_spec, input_shape=entry.shape_text())
    return report, output


@pytest.mark.parametrize("entry", zoo_params(STATE_DICT_PT2))
def test_fold_state_dict_with_factory(entry: ZooModel, zoo_dir: Path) -> None:
    report, output = _fold_state_dict(entry, zoo_dir)
    original = entry.factory()
    check_torch_fold(report, entry, original)
    assert report.folded_model.format is ModelFormat.EXPORTED_PROGRAM
    assert report.output == str(output) and sniff(output) == FileKind.EXPORTED_PROGRAM
    assert_written_model_computes(entry, original, torch.export.load(str(output)).module())


@pytest.mark.parametrize("entry", zoo_params(STATE_DICT_PICKLE))
def test_fold_state_dict_that_torch_export_cannot_capture(entry: ZooModel, zoo_dir: Path) -> None:
    """A .pt2 output cannot hold it: refused, saying why and what to do, with nothing written; an output
    named .pt gets the folded module pickled (README, formats table)."""
    with pytest.raises(UsageError, match="cannot be written as a .pt2 program.*data-dependent") as refused:
        _fold_state_dict(entry, zoo_dir)
    assert "name the output .pt" in refused.value.hint
    assert not (zoo_dir / f"{entry.name}_state_dict.folded.pt2").exists()
    report, output = _fold_state_dict(entry, zoo_dir, ".pt")
    original = entry.factory()
    check_torch_fold(report, entry, original)
    assert report.folded_model.format is ModelFormat.PICKLE
    assert any("torch.load(..., weights_only=False)" in note for note in report.notes)
    assert report.output == str(output) and sniff(output) == FileKind.TORCH_PICKLE
    assert_written_model_computes(entry, original, torch.load(str(output), weights_only=False))
    in_memory = bnfold.fold(zoo_dir / f"{entry.name}_state_dict.pt", model_factory=entry.factory_spec,
                            input_shape=entry.shape_text())
    assert in_memory.verified and in_memory.folded_model.format is ModelFormat.PICKLE
    assert any("stays an eager module: torch.export cannot capture it" in note for note in in_memory.notes)


@pytest.mark.parametrize("entry", zoo_params([ZOO_BY_NAME["token_mlp"], *STATE_DICT_PICKLE]))
def test_cli_folds_a_state_dict_with_a_factory(entry: ZooModel, zoo_dir: Path, cli) -> None:
    source = zoo_dir / f"{entry.name}_cli_state_dict.pt"
    torch.save(entry.factory().state_dict(), str(source))
    options = ["--model-factory", entry.factory_spec, "--input-shape", entry.shape_text(), "--json"]
    exported = not entry.pt2_skip
    for suffix in (".pt2", ".pt"):  # the output's name says what is written: a program, or a pickled module
        output = zoo_dir / f"{entry.name}_cli.folded{suffix}"
        result = cli("fold", source, "-o", output, *options)
        if suffix == ".pt2" and not exported:
            assert result.code == 2 and "name the output .pt" in result.stderr and not output.exists()
            continue
        assert result.code == 0, result.stderr
        body = json.loads(result.stdout)
        assert (body["folded"], body["kept"]) == (len(entry.foldable), len(entry.kept))
        assert body["verified"] and body["max_rel_error"] <= REL_TOLERANCE
        assert body["output"] == str(output)
        assert any(("torch.export program" if suffix == ".pt2" else "pickled") in note for note in body["notes"])
        assert sniff(output) == (FileKind.EXPORTED_PROGRAM if suffix == ".pt2" else FileKind.TORCH_PICKLE)


# --------------------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------------------

_RUNTIME_ARITHMETIC = {"Sqrt", "Reciprocal", "Div", "Pow"}


class OnnxCase:
    """One exported zoo model, what its BN nodes are, and what onnxruntime's basic level leaves."""

    def __init__(self, entry: ZooModel, directory: Path) -> None:
        import onnx

        self.entry = entry
        self.path = export_onnx(entry.factory(), entry.input_shape, directory / f"{entry.name}.onnx",
                                dynamic_batch=entry.onnx_dynamic_batch)
        self.proto = onnx.load(str(self.path))
        self.bn_modules = onnx_bn_modules(self.proto, entry.bn_layers)
        self.module_of_node = {node.name or node.output[0]: onnx_bn_module(node, entry.bn_layers)
                               for node in onnx_bn_nodes(self.proto)}
        self.ort_basic_left = ort_basic_bn_count(self.path, directory / f"{entry.name}.ort-basic.onnx")

    @property
    def expected_left(self) -> Counter[str]:
        kept = self.entry.onnx_expected_kept
        return Counter({name: count for name, count in self.bn_modules.items() if name in kept})

    def batch(self, seed: int) -> np.ndarray:
        batch = 3 if self.entry.onnx_dynamic_batch else None
        return self.entry.example(batch=batch, seed=seed).numpy()


def ort_session(path_or_bytes, level=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = level or ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path_or_bytes, options, providers=["CPUExecutionProvider"])


def ort_basic_bn_count(path: Path, optimized: Path) -> int:
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return len(onnx_bn_nodes(onnx.load(str(optimized))))


_ONNX_CASES: dict[str, OnnxCase] = {}


@pytest.fixture
def onnx_case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> OnnxCase:
    entry: ZooModel = request.param
    if entry.name not in _ONNX_CASES:  # one export per model per session (per xdist worker)
        _ONNX_CASES[entry.name] = OnnxCase(entry, tmp_path_factory.mktemp(f"onnx_{entry.name}"))
    return _ONNX_CASES[entry.name]


def onnx_params() -> list:
    return zoo_params(skip_onnx=True)


@pytest.mark.parametrize("onnx_case", onnx_params(), indirect=True)
def test_zoo_onnx_export_keeps_bn(onnx_case: OnnxCase) -> None:
    """The export is the input the ONNX tests need: one BN node per BN module call, parameters named."""
    import onnx

    onnx.checker.check_model(onnx_case.proto, full_check=True)
    assert "?" not in onnx_case.bn_modules, "a BatchNormalization node reads no zoo BN's parameters"
    assert not [n for n in onnx_case.proto.graph.node if n.op_type == "Identity"]
    original = onnx_case.entry.factory()
    x = onnx_case.batch(seed=1)
    (out,) = ort_session(str(onnx_case.path)).run(None, {"input": x})
    assert rel_error(forward(original, torch.from_numpy(x)), out) <= REL_TOLERANCE


@pytest.mark.parametrize("onnx_case", onnx_params(), indirect=True)
def test_fold_onnx_export(onnx_case: OnnxCase) -> None:
    import onnx

    entry = onnx_case.entry
    report = bnfold.fold(onnx_case.path)
    assert_verified(report)
    folded = report.folded_model.proto

    # exactly the non-foldable BN nodes are left, and never more than onnxruntime's basic level leaves
    left = onnx_bn_modules(folded, entry.bn_layers)
    assert left == onnx_case.expected_left
    assert sum(left.values()) <= onnx_case.ort_basic_left

    # the decisions say the same, with reasons, named after the nodes of the input
    kept_modules = Counter(onnx_case.module_of_node.get(d.layer, "?") for d in report.kept)
    folded_modules = Counter(onnx_case.module_of_node.get(d.layer, "?") for d in report.folded)
    assert kept_modules == onnx_case.expected_left
    assert folded_modules == onnx_case.bn_modules - onnx_case.expected_left
    assert all(d.reason for d in report.kept)

    # constants, not run-time arithmetic; same outputs; a valid model
    def count(proto, ops):
        return sum(1 for node in proto.graph.node if node.op_type in ops)

    assert len(folded.graph.node) <= len(onnx_case.proto.graph.node)
    assert count(folded, _RUNTIME_ARITHMETIC) <= count(onnx_case.proto, _RUNTIME_ARITHMETIC)
    assert [o.name for o in folded.graph.output] == [o.name for o in onnx_case.proto.graph.output]
    onnx.checker.check_model(folded, full_check=True)

    x = onnx_case.batch(seed=2)
    (expected,) = ort_session(str(onnx_case.path)).run(None, {"input": x})
    (actual,) = ort_session(folded.SerializeToString()).run(None, {"input": x})
    assert rel_error(expected, actual) <= REL_TOLERANCE
