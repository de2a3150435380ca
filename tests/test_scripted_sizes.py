"""Folded scripted (torch.jit.script) models run at every input size the original runs at.

torch.export's TorchScript converter writes a scripted forward's integer arithmetic on sizes (`h * w`) as
aten ops on ints, which torch.export ran on the example's sizes: a non-local block folded at 8x8 reshaped
to 64 tokens at every size, and the check at one more batch row did not notice. A scripted
`F.interpolate(size=t.shape[-2:])` did not convert at all (aten::slice of a list). Each model here is
folded at 2x3x8x8 and compared with the original at other batch sizes and other heights and widths.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.pytorch import capture
from tests.test_traced_size_arithmetic import YoloHead, conv_bn
from tests.torch_builders import randomized


class NonLocal(nn.Module):
    """A non-local (self-attention) block as detection backbones use it: `h * w` tokens per image."""

    def __init__(self):
        super().__init__()
        self.stem, self.inter = conv_bn(3, 4), 2
        self.theta, self.phi, self.g = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)
        self.out = conv_bn(2, 4)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        theta = self.theta(x).view(b, self.inter, h * w).permute(0, 2, 1)
        phi = self.phi(x).view(b, self.inter, h * w)
        g = self.g(x).view(b, self.inter, h * w).permute(0, 2, 1)
        y = torch.softmax(theta @ phi, dim=-1) @ g
        return x + self.out(y.permute(0, 2, 1).contiguous().view(b, self.inter, h, w))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    return torch.transpose(x, 1, 2).contiguous().view(batchsize, -1, height, width)


class ShuffleUnit(nn.Module):
    """torchvision's ShuffleNetV2 unit (stride 1): half the channels through a branch, then shuffled."""

    def __init__(self):
        super().__init__()
        self.stem, self.branch2 = conv_bn(3, 8), nn.Sequential(conv_bn(4, 4), nn.ReLU(), conv_bn(4, 4))

    def forward(self, x):
        x1, x2 = self.stem(x).chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch2(x2)), dim=1), 2)


class FPNMerge(nn.Module):
    """torchvision's FeaturePyramidNetwork top-down step: the coarse map interpolated to the lateral's size."""

    def __init__(self):
        super().__init__()
        self.lateral, self.coarse = conv_bn(3, 4), conv_bn(3, 4, stride=2)

    def forward(self, x):
        lateral = self.lateral(x)
        return lateral + F.interpolate(self.coarse(x), size=lateral.shape[-2:], mode="nearest")


class HalfCrop(nn.Module):
    """The top half of the map, with its height computed through a float: `int(h * 0.5)`."""

    def __init__(self):
        super().__init__()
        self.m = conv_bn(3, 4)

    def forward(self, x):
        y = self.m(x)
        return y[:, :, :int(y.size(2) * 0.5)]


class Halved(nn.Module):
    """A Python number after the BN, which a trace records as a 0-dim tensor."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * 0.5


MODELS = {NonLocal: {"stem.1", "out.1"}, YoloHead: {"m.1"}, ShuffleUnit: {"stem.1", "branch2.0.1", "branch2.2.1"},
          FPNMerge: {"lateral.1", "coarse.1"}}
OTHER_SIZES = [(1, 3, 12, 16), (5, 3, 8, 8), (2, 3, 16, 8)]


def assert_computes_alike(folded: torch.jit.ScriptModule, model: nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def fold_saved(compiled: torch.jit.ScriptModule, tmp_path, cli, *options: str):
    """`bnfold fold` of `compiled` saved, at 2x3x8x8."""
    path = tmp_path / "model.pt"
    torch.jit.save(compiled, str(path))
    return cli("fold", path, "-o", tmp_path / "folded.pt", "--input-shape", "2,3,8,8", *options)


@pytest.mark.parametrize("cls", MODELS, ids=lambda cls: cls.__name__)
def test_a_folded_scripted_model_runs_at_other_batch_sizes_heights_and_widths(cls):
    model = randomized(cls())
    report = bnfold.fold(torch.jit.script(model), input_shape="2,3,8,8")
    assert report.verified and {d.layer for d in report.folded} == MODELS[cls]
    assert report.notes == []
    folded = report.folded_model.module
    assert "batch_norm" not in str(folded.inlined_graph)
    for shape in OTHER_SIZES:
        assert_computes_alike(folded, model, shape)


def converter_fixed(sizes: str) -> str:
    return (f"the folded TorchScript model is made for the --input-shape {sizes}, where the TorchScript model also "
            "runs at others: torch.export's TorchScript converter fixed those sizes in the graph bnfold folds; fold "
            "at the sizes the model is to run at")


def test_the_check_names_the_heights_and_widths_the_converter_fixed(monkeypatch):
    """With the converter's integer arithmetic left as it wrote it, a non-local block folded at 8x8 holds
    64 tokens: the fold still verifies at 8x8, and the report says the folded model is made for that size."""
    monkeypatch.setattr(capture, "_symbolic_size_arithmetic", lambda graph_module: graph_module)
    model = randomized(NonLocal())
    report = bnfold.fold(torch.jit.script(model), input_shape="2,3,8,8")
    assert report.verified
    assert report.notes == [converter_fixed("size of axis 2 (8) and size of axis 3 (8) alone (at 16: shape "
                                            "'[2, 2, 64]' is invalid for input of size 512)")]
    assert_computes_alike(report.folded_model.module, model, (5, 3, 8, 8))


def test_a_height_computed_through_a_float_is_said_to_be_fixed(tmp_path, cli):
    """`int(h * 0.5)` goes through a float, which the converter cannot keep symbolic: the folded model crops
    4 rows at every height. It folds, and the API and CLI say at which height it is made for."""
    model = randomized(HalfCrop())
    report = bnfold.fold(torch.jit.script(model), input_shape="2,3,8,8")
    assert report.verified and {d.layer for d in report.folded} == {"m.1"}
    assert report.notes == [converter_fixed("size of axis 2 (8) alone (at 16: other outputs than the TorchScript "
                                            "model)")]
    assert_computes_alike(report.folded_model.module, model, (5, 3, 8, 12))

    result = fold_saved(torch.jit.script(model), tmp_path, cli)
    assert result.code == 0 and "Traceback" not in result.stdout + result.stderr
    assert "made for the --input-shape size of axis 2 (8) alone" in " ".join((result.stdout + result.stderr).split())


def test_a_traced_python_number_is_a_constant_of_the_folded_model_not_a_parameter(tmp_path, cli):
    """A trace records `* 0.5` as a 0-dim tensor, which the converter lifts: traced back, the folded model
    held it as a buffer, and counted 113 parameters where its conv has 112."""
    model = randomized(Halved())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, torch.zeros(2, 3, 8, 8))
    report = bnfold.fold(traced, input_shape="2,3,8,8")
    assert report.verified and {d.layer for d in report.folded} == {"bn"}
    folded = report.folded_model.module
    assert set(folded.state_dict()) == {"conv.weight", "conv.bias"}
    assert report.params_after == 4 * 3 * 3 * 3 + 4
    assert_computes_alike(folded, model, (3, 3, 10, 12))

    result = fold_saved(traced, tmp_path, cli, "--json")
    assert result.code == 0
    assert json.loads(result.stdout)["params_after"] == 4 * 3 * 3 * 3 + 4


class OddPad(nn.Module):
    """Pads an odd width to an even one (as space-to-depth stems and U-Nets do): a branch on the parity."""

    def __init__(self):
        super().__init__()
        self.m = conv_bn(3, 4)

    def forward(self, x):
        y = self.m(x)
        if y.shape[-1] % 2 == 1:
            y = F.pad(y, (0, 1))
        return y


def test_a_branch_on_a_sizes_parity_is_said():
    """torch.export records the even width as a guard, which the trace drops, and the checks at twice every
    size are even: the folded model gave a 9-wide map where the model pads to 10, and no note."""
    model = randomized(OddPad())
    report = bnfold.fold(torch.jit.script(model), input_shape="2,3,8,8")
    assert report.verified and {d.layer for d in report.folded} == {"m.1"}
    assert report.notes == ["the folded TorchScript model takes the model's branch for the --input-shape size of "
                            "axis 3 (8) (at 17: other outputs than the TorchScript model): the model branches on "
                            "that size (on its parity, say), and a trace keeps the example's branch; fold at the "
                            "sizes the model is to run at"]
    assert_computes_alike(report.folded_model.module, model, (5, 3, 12, 8))



@pytest.mark.parametrize("compile_", ["script", "trace"])
def test_a_model_folded_at_batch_one_runs_at_every_batch_without_a_note(compile_):
    """torch.export makes a size-1 axis a constant: converted at `--input-shape 1,...`, the folded model was
    made for batch 1 alone (and said so) although the model runs at any batch. The batch is doubled for the
    conversion where the model runs at two."""
    model = randomized(NonLocal())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.jit.script(model) if compile_ == "script" else torch.jit.trace(model, torch.randn(1, 3, 8, 8))
    report = bnfold.fold(compiled, input_shape="1,3,8,8")
    assert report.verified and {d.layer for d in report.folded} == MODELS[NonLocal]
    assert report.notes == []
    for shape in ((3, 3, 8, 8), (1, 3, 8, 8)) if compile_ == "trace" else ((3, 3, 8, 8), *OTHER_SIZES):
        assert_computes_alike(report.folded_model.module, model, shape)


class FirstRow(nn.Module):
    """A model that takes a batch of one only: its trace writes the batch into a view."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 4)

    def forward(self, x):
        return self.stem(x).view(1, -1)


def test_a_trace_made_for_batch_one_is_folded_at_batch_one():
    """Its trace fails at two rows: it is converted at the example's one."""
    model = randomized(FirstRow())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.randn(1, 3, 8, 8))
    report = bnfold.fold(traced, input_shape="1,3,8,8")
    assert report.verified and {d.layer for d in report.folded} == {"stem.1"}
    assert_computes_alike(report.folded_model.module, model, (1, 3, 8, 8))
