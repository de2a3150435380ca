"""Quantization-aware-training models and BN layers without running statistics in eager PyTorch.

A FakeQuantize observes in eval mode too: bnfold's forward passes must compute with the quantization the
model holds and leave it (scale, zero point, observer min/max, enable flags) as it was. A BN that keeps no
running statistics always normalizes by its batch: recalibration skips it and says so, as inspect does.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.ao.quantization as tq
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.errors import NoBatchNormError
from bnfold.pytorch.discover import missing_statistics
from bnfold.pytorch.quantization import observers_frozen
from tests.recalibration_oracle import assert_statistics_match

SHAPE = (16, 3, 8, 8)
# torch.ao.quantization announces its deprecation, and its default QAT qconfig a reduce_range one
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Please use quant_min")


class QatNet(nn.Module):
    """Quant stub, Conv+BN+ReLU and Conv+BN, fused and prepared for QAT by `qat_model`."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4)
        self.dequant = tq.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(self.quant(x)))))))


def qat_model() -> nn.Module:
    """A QAT model after a few training steps (observers initialized, BN statistics moved), in eval mode;
    one weight quantizer has its observer switched off, one activation quantizer its fake quantization,
    so that restoring the flags is visible."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = QatNet().train()
        model.qconfig = tq.get_default_qat_qconfig("fbgemm")
        model = tq.prepare_qat(tq.fuse_modules_qat(model, [["conv1", "bn1", "relu"], ["conv2", "bn2"]]))
        for _ in range(3):
            model(torch.randn(SHAPE))
    model.conv2.weight_fake_quant.disable_observer()
    model.conv1.activation_post_process.disable_fake_quant()
    return model.eval()


def shifted_data(samples: int = 64) -> np.ndarray:
    """Inputs far from those the model was trained on: observers left on would move a lot."""
    return (np.random.default_rng(1).standard_normal((samples, *SHAPE[1:])) * 3 + 2).astype(np.float32)


def all_but_bn_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state without the BN statistics: weights, fake-quant scales, zero points, flags, observer
    min/max."""
    return all_but_bn_statistics_of(model.state_dict())


def all_but_bn_statistics_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in state.items()
            if name.rpartition(".")[2] not in ("running_mean", "running_var", "num_batches_tracked")}


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    changed = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert not changed, f"changed: {changed}"


def test_observers_learn_in_eval_mode_without_freezing() -> None:
    """The premise: an eval-mode forward of a QAT model moves its quantization state."""
    model = qat_model()
    before = all_but_bn_statistics(model)
    with torch.no_grad():
        model(torch.from_numpy(shifted_data()))
    after = all_but_bn_statistics(model)
    assert not torch.equal(after["quant.activation_post_process.scale"], before["quant.activation_post_process.scale"])


def test_frozen_observers_keep_the_state_and_flags_and_quantize_with_the_held_scale() -> None:
    model = qat_model()
    before = all_but_bn_statistics(model)
    reference = copy.deepcopy(model).apply(tq.disable_observer)  # what the model computes with observers off
    x = torch.from_numpy(shifted_data())
    with torch.no_grad(), observers_frozen(model):
        assert not model.conv1.weight_fake_quant.observer_enabled.item()  # off during the passes
        output = model(x)
    assert_same_tensors(all_but_bn_statistics(model), before)
    assert model.conv1.weight_fake_quant.observer_enabled.item() == 1  # the model's own flags are back
    assert model.conv2.weight_fake_quant.observer_enabled.item() == 0
    assert model.conv1.activation_post_process.fake_quant_enabled.item() == 0
    with torch.no_grad():
        torch.testing.assert_close(output, reference(x), rtol=0, atol=0)


def test_frozen_plain_observer_is_restored_even_when_it_resized_its_buffers() -> None:
    """A plain observer (a model prepared for post-training calibration) records every input; a per-channel
    one gives its empty min/max their shape on its first input."""
    observer = tq.PerChannelMinMaxObserver(ch_axis=1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), observer).eval()
    with torch.no_grad(), observers_frozen(model):
        model(torch.randn(SHAPE))
        assert observer.min_val.shape == (4,)  # it did observe: only its state is put back
    assert observer.min_val.shape == (0,) and observer.max_val.shape == (0,)


class HandWrittenBatchNorm(nn.Module):
    """A BN written by hand that keeps no running statistics: F.batch_norm always normalizes by the batch."""

    def __init__(self, channels: int, register: bool) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))
        self.eps = 1e-5
        if register:
            self.register_buffer("running_mean", None)
        else:
            self.running_mean = None
        self.running_var = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, 0.1, self.eps)


def test_missing_statistics_names_bn_layers_without_running_statistics_only() -> None:
    always = "it always normalizes by batch statistics"
    assert always in missing_statistics(nn.BatchNorm2d(4, track_running_stats=False))
    assert "track_running_stats=False" in missing_statistics(nn.BatchNorm2d(4, track_running_stats=False))
    for register in (False, True):
        assert "running_mean is None" in missing_statistics(HandWrittenBatchNorm(4, register))
        assert always in missing_statistics(HandWrittenBatchNorm(4, register))
    for module in (nn.BatchNorm2d(4), nn.InstanceNorm2d(4), nn.LayerNorm(4), nn.Conv2d(3, 4, 3)):
        assert missing_statistics(module) is None


# --------------------------------------------------------------------------------------------------------
# End to end: recalibrate, inspect --data and fold --data on a QAT model
# --------------------------------------------------------------------------------------------------------


def frozen_exact_statistics(model: nn.Module, data: np.ndarray, batch: int) -> dict[str, tuple[np.ndarray, ...]]:
    """What exact recalibration must find: each BN in turn gets the float64 mean and unbiased variance of
    the inputs it sees in eval mode with the observers off, the BN layers before it already updated."""
    model = copy.deepcopy(model).apply(tq.disable_observer)
    found = {}
    for name in ("conv1.bn", "conv2.bn"):
        bn, seen = model.get_submodule(name), []
        hook = bn.register_forward_pre_hook(lambda _module, inputs: seen.append(inputs[0].double()))
        with torch.no_grad():
            for start in range(0, len(data), batch):
                model(torch.from_numpy(data[start:start + batch]))
        hook.remove()
        values = torch.cat(seen).transpose(0, 1).flatten(1)
        found[name] = (values.mean(dim=1).numpy(), values.var(dim=1).numpy())
        with torch.no_grad():
            bn.running_mean.copy_(torch.from_numpy(found[name][0]))
            bn.running_var.copy_(torch.from_numpy(found[name][1]))
    return found


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_recalibrating_a_qat_model_changes_only_its_bn_statistics(method: str) -> None:
    model = qat_model()
    before, statistics = all_but_bn_statistics(model), {k: v.clone() for k, v in model.state_dict().items()}
    report = bnfold.recalibrate(model, shifted_data(), method=method, batch_size=16)
    assert [layer.name for layer in report.layers] == ["conv1.bn", "conv2.bn"]
    result = report.result.module
    assert_same_tensors(all_but_bn_statistics(result), before)  # scales, zero points, min/max and flags
    assert_same_tensors(model.state_dict(), statistics)  # the caller's model is untouched
    for name in ("conv1.bn", "conv2.bn"):
        assert not torch.allclose(result.get_submodule(name).running_mean, statistics[f"{name}.running_mean"])
    if method == "exact":
        for name, (mean, var) in frozen_exact_statistics(model, shifted_data(), 16).items():
            bn = result.get_submodule(name)
            assert_statistics_match(bn.running_mean.numpy(), bn.running_var.numpy(), mean, var, layer=name)


def test_recalibrating_a_qat_checkpoint_writes_its_quantization_as_it_was(tmp_path) -> None:
    """A model bnfold loads itself is worked on without a copy: the flags must be back before it is written."""
    model = qat_model()
    torch.save(model.state_dict(), tmp_path / "qat.pt")
    bnfold.recalibrate(tmp_path / "qat.pt", shifted_data(), output=tmp_path / "out.pt",
                       model_factory="tests.test_qat_and_statless:qat_model")
    written = torch.load(tmp_path / "out.pt")
    assert_same_tensors(all_but_bn_statistics_of(written), all_but_bn_statistics(model))


def test_inspect_with_data_leaves_a_qat_model_as_it_was() -> None:
    model = qat_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = bnfold.inspect(model, data=shifted_data())
    assert set(report.discrepancy) == {"conv1.bn", "conv2.bn"}
    assert_same_tensors(model.state_dict(), state)


def test_fold_verified_on_data_leaves_a_qat_model_as_it_was() -> None:
    """Nothing folds (QAT's ConvBn computes its weight at run time); the output is the model itself, run
    twice by verification: with observers learning, the second run differed by 5% and the fold failed."""
    model = qat_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = bnfold.fold(model, data=shifted_data())
    assert report.passed and report.difference.max_abs == 0.0
    assert_same_tensors(model.state_dict(), state)


# --------------------------------------------------------------------------------------------------------
# BN layers without running statistics
# --------------------------------------------------------------------------------------------------------


class Normalized(nn.Module):
    """A conv, then `norm`, then (with `also_bn`) a BN that has statistics."""

    def __init__(self, norm: nn.Module, also_bn: bool) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 4, 3), norm
        self.bn = nn.BatchNorm2d(4) if also_bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.norm(self.conv(x)))


WITHOUT_STATISTICS = {
    "hand-written": (lambda: HandWrittenBatchNorm(4, register=False), "running_mean is None"),
    "registered None": (lambda: HandWrittenBatchNorm(4, register=True), "running_mean is None"),
    "track_running_stats=False": (lambda: nn.BatchNorm2d(4, track_running_stats=False), "track_running_stats=False"),
}
WHY = "it always normalizes by batch statistics, so there are none to recalibrate and no fixed scale and shift to fold"


@pytest.mark.parametrize("name", WITHOUT_STATISTICS)
def test_recalibrate_names_a_bn_without_running_statistics_and_why(name: str) -> None:
    build, cause = WITHOUT_STATISTICS[name]
    with pytest.raises(NoBatchNormError) as raised:
        bnfold.recalibrate(Normalized(build(), also_bn=False).eval(), shifted_data())
    assert f"(norm: no running statistics ({cause}): {WHY})" in str(raised.value)
    report = bnfold.recalibrate(Normalized(build(), also_bn=True).eval(), shifted_data())
    assert [layer.name for layer in report.layers] == ["bn"]
    assert [(layer.name, layer.reason) for layer in report.skipped] == [
        ("norm", f"no running statistics ({cause}): {WHY}")]
    findings = bnfold.inspect(Normalized(build(), also_bn=True).eval()).findings
    assert ("no-running-stats", "norm") in {(finding.code, finding.layer) for finding in findings}
