"""Eager models whose attributes carry names an fx GraphModule uses itself (`code`, `graph`, `meta`).

bnfold folds an eager model through a GraphModule of its trace, whose generated code reaches every
submodule and tensor as `self.<name>`: a model's `code` child met the GraphModule's `code` property, so
building the module failed, the fallback to torch.export failed in turn (with a traceback, given an
input shape), and a frozen TorchScript model's statistics could not be named. Each BN must still be
found, folded exactly, named as the model names it, and recalibrated.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.errors import InputError
from bnfold.layers import FoldStatus
from tests.recalibration_oracle import assert_statistics_match, exact_oracle
from tests.torch_builders import assert_folds, bn_calls, outputs, randomized, runnable

SHAPE = (2, 3, 10, 10)


class Reserved(nn.Module):
    """Conv + BN under `code` and `graph`, and a plain conv under `meta`."""

    def __init__(self) -> None:
        super().__init__()
        self.code = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        self.graph = nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.meta = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.meta(self.graph(self.code(x)))


class ShapeBranch(nn.Module):
    """Branches on a shape, which symbolic tracing cannot follow (torch.export can)."""

    def __init__(self) -> None:
        super().__init__()
        self.code = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        self.graph = Reserved()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.code(x)
        return self.graph(y[:, :3]) if y.shape[0] > 1 else y


class StatisticsNamedCode(nn.Module):
    """F.batch_norm on the model's own buffers `code` and `graph`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("code", torch.linspace(-1, 1, 4))
        self.register_buffer("graph", torch.linspace(0.5, 2, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.conv(x), self.code, self.graph, None, None, False, 0.1, 1e-3)


def _shape(shape: tuple[int, ...]) -> str:
    return ",".join(map(str, shape))


def test_inspect_plans_folds_under_the_model_names():
    """The failed trace fell back to torch.export, whose unlifting raised (without an input shape, the
    fallback of folding module by module happened to plan the same folds)."""
    report = bnfold.inspect(randomized(Reserved()), input_shape=_shape(SHAPE))
    assert {name: (d.status, d.targets) for name, d in report.folds.items()} == {
        "code.1": (FoldStatus.FOLDABLE, ["code.0"]), "graph.1": (FoldStatus.FOLDABLE, ["graph.0"])}


def test_fold_is_exact_names_the_model_layers_and_leaves_no_batch_norm(tmp_path):
    model = randomized(Reserved())
    report = assert_folds(model, SHAPE, folded={"code.1", "graph.1"})
    assert {d.layer: d.targets for d in report.decisions} == {"code.1": ["code.0"], "graph.1": ["graph.0"]}
    folded = runnable(report.folded_model)
    x = torch.randn(SHAPE)
    assert sum(bn_calls(folded, x).values()) == 0  # its tensors are renamed: no layer name to look for
    assert any("holds code as code_, graph as graph_, meta as meta_" in note for note in report.notes)
    bnfold.fold(model, tmp_path / "folded.pt", input_shape=_shape(SHAPE))
    loaded = torch.load(tmp_path / "folded.pt", weights_only=False)
    np.testing.assert_array_equal(outputs(loaded, x), outputs(folded, x))


def test_functional_batch_norm_on_buffers_named_code_folds_into_the_conv():
    assert_folds(StatisticsNamedCode().eval(), SHAPE, folded={"code"})


def test_batch_norm_in_training_mode_named_graph_is_kept_saying_why():
    model = randomized(nn.Sequential())  # modules are added below: `graph` must be a top-level name
    model.add_module("code", nn.Conv2d(3, 8, 3))
    model.add_module("graph", nn.BatchNorm2d(8).train())
    report = bnfold.fold(model, verify=False, input_shape=_shape(SHAPE))
    assert [(d.layer, d.status) for d in report.decisions] == [("graph", FoldStatus.KEPT)]
    assert "training mode" in report.decisions[0].reason


def test_a_model_torch_export_must_capture_is_folded_module_by_module():
    """torch.export captures it, but its program does not unlift (torch's own GraphModule meets `code`):
    the parts that trace on their own fold, named as the model names them."""
    report = assert_folds(randomized(ShapeBranch()), SHAPE, folded={"code.1", "graph.code.1", "graph.graph.1"})
    assert any("does not unlift" in note and "module by module" in note for note in report.notes)


def test_frozen_torchscript_statistics_of_a_module_named_code_fold():
    """Freezing keeps a BN after a ReLU; fold names its constants `code.2.running_mean`, ... in the graph."""
    model = randomized(nn.Sequential())
    model.add_module("code", nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8)))
    model.add_module("graph", nn.Conv2d(8, 4, 3))
    model = randomized(model)
    frozen = torch.jit.freeze(torch.jit.script(model))
    report = bnfold.fold(frozen, input_shape=_shape(SHAPE))
    assert report.verified, (report.difference, report.verify_error)
    assert [(d.layer, d.status, d.targets) for d in report.decisions] == [("code.2", FoldStatus.FOLDED, ["graph"])]


def test_recalibrated_statistics_are_exact_and_the_result_folds():
    data = np.random.default_rng(0).standard_normal((48, *SHAPE[1:])).astype(np.float32) * 2 + 1
    model = randomized(Reserved())
    expected, _ = exact_oracle(model, data, ddof=1)
    recalibrated = bnfold.recalibrate(model, data, method="exact").result.module
    for name in ("code.1", "graph.1"):
        bn = recalibrated.get_submodule(name)
        assert_statistics_match(bn.running_mean.numpy(), bn.running_var.numpy(), *expected[name], layer=name)
    assert_folds(recalibrated, SHAPE, folded={"code.1", "graph.1"})


def test_a_program_torch_cannot_turn_back_into_a_module_gets_a_one_line_error(tmp_path):
    """torch.export captures `code`, but the program never becomes a module again: recalibrate and
    inspect --data raised torch's RuntimeError (exit 3, a traceback)."""
    path = tmp_path / "reserved.pt2"
    torch.export.save(torch.export.export(randomized(Reserved()).eval(), (torch.randn(*SHAPE),)), str(path))
    data = np.random.default_rng(0).standard_normal((8, *SHAPE[1:])).astype(np.float32)
    for call in (lambda: bnfold.recalibrate(path, data), lambda: bnfold.inspect(path, data=data)):
        with pytest.raises(InputError, match=r"does not turn back into a module \(Node code"):
            call()
