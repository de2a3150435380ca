"""TorchScript archives whose BN are no plain submodules in eval mode: frozen modules (statistics as graph
constants) and scripted modules with a BN left in training mode."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bnfold
from bnfold.errors import NoBatchNormError
from bnfold.pytorch.recalibrate import NO_KERNEL_NOTE
from bnfold.layers import FoldStatus
from tests.torch_builders import randomized


class SumThenLinear(nn.Module):
    """Two BN that torch.jit.freeze cannot fold into a conv: one after a sum of convs, one after Linear->ReLU."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.lin, self.bn1d, self.head = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)

    def forward(self, x):
        y = self.bn(self.a(x) + self.b(x))
        return self.head(self.bn1d(torch.relu(self.lin(y.mean((2, 3))))))


def test_inspect_lists_the_bn_a_frozen_module_keeps_under_the_names_fold_uses(tmp_path):
    """Freezing makes BN statistics graph constants (no BN submodule is left): inspect reads them from the
    batch_norm calls, with health checks, and names them as fold does (module paths while the frozen
    module is in memory; in graph order once torch.jit.save dropped the constants' debug names)."""
    model = randomized(SumThenLinear())
    with torch.no_grad():
        model.bn1d.weight[2] = 0.0  # a dead channel: health checks must see the frozen statistics
    frozen = torch.jit.freeze(torch.jit.script(model))
    torch.jit.save(frozen, tmp_path / "frozen.ts")
    for source, names in ((frozen, ["bn", "bn1d"]), (tmp_path / "frozen.ts", ["batch_norm", "batch_norm_1"])):
        report = bnfold.inspect(source)
        assert [layer.name for layer in report.layers] == names
        for layer, bn in zip(report.layers, (model.bn, model.bn1d)):
            assert layer.kind == "F.batch_norm (frozen)" and (layer.eps, layer.momentum) == (bn.eps, bn.momentum)
            for mine, theirs in ((layer.running_mean, bn.running_mean), (layer.running_var, bn.running_var),
                                 (layer.weight, bn.weight), (layer.bias, bn.bias)):
                np.testing.assert_array_equal(mine, theirs.detach().double().numpy())
        dead = [finding.layer for finding in report.findings if finding.code == "dead-channels"]
        assert dead == [names[1]]
        folded = bnfold.fold(source, input_shape="2,3,8,8")
        assert [(d.layer, d.status) for d in folded.plan.decisions] == [(name, FoldStatus.FOLDED) for name in names]
        assert folded.verified


def test_folds_into_a_frozen_module_name_its_layers_and_count_the_weights_freezing_made_constants(tmp_path):
    """A frozen module keeps its weights as graph constants, not in its state_dict: the parameters before
    the fold count them (they read 0, so 0 -> 268), and the layers folded into are named by module path
    while in memory (they read lifted_tensor_self.a), in graph order once torch.jit.save dropped the paths."""
    model = randomized(SumThenLinear())
    weights = {name: t.numel() for name, t in model.state_dict().items() if t.is_floating_point()}
    before, folded_away = sum(weights.values()), sum(n for name, n in weights.items() if name.startswith("bn"))
    frozen = torch.jit.freeze(torch.jit.script(model))
    torch.jit.save(frozen, tmp_path / "frozen.ts")
    for source, targets in ((frozen, [["a", "b"], ["head"]]),
                            (tmp_path / "frozen.ts", [["conv2d", "conv2d_1"], ["linear_1"]])):
        report = bnfold.fold(source, tmp_path / "out.ts", input_shape="2,3,8,8", force=True)
        assert report.verified and [d.targets for d in report.folded] == targets
        assert (report.params_before, report.params_after) == (before, before - folded_away)
        written = torch.jit.load(str(tmp_path / "out.ts")).state_dict()
        assert sum(t.numel() for t in written.values()) == before - folded_away
    assert sorted(bnfold.fold(frozen, input_shape="2,3,8,8").folded_model.module.state_dict()) == sorted(
        name for name in weights if not name.startswith("bn"))


def test_a_module_frozen_with_its_conv_bn_folded_has_no_bn_left():
    frozen = torch.jit.freeze(torch.jit.script(randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))))
    assert bnfold.inspect(frozen).layers == []


class TwoConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


@pytest.mark.parametrize("when", ["before scripting", "after scripting"])
def test_a_scripted_bn_in_training_mode_is_named_as_what_stops_the_fold(tmp_path, when):
    """torch.export's TorchScript converter cannot convert BN's training branch (a loop): the report says
    which BN is in training mode and how to fix it, once for the whole model (every layer repeated it), in
    --json too."""
    model = randomized(TwoConvBN())
    if when == "before scripting":
        model.bn2.train()
    scripted = torch.jit.script(model)
    if when == "after scripting":
        scripted.bn2.train()
    torch.jit.save(scripted, tmp_path / "training.ts")
    report = bnfold.fold(tmp_path / "training.ts", input_shape="2,3,8,8")
    document = json.loads(report.to_json())
    assert [(layer["layer"], layer["status"]) for layer in document["layers"]] == [("bn1", "kept"), ("bn2", "kept")]
    assert "because bn2 is in training mode" in document["analysis_error"]
    assert "call .eval() on the model" in document["analysis_error"]
    assert {layer["reason"] for layer in document["layers"]} == {"not analysed (see above)"}


@pytest.mark.parametrize("training, flags", [(True, ["--input-shape", "2,3,8,8"]), (False, ["--no-verify"])],
                         ids=["the converter fails", "no example input"])
def test_a_torchscript_model_bnfold_cannot_analyse_fails_fold_and_the_require_folded_gate(tmp_path, cli, training,
                                                                                         flags):
    """No graph captured means no layer was even looked at: fold exits 1 writing nothing (it wrote the model
    unchanged, exit 0), inspect leaves the fold column unknown and says why, and check --require-folded
    fails (it passed, counting both foldable BN as 'kept, not exactly foldable')."""
    scripted = torch.jit.script(randomized(TwoConvBN()))
    scripted.bn2.train(training)
    model, output = tmp_path / "model.ts", tmp_path / "out.ts"
    torch.jit.save(scripted, model)
    shape = flags[1] if flags[0] == "--input-shape" else None
    report = bnfold.fold(model, output, input_shape=shape, verify="--no-verify" not in flags)
    assert not report and report.analysis_error and report.difference is None and not output.exists()
    assert json.loads(report.to_json())["analysis_error"] == report.analysis_error
    result = cli("fold", str(model), "-o", str(output), *flags)
    assert result.code == 1 and not output.exists()
    words = " ".join(result.stdout.split())
    assert f"not analysed: {report.analysis_error}" in words and words.count(report.analysis_error) == 1
    assert words.count("kept: not analysed (see above)") == 2
    assert result.stdout.rstrip().endswith("fold rejected: nothing written")
    inspection = bnfold.inspect(model, input_shape=shape)
    assert inspection.folds is None and inspection.fold_error == report.analysis_error
    assert f"fold analysis not available: {report.analysis_error}" in inspection.notes
    gate = cli("check", str(model), "--require-folded", "--json", *(["--input-shape", shape] if shape else []))
    assert gate.code == 1
    [policy] = [p for p in json.loads(gate.stdout)["policies"] if p["policy"] == "require-folded"]
    assert policy["outcome"] == "failed" and report.analysis_error in policy["failures"][0]["message"]


def test_bench_of_a_torchscript_model_bnfold_cannot_analyse_says_why_and_times_nothing(tmp_path, cli):
    """Without a fold both sides are the same model: bench timed it against itself and exited 0 with a
    speed-up of nothing. It now fails as fold does (exit 1), giving the reason, in --json too."""
    scripted = torch.jit.script(randomized(TwoConvBN()))
    scripted.bn2.train()
    model = tmp_path / "model.ts"
    torch.jit.save(scripted, model)
    report = bnfold.bench(model, input_shape="2,3,8,8", runs=1, warmup=1)
    assert not report and report.rows == [] and "because bn2 is in training mode" in report.analysis_error
    args = ("bench", str(model), "--input-shape", "2,3,8,8", "--runs", "1", "--warmup", "1")
    result = cli(*args)
    assert result.code == 1 and f"not analysed: {report.analysis_error}" in " ".join(result.stdout.split())
    assert "speed-up" not in result.stdout and "not timed" in result.stdout
    document = json.loads(cli(*args, "--json").stdout)
    assert (document["passed"], document["results"]) == (False, [])
    assert document["analysis_error"] == report.analysis_error


def test_recalibrating_a_frozen_module_skips_its_constant_statistics_saying_why():
    model = randomized(SumThenLinear())
    data = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    partly = torch.jit.freeze(torch.jit.script(model), preserved_attrs=["bn1d"])  # bn1d stays a submodule
    report = bnfold.recalibrate(partly, data=data)
    assert [layer.name for layer in report.layers] == ["bn1d"] and set(report.notes) <= {NO_KERNEL_NOTE}
    assert [(s.name, "torch.jit.freeze" in s.reason) for s in report.skipped] == [("bn", True)]
    with pytest.raises(NoBatchNormError, match=r"bn: its statistics are constants of a frozen.*; bn1d: "):
        bnfold.recalibrate(torch.jit.freeze(torch.jit.script(model)), data=data)


class StatisticsOnBuffers(nn.Module):
    """F.batch_norm on buffers of a module that is no BN module: only the graph shows it is one."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mu", torch.linspace(-1, 1, 4))
        self.register_buffer("sigma2", torch.linspace(0.5, 2, 4))

    def forward(self, x):
        return F.batch_norm(x, self.mu, self.sigma2, None, None, False, 0.1, 1e-3)


def test_functional_batch_norm_in_a_submodule_named_like_a_script_module_property_is_found():
    """A ScriptModule's own `code` and `graph` properties hid its submodules of those names: reading the
    statistics failed, discovery silently fell back to the module walk, and inspect and recalibrate saw
    no BN at all."""
    scripted = torch.jit.script(nn.Sequential(OrderedDict(code=StatisticsOnBuffers(), graph=StatisticsOnBuffers())))
    layers = bnfold.inspect(scripted).layers
    assert [(layer.name, layer.channels, layer.eps) for layer in layers] == [("code", 4, 1e-3), ("graph", 4, 1e-3)]
    np.testing.assert_array_equal(layers[1].running_var, np.linspace(0.5, 2, 4, dtype=np.float32))
    data = np.random.default_rng(0).standard_normal((16, 4, 5, 5)).astype(np.float32)
    assert [layer.name for layer in bnfold.recalibrate(scripted, data=data).layers] == ["code", "graph"]


class HandWrittenFrozenMomentum(nn.Module):
    """F.batch_norm on its own buffers with a momentum of 0.0 written out, beside a BN module whose
    momentum=None its forward passes as 0.0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mu", torch.zeros(4))
        self.register_buffer("sigma2", torch.ones(4))
        self.bn = nn.BatchNorm2d(4, momentum=None)

    def forward(self, x):
        return self.bn(F.batch_norm(self.conv(x), self.mu, self.sigma2, None, None, False, 0.0, 1e-5))


def test_momentum_reads_alike_in_eager_scripted_and_frozen_modules():
    module = HandWrittenFrozenMomentum().eval()
    scripted = torch.jit.script(module)
    for source in (module, scripted):
        assert {layer.name: layer.momentum for layer in bnfold.inspect(source).layers} == {"mu": 0.0, "bn": None}
    # freezing folds bn into conv; a frozen call's 0.0 reads as a module's momentum=None (it cannot tell)
    frozen = bnfold.inspect(torch.jit.freeze(torch.jit.script(module)))
    assert [layer.momentum for layer in frozen.layers] == [None]


class ShuffleByBatchSize(nn.Module):
    """ShuffleNetV2's channel shuffle: a view whose sizes are read from the input at run time."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        batchsize, channels, height, width = x.size()
        x = self.bn(self.conv(x)).view(batchsize, 2, -1, height, width)
        return x.transpose(1, 2).reshape(x.size(0), -1)


@pytest.mark.parametrize("compile", [torch.jit.script, lambda m: torch.jit.trace(m, torch.zeros(2, 3, 8, 8))],
                         ids=["scripted", "traced"])
def test_a_folded_torchscript_model_runs_at_any_batch_size(compile):
    """The folded graph is traced back on the `--input-shape` example: through aten's size ops the tracer
    wrote that example's batch size into every view, and the fold ran at batch 2 alone."""
    model = randomized(ShuffleByBatchSize())
    report = bnfold.fold(compile(model), input_shape="2,3,8,8")
    assert report.verified and [d.layer for d in report.folded] == ["bn"]
    for batch in (1, 5):
        x = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(report.folded_model.module(x), model(x), rtol=1e-5, atol=1e-6)
