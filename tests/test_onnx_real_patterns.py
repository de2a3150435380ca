"""ONNX patterns that real models bring (quantized weights, old opsets, external data, ...): bnfold
folds them exactly or keeps the BN with a reason, and recalibrates them to a float64 oracle."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold import recalibrate
from tests.onnx_builders import BN, F32, bn_node, bn_params, fold_checked, make, run, statuses, weights


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


def _bn_input_statistics(model, data: np.ndarray, value: str) -> tuple[np.ndarray, np.ndarray]:
    """The oracle: `value` computed by onnxruntime, its mean and population variance per channel (axis 1,
    over the batch and every position) in float64."""
    observed = onnx.shape_inference.infer_shapes(model)
    observed.graph.output.append(next(info for info in observed.graph.value_info if info.name == value))
    outputs = np.asarray(run(observed, {"x": data})[-1], np.float64)
    axes = (0, *range(2, outputs.ndim))
    return outputs.mean(axis=axes), outputs.var(axis=axes)


def _recalibrated(model, data: np.ndarray, method: str):
    report = recalibrate(model, data, method=method)
    arrays = {init.name: numpy_helper.to_array(init) for init in report.result.proto.graph.initializer}
    stored = {node.name: tuple(arrays[name].astype(np.float64) for name in node.input[3:5])
              for node in report.result.proto.graph.node if node.op_type == BN}
    return report, stored


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_a_per_activation_bn_is_skipped_with_its_reason_and_the_others_recalibrated(method):
    """spatial=0 (opset 7, onnxruntime runs it): the per-channel probe met (C, H, W) statistics and the
    whole recalibration failed with a channel-count DataError."""
    rng = np.random.default_rng(2)
    per_activation = {name: values.reshape(6, 3, 3) for name, values in bn_params(rng, 54, "pa").items()}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "n", "pa", spatial=0),
             helper.make_node("Conv", ["n", "w2"], ["c2"]), bn_node("c2", "y")]
    model = make(nodes, {"x": (("N", 4, 5, 5), F32)}, {"y": (None, F32)},
                 {"w": weights(rng, 6, 4, 3, 3), "w2": weights(rng, 5, 6, 1, 1), **per_activation, **bn_params(rng, 5)},
                 opset=7)
    data = (rng.standard_normal((40, 4, 5, 5)) + 0.5).astype(F32)
    report, stored = _recalibrated(model, data, method)
    assert [(skipped.name, skipped.reason.split(":")[0]) for skipped in report.skipped] == [("pa", "spatial=0")]
    mean, var = _bn_input_statistics(model, data, "c2")
    np.testing.assert_allclose(stored["bn"][0], mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stored["bn"][1], var, rtol=1e-6)
    assert all(np.array_equal(stored["pa"][k], per_activation[f"pa.{r}"]) for k, r in enumerate(("mean", "var")))


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_a_per_activation_bn_on_features_is_per_channel_and_recalibrated(method):
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"]), bn_node("g", "y", spatial=0)]
    model = make(nodes, {"x": (("N", 6), F32)}, {"y": (None, F32)},
                 {"w": weights(rng, 6, 8), "b": rng.standard_normal(8).astype(F32), **bn_params(rng, 8)}, opset=7)
    data = (rng.standard_normal((40, 6)) * 3 - 1).astype(F32)
    report, stored = _recalibrated(model, data, method)
    mean, var = _bn_input_statistics(model, data, "g")
    assert not report.skipped
    np.testing.assert_allclose(stored["bn"][0], mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stored["bn"][1], var, rtol=1e-6)


def test_a_model_with_external_data_is_recalibrated_into_its_own_external_data(tmp_path):
    """fold kept the sidecar layout of a model saved with external data; recalibrate wrote every tensor
    inline."""
    rng = np.random.default_rng(4)
    model = make([helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y")], {"x": (("N", 4, 5, 5), F32)},
                 {"y": (None, F32)}, {"w": weights(rng, 6, 4, 3, 3), **bn_params(rng, 6)})
    source = tmp_path / "source"
    source.mkdir()
    onnx.save_model(onnx.ModelProto.FromString(model.SerializeToString()), str(source / "m.onnx"),  # it edits the model
                    save_as_external_data=True, location="m.weights", size_threshold=0)
    originals = {path.name: path.read_bytes() for path in source.iterdir()}
    data = (rng.standard_normal((24, 4, 5, 5)) - 2).astype(F32)
    recalibrate(source / "m.onnx", data, output=tmp_path / "r.onnx")
    assert {path.name: path.read_bytes() for path in source.iterdir()} == originals
    written = onnx.load(str(tmp_path / "r.onnx"), load_external_data=False)
    locations = {init.name: entry.value for init in written.graph.initializer for entry in init.external_data
                 if entry.key == "location"}
    assert locations["w"] == "r.onnx.data" and set(locations.values()) == {"r.onnx.data"}  # small ones inline
    arrays = {init.name: numpy_helper.to_array(init) for init in onnx.load(str(tmp_path / "r.onnx")).graph.initializer}
    mean, var = _bn_input_statistics(model, data, "c")
    np.testing.assert_allclose(arrays["bn.mean"], mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(arrays["bn.var"], var, rtol=1e-6)


def test_a_model_older_than_onnxruntime_is_named_as_such_with_the_way_out(tmp_path):
    """onnxruntime has no kernel before opset 7 (BatchNormalization-6): recalibration blamed its own probe
    node ("no implementation for Mul(6)"); both commands now say what is old and how to convert it."""
    from bnfold import fold
    from bnfold.errors import InputError

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y", is_test=1)]
    model = make(nodes, {"x": ((2, 3, 6, 6), F32)}, {"y": (None, F32)}, {"w": weights(rng, 4, 3, 3, 3), **bn_params(rng, 4)},
                 opset=6, ir=3, inputs_from_initializers=True)
    path = tmp_path / "old.onnx"
    onnx.save(model, path)
    with pytest.raises(InputError, match="onnxruntime runs opset 7 and later, and this model is opset 6") as raised:
        recalibrate(path, rng.standard_normal((32, 3, 6, 6)).astype(F32))
    assert "version_converter" in raised.value.hint
    report = fold(path, tmp_path / "folded.onnx")
    assert not report.passed and "opset 7 and later" in report.verify_error
    assert not (tmp_path / "folded.onnx").exists()
