"""TorchScript modules whose BN calls the inlined forward graph used to hide: BN called through a
`torch.jit.interface`-typed attribute (not inlined by TorchScript), and hand-written BN whose running
statistics are `Optional[Tensor]` attributes holding None."""

from typing import Optional

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import bnfold
from bnfold.errors import NoBatchNormError
from bnfold.layers import FoldStatus
from bnfold.pytorch.discover import missing_statistics
from tests.torch_builders import randomized


@torch.jit.interface
class NormInterface(nn.Module):
    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (the name BatchNorm's forward gives it)
        pass


class BehindInterface(nn.Module):
    """A conv whose BN is held through an interface-typed attribute: its forward is a prim::CallMethod."""

    norm: NormInterface

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 8, 3), norm

    def forward(self, x):
        return self.norm(self.conv(x))


class StatisticsOnBuffers(nn.Module):
    """F.batch_norm on buffers of a module that is no BN module: only its graph shows it is one."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mu", torch.linspace(-1, 1, 8))
        self.register_buffer("sigma2", torch.linspace(0.5, 2, 8))

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        return F.batch_norm(input, self.mu, self.sigma2, None, None, False, 0.1, 1e-3)


def _calibration() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("saved", [False, True], ids=["in memory", "saved"])
def test_a_bn_behind_an_interface_is_described_folded_and_recalibrated_as_in_eager(tmp_path, saved):
    """Recalibration found no BN at all (NoBatchNormError): the inlined graph showed no batch_norm call.
    It is inlined as the module the attribute holds, so the scripted model recalibrates to the statistics
    the eager one gets, and inspect and fold agree with eager."""
    model = randomized(BehindInterface(nn.BatchNorm2d(8)))
    scripted = torch.jit.script(model)
    if saved:
        torch.jit.save(scripted, tmp_path / "interface.ts")
        scripted = torch.jit.load(str(tmp_path / "interface.ts"))
    layer, = bnfold.inspect(scripted).layers
    assert (layer.name, layer.kind, layer.eps, layer.momentum) == ("norm", "BatchNorm2d", 1e-5, 0.1)
    np.testing.assert_array_equal(layer.running_var, model.norm.running_var.double().numpy())
    folded = bnfold.fold(scripted, input_shape="2,3,8,8")
    assert folded.verified and [(d.layer, d.status) for d in folded.plan.decisions] == [("norm", FoldStatus.FOLDED)]

    data = _calibration()
    report = bnfold.recalibrate(scripted, data=data)
    expected = bnfold.recalibrate(model, data=data).result.module.norm
    assert [result.name for result in report.layers] == ["norm"] and not report.skipped
    recalibrated = report.result.module.norm
    for mine, theirs in ((recalibrated.running_mean, expected.running_mean),
                         (recalibrated.running_var, expected.running_var)):
        torch.testing.assert_close(mine, theirs)
    assert not torch.equal(recalibrated.running_mean, model.norm.running_mean)


def test_functional_batch_norm_behind_an_interface_is_found():
    """F.batch_norm on buffers is found from the graph alone: behind an interface it was not found at all."""
    layer, = bnfold.inspect(torch.jit.script(BehindInterface(StatisticsOnBuffers()).eval())).layers
    assert (layer.name, layer.kind, layer.eps, layer.channels) == ("norm", "F.batch_norm (StatisticsOnBuffers)",
                                                                   1e-3, 8)
    np.testing.assert_allclose(layer.running_mean, np.linspace(-1, 1, 8), rtol=1e-6)


class PickedAtRunTime(nn.Module):
    """A BN picked from a ModuleDict by a key known only at run time: no graph can say which one runs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norms = nn.ModuleDict({"a": nn.BatchNorm2d(8), "b": nn.BatchNorm2d(8)})

    def forward(self, x, key: str = "a"):
        norm: NormInterface = self.norms[key]
        return norm.forward(self.conv(x))


def test_a_bn_picked_at_run_time_through_an_interface_is_reported_as_hidden():
    """The BN modules are described from the module walk, with a warning that bnfold cannot see their call
    (nothing said so), and fold keeps them with the converter's reason."""
    scripted = torch.jit.script(randomized(PickedAtRunTime()))
    report = bnfold.inspect(scripted)
    assert [layer.name for layer in report.layers] == ["norms.a", "norms.b"]
    hidden = [(f.layer, f.message) for f in report.findings if f.code == "hidden-call"]
    assert hidden == [(name, "called through a TorchScript interface (norms) bnfold cannot see through: its "
                             "statistics are checked, but it cannot be recalibrated or folded")
                      for name in ("norms.a", "norms.b")]
    folded = bnfold.fold(scripted, input_shape="2,3,8,8")
    assert {d.status for d in folded.plan.decisions} == {FoldStatus.KEPT} and "ModuleContainerIndex" in str(
        folded.analysis_error)


def test_recalibrating_a_bn_picked_at_run_time_says_why_it_is_skipped():
    with pytest.raises(NoBatchNormError, match=r"norms\.a: called through a TorchScript interface \(norms\)"):
        bnfold.recalibrate(torch.jit.script(randomized(PickedAtRunTime())), data=_calibration())


class OptionalStatistics(nn.Module):
    """A hand-written BN whose running statistics are Optional attributes, None for track_running_stats=False."""

    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]

    def __init__(self, channels: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(channels) + 0.5), nn.Parameter(torch.rand(channels))
        self.running_mean, self.running_var = None, None
        self.eps, self.momentum = 1e-3, 0.2

    def forward(self, x):
        batch_statistics = self.training or self.running_mean is None
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, batch_statistics,
                            self.momentum, self.eps)


class TwoNorms(nn.Module):
    def __init__(self, first: nn.Module):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3), first
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


@pytest.mark.parametrize("first", [lambda: OptionalStatistics(8), lambda: nn.BatchNorm2d(8, 1e-3, 0.2, True, False)],
                         ids=["Optional attributes", "torch BatchNorm2d"])
def test_a_scripted_bn_without_running_statistics_is_described_and_skipped_as_torch_batchnorm_is(first):
    """With `running_mean: Optional[Tensor] = None`, the scripted graph reads an attribute holding None:
    inspect showed eps unknown and recalibrate failed with a traceback (AttributeError on None.copy_).
    Now it reads as BatchNorm2d(track_running_stats=False) does: eps and momentum as the eager module has
    them, no running statistics, and recalibration skips it saying so."""
    model = randomized(TwoNorms(first()))
    eager = {layer.name: layer for layer in bnfold.inspect(model).layers}["bn1"]
    scripted = torch.jit.script(model)
    layer = {layer.name: layer for layer in bnfold.inspect(scripted).layers}["bn1"]
    assert (layer.name, layer.kind, layer.eps, layer.momentum, layer.channels) == (
        "bn1", eager.kind, 1e-3, 0.2, 8)
    assert not layer.track_running_stats and not layer.has_running_stats and layer.extra == {}
    assert ("no-running-stats", "bn1") in [(f.code, f.layer) for f in bnfold.inspect(scripted).findings]
    report = bnfold.recalibrate(scripted, data=_calibration())
    assert [result.name for result in report.layers] == ["bn2"]
    assert [(s.name, s.reason) for s in report.skipped] == [("bn1", missing_statistics(first()))]


class NormUnderTwoNames(nn.Module):
    """DGCNN's pattern: the BN is an attribute of the model and a child of the Sequential that calls it."""

    def __init__(self):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(8)
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), self.bn1, nn.LeakyReLU(0.2))

    def forward(self, x):
        return self.conv1(x)


def test_a_traced_bn_held_under_two_names_is_one_layer_as_in_eager():
    """TorchScript copies a module per attribute name (the copies share its tensors): fold kept `conv1.1`
    as "not found in the captured computation" beside the folded `bn1`, inspect listed two layers."""
    model = randomized(NormUnderTwoNames())
    traced = torch.jit.trace(model, torch.zeros(2, 3, 8, 8))
    assert [layer.name for layer in bnfold.inspect(traced).layers] == ["bn1"]
    folded = bnfold.fold(traced, input_shape="2,3,8,8")
    assert folded.verified and [(d.layer, d.status) for d in folded.plan.decisions] == [("bn1", FoldStatus.FOLDED)]
    report = bnfold.recalibrate(traced, data=_calibration())
    assert [result.name for result in report.layers] == ["bn1"] and not report.skipped
