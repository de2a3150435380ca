"""BN after a sum of layer outputs, in both engines: BN(a + b) = (s*a + t) + s*b.

Every summed layer takes the BN scale and exactly one takes its shift (one that already has a bias, so
no other layer gains one). Refused, with the reason: a summed output that something else also reads, a
term that is no layer (an identity shortcut, a graph input), a sum that broadcasts over channels or
across ranks, and channels on different axes. The zoo (`preact_resnet`, `branch_sum`, `edge_cases`)
covers the same pattern in whole models.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import helper
from torch import nn

from bnfold.layers import FoldDirection, FoldStatus
from bnfold.onnx.fold import plan_folds
from tests.onnx_builders import bn_node, bn_params, fold_checked, make, weights
from tests.torch_builders import assert_folds, randomized

F32 = np.float32
EXACT = 1e-6  # float64 fold, rounded once: a few float32 roundings of the outputs

# ---- PyTorch ----------------------------------------------------------------------------------------------


class Branches(nn.Module):
    """bn(a(x) + b(x) + c(y)), with y = x or an upsampled copy feeding a transposed conv."""

    def __init__(self, *, biased: bool, transposed: bool = False) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 6, 3, 1, 1, bias=False)
        self.b = nn.Conv2d(4, 6, 1, bias=biased)
        self.c = nn.ConvTranspose2d(4, 6, 2, 2, groups=2, bias=False) if transposed else nn.Conv2d(4, 6, 1, bias=False)
        self.transposed = transposed
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        y = F.avg_pool2d(x, 2) if self.transposed else x
        return F.relu(self.bn(self.a(x) + self.b(x) + self.c(y)))


@pytest.mark.parametrize("biased, transposed", [(True, False), (False, True)])
def test_torch_sum_folds_scale_into_every_layer_and_the_shift_into_one(biased, transposed):
    report = assert_folds(randomized(Branches(biased=biased, transposed=transposed)), (2, 4, 6, 6), {"bn"})
    decision = report.decisions[0]
    assert decision.direction is FoldDirection.SUM and decision.targets == ["a", "b", "c"]
    assert decision.describe() == "folded → a + b + c"
    assert report.difference.max_rel <= EXACT
    biases = {name for name, _ in report.folded_model.module.named_parameters() if name.endswith("bias")}
    assert biases == ({"b.bias"} if biased else {"a.bias"})  # one bias carries the shift


class SumOf(nn.Module):
    """bn(first(x) + second(x)) -> relu, where a term may be a 1-channel conv, x itself or a Linear over the
    last axis, and `probe` optionally reads the first term too."""

    def __init__(self, second: str, *, probe: bool = False) -> None:
        super().__init__()
        self.first = nn.Conv2d(4, 4, 3, 1, 1, bias=False)
        self.second = {"gate": nn.Conv2d(4, 1, 1), "identity": None, "linear": nn.Linear(4, 4)}[second]
        self.bn = nn.BatchNorm2d(4)
        self.probe = probe

    def forward(self, x):
        first = self.first(x)
        if self.second is None:
            second = x
        else:
            second = self.second(x.permute(0, 2, 3, 1) if isinstance(self.second, nn.Linear) else x)
        out = F.relu(self.bn(first + second))
        return out * torch.sigmoid(first) if self.probe else out


@pytest.mark.parametrize("second, probe, word", [
    ("gate", True, "first's output also feeds `sigmoid`"),
    ("identity", False, "one summed input is `the model input x`"),
    ("gate", False, "the sum broadcasts over channels (4 from first + 1 from second)"),
    ("linear", False, "second's output channels lie on axis 3"),  # same shape, channels on another axis
])
def test_torch_sum_is_kept_with_the_reason(second, probe, word):
    assert_folds(randomized(SumOf(second, probe=probe)), (2, 4, 4, 4), set(), {"bn": word})


# ---- ONNX -------------------------------------------------------------------------------------------------


def sum_model(rng, *, gate=False, reader=False, term="c3"):
    """bn(Sum(Add(conv1(x), conv2(x)), <term>)): conv3 (biased, 6 channels; 1 with `gate`), or x itself;
    `reader` makes conv1's output a graph output too."""
    inits = {"w1": weights(rng, 6, 6, 3, 3), "w2": weights(rng, 6, 6, 1, 1),
             "w3": weights(rng, 1 if gate else 6, 6, 1, 1), "b3": rng.standard_normal(1 if gate else 6).astype(F32),
             **bn_params(rng, 6)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w2"], ["c2"], name="conv2"),
             helper.make_node("Conv", ["x", "w3", "b3"], ["c3"], name="conv3"),
             helper.make_node("Add", ["c1", "c2"], ["s12"], name="add"),
             helper.make_node("Sum", ["s12", term], ["s"], name="sum"), bn_node("s", "y")]
    outputs = {"y": (None, F32), **({"c1": (None, F32)} if reader else {})}
    return make(nodes, {"x": ((2, 6, 5, 5), F32)}, outputs, inits)


def test_onnx_sum_folds_scale_into_every_layer_and_the_shift_into_one():
    model = sum_model(np.random.default_rng(0))
    folded, plan = fold_checked(model, tolerance=EXACT)
    (decision,) = plan.decisions
    assert decision.direction is FoldDirection.SUM and decision.targets == ["conv1", "conv2", "conv3"]
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Conv", "Conv", "Add", "Sum"]
    convs = {n.name: list(n.input) for n in folded.graph.node if n.op_type == "Conv"}
    assert [len(inputs) for inputs in convs.values()] == [2, 2, 3]  # only conv3's bias carries the shift
    assert {i.name for i in folded.graph.initializer} == {"w1_folded", "w2_folded", "w3_folded", "b3_folded"}


def matmul_sum_model(rng):
    """bn(MatMul(x, W1) + Gemm(x, W2, b)) over (N, C) features; the BN is the graph output."""
    inits = {"w1": weights(rng, 4, 6), "w2": weights(rng, 6, 4), "b2": rng.standard_normal(6).astype(F32),
             **bn_params(rng, 6)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m"], name="matmul"),
             helper.make_node("Gemm", ["x", "w2", "b2"], ["g"], name="gemm", transB=1),
             helper.make_node("Add", ["m", "g"], ["s"], name="add"), bn_node("s", "y")]
    return make(nodes, {"x": ((3, 4), F32)}, {"y": (None, F32)}, inits)


def test_onnx_sum_of_matmul_and_gemm_folds_without_a_new_bias():
    folded, plan = fold_checked(matmul_sum_model(np.random.default_rng(1)), tolerance=EXACT)
    assert plan.decisions[0].targets == ["matmul", "gemm"]
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Gemm", "Add"]
    assert [o.name for o in folded.graph.output] == ["y"]


def rank_broadcast_model(rng):
    """Add(conv (2, 6, 5, 5), MatMul (5, 5)): the MatMul's rows broadcast over batch and channels."""
    inits = {"w": weights(rng, 6, 4, 1, 1), "m": weights(rng, 5, 5), **bn_params(rng, 6)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("MatMul", ["z", "m"], ["mm"], name="matmul"),
             helper.make_node("Add", ["c", "mm"], ["s"], name="add"), bn_node("s", "y")]
    return make(nodes, {"x": ((2, 4, 5, 5), F32), "z": ((5, 5), F32)}, {"y": (None, F32)}, inits)


@pytest.mark.parametrize("build, reason", [
    (lambda rng: sum_model(rng, reader=True), "Conv conv1 output 'c1' is also a graph output"),
    (lambda rng: sum_model(rng, term="x"), "Sum sum input 'x': its input 'x' is a graph input"),
    (lambda rng: sum_model(rng, term="s12"), "Sum sum reads 's12' twice"),
    (lambda rng: sum_model(rng, gate=True), "the sum broadcasts over channels (6 from Conv conv1 + 6 from Conv conv2 "
                                            "+ 1 from Conv conv3)"),
    (rank_broadcast_model, "Add add may broadcast 'mm' across the channel axis"),
])
def test_onnx_sum_is_kept_with_the_reason(build, reason):
    (decision,) = plan_folds(build(np.random.default_rng(2))).decisions
    assert decision.status is FoldStatus.KEPT
    assert reason in decision.reason, decision.reason
