"""The ONNX recalibration probes. Exact method: cheap mean-square reductions where they are exact
enough, careful squared deviations only for the layers whose inputs would cancel, decided per batch.
Fast method (opset 14+): the BN itself in training mode, which onnxruntime reduces in two passes."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from bnfold.onnx.model import OnnxModel
from bnfold.onnx.recalibrate import OnnxStatisticsRunner


def two_bn_model(channels: int, input_shape: list | None = None) -> OnnxModel:
    """x -> bn_a -> y_a and z -> bn_b -> y_b: two independent BN layers on two inputs (declared with
    `input_shape`: by default with none, so that their rank is unknown)."""
    nodes, inits = [], []
    for layer, source in (("a", "x"), ("b", "z")):
        names = [f"{layer}_{part}" for part in ("scale", "bias", "mean", "var")]
        inits += [numpy_helper.from_array(np.full(channels, value, np.float32), name)
                  for name, value in zip(names, (1, 0, 0, 1))]
        nodes.append(helper.make_node("BatchNormalization", [source, *names], [f"y_{layer}"], name=f"bn_{layer}"))
    graph = helper.make_graph(
        nodes, "two", [helper.make_tensor_value_info(name, 1, input_shape) for name in ("x", "z")],
        [helper.make_tensor_value_info(name, 1, None) for name in ("y_a", "y_b")], inits)
    return OnnxModel(None, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def test_only_layers_whose_inputs_cancel_are_probed_carefully():
    rng = np.random.default_rng(0)
    centred = rng.standard_normal((4, 8, 10, 10)).astype(np.float32)
    offset = centred + 1000  # mean square / variance about 1e6: a mean-square variance would be noise
    runner = OnnxStatisticsRunner(two_bn_model(8))
    calm = {"x": centred, "z": centred}
    statistics = runner.run_pass([calm, calm], ["bn_a", "bn_b"], batch_statistics=False)
    assert runner.careful == set()
    statistics = runner.run_pass([calm, {"x": centred, "z": offset}], ["bn_a", "bn_b"], batch_statistics=False)
    assert runner.careful == {"bn_b"}
    both = np.concatenate([centred, offset]).astype(np.float64)
    expected = both.transpose(1, 0, 2, 3).reshape(8, -1).var(axis=1)
    np.testing.assert_allclose(statistics["bn_b"].variance(), expected, rtol=2e-6)


@pytest.mark.parametrize("offset_by", [3.0, 1000.0])  # standard deviations; far offsets are probed carefully
def test_fast_method_reads_training_mode_statistics_exactly(offset_by):
    rng = np.random.default_rng(1)
    offset = (rng.standard_normal((6, 8, 10, 10)) * 0.5 + 0.5 * offset_by).astype(np.float32)
    runner = OnnxStatisticsRunner(two_bn_model(8))
    proto, _ = runner._instrumented({"bn_a", "bn_b"}, batch_statistics=True)
    trained = [node for node in proto.graph.node if node.op_type == "BatchNormalization"]
    assert [attribute.i for node in trained for attribute in node.attribute if attribute.name == "training_mode"] == [1, 1]
    assert not any(node.op_type == "ReduceMean" for node in proto.graph.node)  # no second read of a BN input
    batches = [{"x": offset[:3], "z": offset[:3]}, {"x": offset[3:], "z": offset[3:]}]
    statistics = runner.run_pass(batches, ["bn_a", "bn_b"], batch_statistics=True)
    assert runner.careful == (set() if offset_by < 100 else {"bn_a", "bn_b"})
    per_channel = offset.astype(np.float64).transpose(1, 0, 2, 3).reshape(8, -1)
    batch_means = offset.astype(np.float64).reshape(2, 3, 8, -1).mean(axis=(1, 3))  # equal batches of 3
    for layer in ("bn_a", "bn_b"):
        np.testing.assert_allclose(statistics[layer].variance(), per_channel.var(axis=1), rtol=2e-6)
        np.testing.assert_allclose(statistics[layer].mean, per_channel.mean(axis=1), rtol=1e-6)
        assert statistics[layer].batch_units and statistics[layer].samples == 6
        np.testing.assert_allclose(statistics[layer].standard_error(),  # sd of the batch means / sqrt(batches)
                                   batch_means.std(axis=0, ddof=1) / np.sqrt(2), rtol=1e-3)


def test_bn_input_types_are_traced_back_through_type_keeping_ops():
    from onnx import TensorProto

    from bnfold.onnx.graph import GraphIndex
    from bnfold.onnx.shapes import traced_dtype

    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Cast", ["a"], ["b"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["b", "w"], ["c"]), helper.make_node("Gelu", ["c"], ["d"], domain="com.example"),
             helper.make_node("Shape", ["a"], ["e"]), helper.make_node("Conv", ["w16", "w16"], ["f"])]
    graph = helper.make_graph(nodes, "types", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, None)], [],
                              [numpy_helper.from_array(np.ones(3, np.float32), "w"),
                               numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float16), "w16")])
    index = GraphIndex(graph)
    assert {name: traced_dtype(index, name) for name in "xabcdef"} == {
        "x": np.float16, "a": np.float16, "b": np.float32, "c": np.float32, "d": None, "e": None, "f": np.float16}


def test_plain_models_need_no_shape_inference_to_type_their_bn_inputs(monkeypatch):
    import bnfold.onnx.recalibrate as recalibrate

    def refused(_model):
        raise AssertionError("shape inference ran")

    monkeypatch.setattr(recalibrate, "infer_facts", refused)
    OnnxStatisticsRunner(two_bn_model(4))._instrumented({"bn_a", "bn_b"}, batch_statistics=True)


@pytest.mark.parametrize("batch_statistics", [True, False])
@pytest.mark.parametrize("offset_by", [3.0, 1000.0])  # far offsets take the careful probe
def test_probes_reduce_inputs_of_known_rank_without_reshaping(batch_statistics, offset_by):
    """A Reshape of a BN input that the BN still reads cost 11% of a MobileNet batch in onnxruntime: where
    the rank is known the probe reduces the input's own axes, with the same statistics."""
    rng = np.random.default_rng(2)
    values = (rng.standard_normal((6, 8, 5, 4)) * 0.5 + 0.5 * offset_by).astype(np.float32)
    batches = [{"x": values[:3], "z": values[:3]}, {"x": values[3:], "z": values[3:]}]
    found = {}
    for declared in (None, ["N", 8, "H", "W"]):
        runner = OnnxStatisticsRunner(two_bn_model(8, declared))
        found[declared is not None] = runner.run_pass(batches, ["bn_a", "bn_b"], batch_statistics)
        proto, _ = runner._instrumented({"bn_a", "bn_b"}, batch_statistics)
        reduces = not batch_statistics or bool(runner.careful)  # training-mode probes read only a Shape
        assert any(node.op_type == "Reshape" for node in proto.graph.node) == (declared is None and reduces)
    per_channel = values.astype(np.float64).transpose(1, 0, 2, 3).reshape(8, -1)
    for statistics in found.values():
        for layer in ("bn_a", "bn_b"):
            assert statistics[layer].count == per_channel.shape[1]
            np.testing.assert_allclose(statistics[layer].variance(), per_channel.var(axis=1), rtol=2e-6)
            np.testing.assert_allclose(statistics[layer].mean, per_channel.mean(axis=1), rtol=1e-6)
            assert statistics[layer].samples == 6


def test_bn_input_ranks_are_traced_back_through_convs_and_rank_keeping_ops():
    from bnfold.onnx.graph import GraphIndex
    from bnfold.onnx.shapes import traced_rank

    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Add", ["r", "bias"], ["a"]), helper.make_node("Flatten", ["a"], ["f"]),
             helper.make_node("Sigmoid", ["f"], ["s"]), helper.make_node("Add", ["a", "s"], ["mixed"])]
    graph = helper.make_graph(nodes, "ranks", [helper.make_tensor_value_info("x", 1, None)], [],
                              [numpy_helper.from_array(np.ones((4, 3, 3, 3, 3), np.float32), "w"),
                               numpy_helper.from_array(np.ones((4, 1, 1, 1), np.float32), "bias")])
    index, known = GraphIndex(graph), {}
    assert {name: traced_rank(index, name, known) for name in ("x", "c", "r", "a", "f", "s", "mixed")} == {
        "x": None, "c": 5, "r": 5, "a": 5, "f": None, "s": None, "mixed": None}


def mixed_model(declared: bool) -> OnnxModel:
    """Three BN layers whose probe outputs differ in kind: `image` (float32, N x 4 x 5 x 5), `table` (double
    statistics of a double N x 3 input: rank 2, no positions) and `offset` (float32, its input far from 0)."""
    nodes, inits, inputs = [], [], []
    for layer, dtype, shape in (("image", np.float32, ["N", 4, 5, 5]), ("table", np.float64, ["N", 3]),
                                ("offset", np.float32, ["N", 4, 5, 5])):
        names = [f"{layer}_{part}" for part in ("scale", "bias", "mean", "var")]
        inits += [numpy_helper.from_array(np.full(shape[1], value, dtype), name)
                  for name, value in zip(names, (1, 0, 0, 1))]
        nodes.append(helper.make_node("BatchNormalization", [layer, *names], [f"y_{layer}"], name=layer))
        element = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        inputs.append(helper.make_tensor_value_info(layer, element, shape if declared else None))
    graph = helper.make_graph(nodes, "mixed", inputs, [helper.make_tensor_value_info(f"y_{layer}", 0, None)
                                                        for layer in ("image", "table", "offset")], inits)
    return OnnxModel(None, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


@pytest.mark.parametrize("declared", [True, False])  # shapes come out in one vector, or one per layer
@pytest.mark.parametrize("batch_statistics", [True, False])
def test_probe_outputs_of_every_kind_line_up_with_their_layers(declared, batch_statistics):
    """The probes' outputs leave onnxruntime concatenated per kind and dtype (float32 and double statistics,
    a careful probe after the offset layer cancels, a rank-2 input): each layer gets its own statistics."""
    rng = np.random.default_rng(3)
    data = {"image": rng.standard_normal((12, 4, 5, 5)) * 2 + 1, "table": rng.standard_normal((12, 3)) * 3 - 2,
            "offset": rng.standard_normal((12, 4, 5, 5)) * 0.5 + 1e4}
    batches = [{name: (values[rows] if name == "table" else values[rows].astype(np.float32))
                for name, values in data.items()} for rows in (slice(0, 5), slice(5, 12))]
    runner = OnnxStatisticsRunner(mixed_model(declared))
    statistics = runner.run_pass(batches, ["image", "table", "offset"], batch_statistics)
    assert runner.careful == {"offset"}
    for layer, values in data.items():
        per_channel = np.moveaxis(np.concatenate([batch[layer] for batch in batches]).astype(np.float64), 1, 0)
        per_channel = per_channel.reshape(per_channel.shape[0], -1)
        assert (statistics[layer].count, statistics[layer].samples) == (per_channel.shape[1], 12)
        np.testing.assert_allclose(statistics[layer].mean, per_channel.mean(axis=1), rtol=1e-6)
        np.testing.assert_allclose(statistics[layer].variance(), per_channel.var(axis=1), rtol=2e-6)
