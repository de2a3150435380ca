"""The identity-branch BN of train-time reparameterizable blocks, in both engines: BN(x) + conv(x).

RepVGG, MobileOne and YOLOv6/v7's RepConv sum a 3x3 conv+BN, a 1x1 conv+BN and a BN of the block's input
alone. That BN is y = a * x + b per channel; a conv beside it that reads the same x with stride 1 and
centred padding sees x[o] at its centre tap, so it absorbs the BN exactly: a[o] into weight[o, o's row,
centre], b into its bias (RepVGG's own reparameterization). Refused, with the reason: a stride-2 conv, one
that changes the channel count, an even kernel or padding off centre, and outputs read elsewhere.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import onnx
from onnx import helper
from torch import nn

import bnfold
from bnfold import foldmath
from bnfold.layers import FoldDirection, FoldStatus
from bnfold.onnx.fold import plan_folds
from tests.onnx_builders import bn_node, bn_params, count, fold_checked, make, weights
from tests.torch_builders import assert_folds, randomized
from tests.zoo import bn_calls, export_onnx

F32 = np.float32
EXACT = 1e-6  # float64 fold, rounded once: a few float32 roundings of the outputs


def test_fold_into_sibling_adds_the_bn_at_the_centre_tap():
    """conv'(x) == conv(x) + a * x + b for plain, grouped and depthwise convs and a Linear's diagonal."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((2, 6, 5, 5)))
    a, b = rng.standard_normal(6), rng.standard_normal(6)
    for groups in (1, 2, 6):
        weight, bias = rng.standard_normal((6, 6 // groups, 3, 3)), rng.standard_normal(6)
        folded, folded_bias = foldmath.fold_into_sibling(weight, bias, a, b, groups)
        expected = F.conv2d(x, torch.from_numpy(weight), torch.from_numpy(bias), padding=1, groups=groups) \
            + torch.from_numpy(a).view(1, 6, 1, 1) * x + torch.from_numpy(b).view(1, 6, 1, 1)
        actual = F.conv2d(x, torch.from_numpy(folded), torch.from_numpy(folded_bias), padding=1, groups=groups)
        assert torch.allclose(actual, expected, rtol=1e-12, atol=1e-12)
    matrix = rng.standard_normal((6, 6))
    folded, folded_bias = foldmath.fold_into_sibling(matrix, None, a, b)
    assert np.allclose(folded, matrix + np.diag(a)) and np.allclose(folded_bias, b)
    with pytest.raises(ValueError):
        foldmath.fold_into_sibling(rng.standard_normal((6, 4, 3, 3)), None, a, b)


# ---- PyTorch ----------------------------------------------------------------------------------------------


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0, groups: int = 1,
            **conv: object) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups, bias=False, **conv),
                         nn.BatchNorm2d(c_out))


class RepVGGBlock(nn.Module):
    """DingXiaoH's RepVGGBlock (training form): ReLU(dense 3x3+BN + 1x1+BN + identity BN)."""

    def __init__(self, channels: int = 4, groups: int = 1, **dense: object) -> None:
        super().__init__()
        self.rbr_identity = nn.BatchNorm2d(channels)
        self.rbr_dense = conv_bn(channels, channels, 3, 1, dense.pop("padding", 1), groups, **dense)
        self.rbr_1x1 = conv_bn(channels, channels, 1, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.rbr_dense(x) + self.rbr_1x1(x) + self.rbr_identity(x))


class MobileOneBlock(nn.Module):
    """apple/ml-mobileone's block at train time: `out = scale_out + identity_out`, then `out +=` each k x k
    branch; a 1x1 block has no scale branch (`0 + identity_out`, then only in-place adds)."""

    def __init__(self, channels: int = 4, branches: int = 3, depthwise: bool = False, kernel: int = 3) -> None:
        super().__init__()
        groups = channels if depthwise else 1
        self.rbr_skip = nn.BatchNorm2d(channels)
        self.rbr_scale = conv_bn(channels, channels, 1, groups=groups) if kernel > 1 else None
        self.rbr_conv = nn.ModuleList(conv_bn(channels, channels, kernel, 1, kernel // 2, groups)
                                      for _ in range(branches))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = (0 if self.rbr_scale is None else self.rbr_scale(x)) + self.rbr_skip(x)
        for branch in self.rbr_conv:
            out += branch(x)
        return F.relu(out)


class RepConv(nn.Module):
    """YOLOv7's RepConv (training form): SiLU(dense + 1x1 + identity BN), each conv+BN a Sequential."""

    def __init__(self, c1: int = 4, c2: int = 4, k: int = 3, s: int = 1) -> None:
        super().__init__()
        self.act = nn.SiLU()
        self.rbr_identity = nn.BatchNorm2d(num_features=c1) if c2 == c1 and s == 1 else None
        self.rbr_dense = conv_bn(c1, c2, k, s, k // 2)
        self.rbr_1x1 = conv_bn(c1, c2, 1, s, 0)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.act(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)


class Stem(nn.Module):
    """A conv before the block, so the block's input is a layer output (as inside a network)."""

    def __init__(self, block: nn.Module, channels: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(F.relu(self.stem(x)))


REPVGG = {"block.rbr_identity", "block.rbr_dense.1", "block.rbr_1x1.1"}
MOBILEONE = {"block.rbr_skip", "block.rbr_scale.1", "block.rbr_conv.0.1", "block.rbr_conv.1.1", "block.rbr_conv.2.1"}
MOBILEONE_1X1 = MOBILEONE - {"block.rbr_scale.1"}


@pytest.mark.parametrize("block, folded, target", [
    (RepVGGBlock(), REPVGG, "block.rbr_dense.0"),
    (RepVGGBlock(groups=2), REPVGG, "block.rbr_dense.0"),  # grouped: the row of o within its group
    (RepVGGBlock(groups=4), REPVGG, "block.rbr_dense.0"),  # depthwise: row 0
    (RepVGGBlock(dilation=2, padding=2), REPVGG, "block.rbr_dense.0"),
    (RepVGGBlock(padding_mode="reflect"), REPVGG, "block.rbr_dense.0"),  # an F.pad before the conv
    (MobileOneBlock(), MOBILEONE, "block.rbr_scale.0"),
    (MobileOneBlock(depthwise=True), MOBILEONE, "block.rbr_scale.0"),
    (MobileOneBlock(kernel=1), MOBILEONE_1X1, "block.rbr_conv.0.0"),  # through `0 + identity_out`
    (RepConv(), REPVGG, "block.rbr_dense.0"),
], ids=["repvgg", "grouped", "depthwise", "dilated", "reflect", "mobileone", "mobileone-dw", "mobileone-1x1",
        "yolov7-repconv"])
def test_torch_identity_bn_folds_into_the_conv_beside_it(block, folded, target):
    report = assert_folds(randomized(Stem(block)), (2, 3, 6, 6), folded)
    decision = next(d for d in report.decisions if d.layer in ("block.rbr_identity", "block.rbr_skip"))
    assert decision.direction is FoldDirection.INTO_SIBLING and decision.targets == [target]
    assert decision.describe() == f"folded → {target}"
    assert report.difference.max_rel <= EXACT
    assert f"{target}.bias" in dict(report.folded_model.module.named_parameters())  # the shift's new bias


class LinearBeside(nn.Module):
    """BN1d(x) + Linear(x) on (N, C) features: the BN goes onto the Linear's diagonal."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x) + self.bn(x))


def test_torch_identity_bn_folds_onto_a_linear_diagonal():
    report = assert_folds(randomized(LinearBeside()), (3, 5), {"bn"})
    assert report.decisions[0].direction is FoldDirection.INTO_SIBLING and report.decisions[0].targets == ["fc"]
    assert report.difference.max_rel <= EXACT


def exported(model: nn.Module, shape: tuple[int, ...]) -> torch.export.ExportedProgram:
    return torch.export.export(model, (torch.randn(shape),))


def scripted(model: nn.Module, shape: tuple[int, ...]) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(model, torch.randn(shape))


@pytest.mark.parametrize("convert", [exported, scripted], ids=["pt2", "torchscript"])
@pytest.mark.parametrize("block, folded", [(RepVGGBlock(), REPVGG), (MobileOneBlock(), MOBILEONE),
                                           (MobileOneBlock(kernel=1), MOBILEONE_1X1)],
                         ids=["repvgg", "mobileone", "mobileone-1x1"])
def test_exported_and_torchscript_models_fold_it_too(convert, block, folded):
    """Both capture aten graphs, where the 1x1 MobileOne block's identity term reaches only in-place adds
    (`0 + identity_out` then `out += branch(x)`: aten.add_), which sum as plain adds do."""
    model, shape = randomized(Stem(block)), (2, 3, 6, 6)
    report = bnfold.fold(convert(model, shape), input_shape=",".join(map(str, shape)))
    assert report.verified and report.difference.max_rel <= EXACT
    assert {d.layer for d in report.folded} == folded and not report.kept
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    folded_module = report.folded_model.program.module() if convert is exported else report.folded_model.module
    assert not bn_calls(folded_module, x)
    with torch.no_grad():
        assert torch.allclose(folded_module(x), model(x), rtol=1e-5, atol=1e-6)


class Refused(nn.Module):
    """BN(x) + conv(x) where the conv cannot take the BN: `how` picks why."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        spec = {"stride": dict(kernel_size=3, stride=2, padding=1), "channels": dict(out_channels=1, kernel_size=3,
                padding=1), "even": dict(kernel_size=2), "offset": dict(kernel_size=3)}.get(how, dict(kernel_size=3,
                                                                                                    padding=1))
        self.conv = nn.Conv2d(4, spec.pop("out_channels", 4), **spec)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = {"even": (0, 1, 0, 1), "offset": (2, 0, 2, 0)}.get(self.how)
        c = self.conv(F.pad(x, pad) if pad else x)
        y = self.bn(x)
        out = F.relu(c + y)
        if self.how == "bn-read":
            return out * torch.sigmoid(y)
        return out * torch.sigmoid(c) if self.how == "conv-read" else out


@pytest.mark.parametrize("how, shape, word", [
    ("stride", (2, 4, 2, 2), "conv has stride 2x2"),  # its 1x1 output broadcasts over the 2x2 sum
    ("channels", (2, 4, 5, 5), "conv maps 4 channels to 1"),  # broadcasts over channels
    ("even", (2, 4, 5, 5), "conv has an even kernel size 2x2, so no centre tap"),
    ("offset", (2, 4, 5, 5), "conv has padding 2+0, 2+0 where its centre tap needs 1+1, 1+1"),
    ("bn-read", (2, 4, 5, 5), "it feeds a sum beside conv but also `sigmoid`"),
    ("conv-read", (2, 4, 5, 5), "conv's output also feeds `sigmoid`"),
])
def test_torch_identity_bn_is_kept_with_the_reason(how, shape, word):
    report = assert_folds(randomized(Refused(how)), shape, set(), {"bn": word})
    assert report.decisions[0].reason.startswith("it normalizes the input")


# ---- ONNX -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block, target", [
    (RepVGGBlock(), "/block/rbr_dense/rbr_dense.0/Conv"),
    (RepVGGBlock(groups=4), "/block/rbr_dense/rbr_dense.0/Conv"),
    (RepVGGBlock(padding_mode="reflect"), "/block/rbr_dense/rbr_dense.0/Conv"),  # Pad -> Conv
    (MobileOneBlock(depthwise=True), "/block/rbr_scale/rbr_scale.0/Conv"),
    (RepConv(), "/block/rbr_dense/rbr_dense.0/Conv"),  # `0 if ... else` leaves a plain sum
], ids=["repvgg", "depthwise", "reflect", "mobileone-dw", "yolov7-repconv"])
def test_onnx_identity_bn_folds_into_the_conv_beside_it(block, target, tmp_path):
    path = export_onnx(randomized(Stem(block)), (2, 3, 6, 6), tmp_path / "block.onnx")
    folded, plan = fold_checked(onnx.load(str(path)), tolerance=EXACT)
    assert {d.status for d in plan.decisions} == {FoldStatus.FOLDABLE}
    (decision,) = [d for d in plan.decisions if "rbr_identity" in d.layer or "rbr_skip" in d.layer]
    assert decision.direction is FoldDirection.INTO_SIBLING and decision.targets == [target]
    assert count(folded, "BatchNormalization") == 0 and count(folded, "Identity") == 0


def block_model(rng, *, group=1, c_out=4, kernel=3, stride=1, pads=(1, 1, 1, 1), bn_output=False,
                conv_output=False, zero_add=False, spatial=5, conv1=True):
    """Sum(conv3 -> BN3, conv1, BN [+ 0]) of r = Relu(x); without `conv1` conv3 is the one layer reading r."""
    inits = {"w3": weights(rng, c_out, 4 // group, kernel, kernel), "w1": weights(rng, c_out, 4 // group, 1, 1),
             "b1": rng.standard_normal(c_out).astype(F32), "zero": np.zeros((), F32),
             **bn_params(rng, c_out, "bn3"), **bn_params(rng, 4)}
    identity = "y0" if zero_add else "y"
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w3"], ["c3"], name="conv3", group=group, pads=list(pads),
                              strides=[stride, stride]),
             bn_node("c3", "n3", "bn3"),
             helper.make_node("Conv", ["r", "w1", "b1"], ["c1"], name="conv1", group=group, strides=[stride, stride]),
             bn_node("r", "y"),
             *([helper.make_node("Add", ["zero", "y"], ["y0"], name="plus_zero")] if zero_add else []),
             helper.make_node("Sum", ["n3", *(["c1"] if conv1 else []), identity], ["s"], name="sum")]
    if not conv1:
        del nodes[3], inits["w1"], inits["b1"]
    outputs = {"s": (None, F32), **({"y": (None, F32)} if bn_output else {}), **({"n3": (None, F32)} if conv_output
                                                                                  else {})}
    return make(nodes, {"x": ((2, 4, spatial, spatial), F32)}, outputs, inits)


@pytest.mark.parametrize("options", [{}, {"group": 4}, {"zero_add": True}], ids=["plain", "depthwise", "zero-add"])
def test_onnx_identity_bn_leaves_a_sum_of_three(options):
    """conv3's BN folds first; the identity BN then goes into conv3, and the Sum loses its third input."""
    folded, plan = fold_checked(block_model(np.random.default_rng(0), **options), tolerance=EXACT)
    decisions = {d.layer: d for d in plan.decisions}
    assert decisions["bn"].direction is FoldDirection.INTO_SIBLING and decisions["bn"].targets == ["conv3"]
    assert [n.op_type for n in folded.graph.node] == ["Relu", "Conv", "Conv", "Sum"]
    assert list(folded.graph.node[-1].input) == ["n3", "c1"]  # conv3 writes its BN's output name


def gemm_model(rng):
    """Tanh(Gemm(x, W, b; alpha 0.5, transB) + BN(x)) on (N, 5) features."""
    inits = {"w": weights(rng, 5, 5), "b": rng.standard_normal(5).astype(F32), **bn_params(rng, 5)}
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], name="gemm", alpha=0.5, beta=2.0, transB=1),
             bn_node("x", "y"), helper.make_node("Add", ["g", "y"], ["s"], name="add"),
             helper.make_node("Tanh", ["s"], ["out"], name="tanh")]
    return make(nodes, {"x": ((3, 5), F32)}, {"out": (None, F32)}, inits)


def test_onnx_identity_bn_folds_onto_a_gemm_diagonal():
    folded, plan = fold_checked(gemm_model(np.random.default_rng(1)), tolerance=EXACT)
    assert plan.decisions[0].targets == ["gemm"] and plan.decisions[0].direction is FoldDirection.INTO_SIBLING
    assert [n.op_type for n in folded.graph.node] == ["Gemm", "Tanh"]


@pytest.mark.parametrize("options, reason", [
    ({"stride": 2, "spatial": 2}, "Conv conv3 has stride 2x2"),  # a 1x1 output broadcast over the 2x2 sum
    ({"c_out": 1}, "Conv conv3 maps 4 channels to 1 (the BN has 4)"),
    ({"kernel": 2, "pads": (0, 0, 1, 1)}, "Conv conv3 has an even kernel size 2x2, so no centre tap"),
    ({"pads": (2, 2, 0, 0)}, "Conv conv3 has padding 2+0, 2+0 where its centre tap needs 1+1, 1+1"),
    ({"bn_output": True}, "it feeds a sum beside Conv conv3 but is also a graph output"),
    ({"conv_output": True}, "Conv conv3's output is also a graph output"),  # once its BN has folded
])
def test_onnx_identity_bn_is_kept_with_the_reason(options, reason):
    plan = plan_folds(block_model(np.random.default_rng(2), conv1=False, **options))
    decision = plan.by_layer()["bn"]
    assert decision.status is FoldStatus.KEPT
    assert reason in decision.reason, decision.reason
