"""A BN whose computation fixes training mode normalizes by batch statistics in eval mode too.

Research code may call F.batch_norm(..., training=True) or torch.batch_norm(..., True, ...) whatever
`self.training` is; torch.export records such a layer (and any BN exported in training mode) as a
training-mode op, and ONNX as training_mode=1 (is_test=0 before opset 7). inspect, fold and recalibrate
say so with one finding and one reason in every format, where the eager model got no finding and a fold
reason asking for model.eval(), and the .pt2 a warning that bnfold evaluates it in eval mode.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.errors import BnfoldError
from bnfold.layers import FoldStatus, Severity
from tests.onnx_builders import conv_bn

FINDING = ("training-mode", Severity.ERROR, "BN normalizes with each batch's statistics even in eval mode (training "
           "mode is fixed in its computation), so outputs depend on the batch")
FIXED = ("in training mode whatever the model's mode (its computation fixes it): it normalizes each batch with that "
         "batch's statistics and never by its running statistics, so there are none to recalibrate and no fixed "
         "scale and shift to fold")
FIXED_ONNX = {name: FIXED.replace("its computation fixes it", name) for name in ("training_mode=1", "is_test=0")}
SHAPE = "2,3,8,8"


class FunctionalAlwaysTraining(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=True,
                            momentum=self.momentum, eps=self.eps)


class AtenAlwaysTraining(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var, True,
                                self.momentum, self.eps, False)


class LookalikeAlwaysTraining(nn.Module):
    """No BatchNorm class at all: its statistics and parameters by BN's names."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.eps, self.momentum = 1e-5, 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=True,
                            momentum=self.momentum, eps=self.eps)


class Net(nn.Module):
    def __init__(self, norm: type[nn.Module]) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3), norm(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


NORMS = [FunctionalAlwaysTraining, AtenAlwaysTraining, LookalikeAlwaysTraining]


def _saved(tmp_path, model: nn.Module, how: str) -> str:
    path = tmp_path / ("model.pt2" if how == "export" else "model.pt")
    if how == "export":
        torch.export.save(torch.export.export(model, (torch.randn(2, 3, 8, 8),)), path)
    else:
        torch.save(model, path)
    return str(path)


def _always_training(tmp_path, norm: type[nn.Module], how: str) -> str:
    torch.manual_seed(0)
    return _saved(tmp_path, Net(norm).eval(), how)


def _findings(source, layer: str) -> list[tuple]:
    report = bnfold.inspect(source, allow_pickle=True, input_shape=SHAPE, fail_on=None)
    return [(f.code, f.severity, f.message) for f in report.findings if f.layer == layer]


def _reason(source, layer: str) -> tuple:
    decisions = {d.layer: d for d in bnfold.fold(source, allow_pickle=True, input_shape=SHAPE).plan.decisions}
    return decisions[layer].status, decisions[layer].reason


def _onnx(**bn_attrs):
    return conv_bn(np.random.default_rng(0), bn_attrs=bn_attrs, opset=6 if "is_test" in bn_attrs else 17)


ONNX = {"training_mode=1": dict(training_mode=1), "is_test=0": dict(is_test=0)}


@pytest.mark.parametrize("how", ["pickle", "export"])
@pytest.mark.parametrize("norm", NORMS, ids=lambda norm: norm.__name__)
def test_inspect_gives_the_training_mode_error_in_eval_mode(tmp_path, norm, how):
    """The eager model had no finding (its module is in eval mode); the .pt2 a warning that bnfold runs it in
    eval mode, which it does not. Its statistics, never used, are not checked (no stale-stats)."""
    assert _findings(_always_training(tmp_path, norm, how), "bn1") == [FINDING]


@pytest.mark.parametrize("attrs", ONNX.values(), ids=ONNX.keys())
def test_inspect_words_the_onnx_training_mode_error_as_for_torch(attrs):
    assert _findings(_onnx(**attrs), "bn") == [FINDING]


@pytest.mark.parametrize("how", ["pickle", "export"])
@pytest.mark.parametrize("norm", NORMS, ids=lambda norm: norm.__name__)
def test_fold_keeps_it_without_asking_for_model_eval(tmp_path, norm, how):
    """The reason said '(call model.eval() first)', which changes nothing here."""
    path = _always_training(tmp_path, norm, how)
    assert _reason(path, "bn1") == (FoldStatus.KEPT, FIXED)
    assert _reason(path, "bn2")[0] is FoldStatus.FOLDED


@pytest.mark.parametrize("attrs", ONNX.values(), ids=ONNX.keys())
def test_onnx_fold_keeps_it_for_the_same_reason(attrs):
    """The same words, naming the attribute that fixes it."""
    (name,) = (f"{key}={value}" for key, value in attrs.items())
    assert _reason(_onnx(**attrs), "bn") == (FoldStatus.KEPT, FIXED_ONNX[name])


@pytest.mark.parametrize("how", ["pickle", "export"])
@pytest.mark.parametrize("norm", NORMS, ids=lambda norm: norm.__name__)
def test_recalibrate_skips_it_for_the_reason_fold_gives(tmp_path, norm, how):
    """Its running statistics are never used, so writing them would change nothing: the eager BatchNorm
    subclass was recalibrated anyway, the look-alike skipped as 'not a torch BatchNorm class'."""
    data = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    result = bnfold.recalibrate(_always_training(tmp_path, norm, how), data, allow_pickle=True)
    assert [(s.name, s.reason) for s in result.skipped] == [("bn1", FIXED)]


@pytest.mark.parametrize("method", ["exact", "fast"])
@pytest.mark.parametrize("norm", NORMS, ids=lambda norm: norm.__name__)
def test_recalibrate_leaves_its_statistics_as_they_were(norm, method):
    """Each forward of the passes moved them by its momentum, so the skipped layer came back changed."""
    torch.manual_seed(0)
    model = Net(norm).eval()
    data = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32) * 2 + 1
    recalibrated = bnfold.recalibrate(model, data, method=method).result.module
    for name in ("running_mean", "running_var"):
        assert torch.equal(getattr(recalibrated.bn1, name), getattr(model.bn1, name))
        assert not torch.equal(getattr(recalibrated.bn2, name), getattr(model.bn2, name))


@pytest.mark.parametrize("attrs", ONNX.values(), ids=ONNX.keys())
def test_onnx_recalibrate_skips_it_for_the_same_reason(attrs):
    data = np.random.default_rng(0).standard_normal((16, 4, 5, 5)).astype(np.float32)
    with pytest.raises(BnfoldError, match="no BN layer that can be recalibrated") as error:
        bnfold.recalibrate(_onnx(**attrs), data)
    (name,) = (f"{key}={value}" for key, value in attrs.items())
    assert f"bn: {FIXED_ONNX[name]}" in str(error.value)


def test_a_bn_exported_in_training_mode_is_fixed_in_the_program_unlike_the_module(tmp_path):
    """The .pt2 graph normalizes by batch statistics whatever bnfold does: it was a warning that said bnfold
    evaluates it in eval mode. The module itself in training mode keeps that warning: model.eval() changes it."""
    torch.manual_seed(0)
    model = Net(nn.BatchNorm2d).train()
    path = _saved(tmp_path, model, "export")
    assert _findings(path, "bn1") == [FINDING]
    assert _reason(path, "bn1") == (FoldStatus.KEPT, FIXED)
    left_in_training = [(c, s) for c, s, _ in _findings(model, "bn1") if c == "training-mode"]
    assert left_in_training == [("training-mode", Severity.WARNING)]
    status, reason = _reason(model, "bn1")
    assert status is FoldStatus.KEPT and reason.endswith("(call model.eval() first)")


@pytest.mark.parametrize("how", ["pickle", "export"])
def test_an_eval_mode_model_gets_no_training_mode_finding(tmp_path, how):
    torch.manual_seed(0)
    path = _saved(tmp_path, Net(nn.BatchNorm2d).eval(), how)
    report = bnfold.inspect(path, allow_pickle=True, input_shape=SHAPE, fail_on=None)
    assert [f for f in report.findings if f.code == "training-mode"] == []
    assert not any(layer.training or layer.training_fixed for layer in report.layers)
