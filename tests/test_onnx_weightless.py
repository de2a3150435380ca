"""Weightless copies and the tensor-at-a-time writer: what keeps ONNX folding near twice the weights.

The copies must restore to exactly the model they came from, the writer must write exactly the bytes
protobuf would (or a sidecar that loads back to the same values), and folding must leave no stand-in
behind in what it hands out.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import bnfold
from bnfold.onnx.fold import apply_folds, plan_folds
from bnfold.onnx.graph import walk_graphs
from bnfold.onnx.model import OnnxModel, save_model
from bnfold.onnx.weightless import Weightless
from tests.conftest import SAMPLES
from tests.onnx_builders import BN, bn_node, bn_params, count, make, weights

UNKNOWN_FIELD = bytes([0xF8, 0x07, 0x05])  # field 127 (no ONNX message has it), varint 5: a newer file's field


def branchy_model() -> onnx.ModelProto:
    """Conv -> BN in the main graph and an If whose branch holds a weight of its own, with fields from a
    newer ONNX on the model and on a weight."""
    rng = np.random.default_rng(3)
    branch_weight = numpy_helper.from_array(weights(rng, 8, 16), "branch_w")
    then_graph = helper.make_graph([helper.make_node("Identity", ["branch_w"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, None)], [branch_weight])
    else_graph = helper.make_graph([helper.make_node("Identity", ["w"], ["e"])], "else", [],
                                   [helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), bn_node("c", "y"),
             helper.make_node("If", ["flag"], ["z"], name="if", then_branch=then_graph, else_branch=else_graph)]
    model = make(nodes, {"x": (["n", 8, 5, 5], np.float32), "flag": ([], np.bool_)},
                 {"y": (None, np.float32), "z": (None, np.float32)},
                 {"w": weights(rng, 8, 8, 3, 3), **bn_params(rng, 8)})
    model.metadata_props.add(key="origin", value="test")
    model.graph.initializer[0].MergeFromString(UNKNOWN_FIELD)
    model.MergeFromString(UNKNOWN_FIELD)
    return model


def then_branch(model: onnx.ModelProto) -> onnx.GraphProto:
    node = next(node for node in model.graph.node if node.op_type == "If")
    return next(attr.g for attr in node.attribute if attr.name == "then_branch")


def models() -> list[onnx.ModelProto]:
    return [branchy_model(), *(onnx.load(str(SAMPLES / f"{name}.onnx")) for name in ("cnn", "resnet", "mixed"))]


@pytest.mark.parametrize("model", models(), ids=["branchy", "cnn", "resnet", "mixed"])
def test_a_weightless_copy_holds_no_weights_and_restores_exactly(model):
    before = model.SerializeToString()
    weightless = Weightless(model)
    stand_ins = list(weightless.stand_ins())
    assert stand_ins and all(not tensor.HasField("raw_data") for tensor, _ in stand_ins)
    stripped = sum(len(original.raw_data) for _, original in stand_ins)
    assert weightless.proto.ByteSize() < len(before) - stripped + 64 * len(stand_ins)  # a small marker each
    assert weightless.restore().SerializeToString() == before
    assert model.SerializeToString() == before


@pytest.mark.parametrize("model", models(), ids=["branchy", "cnn", "resnet", "mixed"])
def test_saving_writes_exactly_the_bytes_protobuf_would(tmp_path, model):
    save_model(model, tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx").read_bytes() == model.SerializeToString()


def test_saving_with_external_data_loads_back_the_same_model(tmp_path):
    model = branchy_model()
    save_model(model, tmp_path / "model.onnx", external=True)
    loaded = OnnxModel.load(tmp_path / "model.onnx")
    assert loaded.external_data and (tmp_path / "model.onnx.data").exists()
    written = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert then_branch(written).initializer[0].data_location == onnx.TensorProto.EXTERNAL  # subgraphs' too
    for index in walk_graphs(loaded.proto.graph):  # the data is back in the tensors; only the markers differ
        for tensor in index.graph.initializer:
            tensor.ClearField("external_data")
            tensor.ClearField("data_location")
    assert loaded.proto.SerializeToString() == model.SerializeToString()


def test_folding_hands_out_no_stand_in_and_keeps_what_it_does_not_fold():
    model = branchy_model()
    before = model.SerializeToString()
    folded = apply_folds(model, plan_folds(model))
    assert model.SerializeToString() == before
    assert count(folded, BN) == 0
    tensors = [tensor for graph in (folded.graph, then_branch(folded)) for tensor in graph.initializer]
    assert all(not tensor.external_data and tensor.HasField("raw_data") for tensor in tensors)
    assert then_branch(folded).initializer[0] == then_branch(model).initializer[0]
    assert UNKNOWN_FIELD in folded.SerializeToString()  # a newer ONNX's fields survive the fold


def test_fold_of_a_model_given_in_memory_leaves_it_as_it_was():
    model = branchy_model()
    before = model.SerializeToString()
    report = bnfold.fold(model, batches=[{"x": np.ones((2, 8, 5, 5), np.float32), "flag": np.array(True)}])
    assert report.passed and report.difference.max_rel < 1e-5
    assert model.SerializeToString() == before  # only a model bnfold loaded itself is dropped early
    assert count(report.folded_model.proto, BN) == 0 and count(model, BN) == 1
