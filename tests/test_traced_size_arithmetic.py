"""Folded TorchScript models whose forward computes with sizes (`h - 2`, `c // 2`, `h * w`, `x.size()`).

A traced model does that arithmetic on 0-dim tensors; torch.export's TorchScript converter writes it as
aten ops on lifted constants, and the fold, traced back, wrote the example's sizes into it (or kept a
lifted constant as a Python int "buffer", and `fold` failed with "'int' object has no attribute 'detach'").
Each model is folded at batch 2 and compared with the original at batches 1 and 5.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.pytorch import engine
from tests.torch_builders import randomized


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout))


class CroppedShuffle(nn.Module):
    """ShuffleNet's channel shuffle, with sizes read by `x.size()` and shifted by a valid conv (`h - 2`)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        b, c, h, w = x.size()
        return self.bn(self.conv(x)).view(b, 2, -1, h - 2, w - 2).transpose(1, 2).flatten(1)


class YoloHead(nn.Module):
    """YOLOv5's Detect: `view(bs, na, no, ny, nx)` then the boxes as rows."""

    def __init__(self):
        super().__init__()
        self.m, self.na, self.no = conv_bn(3, 3 * 7), 3, 7

    def forward(self, x):
        y = self.m(x)
        bs, _, ny, nx = y.shape
        return y.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous().view(bs, -1, self.no)


class TokensHead(nn.Module):
    """A detection head that flattens the feature map into `h * w` tokens."""

    def __init__(self):
        super().__init__()
        self.m = conv_bn(3, 6)

    def forward(self, x):
        y = self.m(x)
        b, c, h, w = y.shape
        return y.reshape(b, c, h * w).transpose(1, 2)


class ExpandedGate(nn.Module):
    """A squeeze-and-excitation gate broadcast with expand (sizes from the input) and expand_as."""

    def __init__(self):
        super().__init__()
        self.m, self.g = conv_bn(3, 4), conv_bn(3, 4)

    def forward(self, x):
        y, gate = self.m(x), self.g(x).mean((2, 3), keepdim=True)
        return y * gate.expand(x.size(0), -1, x.size(2), x.size(3)) + gate.expand_as(y)


class HalfChannels(nn.Module):
    """GhostNet/CSP style halves: `c = x.size(1) // 2` in slices and a view."""

    def __init__(self):
        super().__init__()
        self.m = conv_bn(3, 6)

    def forward(self, x):
        y = self.m(x)
        c = y.size(1) // 2
        return y[:, :c] * y[:, c:] + y.view(y.size(0), 2, c, y.size(2), y.size(3)).sum(1)


class PaddedCat(nn.Module):
    """torch.cat of tensors made to the feature map's size (new_zeros, torch.zeros(y.size()))."""

    def __init__(self):
        super().__init__()
        self.m = conv_bn(3, 4)

    def forward(self, x):
        y = self.m(x)
        pad = y.new_zeros(y.size(0), 2, y.size(2), y.size(3))
        return torch.cat([y, pad + 1, torch.zeros(y.size())], 1).view(y.size(0), -1)


class TopDown(nn.Module):
    """An FPN merge: the coarse map interpolated to the lateral's size."""

    def __init__(self):
        super().__init__()
        self.top, self.lateral = conv_bn(3, 4, stride=2), conv_bn(3, 4)

    def forward(self, x):
        lateral = self.lateral(x)
        return F.interpolate(self.top(x), size=lateral.shape[-2:], mode="nearest") + lateral


class FlattenLinear(nn.Module):
    """A classifier's `x.view(x.size(0), -1)`."""

    def __init__(self):
        super().__init__()
        self.m, self.fc = conv_bn(3, 4), nn.Linear(4 * 64, 5)

    def forward(self, x):
        return self.fc(self.m(x).view(x.size(0), -1))


TRACED = {CroppedShuffle: {"bn"}, YoloHead: {"m.1"}, TokensHead: {"m.1"}, ExpandedGate: {"g.1", "m.1"},
          HalfChannels: {"m.1"}, PaddedCat: {"m.1"}, TopDown: {"lateral.1", "top.1"}, FlattenLinear: {"m.1"}}


def traced(model: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(model, torch.zeros(2, 3, 8, 8))


def assert_folds_at_any_batch_size(model: nn.Module, compiled: torch.jit.ScriptModule, layers: set[str]):
    report = bnfold.fold(compiled, input_shape="2,3,8,8")
    assert report.verified and {d.layer for d in report.folded} == layers
    assert report.notes == []
    folded = report.folded_model.module
    assert all(isinstance(t, torch.Tensor) for t in folded.state_dict().values())
    assert "batch_norm" not in str(folded.inlined_graph)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    return report


@pytest.mark.parametrize("cls", TRACED, ids=lambda cls: cls.__name__)
def test_a_folded_traced_model_computes_with_sizes_at_any_batch_size(cls):
    model = randomized(cls())
    assert_folds_at_any_batch_size(model, traced(model), TRACED[cls])


@pytest.mark.parametrize("cls", TRACED, ids=lambda cls: cls.__name__)
def test_a_folded_scripted_model_computes_with_sizes_at_any_batch_size(cls):
    model = randomized(cls())
    assert_folds_at_any_batch_size(model, torch.jit.script(model), TRACED[cls])


def test_the_lifted_constant_of_a_traced_subtraction_is_written_back_as_a_number():
    """The converter lifts `h - 2`'s 2 as a 0-dim "wrapped number" tensor, which a ScriptModule stores as a
    Python int: the folded model then held an int buffer. It holds the conv's weights alone, and computes
    `h - 2` from the input's size, so it also runs at another height."""
    model = randomized(CroppedShuffle())
    report = assert_folds_at_any_batch_size(model, traced(model), {"bn"})
    folded = report.folded_model.module
    assert set(folded.state_dict()) == {"conv.weight", "conv.bias"}
    assert report.params_after == 4 * 3 * 3 * 3 + 4
    x = torch.randn(3, 3, 10, 12)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_binding_that_takes_other_arguments_leaves_its_op_and_the_fixed_batch_is_said(monkeypatch, tmp_path, cli):
    """An aten op whose Python binding does not compute what the op does (here: other arguments) keeps
    the op; the trace then writes the example's batch into the view, the fold still verifies at that batch,
    and the report says the folded model runs at that batch size alone, the CLI without a traceback."""
    def view_of_another_signature(tensor, *, shape):
        return tensor.view(shape)

    monkeypatch.setitem(engine._OWN_BINDINGS, torch.ops.aten.view.default, view_of_another_signature)
    model = randomized(FlattenLinear())
    report = bnfold.fold(traced(model), input_shape="2,3,8,8")
    assert report.verified and {d.layer for d in report.folded} == {"m.1"}
    assert report.notes == ["the folded TorchScript model runs at the --input-shape batch size (2) alone (at 3: "
                            "mat1 and mat2 shapes cannot be multiplied (2x384 and 256x5)): torch.jit.trace wrote "
                            "the example's sizes into shape arithmetic bnfold cannot trace"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(report.folded_model.module(x), model(x), rtol=1e-5, atol=1e-5)

    path = tmp_path / "model.pt"
    torch.jit.save(traced(model), str(path))
    result = cli("fold", path, "-o", tmp_path / "folded.pt", "--input-shape", "2,3,8,8")
    assert result.code == 0 and "Traceback" not in result.stdout + result.stderr
    assert "runs at the --input-shape batch size (2) alone" in " ".join((result.stdout + result.stderr).split())


def test_the_cli_folds_a_saved_traced_model_that_subtracts_from_sizes(tmp_path, cli):
    model = randomized(CroppedShuffle())
    path, output = tmp_path / "model.pt", tmp_path / "folded.pt"
    torch.jit.save(traced(model), str(path))
    result = cli("fold", path, "-o", output, "--input-shape", "2,3,8,8")
    assert result.code == 0 and "Traceback" not in result.stdout + result.stderr
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(output))(x), model(x), rtol=1e-5, atol=1e-5)
