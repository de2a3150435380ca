"""inspect judges an ONNX spatial=0 BN (opset < 9) by the rule fold planning and recalibration apply:
per activation unless shape inference proves its input is (N, C)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import bnfold
from bnfold.layers import FoldStatus
from tests.onnx_builders import F32, bn_node, bn_params, make, weights


def _features_model(opset: int, *, value_info: bool = True, runtime_params: bool = False):
    """x (N, 6) -> Gemm -> spatial=0 BN over 8 features; `runtime_params`: the BN's four parameters are
    graph inputs of undeclared shape, so only the BN's input can tell its channels."""
    rng = np.random.default_rng(0)
    params = bn_params(rng, 8)
    inputs = {"x": (("N", 6), F32)} | ({name: (None, F32) for name in params} if runtime_params else {})
    inits = {"w": weights(rng, 6, 8), "b": rng.standard_normal(8).astype(F32)} | ({} if runtime_params else params)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], name="fc"), bn_node("g", "y", spatial=0)]
    model = make(nodes, inputs, {"y": (None, F32)}, inits, opset=opset)
    if not value_info:  # as many exporters write it: ranks of intermediate values only from inference
        del model.graph.value_info[:]
    return model


def _feature_maps_model(opset: int, *, runtime_params: bool = False):
    """x (N, 4, 5, 5) -> Conv -> spatial=0 BN with statistics per activation, (6, 3, 3)."""
    rng = np.random.default_rng(1)
    params = {name: values.reshape(6, 3, 3) for name, values in bn_params(rng, 54).items()}
    inputs = {"x": (("N", 4, 5, 5), F32)} | ({name: (None, F32) for name in params} if runtime_params else {})
    inits = {"w": weights(rng, 6, 4, 3, 3)} | ({} if runtime_params else params)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y", spatial=0)]
    return make(nodes, inputs, {"y": (None, F32)}, inits, opset=opset)


@pytest.mark.parametrize("value_info", [True, False])
@pytest.mark.parametrize("opset", [7, 8])
def test_a_spatial0_bn_on_features_is_inspected_as_per_channel_as_fold_folds_it(opset, value_info):
    """inspect marked every spatial=0 BN per activation from the attribute alone, beside a fold column
    that folds it; recalibration traced ranks without inference and skipped it where the file declares
    no intermediate shapes, though fold and inspect proved it (N, C)."""
    model = _features_model(opset, value_info=value_info)
    report = bnfold.inspect(model)
    [layer] = report.layers
    assert "per_activation" not in layer.extra
    assert layer.channels == 8
    assert report.folds["bn"].status is FoldStatus.FOLDABLE
    assert [(d.layer, d.status) for d in bnfold.fold(model).plan.decisions] == [("bn", FoldStatus.FOLDED)]
    data = np.random.default_rng(2).standard_normal((40, 6)).astype(F32)
    assert not bnfold.recalibrate(model, data).skipped


@pytest.mark.parametrize("opset", [7, 8])
def test_a_spatial0_bn_fed_at_run_time_on_features_takes_its_channels_from_its_input(opset):
    """Its parameters declare no shape: the channels are axis 1 of its (N, C) input, as for any per-channel
    BN. They read '?' while the attribute alone made it per activation."""
    [layer] = bnfold.inspect(_features_model(opset, runtime_params=True)).layers
    assert "per_activation" not in layer.extra
    assert layer.channels == 8


@pytest.mark.parametrize("opset", [7, 8])
def test_a_spatial0_bn_on_feature_maps_is_still_inspected_per_activation(opset):
    report = bnfold.inspect(_feature_maps_model(opset))
    [layer] = report.layers
    assert layer.extra["per_activation"] is True
    assert layer.channels == 54  # activations, (6, 3, 3)
    assert report.folds["bn"].status is FoldStatus.KEPT
    assert report.folds["bn"].reason == "spatial=0: statistics per activation, not per channel"


def test_a_spatial0_bn_fed_at_run_time_on_feature_maps_has_no_channel_count_from_its_input():
    """Axis 1 of its input holds 6 channels, but its statistics are per activation: no count is guessed."""
    [layer] = bnfold.inspect(_feature_maps_model(7, runtime_params=True)).layers
    assert layer.extra["per_activation"] is True
    assert layer.channels is None
