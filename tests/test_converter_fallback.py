"""Traced models whose size arithmetic torch.export's TorchScript converter could not convert.

A trace keeps a size it computes on as a 0-dim tensor (`prim::NumToTensor`) and reads it back as an int
(`aten::Int`). The converter wrote that as tensor arithmetic and `_local_scalar_dense`, torch.export made up
a new symbol for the result, and a graph that then had to compare it with a size (a ceil_mode pooling after
TResNet's SpaceToDepth `H // 4`, a conv after EfficientDet's F.pad by amounts computed from sizes) failed
with "Could not guard on data-dependent expression": every BN was "not analysed". The converter's graph now
computes such chains as Python ints on the input's sizes (`capture._size_tensors_as_ints`), which export
keeps as expressions of those sizes: nothing is fixed to the example, and the folded model runs wherever
the traced one does. Arithmetic outside integers (a floor division with `torch.div`) is left as it was.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.pytorch import capture
from tests.torch_builders import randomized

GUARD = "Could not guard on data-dependent expression"


class SpaceToDepthPool(nn.Module):
    """TResNet's SpaceToDepth stem (a view by `h // 4`), conv + BN, then a ceil_mode average pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(48, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.size()
        x = x.view(n, c, h // 4, 4, w // 4, 4).permute(0, 3, 5, 1, 2, 4).contiguous().view(n, c * 16, h // 4, w // 4)
        return F.avg_pool2d(F.relu(self.bn(self.conv(x))), 2, ceil_mode=True)


class StaticSamePadding(nn.Module):
    """EfficientDet's Conv2dStaticSamePadding (F.pad by amounts from `math.ceil` of sizes), then BN."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.conv, self.bn, self.stride = nn.Conv2d(3, 8, 3, stride=stride, bias=False), nn.BatchNorm2d(8), stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        extra_h = (math.ceil(w / self.stride) - 1) * self.stride - w + 3
        extra_v = (math.ceil(h / self.stride) - 1) * self.stride - h + 3
        x = F.pad(x, [extra_h // 2, extra_h - extra_h // 2, extra_v // 2, extra_v - extra_v // 2])
        return self.bn(self.conv(x))


class TorchDivSpaceToDepth(SpaceToDepthPool):
    """SpaceToDepthPool with `torch.div(h, 4, rounding_mode="floor")`, as code written when `//` on tensors
    warned of its deprecation has it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.size()
        h4, w4 = torch.div(h, 4, rounding_mode="floor"), torch.div(w, 4, rounding_mode="floor")
        x = x.view(n, c, h4, 4, w4, 4).permute(0, 3, 5, 1, 2, 4).contiguous().view(n, c * 16, h4, w4)
        return F.avg_pool2d(F.relu(self.bn(self.conv(x))), 2, ceil_mode=True)


class TruncatingSpaceToDepth(SpaceToDepthPool):
    """SpaceToDepthPool with `torch.div(h, 4, rounding_mode="trunc")`, which the rewrite does not take (on a
    negative size difference it is no floor division)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.size()
        h4, w4 = torch.div(h, 4, rounding_mode="trunc"), torch.div(w, 4, rounding_mode="trunc")
        x = x.view(n, c, h4, 4, w4, 4).permute(0, 3, 5, 1, 2, 4).contiguous().view(n, c * 16, h4, w4)
        return F.avg_pool2d(F.relu(self.bn(self.conv(x))), 2, ceil_mode=True)


EXAMPLE = (2, 3, 32, 32)
# other batches and sizes: 36 // 4 = 9 is odd, so the ceil_mode pooling pads; 33 and 31 are odd sizes
OTHER_SIZES = {SpaceToDepthPool: [(3, 3, 64, 64), (1, 3, 48, 36)],
               TorchDivSpaceToDepth: [(3, 3, 64, 64), (1, 3, 48, 36)],
               StaticSamePadding: [(3, 3, 64, 64), (1, 3, 33, 31)]}
CASES = [pytest.param(SpaceToDepthPool(), id="space-to-depth"),
         pytest.param(TorchDivSpaceToDepth(), id="space-to-depth-torch-div"),
         pytest.param(StaticSamePadding(1), id="static-same-padding-stride-1"),
         pytest.param(StaticSamePadding(2), id="static-same-padding-stride-2")]


def traced(model: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(model, torch.randn(*EXAMPLE))


@pytest.mark.parametrize("model", CASES)
def test_a_traced_model_that_computes_on_sizes_folds_and_runs_at_other_sizes(model: nn.Module) -> None:
    """The BN folds, verified, with no note: the folded TorchScript model computes what the traced one
    does at the example and at other batches and sizes, so no size was fixed on the way."""
    model = randomized(model)
    original = traced(model)
    report = bnfold.fold(original, input_shape=",".join(map(str, EXAMPLE)))
    assert report.verified and [d.layer for d in report.folded] == ["bn"]
    assert report.notes == []
    folded = report.folded_model.module
    assert "batch_norm" not in str(folded.inlined_graph)
    for shape in [EXAMPLE, *OTHER_SIZES[type(model)]]:
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), original(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", CASES)
def test_without_the_rewrite_the_converter_guards_on_the_traced_sizes(model: nn.Module, monkeypatch) -> None:
    """The models above reproduce the failure: with the converter's graph left as it writes it, no BN is
    analysed and the reason is the converter's guard on a data-dependent size."""
    monkeypatch.setattr(capture, "_size_tensors_as_ints", lambda module: None)
    report = bnfold.fold(traced(randomized(model)), input_shape=",".join(map(str, EXAMPLE)))
    assert not report.folded
    assert report.analysis_error.startswith(f"torch.export cannot convert this TorchScript model ({GUARD}")


def test_size_arithmetic_the_rewrite_does_not_take_keeps_the_converters_reason() -> None:
    """`torch.div(h, 4, rounding_mode="trunc")` is not among the operators the rewrite knows: the converter
    still fails on the guard, and the report gives its reason for every BN rather than a guess."""
    report = bnfold.fold(traced(randomized(TruncatingSpaceToDepth())), input_shape=",".join(map(str, EXAMPLE)))
    assert not report
    assert report.analysis_error.startswith(f"torch.export cannot convert this TorchScript model ({GUARD}")
    assert [(d.layer, d.reason) for d in report.plan.decisions] == [("bn", "not analysed (see above)")]
