"""QAT models as TorchScript and torch.export programs, QAT models timed by `bench`, and the inspect finding
of a BN without running statistics left in training mode.

A TorchScript model's quantizers are RecursiveScriptModules and a program has none (its FusedMovingAvg-
ObsFakeQuantize is one aten op that writes its min/max, scale and zero point in place, undeclared in the
program's signature): neither may move under recalibrate, inspect --data, fold's verification or bench.
"""

from __future__ import annotations

import pytest
import torch
import torch.ao.quantization as tq
from torch import nn

import bnfold
from bnfold.benchmark import bench
from bnfold.errors import InputError
from tests.test_qat_and_statless import (SHAPE, HandWrittenBatchNorm, Normalized, QatNet, all_but_bn_statistics_of,
                                         assert_same_tensors, frozen_exact_statistics, qat_model, shifted_data)
from tests.recalibration_oracle import assert_statistics_match

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Please use quant_min",
                                        "ignore::torch.jit.TracerWarning")
FORMS = {
    "traced": lambda model: torch.jit.trace(model, torch.randn(SHAPE)),
    "exported": lambda model: torch.export.export(model, (torch.randn(SHAPE),), strict=False),
}


def state_of(model: object) -> dict[str, torch.Tensor]:
    """Every tensor of a module or program, quantizer state included, BN statistics left out."""
    state = model.state_dict if isinstance(model, torch.export.ExportedProgram) else model.state_dict()
    return all_but_bn_statistics_of(state)


@pytest.mark.parametrize("form", FORMS)
def test_recalibrating_a_scripted_or_exported_qat_model_moves_only_its_bn_statistics(form: str) -> None:
    """The statistics are the eager model's with its observers off: the quantization it holds was used."""
    eager = qat_model()
    model = FORMS[form](eager)
    before = state_of(model)
    result = bnfold.recalibrate(model, shifted_data(), batch_size=16).result
    recalibrated = result.program if form == "exported" else result.module
    assert_same_tensors(state_of(recalibrated), before)
    assert_same_tensors(state_of(model), before)
    statistics = recalibrated.state_dict if form == "exported" else recalibrated.state_dict()
    for name, (mean, var) in frozen_exact_statistics(eager, shifted_data(), 16).items():
        assert_statistics_match(statistics[f"{name}.running_mean"].numpy(), statistics[f"{name}.running_var"].numpy(),
                                mean, var, layer=name)


@pytest.mark.parametrize("form", FORMS)
def test_inspect_and_fold_on_data_leave_a_scripted_or_exported_qat_model_as_it_was(form: str) -> None:
    """With the observers learning, verification's two runs of the unfolded model differed (by 0.16) and
    the fold failed; the traced model's own quantization moved."""
    model = FORMS[form](qat_model())
    before = state_of(model)
    assert set(bnfold.inspect(model, data=shifted_data()).discrepancy) == {"conv1.bn", "conv2.bn"}
    report = bnfold.fold(model, data=shifted_data())
    assert report.passed and report.difference.max_abs == 0.0
    assert_same_tensors(state_of(model), before)


def test_a_scripted_fake_quantizer_and_observer_are_frozen_and_put_back() -> None:
    """torch.jit.script keeps FakeQuantize's flag test, and a plain observer records what it sees."""
    torch.manual_seed(0)
    eager = nn.Sequential(tq.FakeQuantize(), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), tq.MovingAverageMinMaxObserver())
    eager(torch.randn(SHAPE))
    model = torch.jit.script(eager.eval())
    before = state_of(model)
    result = bnfold.recalibrate(model, shifted_data()).result.module
    assert_same_tensors(state_of(result), before)
    assert not torch.equal(result.state_dict()["2.running_mean"], model.state_dict()["2.running_mean"])


def non_fused_qat_model(observing: bool) -> nn.Module:
    """A QAT model with torch's FakeQuantize, which tests its observer_enabled flag in Python."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = QatNet().train()
        model.qconfig = tq.default_qat_qconfig
        model = tq.prepare_qat(tq.fuse_modules_qat(model, [["conv1", "bn1", "relu"], ["conv2", "bn2"]]))
        model(torch.randn(SHAPE))
    return model.eval() if observing else model.eval().apply(tq.disable_observer)


def test_a_fake_quantizer_traced_while_observing_is_refused_before_it_runs() -> None:
    """The trace kept the observing branch: no flag stops it, so bnfold says so and moves nothing."""
    model = torch.jit.trace(non_fused_qat_model(observing=True), torch.randn(SHAPE))
    before = state_of(model)
    with pytest.raises(InputError, match="quant.activation_post_process of this TorchScript model observes") as raised:
        bnfold.inspect(model, data=shifted_data())
    assert "disable_observer" in raised.value.hint
    assert_same_tensors(state_of(model), before)
    traced_off = torch.jit.trace(non_fused_qat_model(observing=False), torch.randn(SHAPE))  # as the hint says
    before = state_of(traced_off)
    assert bnfold.inspect(traced_off, data=shifted_data()).discrepancy
    assert_same_tensors(state_of(traced_off), before)


@pytest.mark.parametrize("form", ["eager", *FORMS])
def test_bench_leaves_a_qat_model_as_it_was(form: str) -> None:
    model = qat_model() if form == "eager" else FORMS[form](qat_model())
    before = state_of(model)
    report = bench(model, runs=2, warmup=1, input_shape=",".join(map(str, SHAPE)))
    assert report.passed and report.rows
    assert_same_tensors(state_of(model), before)


@pytest.mark.parametrize("norm", [lambda: HandWrittenBatchNorm(4, register=False),
                                  lambda: nn.BatchNorm2d(4, track_running_stats=False)],
                         ids=["hand-written F.batch_norm(training=True)", "track_running_stats=False"])
def test_a_bn_without_running_statistics_in_training_mode_gets_no_training_mode_warning(norm) -> None:
    """Such a layer normalizes by its batch in either mode: eval mode changes nothing, and the finding that
    says what it does is no-running-stats."""
    findings = bnfold.inspect(Normalized(norm(), also_bn=True).train(), fail_on=None).findings
    codes = {(finding.code, finding.layer) for finding in findings}
    assert ("no-running-stats", "norm") in codes and ("training-mode", "norm") not in codes
    assert ("training-mode", "bn") in codes  # a BatchNorm2d with statistics left in training mode


def fused_fake_quantized_model() -> nn.Module:
    """A fused fake quantizer before a Conv+BN: symbolic tracing takes it whole (a QatNet needs export)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(tq.FusedMovingAvgObsFakeQuantize(), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        model(torch.randn(SHAPE))
    return model.eval()


def test_folding_a_checkpoint_writes_its_quantization_as_it_was(tmp_path) -> None:
    """bnfold's own model shares its tensors with the capture, whose shape propagation runs the model once."""
    torch.save(fused_fake_quantized_model().state_dict(), tmp_path / "model.pt")
    report = bnfold.fold(tmp_path / "model.pt", tmp_path / "folded.pt2", input_shape=",".join(map(str, SHAPE)),
                         model_factory="tests.test_qat_forms:fused_fake_quantized_model")
    assert report.passed and [decision.layer for decision in report.folded] == ["2"]
    written = torch.export.load(tmp_path / "folded.pt2").state_dict
    expected = fused_fake_quantized_model().state_dict()
    assert_same_tensors({name: written[name] for name in written if name.startswith("0.")},
                        {name: expected[name] for name in written if name.startswith("0.")})
