"""ONNX patterns that real models bring (quantized weights, old opsets, external data, ...): bnfold
folds them exactly or keeps the BN with a reason, and recalibrates them to a float64 oracle."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests.onnx_builders import F32, bn_node, bn_params, fold_checked, make, statuses, weights


def _quantized(values: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 values and their float32 scale (per tensor, or per slice along `axis`)."""
    reduced = tuple(a for a in range(values.ndim) if a != axis) if axis is not None else None
    scale = (np.abs(values).max(axis=reduced) / 127).astype(F32)
    shaped = scale.reshape([-1 if a == axis else 1 for a in range(values.ndim)]) if axis is not None else scale
    return np.round(values / shaped).astype(np.int8), scale


@pytest.mark.parametrize("opset", [13, 19, 21])
@pytest.mark.parametrize("axis", [None, 0])
def test_a_conv_with_dequantized_weights_keeps_its_bn_and_its_int8_weights(opset, axis):
    """QDQ models: the reference evaluator computes DequantizeLinear from opset 19 on, which made the
    weight a float constant and the fold replaced the int8 weight by float values, silently."""
    rng = np.random.default_rng(0)
    quantized, scale = _quantized(weights(rng, 6, 4, 3, 3), axis)
    inits = {"wq": quantized, "ws": scale, "wz": np.zeros(scale.shape, np.int8), "xs": np.array(0.05, F32),
             "xz": np.array(0, np.int8), **bn_params(rng, 6)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], **({} if axis is None else {"axis": 0})),
             helper.make_node("Conv", ["xd", "w"], ["c"], name="conv"), bn_node("c", "y")]
    model = make(nodes, {"x": ((2, 4, 5, 5), F32)}, {"y": (None, F32)}, inits, opset=opset)
    folded, plan = fold_checked(model, check=False)
    assert statuses(plan) == ["kept"]
    assert "dequantized by DequantizeLinear" in plan.decisions[0].reason
    assert [n.op_type for n in folded.graph.node] == [n.op_type for n in nodes]


def test_a_matmul_with_a_dequantized_bias_keeps_its_bn():
    rng = np.random.default_rng(1)
    quantized, scale = _quantized(rng.standard_normal(8).astype(F32), None)
    inits = {"w": weights(rng, 6, 8), "bq": quantized, "bs": scale, "bz": np.array(0, np.int8), **bn_params(rng, 8)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["b"]),
             helper.make_node("Add", ["m", "b"], ["mb"]), bn_node("mb", "y")]
    _, plan = fold_checked(make(nodes, {"x": ((3, 6), F32)}, {"y": (None, F32)}, inits, opset=21), check=False)
    assert statuses(plan) == ["kept"] and "'b' is dequantized" in plan.decisions[0].reason
