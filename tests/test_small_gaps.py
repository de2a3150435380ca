"""Three small gaps: an ONNX spatial=0 BN on (N, C) features, a scripted BN without running statistics,
and a scripted child module named `code`."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from onnx import helper
from torch import nn

import bnfold
from bnfold.layers import FoldStatus
from tests.onnx_builders import BN, F32, bn_node, bn_params, count, make, weights
from tests.test_torchscript_gaps import TwoNorms, _calibration
from tests.torch_builders import randomized


@pytest.mark.parametrize("opset", [7, 8])
@pytest.mark.parametrize("where", ["after Gemm", "before Gemm"])
def test_a_spatial0_bn_on_features_folds_and_verifies(opset, where):
    """On an (N, C) input, statistics per activation are per channel: fold kept every spatial=0 BN
    ("statistics per activation"), though recalibration already treated this one as per channel."""
    rng = np.random.default_rng(0)
    inits = {"w": weights(rng, 6, 8), "b": rng.standard_normal(8).astype(F32)}
    if where == "after Gemm":
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], name="fc"), bn_node("g", "y", spatial=0)]
        inits |= bn_params(rng, 8)
    else:
        nodes = [bn_node("x", "n", spatial=0), helper.make_node("Gemm", ["n", "w", "b"], ["y"], name="fc")]
        inits |= bn_params(rng, 6)
    model = make(nodes, {"x": (("N", 6), F32)}, {"y": (None, F32)}, inits, opset=opset)
    report = bnfold.fold(model, input_shape="5,6")
    assert report and report.verified, report.difference
    assert [(d.layer, d.status, d.targets) for d in report.plan.decisions] == [("bn", FoldStatus.FOLDED, ["fc"])]
    assert count(report.folded_model.proto, BN) == 0


def test_a_spatial0_bn_on_feature_maps_is_still_kept_with_its_reason():
    rng = np.random.default_rng(1)
    per_activation = {name: values.reshape(6, 3, 3) for name, values in bn_params(rng, 54).items()}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y", spatial=0)]
    model = make(nodes, {"x": (("N", 4, 5, 5), F32)}, {"y": (None, F32)},
                 {"w": weights(rng, 6, 4, 3, 3), **per_activation}, opset=7)
    report = bnfold.fold(model)
    [decision] = report.plan.decisions
    assert decision.status is FoldStatus.KEPT
    assert decision.reason == "spatial=0: statistics per activation, not per channel"
    assert count(report.folded_model.proto, BN) == 1


def test_a_spatial0_bn_on_an_input_of_unknown_rank_is_kept_saying_so():
    """Without a known rank the input may have positions beyond its channels: no fold on a guess."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["g"], name="fc"),
             helper.make_node("Reshape", ["g", "shape"], ["r"], name="reshape"), bn_node("r", "y", spatial=0)]
    model = make(nodes, {"x": (("N", 6), F32), "shape": (("K",), np.int64)}, {"y": (None, F32)},
                 {"w": weights(rng, 6, 8), **bn_params(rng, 8)}, opset=7)
    [decision] = bnfold.fold(model, verify=False).plan.decisions
    assert decision.status is FoldStatus.KEPT
    assert decision.reason.startswith("spatial=0: statistics per activation, which are per channel only on an (N, C)")


def test_a_scripted_bn_without_running_statistics_is_kept_for_the_reason_eager_gives():
    """torch.export's converter cannot convert the batch-statistics branch such a BN always takes: every
    layer read "not analysed (see above)" and the error was the converter's alone ("failed for node
    prim::Loop"). The BN now gets eager's reason and the error names it."""
    model = randomized(TwoNorms(nn.BatchNorm2d(8, track_running_stats=False)))
    eager = {d.layer: d.reason for d in bnfold.fold(model, input_shape="2,3,8,8").plan.decisions}
    scripted = torch.jit.script(model)
    report = bnfold.fold(scripted, input_shape="2,3,8,8")
    assert not report
    reasons = {d.layer: d.reason for d in report.plan.decisions}
    assert reasons == {"bn1": eager["bn1"], "bn2": "not analysed (see above)"}
    assert eager["bn1"].startswith("no running statistics (track_running_stats=False)")
    assert report.analysis_error.endswith(
        ": bn1 has no running statistics (track_running_stats=False), so it always normalizes by batch statistics, "
        "a BatchNorm branch the converter cannot convert")
    inspection = bnfold.inspect(scripted, input_shape="2,3,8,8")
    assert inspection.fold_error == report.analysis_error
    assert ("no-running-stats", "bn1") in [(f.code, f.layer) for f in inspection.findings]
    skipped = bnfold.recalibrate(scripted, data=_calibration()).skipped
    assert [(s.name, s.reason) for s in skipped] == [("bn1", eager["bn1"])]


def _named_like_properties(holder: str | None) -> nn.Module:
    """Conv+BN children named `code` and `graph` (ScriptModule properties), inside `holder` or at the top."""
    body = nn.Sequential(OrderedDict(code=nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), relu=nn.ReLU(),
                                     graph=nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))))
    return randomized(nn.Sequential(OrderedDict([(holder, body)])) if holder else body)


def _statistics(module: nn.Module) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in module.state_dict().items() if key.endswith(("_mean", "_var"))}


def test_scripted_children_named_code_and_graph_are_inspected_folded_and_recalibrated_as_in_eager():
    """torch.export's converter reads attributes with getattr, which found the ScriptModule's `code`
    string and `graph` instead of the children: fold failed ("'str' object has no attribute '0'")."""
    model = _named_like_properties("body")
    scripted = torch.jit.script(model)
    names = ["body.code.1", "body.graph.1"]
    assert [layer.name for layer in bnfold.inspect(scripted, input_shape="2,3,8,8").layers] == names
    report = bnfold.fold(scripted, input_shape="2,3,8,8")
    assert report and report.verified
    assert [(d.layer, d.status, d.targets) for d in report.plan.decisions] == [
        ("body.code.1", FoldStatus.FOLDED, ["body.code.0"]), ("body.graph.1", FoldStatus.FOLDED, ["body.graph.0"])]
    assert not any("batch_norm" in node.kind() for node in report.folded_model.module.inlined_graph.nodes())
    recalibrated = bnfold.recalibrate(scripted, data=_calibration())
    assert [layer.name for layer in recalibrated.layers] == names
    expected = _statistics(bnfold.recalibrate(model, data=_calibration()).result.module)
    got = _statistics(recalibrated.result.module)
    assert got.keys() == expected.keys() and len(got) == 4
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6)


def test_top_level_children_named_code_and_graph_say_how_to_make_the_model_foldable():
    """At the top the converter's own GraphModule reserves those names ("Code has not been generated!
    Please report a bug to PyTorch"): the error says which names and what to do; inspect and recalibrate
    work all the same."""
    scripted = torch.jit.script(_named_like_properties(None))
    report = bnfold.fold(scripted, input_shape="2,3,8,8")
    assert not report and report.analysis_error.endswith(
        ": the model's top-level code, graph are named like an attribute of torch.fx.GraphModule, which the "
        "converter builds; rename them (e.g. code_) before torch.jit.script")
    assert [layer.name for layer in bnfold.inspect(scripted).layers] == ["code.1", "graph.1"]
    assert [layer.name for layer in bnfold.recalibrate(scripted, data=_calibration()).layers] == ["code.1", "graph.1"]
