"""BN discovery: PyTorch finds more than isinstance(m, BatchNorm2d), in modules and graphs; ONNX reads
BatchNormalization of every opset."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from rich.console import Console
from torch import nn

from bnfold import inspect
from bnfold.layers import FoldStatus, Severity
from bnfold.pytorch.discover import discover_exported, discover_module
from bnfold.reports.html import render_html
from tests.onnx_builders import bn_node, bn_params, conv_bn, make, weights
from tests.torch_builders import randomized


class BatchNormAct2d(nn.BatchNorm2d):
    """Like timm's: normalize, then an activation inside the same module."""

    def __init__(self, channels):
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


class FrozenBatchNorm2d(nn.Module):
    """Detectron-style look-alike: BN buffers, hand-written affine, not a _BatchNorm."""

    def __init__(self, channels, eps=1e-5):
        super().__init__()
        self.eps = eps
        for name, value in (("weight", torch.ones(channels)), ("bias", torch.zeros(channels)),
                            ("running_mean", torch.zeros(channels)), ("running_var", torch.ones(channels))):
            self.register_buffer(name, value)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn1d = nn.BatchNorm1d(4)
        self.bn2d = nn.BatchNorm2d(4)
        self.bn3d = nn.BatchNorm3d(4)
        self.sync = nn.SyncBatchNorm(4)
        self.act_bn = BatchNormAct2d(4)
        self.frozen = FrozenBatchNorm2d(4)
        self.no_stats = nn.BatchNorm2d(4, track_running_stats=False)
        self.lazy = nn.LazyBatchNorm2d()


def test_module_walk_finds_every_bn_kind():
    layers = {layer.name: layer for layer in discover_module(Zoo().eval())}
    assert set(layers) == {"bn1d", "bn2d", "bn3d", "sync", "act_bn", "frozen", "no_stats", "lazy"}
    assert layers["act_bn"].kind == "BatchNormAct2d (BatchNorm2d subclass)"
    assert layers["frozen"].kind == "FrozenBatchNorm2d (look-alike)"
    assert layers["sync"].kind == "SyncBatchNorm"
    assert layers["no_stats"].running_mean is None and not layers["no_stats"].track_running_stats
    assert layers["lazy"].channels is None and layers["lazy"].running_mean is None
    assert layers["bn2d"].num_batches_tracked == 0 and layers["bn2d"].channels == 4


def test_scripted_modules_are_found_by_their_original_class():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    layers = discover_module(torch.jit.script(model))
    assert [(layer.name, layer.kind) for layer in layers] == [("1", "BatchNorm2d")]
    assert layers[0].eps == 1e-5


def test_exported_program_bn_ops_are_named_after_their_module():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    program = torch.export.export(model, (torch.randn(1, 3, 8, 8),))
    (layer,) = discover_exported(program)
    assert layer.name == "1" and layer.kind == "BatchNormAct2d"
    torch.testing.assert_close(torch.from_numpy(layer.running_var).float(), model[1].running_var)


def test_functional_batch_norm_in_an_exported_program():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mu", torch.zeros(4))
            self.register_buffer("sigma2", torch.ones(4))

        def forward(self, x):
            return F.batch_norm(x, self.mu, self.sigma2, training=False, eps=1e-3)

    program = torch.export.export(Functional().eval(), (torch.randn(2, 4, 5, 5),))
    (layer,) = discover_exported(program)
    assert layer.eps == 1e-3 and layer.channels == 4 and not layer.affine


class FunctionalOnBuffers(nn.Module):
    """BN written with F.batch_norm on buffers named neither running_mean nor running_var."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mu", torch.linspace(-1, 1, 4))
        self.register_buffer("sigma2", torch.linspace(0.5, 2, 4))
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.mu, self.sigma2, self.gamma, None, False, 0.1, 1e-3)


def summary(layers):
    return [(layer.name, layer.kind.split(" ")[0], layer.eps, layer.channels, layer.affine) for layer in layers]


@pytest.mark.parametrize("compile_", [torch.jit.script, lambda m: torch.jit.trace(m, torch.randn(1, 3, 8, 8))],
                         ids=["scripted", "traced"])
def test_torchscript_graph_shows_functional_batch_norm(compile_):
    model = FunctionalOnBuffers().eval()
    eager = discover_module(model)
    assert summary(eager) == [("mu", "F.batch_norm", 1e-3, 4, True)]
    (layer,) = discover_module(compile_(model))
    assert summary([layer]) == summary(eager) and layer.kind == "F.batch_norm (FunctionalOnBuffers)"
    np.testing.assert_array_equal(layer.running_var, model.sigma2.double().numpy())


def test_traced_torchscript_eps_and_momentum_come_from_the_graph(tmp_path):
    """A traced BN module keeps no eps attribute: the graph's batch_norm call holds it."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3, momentum=0.05), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    path = tmp_path / "traced.ts"
    torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 8, 8)), str(path))
    report = inspect(path)
    (layer,) = report.layers
    assert (layer.name, layer.kind, layer.eps, layer.momentum) == ("1", "BatchNorm2d", 1e-3, 0.05)
    assert "eps_unknown" not in layer.extra
    assert np.isfinite(layer.effective_gain()).all()
    assert not [finding for finding in report.findings if finding.code == "unusual-eps"]


ONNX_OPSET_ATTRIBUTES = {  # BatchNormalization's versions, each with the attributes it had
    1: dict(consumed_inputs=[0, 0, 0, 1, 1], is_test=1, spatial=1),
    6: dict(is_test=1, spatial=1),
    7: dict(spatial=1),
    9: {},
    14: dict(training_mode=0),
    15: {},
    onnx.defs.onnx_opset_version(): {},
}


@pytest.mark.parametrize("opset", sorted(ONNX_OPSET_ATTRIBUTES))
def test_onnx_bn_of_every_opset_is_described(opset):
    model = conv_bn(np.random.default_rng(opset), bias=False, opset=opset,
                    bn_attrs={**ONNX_OPSET_ATTRIBUTES[opset], "epsilon": 1e-3, "momentum": 0.8})
    stored = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    report = inspect(model)
    (layer,) = report.layers
    version = onnx.defs.get_schema("BatchNormalization", opset).since_version  # the kind names the operator
    assert (layer.kind, layer.channels, layer.training) == (f"BatchNormalization-{version}", 6, False)
    assert layer.eps == pytest.approx(1e-3) and layer.momentum == pytest.approx(0.8)
    np.testing.assert_array_equal(layer.running_var, stored["bn.var"])
    np.testing.assert_array_equal(layer.weight, stored["bn.scale"])
    assert report.findings == [] and report.folds[layer.name].status is FoldStatus.FOLDABLE


@pytest.mark.parametrize("opset, kind", [(17, "BatchNormalization-15"), (9, "BatchNormalization-9"),
                                          (7, "BatchNormalization-7")])
def test_onnx_kind_names_the_operator_version_not_the_model_opset(opset, kind):
    (layer,) = inspect(conv_bn(np.random.default_rng(opset), opset=opset)).layers
    assert layer.kind == kind and layer.extra["opset"] == opset


def test_onnx_kind_at_an_opset_newer_than_onnx_knows_is_the_model_opset():
    from bnfold.onnx.discover import discover

    newer = onnx.defs.onnx_opset_version() + 1  # BatchNormalization may have changed there
    (layer,) = discover(conv_bn(np.random.default_rng(0)), newer)
    assert layer.kind == f"BatchNormalization-{newer}"


@pytest.mark.parametrize("opset, attributes", [(1, dict(consumed_inputs=[0, 0, 0, 1, 1], is_test=0)),
                                               (6, dict(is_test=0)), (15, dict(training_mode=1))])
def test_onnx_bn_in_training_mode_is_an_error(opset, attributes):
    report = inspect(conv_bn(np.random.default_rng(0), bias=False, opset=opset, bn_attrs=attributes))
    assert [(f.code, f.severity) for f in report.findings] == [("training-mode", Severity.ERROR)]
    assert not report


def _printed(report) -> str:
    console = Console(width=200, record=True, color_system=None, file=io.StringIO())
    console.print(report)
    return console.export_text()


@pytest.mark.parametrize("eps", [1e-5, 1.234567e-5, 1e-3])
@pytest.mark.parametrize("framework", ["onnx", "torch"])
def test_eps_is_shown_as_written_and_computed_with_as_stored(framework, eps):
    """ONNX keeps epsilon as float32: reports show the shortest decimal that reads back as it (1e-05, not
    9.999999747378752e-06), in full (1.234567e-05, not 1.2e-05), as for a torch eps; the gain uses the
    stored value."""
    if framework == "onnx":
        model, stored = conv_bn(np.random.default_rng(0), bn_attrs={"epsilon": eps}), float(np.float32(eps))
    else:
        model, stored = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=eps))), eps
    report = inspect(model)
    (layer,) = report.layers
    assert layer.eps == stored and report.to_dict()["layers"][0]["eps"] == eps
    np.testing.assert_array_equal(layer.effective_gain(), layer.weight / np.sqrt(layer.running_var + stored))
    assert f", eps {eps!r})" in _printed(report).splitlines()[0]
    assert f" · eps {eps!r} · " in render_html(report)


def _bn_fed_at_run_time(x_shape, param_shape, *, conv: bool, constant: tuple[str, ...] = ()) -> onnx.ModelProto:
    """x (-> Conv to 6 channels) -> BN whose parameters are graph inputs, except those named `constant`."""
    rng = np.random.default_rng(0)
    params = {name: value for name, value in bn_params(rng, 6).items() if name.removeprefix("bn.") in constant}
    inputs = {"x": (x_shape, np.float32), **{f"bn.{role}": (param_shape, np.float32)
                                             for role in ("scale", "bias", "mean", "var") if role not in constant}}
    nodes = [onnx.helper.make_node("Conv", ["x", "w"], ["c"], name="conv")] if conv else []
    return make([*nodes, bn_node("c" if conv else "x", "y")], inputs, {"y": (None, np.float32)},
                {**params, **({"w": weights(rng, 6, 4, 3, 3)} if conv else {})})


@pytest.mark.parametrize("model, channels", [
    (_bn_fed_at_run_time((2, 4, 5, 5), (6,), conv=True), 6),  # the parameters' declared shape
    (_bn_fed_at_run_time((2, 4, 5, 5), ("C",), conv=True), 6),  # shape inference: the Conv's output channels
    (_bn_fed_at_run_time((2, 6, 5, 5), ("C",), conv=False), 6),  # the input's declared shape
    (_bn_fed_at_run_time((2, "C", 5, 5), ("C",), conv=False), None),  # nothing says
], ids=["declared", "inferred", "input", "unknown"])
def test_onnx_bn_whose_parameters_are_graph_inputs_has_the_channels_the_shapes_say(model, channels):
    """Such a BN showed 0 channels; now what the declared or inferred shapes say, else 'unknown' ('?',
    null), and it stays a runtime-stats warning that is kept, not folded."""
    report = inspect(model)
    (layer,) = report.layers
    assert layer.channels == channels and report.to_dict()["layers"][0]["channels"] == channels
    row = next(line for line in _printed(report).splitlines() if line.startswith("│ bn "))
    assert row.split("│")[2].strip() == ("?" if channels is None else str(channels))
    assert (" · channels unknown · " if channels is None else f" · {channels} channels · ") in render_html(report)
    assert [(f.code, f.severity) for f in report.findings] == [("runtime-stats", Severity.WARNING)]
    assert report.folds["bn"].status is FoldStatus.KEPT and "is a graph input" in report.folds["bn"].reason
    assert report  # a warning: inspect passes


def test_onnx_bn_with_a_scale_fed_at_run_time_has_no_gain():
    """Constant statistics and a runtime gamma: the gain is unknown, not 1/sqrt(var + eps) as if gamma were 1,
    and the runtime input is a finding (the layer showed 'ok')."""
    report = inspect(_bn_fed_at_run_time((2, 6, 5, 5), (6,), conv=False, constant=("bias", "mean", "var")))
    (layer,) = report.layers
    assert layer.channels == 6 and layer.effective_gain() is None
    assert [(f.code, f.message) for f in report.findings] == [
        ("runtime-stats", "parameters are graph inputs fed at run time (bn.scale); they cannot be checked or folded")]
