"""ONNX BN folding: every pattern folds to the same outputs in onnxruntime, every refusal says why."""

from __future__ import annotations

import json
import sys

import ml_dtypes
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from bnfold import foldmath
from bnfold.layers import FoldDirection, FoldStatus
from bnfold.onnx.fold import METADATA_KEY, apply_folds, plan_folds
from bnfold.onnx.model import OnnxModel
from bnfold.plan import FoldOptions
from tests.conftest import SAMPLES
from tests.onnx_builders import (BN, bn_node, bn_params, conv_bn, count, feeds, fold_checked, make, relative_error,
                                 run, statuses, weights)

F32 = np.float32


def _set(node, attribute):
    for existing in [a for a in node.attribute if a.name == attribute.name]:
        node.attribute.remove(existing)
    node.attribute.append(attribute)


def only_decision(plan):
    assert len(plan.decisions) == 1
    return plan.decisions[0]


# --- Conv and ConvTranspose ---------------------------------------------------------------------

@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("spatial", [(7,), (5, 5), (3, 4, 4)])
def test_conv_bn_folds_into_one_conv(group, bias, spatial):
    folded, plan = fold_checked(conv_bn(np.random.default_rng(1), group=group, bias=bias, spatial=spatial))
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert folded.graph.node[0].output[0] == "y"  # the folded producer takes the BN's output name
    assert len(folded.graph.node[0].input) == 3
    decision = only_decision(plan)
    assert decision.status is FoldStatus.FOLDABLE and decision.direction is FoldDirection.INTO_PRODUCER
    assert decision.targets == ["conv"] and decision.producer_bias == ("Conv conv" if bias else None)
    assert {i.name for i in folded.graph.initializer} == {"w_folded", "b_folded" if bias else "w_bias_folded"}


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_bn_scales_weight_axis_one_per_group(group, bias):
    model = conv_bn(np.random.default_rng(2), c_in=4, c_out=8, group=group, bias=bias, op="ConvTranspose",
                    conv_attrs={"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]})
    folded, plan = fold_checked(model)
    assert [n.op_type for n in folded.graph.node] == ["ConvTranspose"]


def test_conv_transpose_with_groups_not_dividing_inputs_is_kept():
    rng = np.random.default_rng(3)
    inits = {"w": weights(rng, 32, 64, 3, 3), **bn_params(rng, 192)}
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["c"], name="ct", group=3), bn_node("c", "y")]
    model = make(nodes, {"x": ((1, 32, 4, 4), F32)}, {"y": (None, F32)}, inits)
    decision = only_decision(plan_folds(model))
    assert decision.status is FoldStatus.KEPT and "group=3" in decision.reason


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_conv_fold_sweep(data):
    """Shapes, groups, strides, dilations, pads, dtypes and both conv kinds: always the same outputs."""
    op = data.draw(st.sampled_from(["Conv", "ConvTranspose"]))
    group = data.draw(st.sampled_from([1, 2, 3]))
    c_in = group * data.draw(st.integers(1, 3))
    c_out = group * data.draw(st.integers(1, 3))
    rank = data.draw(st.integers(1, 3))
    kernel = data.draw(st.integers(1, 3))
    attrs = {"strides": [data.draw(st.integers(1, 2))] * rank, "dilations": [data.draw(st.integers(1, 2))] * rank,
             "pads": [data.draw(st.integers(0, 1))] * (2 * rank)}
    dtype = data.draw(st.sampled_from([np.float32, np.float16]))
    model = conv_bn(np.random.default_rng(data.draw(st.integers(0, 99))), c_in=c_in, c_out=c_out, group=group,
                    bias=data.draw(st.booleans()), spatial=(6,) * rank, kernel=kernel, dtype=dtype, op=op,
                    conv_attrs=attrs)
    folded, _ = fold_checked(model, tolerance=1e-5 if dtype == np.float32 else 5e-3, check=False)
    assert count(folded, BN) == 0


# --- Gemm and MatMul ----------------------------------------------------------------------------

@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [None, (8,), (1, 8), (3, 8), ()])
def test_gemm_bn_honours_transposes_alpha_beta(trans_a, trans_b, bias_shape):
    rng = np.random.default_rng(4)
    inits = {"w": weights(rng, *((8, 5) if trans_b else (5, 8))), **bn_params(rng, 8)}
    if bias_shape is not None:
        inits["c"] = rng.standard_normal(bias_shape).astype(F32)
    gemm = helper.make_node("Gemm", ["a", "w", *(["c"] if bias_shape is not None else [])], ["g"], name="fc",
                            transA=trans_a, transB=trans_b, alpha=0.7, beta=1.3)
    model = make([gemm, bn_node("g", "y")], {"a": ((5, 3) if trans_a else (3, 5), F32)}, {"y": ((3, 8), F32)},
                 inits)
    folded, _ = fold_checked(model)
    assert [n.op_type for n in folded.graph.node] == ["Gemm"]


def matmul_model(rng, a_shape, *, bias=False, between=(), bn_channels=8, out_shape=None):
    """a @ w (+ b) -> nodes in `between` -> BN -> y."""
    k = a_shape[-1]
    inits = {"w": weights(rng, k, 8), **bn_params(rng, bn_channels)}
    nodes = [helper.make_node("MatMul", ["a", "w"], ["m"], name="mm")]
    last = "m"
    if bias:
        inits["b"] = rng.standard_normal(8).astype(F32)
        nodes.append(helper.make_node("Add", ["m", "b"], ["mb"], name="bias"))
        last = "mb"
    for position, (op, attrs, extra_inits) in enumerate(between):
        inits.update(extra_inits)
        nodes.append(helper.make_node(op, [last, *extra_inits], [f"t{position}"], name=f"t{position}", **attrs))
        last = f"t{position}"
    nodes.append(bn_node(last, "y"))
    return make(nodes, {"a": (a_shape, F32)}, {"y": (out_shape, F32)}, inits)


@pytest.mark.parametrize("bias", [False, True])
def test_matmul_with_2d_input_becomes_gemm(bias):
    folded, plan = fold_checked(matmul_model(np.random.default_rng(5), (3, 6), bias=bias))
    assert [n.op_type for n in folded.graph.node] == ["Gemm"]
    assert folded.graph.node[0].output[0] == "y"
    assert plan.decisions[0].producer_bias == ("MatMul mm" if bias else None)


def test_a_matmul_that_becomes_a_gemm_keeps_its_name_doc_string_and_metadata():
    model = matmul_model(np.random.default_rng(5), (3, 6))
    matmul = model.graph.node[0]
    matmul.doc_string = "exported from fc.forward"
    matmul.metadata_props.add(key="pkg.source", value="model.py:12")
    folded, _ = fold_checked(model)
    (gemm,) = folded.graph.node
    assert (gemm.op_type, gemm.name, gemm.doc_string) == ("Gemm", "mm", "exported from fc.forward")
    assert [(p.key, p.value) for p in gemm.metadata_props] == [("pkg.source", "model.py:12")]


@pytest.mark.parametrize("opset", [7, 9, 11, 13, 15, 22])
def test_every_opset_with_gemm_folds_conv_matmul_and_shape_ops(opset):
    """BatchNormalization-7, -9, -14 and -15, Unsqueeze with axes as an attribute (before 13) or an input,
    Gemm whose C is required (before 11): each folds and runs."""
    rng = np.random.default_rng(opset)
    folded, plan = fold_checked(conv_bn(rng, opset=opset))
    assert statuses(plan) == ["foldable"] and count(folded, BN) == 0
    axes = {"axes": [2, 3]} if opset < 13 else {}
    extra = {} if opset < 13 else {"axes": np.array([2, 3])}
    inits = {"w": weights(rng, 6, 8), **bn_params(rng, 8), **extra}
    nodes = [helper.make_node("MatMul", ["a", "w"], ["m"], name="mm"),
             helper.make_node("Unsqueeze", ["m", *extra], ["u"], name="unsqueeze", **axes), bn_node("u", "n"),
             helper.make_node("Flatten", ["n"], ["y"], name="flatten")]
    folded, plan = fold_checked(make(nodes, {"a": ((3, 6), F32)}, {"y": (None, F32)}, inits, opset=opset))
    assert statuses(plan) == ["foldable"] and [n.op_type for n in folded.graph.node] == ["Gemm", "Unsqueeze",
                                                                                          "Flatten"]


@pytest.mark.parametrize("bias", [False, True])
def test_matmul_on_a_sequence_folds_through_transpose_into_weight_and_bias_add(bias):
    # Linear over (N, T, C) then BatchNorm1d on (N, C, T): the classic channel-axis trap, exactly aligned here.
    model = matmul_model(np.random.default_rng(6), (2, 5, 6), bias=bias,
                         between=[("Transpose", {"perm": [0, 2, 1]}, {})])
    folded, plan = fold_checked(model)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add", "Transpose"]
    assert plan.decisions[0].status is FoldStatus.FOLDABLE


@pytest.mark.parametrize("between", [
    [("Unsqueeze", {}, {"axes": np.array([2, 3])})],
    [("Reshape", {}, {"shape": np.array([-1, 8, 1])})],
    [("Identity", {}, {}), ("Reshape", {}, {"shape": np.array([3, 8, 1, 1])}), ("Squeeze", {}, {"sq": np.array([3])})],
], ids=["unsqueeze", "reshape", "identity-reshape-squeeze"])
def test_matmul_folds_through_shape_ops_that_keep_features_on_axis_one(between):
    folded, _ = fold_checked(matmul_model(np.random.default_rng(7), (3, 6), between=between))
    assert count(folded, BN) == 0 and count(folded, "Gemm") == 1


def test_matmul_features_on_another_axis_are_kept_even_when_sizes_match():
    # (N, C, L) @ W(L, L) with L == C: BN normalizes axis 1, the MatMul's features are on axis 2.
    decision = only_decision(plan_folds(matmul_model(np.random.default_rng(8), (2, 8, 8))))
    assert decision.status is FoldStatus.KEPT and "channel axis does not line up" in decision.reason


def test_reshape_that_splits_features_over_two_axes_is_kept():
    # (3, 8) -> (3, 2, 4): a valid model, but each BN channel holds 4 different MatMul features.
    model = matmul_model(np.random.default_rng(9), (3, 6), bn_channels=2,
                         between=[("Reshape", {}, {"shape": np.array([3, 2, 4])})])
    folded, plan = fold_checked(model)
    decision = only_decision(plan)
    assert decision.status is FoldStatus.KEPT and "channel axis does not line up" in decision.reason


# --- Concat split ---------------------------------------------------------------------------------

def concat_model(rng, *, extra_reader=False):
    inits = {"w1": weights(rng, 3, 4, 3, 3), "w2": weights(rng, 5, 4, 1, 1), "b2": rng.standard_normal(5).astype(F32),
             **bn_params(rng, 8)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w2", "b2"], ["c2"], name="conv2"),
             helper.make_node("Concat", ["c1", "c2"], ["cat"], name="cat", axis=1), bn_node("cat", "y")]
    outputs = {"y": (None, F32)}
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["c2"], ["r"], name="relu"))
        outputs["r"] = (None, F32)
    return make(nodes, {"x": ((2, 4, 6, 6), F32)}, outputs, inits)


def test_concat_of_convs_splits_the_bn_per_branch():
    folded, plan = fold_checked(concat_model(np.random.default_rng(10)))
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Conv", "Concat"]
    decision = only_decision(plan)
    assert decision.direction is FoldDirection.SPLIT and decision.targets == ["conv1", "conv2"]


def test_concat_branch_read_elsewhere_keeps_the_bn():
    decision = only_decision(plan_folds(concat_model(np.random.default_rng(11), extra_reader=True)))
    assert decision.status is FoldStatus.KEPT
    assert decision.reason.startswith("Concat cat input 'c2': Conv conv2 output 'c2' also feeds Relu relu")


# --- Fold forward into the consumer ---------------------------------------------------------------

def bn_then(rng, op, *, channels=4, x_shape=(2, 4, 5, 5), pads=0, group=1, kernel=3, between=(), **attrs):
    inits = {**bn_params(rng, channels)}
    nodes = [bn_node("x", "n")]
    last = "n"
    for position, (shape_op, shape_attrs, extra) in enumerate(between):
        inits.update(extra)
        nodes.append(helper.make_node(shape_op, [last, *extra], [f"t{position}"], **shape_attrs))
        last = f"t{position}"
    if op == "Conv":
        inits["w"] = weights(rng, 8, channels // group, kernel, kernel)
        inits["b"] = rng.standard_normal(8).astype(F32)
        nodes.append(helper.make_node("Conv", [last, "w", "b"], ["y"], name="conv", pads=[pads] * 4, group=group))
    elif op == "Gemm":
        weight = weights(rng, channels, 6)
        inits["w"], inits["c"] = weight.T.copy() if attrs.get("transB") else weight, rng.standard_normal(6).astype(F32)
        nodes.append(helper.make_node("Gemm", [last, "w", "c"], ["y"], name="fc", **attrs))
    else:
        inits["w"] = weights(rng, channels, 6)
        nodes.append(helper.make_node("MatMul", [last, "w"], ["y"], name="mm"))
    return make(nodes, {"x": (x_shape, F32)}, {"y": (None, F32)}, inits)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_bn_before_unpadded_conv_folds_forward(group):
    folded, plan = fold_checked(bn_then(np.random.default_rng(12), "Conv", group=group))
    assert [n.op_type for n in folded.graph.node] == ["Conv"] and folded.graph.node[0].input[0] == "x"
    decision = only_decision(plan)
    assert decision.direction is FoldDirection.INTO_CONSUMER and decision.targets == ["conv"]


@pytest.mark.parametrize("kernel", [1, 3])
def test_bn_before_zero_padded_conv_is_kept(kernel):
    decision = only_decision(plan_folds(bn_then(np.random.default_rng(13), "Conv", pads=1, kernel=kernel)))
    assert decision.status is FoldStatus.KEPT and "zero-pads" in decision.reason


def test_bn_before_same_padded_pointwise_conv_folds():
    model = bn_then(np.random.default_rng(41), "Conv", kernel=1)
    _set(model.graph.node[-1], helper.make_attribute("auto_pad", "SAME_UPPER"))
    model.graph.node[-1].attribute.remove(next(a for a in model.graph.node[-1].attribute if a.name == "pads"))
    folded, plan = fold_checked(model)
    assert statuses(plan) == ["foldable"]


@pytest.mark.parametrize("op, between, attrs", [
    ("Gemm", (), {}), ("Gemm", (), {"alpha": 0.5, "beta": 2.0, "transB": 1}), ("MatMul", (), {}),
    ("Gemm", [("Flatten", {}, {})], {}),
], ids=["gemm", "gemm-alpha-beta-transb", "matmul", "flatten-gemm"])
def test_bn_before_matrix_layers_folds_forward(op, between, attrs):
    shape = (3, 4, 1, 1) if between else (3, 4)
    folded, _ = fold_checked(bn_then(np.random.default_rng(14), op, x_shape=shape, between=between, **attrs))
    assert count(folded, BN) == 0 and count(folded, "MatMul") == 0


def test_bn_before_gemm_with_transposed_input_is_kept():
    decision = only_decision(plan_folds(bn_then(np.random.default_rng(15), "Gemm", x_shape=(4, 4), transA=1)))
    assert decision.status is FoldStatus.KEPT and "transA=1" in decision.reason


def test_bn_before_a_conv_transpose_is_kept():
    """Even unpadded, border outputs of a transposed convolution see fewer taps, so the shift is no bias."""
    rng = np.random.default_rng(45)
    nodes = [bn_node("x", "n"), helper.make_node("ConvTranspose", ["n", "w"], ["y"], name="up", strides=[2, 2])]
    model = make(nodes, {"x": ((2, 4, 5, 5), F32)}, {"y": (None, F32)}, {"w": weights(rng, 4, 3, 3, 3),
                                                                          **bn_params(rng, 4)})
    decision = only_decision(plan_folds(model))
    assert decision.status is FoldStatus.KEPT and "a shift before a transposed convolution" in decision.reason


# --- Hand-written BN, chains, constants -----------------------------------------------------------

def test_constant_mul_and_add_after_conv_fold_with_the_bn():
    rng = np.random.default_rng(16)
    inits = {"w": weights(rng, 6, 4, 3, 3), "two": np.array(2.2, F32),
             "per_channel": rng.standard_normal((6, 1, 1)).astype(F32), **bn_params(rng, 6)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Mul", ["two", "c"], ["m"], name="mul"),
             helper.make_node("Add", ["m", "per_channel"], ["a"], name="add"),
             bn_node("a", "y")]
    folded, plan = fold_checked(make(nodes, {"x": ((2, 4, 5, 5), F32)}, {"y": (None, F32)}, inits))
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert json.loads(dict((p.key, p.value) for p in folded.metadata_props)[METADATA_KEY])["other_ops_folded"] == 2


def test_spatially_varying_add_is_not_a_hand_written_bn():
    rng = np.random.default_rng(17)
    inits = {"w": weights(rng, 6, 4, 3, 3), "pattern": rng.standard_normal((1, 1, 3, 3)).astype(F32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Add", ["c", "pattern"], ["y"])]
    folded, _ = fold_checked(make(nodes, {"x": ((2, 4, 5, 5), F32)}, {"y": (None, F32)}, inits))
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Add"]


def test_conv_bn_bn_folds_both_in_passes():
    rng = np.random.default_rng(18)
    inits = {"w": weights(rng, 6, 4, 3, 3), **bn_params(rng, 6, "bn1"), **bn_params(rng, 6, "bn2")}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "n", "bn1"),
             bn_node("n", "y", "bn2")]
    folded, plan = fold_checked(make(nodes, {"x": ((2, 4, 5, 5), F32)}, {"y": (None, F32)}, inits))
    assert statuses(plan) == ["foldable", "foldable"] and [n.op_type for n in folded.graph.node] == ["Conv"]


def test_constant_nodes_and_constant_subgraphs_count_as_constants_and_are_pruned():
    rng = np.random.default_rng(19)
    params = bn_params(rng, 6)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weights(rng, 6, 4, 3, 3))),
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("ConstantOfShape", ["six"], ["zeros"], value=numpy_helper.from_array(np.zeros(1, F32))),
        helper.make_node("Unsqueeze", ["scale_scalar", "axis0"], ["scale_vec"]),
        helper.make_node("Expand", ["scale_vec", "six"], ["scale"]),
        helper.make_node(BN, ["c", "scale", "bn.bias", "zeros", "bn.var"], ["y"], name="bn"),
    ]
    inits = {"six": np.array([6]), "axis0": np.array([0]), "scale_scalar": np.array(1.7, F32),
             "bn.bias": params["bn.bias"], "bn.var": params["bn.var"]}
    model = make(nodes, {"x": ((2, 4, 5, 5), F32)}, {"y": (None, F32)}, inits)
    (layer,) = OnnxModel(None, model).bn_layers()  # inspect sees the same constants
    assert np.array_equal(layer.running_mean, np.zeros(6)) and np.allclose(layer.weight, 1.7)
    folded, plan = fold_checked(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert {i.name for i in folded.graph.initializer} == {"w_folded", "w_bias_folded"}  # no dead weights


def test_subgraph_bodies_are_folded_with_outer_weights():
    rng = np.random.default_rng(20)

    def branch(name, prefix):
        nodes = [helper.make_node("Conv", ["x", f"w_{name}"], [f"{name}_c"], name=f"{name}_conv"),
                 bn_node(f"{name}_c", f"{name}_y", prefix)]
        output = helper.make_tensor_value_info(f"{name}_y", onnx.TensorProto.FLOAT, None)
        return helper.make_graph(nodes, name, [], [output],
                                 [numpy_helper.from_array(v, k) for k, v in bn_params(rng, 6, prefix).items()])

    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then", "bn_t"),
                            else_branch=branch("else", "bn_e"))
    model = make([node], {"x": ((2, 4, 5, 5), F32), "cond": ((), np.bool_)}, {"y": (None, F32)},
                 {"w_then": weights(rng, 6, 4, 3, 3), "w_else": weights(rng, 6, 4, 3, 3)})
    plan = plan_folds(model)
    assert sorted(d.layer for d in plan.decisions) == ["if/else_branch/bn_e", "if/then_branch/bn_t"]
    assert statuses(plan) == ["foldable", "foldable"]
    folded = apply_folds(model, plan)
    for cond in (True, False):
        inputs = {**feeds(model, np.random.default_rng(0)), "cond": np.array(cond)}
        assert relative_error(run(model, inputs), run(folded, inputs)) < 1e-5
    assert not any(n.op_type == BN for a in folded.graph.node[0].attribute for n in a.g.node)
    assert not folded.graph.initializer  # the outer weights went into the branches, folded


def loop_model(rng):
    """A Loop whose body runs Conv (outer weight) -> BN (the body's own initializers) on the carried value."""
    value = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Conv", ["carried", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), bn_node("c", "next")],
        "body", [value("i", onnx.TensorProto.INT64, []), value("cond_in", onnx.TensorProto.BOOL, []),
                 value("carried", onnx.TensorProto.FLOAT, [2, 4, 5, 5])],
        [value("cond_out", onnx.TensorProto.BOOL, []), value("next", onnx.TensorProto.FLOAT, [2, 4, 5, 5])],
        [numpy_helper.from_array(v, k) for k, v in bn_params(rng, 4).items()])
    loop = helper.make_node("Loop", ["trips", "", "x"], ["y"], name="loop", body=body)
    return make([loop], {"x": ((2, 4, 5, 5), F32)}, {"y": ((2, 4, 5, 5), F32)},
                {"trips": np.array(3, np.int64), "w": weights(rng, 4, 4, 3, 3)})


def scan_model(rng):
    """A Scan whose body runs Gemm (outer weight) -> BN on each (3, 5) slice of the sequence."""
    def value(name, shape):
        return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)

    body = helper.make_graph(
        [helper.make_node("Gemm", ["row", "w"], ["g"], name="fc"), bn_node("g", "out"),
         helper.make_node("Identity", ["state"], ["state_out"])],
        "body", [value("state", [1]), value("row", [3, 5])], [value("state_out", [1]), value("out", [3, 6])],
        [numpy_helper.from_array(v, k) for k, v in bn_params(rng, 6).items()])
    scan = helper.make_node("Scan", ["s0", "xs"], ["s", "y"], name="scan", body=body, num_scan_inputs=1)
    return make([scan], {"xs": ((4, 3, 5), F32), "s0": ((1,), F32)}, {"s": (None, F32), "y": (None, F32)},
                {"w": weights(rng, 5, 6)})


@pytest.mark.parametrize("build, layer, op", [(loop_model, "loop/body/bn", "Conv"), (scan_model, "scan/body/bn", "Gemm")],
                         ids=["loop", "scan"])
def test_loop_and_scan_bodies_are_folded(build, layer, op):
    model = build(np.random.default_rng(42))
    folded, plan = fold_checked(model)  # the Loop runs its body three times, the Scan four
    assert [(d.layer, d.status) for d in plan.decisions] == [(layer, FoldStatus.FOLDABLE)]
    body = folded.graph.node[0].attribute[0].g
    assert op in [n.op_type for n in body.node] and not any(n.op_type == BN for n in body.node)
    assert {i.name for i in body.initializer} == {"w_folded", "w_bias_folded"}  # the BN's own went with it
    assert "w" not in {i.name for i in folded.graph.initializer}  # the outer weight went into the body, folded


# --- Initializers that are graph inputs, shared weights -------------------------------------------

def test_initializers_listed_as_inputs_fold_by_default_and_leave_the_inputs():
    model = conv_bn(np.random.default_rng(21), inputs_from_initializers=True)
    folded, plan = fold_checked(model)
    assert [i.name for i in folded.graph.input] == ["x"]
    strict = only_decision(plan_folds(model, FoldOptions(strict_inputs=True)))
    assert strict.status is FoldStatus.KEPT and "--strict-inputs" in strict.reason


def shared_weight_model(rng, same_bn: bool):
    params = bn_params(rng, 6, "bn1")
    other = params if same_bn else bn_params(rng, 6, "bn2")
    inits = {"w": weights(rng, 6, 4, 3, 3), "b": rng.standard_normal(6).astype(F32), **params,
             **{k.replace("bn1", "bn2"): v for k, v in other.items()}}
    nodes = [helper.make_node("Conv", ["x1", "w", "b"], ["c1"], name="conv1"), bn_node("c1", "n1", "bn1"),
             helper.make_node("Conv", ["x2", "w", "b"], ["c2"], name="conv2"), bn_node("c2", "n2", "bn2"),
             helper.make_node("Add", ["n1", "n2"], ["y"], name="add")]
    return make(nodes, {"x1": ((2, 4, 5, 5), F32), "x2": ((2, 4, 5, 5), F32)}, {"y": (None, F32)}, inits)


def test_shared_weights_with_identical_bns_fold_once():
    folded, plan = fold_checked(shared_weight_model(np.random.default_rng(22), same_bn=True))
    assert statuses(plan) == ["foldable", "foldable"]
    convs = [n for n in folded.graph.node if n.op_type == "Conv"]
    assert convs[0].input[1:] == convs[1].input[1:] and len(folded.graph.initializer) == 2


def test_shared_weights_with_different_bns_fold_into_copies():
    model = shared_weight_model(np.random.default_rng(23), same_bn=False)
    folded, plan = fold_checked(model)
    assert statuses(plan) == ["foldable", "foldable"] and count(folded, BN) == 0
    convs = [n for n in folded.graph.node if n.op_type == "Conv"]
    assert convs[0].input[1] != convs[1].input[1] and len(folded.graph.initializer) == 4


def test_only_shape_readers_do_not_block_a_fold():
    rng = np.random.default_rng(38)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "n"),
             helper.make_node("Shape", ["c"], ["s"], name="shape"), helper.make_node("Reshape", ["n", "s"], ["y"])]
    inits = {"w": weights(rng, 6, 4, 3, 3), **bn_params(rng, 6)}
    model = make(nodes, {"x": ((2, 4, 5, 5), F32)}, {"y": (None, F32)}, inits)
    folded, _ = fold_checked(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Shape", "Reshape"]


@pytest.mark.parametrize("mode, folds", [("reflect", True), ("edge", True), ("constant", False)])
def test_bn_folds_forward_through_padding_that_copies_values(mode, folds):
    rng = np.random.default_rng(39)
    inits = {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1]), "w": weights(rng, 8, 4, 3, 3), **bn_params(rng, 4)}
    nodes = [bn_node("x", "n"), helper.make_node("Pad", ["n", "pads"], ["p"], name="pad", mode=mode),
             helper.make_node("Conv", ["p", "w"], ["y"], name="conv")]
    folded, plan = fold_checked(make(nodes, {"x": ((2, 4, 5, 5), F32)}, {"y": (None, F32)}, inits))
    assert statuses(plan) == (["foldable"] if folds else ["kept"])
    assert count(folded, BN) == (0 if folds else 1)


# --- Refusals --------------------------------------------------------------------------------------

def weight_as_graph_input(model):
    weight = next(init for init in model.graph.initializer if init.name == "w")
    model.graph.input.append(helper.make_tensor_value_info("w", weight.data_type, weight.dims))
    model.graph.initializer.remove(weight)


def weight_computed_from_input(model):
    """The conv's weight is a function of a graph input (a tracker's template features used as a kernel)."""
    weight = next(init for init in model.graph.initializer if init.name == "w")
    model.graph.input.append(helper.make_tensor_value_info("template", weight.data_type, weight.dims))
    model.graph.initializer.remove(weight)
    model.graph.node.insert(0, helper.make_node("Relu", ["template"], ["w"], name="/embed/Relu"))


def read_running_mean(model):
    model.graph.node[1].output.append("running_mean")
    model.graph.output.append(helper.make_tensor_value_info("running_mean", onnx.TensorProto.FLOAT, None))


@pytest.mark.parametrize("edit, reason", [
    (lambda m: m.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1)),
     "in training mode whatever the model's mode (training_mode=1)"),
    (lambda m: m.graph.node[1].output.append("running_mean"), "optional output 'running_mean'"),
    (lambda m: read_running_mean(m), "in training mode whatever the model's mode (its running-statistics outputs "
     "are read)"),
    (lambda m: m.graph.output.append(helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, None)),
     "Conv conv output 'c' is also a graph output"),
    (lambda m: weight_as_graph_input(m), "Conv conv weight 'w' is a graph input, not a constant"),
    (lambda m: weight_computed_from_input(m), "Conv conv weight is computed at run time by Relu /embed/Relu"),
], ids=["training-mode", "optional-output", "optional-output-read", "producer-is-graph-output", "input-weight",
        "computed-weight"])
def test_refusals_name_their_reason(edit, reason):
    model = conv_bn(np.random.default_rng(24), bias=False)
    edit(model)
    decision = only_decision(plan_folds(model))
    assert decision.status is FoldStatus.KEPT and reason in decision.reason, decision.reason


def test_producer_read_elsewhere_is_kept_with_the_reader_named():
    rng = np.random.default_rng(25)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="/layer1/conv"), bn_node("c", "n"),
             helper.make_node("Add", ["n", "c"], ["y"], name="/layer1/Add")]
    inits = {"w": weights(rng, 6, 4, 3, 3), **bn_params(rng, 6)}
    model = make(nodes, {"x": ((2, 4, 5, 5), F32)}, {"y": (None, F32)}, inits)
    reason = only_decision(plan_folds(model)).reason
    assert reason == "Conv /layer1/conv output 'c' also feeds Add /layer1/Add", reason


def test_mixed_dtype_bn15_is_kept():
    rng = np.random.default_rng(26)
    params = bn_params(rng, 6, dtype=np.float16)
    params["bn.mean"], params["bn.var"] = params["bn.mean"].astype(F32), params["bn.var"].astype(F32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y")]
    model = make(nodes, {"x": ((1, 4, 5, 5), np.float16)}, {"y": (None, np.float16)},
                 {"w": weights(rng, 6, 4, 3, 3, dtype=np.float16), **params})
    decision = only_decision(plan_folds(model))
    assert decision.status is FoldStatus.KEPT and decision.reason.startswith("mixed dtypes (float16, float32)")


def test_per_activation_bn_is_kept():
    model = conv_bn(np.random.default_rng(27), bn_attrs={"spatial": 0}, opset=7)
    decision = only_decision(plan_folds(model))
    assert decision.status is FoldStatus.KEPT and "spatial=0" in decision.reason


def test_standalone_bn_says_there_is_nothing_to_fold_into():
    rng = np.random.default_rng(28)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("r", "n"),
             helper.make_node("Relu", ["n"], ["y"], name="relu2")]
    model = make(nodes, {"x": ((2, 4, 3), F32)}, {"y": (None, F32)}, bn_params(rng, 4))
    assert only_decision(plan_folds(model)).reason == (
        "nothing to fold into: its input comes from Relu relu and its output feeds Relu relu2")


# --- Numerics and output ---------------------------------------------------------------------------

def test_float16_folds_stay_float16():
    folded, _ = fold_checked(conv_bn(np.random.default_rng(29), dtype=np.float16), tolerance=2e-3)
    assert {numpy_helper.to_array(i).dtype for i in folded.graph.initializer} == {np.dtype(np.float16)}


def test_float64_gemm_folds_to_float64_precision():
    rng = np.random.default_rng(37)
    inits = {"w": weights(rng, 5, 8, dtype=np.float64), **bn_params(rng, 8, dtype=np.float64)}
    nodes = [helper.make_node("Gemm", ["a", "w"], ["g"], name="fc"), bn_node("g", "y")]
    model = make(nodes, {"a": ((3, 5), np.float64)}, {"y": (None, np.float64)}, inits)
    folded, _ = fold_checked(model, tolerance=1e-12)
    assert {numpy_helper.to_array(i).dtype for i in folded.graph.initializer} == {np.dtype(np.float64)}


def test_fold_rounds_once_from_float64():
    rng = np.random.default_rng(30)
    model = conv_bn(rng, dtype=np.float16)
    folded = apply_folds(model, plan_folds(model))
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    scale, shift = foldmath.bn_affine(arrays["bn.scale"], arrays["bn.bias"], arrays["bn.mean"], arrays["bn.var"], 1e-5)
    expected = foldmath.round_to(arrays["w"].astype(np.float64) * scale[:, None, None, None], np.float16)
    actual = numpy_helper.to_array(next(i for i in folded.graph.initializer if i.name == "w_folded"))
    assert np.array_equal(actual, expected)


def test_bfloat16_weights_fold_in_bfloat16():
    rng = np.random.default_rng(31)
    bf16 = ml_dtypes.bfloat16
    model = conv_bn(rng, dtype=bf16, opset=22)  # Conv takes bfloat16 from opset 22
    folded = apply_folds(model, plan_folds(model))
    arrays = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    assert count(folded, BN) == 0 and {a.dtype for a in arrays.values()} == {np.dtype(bf16)}
    onnx.checker.check_model(folded, full_check=True)
    source = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    scale, shift = foldmath.bn_affine(*(source[f"bn.{role}"] for role in ("scale", "bias", "mean", "var")), 1e-5)
    exact = {"w_folded": source["w"] * scale[:, None, None, None], "b_folded": source["b"] * scale + shift}
    for name, values in exact.items():  # each the bfloat16 nearest to the float64 fold (ties to even)
        assert np.array_equal(arrays[name].view(np.uint16), nearest_bfloat16_bits(values)), name


def test_bfloat16_constants_are_rounded_once_from_float64():
    """Through float32 (as ml_dtypes and torch cast), 1 + 2**-8 + 2**-30 rounds to 1 + 2**-8, a tie, then to 1."""
    tricky = np.array([1 + 2**-8 + 2**-30, -(1 + 2**-8 + 2**-30), 1 + 2**-8, 1 + 3 * 2**-8, 3.0, 1e-40, -0.0])
    values = np.concatenate([tricky, np.random.default_rng(46).standard_normal(10_000) * 10.0 ** np.arange(-5, 5)
                             .repeat(1000)])
    assert np.array_equal(foldmath.round_to(values, "bfloat16").view(np.uint16), nearest_bfloat16_bits(values))
    assert foldmath.round_to(tricky[:1], "bfloat16").view(np.uint16)[0] != tricky[:1].astype(
        ml_dtypes.bfloat16).view(np.uint16)[0]


def nearest_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """An oracle independent of the code under test: of a cast's bit pattern and its two neighbours,
    the one closest to each float64 value (the cast may round twice, through float32)."""
    guess = values.astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.int64)
    candidates = np.stack([guess - 1, guess, guess + 1]).astype(np.uint16)
    with np.errstate(invalid="ignore"):  # a neighbour of +-0 or +-Inf may be a NaN pattern: never the nearest
        distance = np.nan_to_num(np.abs(candidates.view(ml_dtypes.bfloat16).astype(np.float64) - values), nan=np.inf)
    best = distance.min(axis=0)
    even_first = np.where(candidates % 2 == 0, 0, 1)  # a tie goes to the even pattern
    order = np.lexsort((even_first, distance != best), axis=0)[0]
    return np.take_along_axis(candidates, order[None], axis=0)[0]


def test_model_properties_survive_and_provenance_is_recorded():
    model = conv_bn(np.random.default_rng(32))
    model.doc_string, model.producer_version, model.model_version = "doc", "9.9", 7
    model.graph.doc_string = "graph doc"
    model.metadata_props.add(key="author", value="someone")
    folded = apply_folds(model, plan_folds(model))
    assert (folded.ir_version, folded.opset_import, folded.producer_name, folded.producer_version) == (
        model.ir_version, model.opset_import, model.producer_name, model.producer_version)
    assert (folded.doc_string, folded.model_version, folded.graph.doc_string) == ("doc", 7, "graph doc")
    props = {p.key: p.value for p in folded.metadata_props}
    assert props["author"] == "someone"
    assert json.loads(props[METADATA_KEY]) == {"version": "0.1.0", "folded": 1, "kept": 0, "other_ops_folded": 0}


def test_two_folds_get_distinct_fresh_names():
    rng = np.random.default_rng(33)
    inits = {"w1": weights(rng, 4, 4, 1, 1), "w2": weights(rng, 8, 4, 1, 1), "w1_bias_folded": np.zeros(1, F32),
             **bn_params(rng, 4, "bn1"), **bn_params(rng, 8, "bn2")}
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2]),
             helper.make_node("Conv", ["p", "w1"], ["c1"]), bn_node("c1", "y1", "bn1"),
             helper.make_node("Conv", ["p", "w2"], ["c2"]), bn_node("c2", "y2", "bn2"),
             helper.make_node("Identity", ["w1_bias_folded"], ["y3"])]
    model = make(nodes, {"x": ((2, 4, 4, 4), F32)}, {"y1": (None, F32), "y2": (None, F32), "y3": (None, F32)}, inits)
    folded, plan = fold_checked(model)
    names = [i.name for i in folded.graph.initializer]
    assert len(names) == len(set(names)) and "w1_bias_folded_1" in names
    assert [d.targets for d in plan.decisions] == [["c1"], ["c2"]]  # unnamed nodes go by their output


def test_plan_is_pure_and_apply_is_repeatable():
    model = concat_model(np.random.default_rng(34))
    before = model.SerializeToString()
    plan = plan_folds(model)
    assert model.SerializeToString() == before
    assert apply_folds(model, plan).SerializeToString() == apply_folds(model, plan).SerializeToString()


def test_large_models_are_saved_with_fresh_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules["bnfold.onnx.model"], "EXTERNAL_DATA_THRESHOLD", 1)
    model = OnnxModel(tmp_path / "in.onnx", conv_bn(np.random.default_rng(35), c_in=16, c_out=32))
    target = tmp_path / "out.onnx"
    (tmp_path / "out.onnx.data").write_bytes(b"stale sidecar of an older model" * 1000)
    model.save(target)
    size = (tmp_path / "out.onnx.data").stat().st_size
    model.save(target)  # saving again must replace the sidecar, never append to it
    assert (tmp_path / "out.onnx.data").stat().st_size == size < 30000
    loaded = OnnxModel.load(target)
    assert loaded.external_data
    for ours, theirs in zip(model.proto.graph.initializer, loaded.proto.graph.initializer, strict=True):
        assert np.array_equal(numpy_helper.to_array(ours), numpy_helper.to_array(theirs))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]


def test_fold_writes_external_data_models_through_the_cli_path(tmp_path):
    from bnfold.folding import fold

    source = tmp_path / "big.onnx"
    onnx.save_model(conv_bn(np.random.default_rng(36), c_in=16, c_out=32), str(source), save_as_external_data=True,
                    location="big.onnx.data", size_threshold=0)
    report = fold(source, tmp_path / "folded.onnx")
    assert report.passed and report.difference.max_rel < 1e-5
    assert (tmp_path / "folded.onnx.data").exists()
    folded = OnnxModel.load(tmp_path / "folded.onnx")
    assert count(folded.proto, BN) == 0 and folded.external_data
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_verification_inputs_agree_on_named_dynamic_dims():
    # k sits on axis 1 of `a` and axis 0 of `b`: only one size for `k` lets the MatMul run.
    rng = np.random.default_rng(40)
    nodes = [helper.make_node("MatMul", ["a", "b"], ["ab"], name="mm"),
             helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y")]
    model = make(nodes, {"a": (["n", "k"], F32), "b": (["k", "n"], F32), "x": (["n", 4, 5, 5], F32)},
                 {"ab": (None, F32), "y": (None, F32)}, {"w": weights(rng, 6, 4, 3, 3), **bn_params(rng, 6)})
    from bnfold.folding import fold

    report = fold(model)
    assert report.passed and report.verify_error is None and report.difference.max_rel < 1e-5


# --- The command: verification decides what is written ---------------------------------------------

def test_verification_sessions_run_with_every_graph_optimization_off():
    """onnxruntime's default level fuses Conv+BN itself and would hide a wrong fold."""
    import onnxruntime as ort

    from bnfold.onnx import runtime

    options = runtime.session(conv_bn(np.random.default_rng(43))).get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def test_fold_over_the_tolerance_exits_1_and_writes_nothing(cli, tmp_path):
    out = tmp_path / "out.onnx"
    result = cli("fold", SAMPLES / "cnn.onnx", "-o", out, "--tolerance", "1e-12", "--json")
    document = json.loads(result.stdout)
    assert result.code == 1 and not out.exists() and list(tmp_path.iterdir()) == []
    assert document["passed"] is False and document["verified"] is False and document["output"] is None
    assert document["max_rel_error"] > document["tolerance"] == 1e-12
    assert {layer["status"] for layer in document["layers"]} == {"foldable"}  # never reported as folded
    assert document["folded"] == 0 and document["foldable"] == 3
    text = cli("fold", SAMPLES / "cnn.onnx", "-o", out, "--tolerance", "1e-12")
    assert text.code == 1 and "3 of 3 BN layers foldable, none folded" in text.stdout
    assert "compared on random inputs" in text.stdout and "verified" not in text.stdout
    assert "fold rejected: nothing written" in text.stdout and not out.exists()


def test_a_wrong_fold_is_caught_by_verification(cli, tmp_path, monkeypatch):
    from bnfold.onnx import fold as onnx_fold

    rounded = onnx_fold._rounded
    monkeypatch.setattr(onnx_fold, "_rounded", lambda values, layer: rounded(values * 1.01, layer))
    out = tmp_path / "out.onnx"
    result = cli("fold", SAMPLES / "cnn.onnx", "-o", out, "--json")
    assert result.code == 1 and not out.exists()
    assert json.loads(result.stdout)["max_rel_error"] > 1e-3


def test_strict_inputs_on_the_command_line(cli, tmp_path):
    model = conv_bn(np.random.default_rng(44), inputs_from_initializers=True)
    source, out = tmp_path / "ir4.onnx", tmp_path / "out.onnx"
    onnx.save(model, source)
    default = cli("fold", source, "-o", out, "--json")
    assert default.code == 0 and json.loads(default.stdout)["layers"][0]["status"] == "folded"
    assert [value.name for value in onnx.load(out).graph.input] == ["x"]
    strict = cli("fold", source, "-o", out, "--strict-inputs", "--force", "--json")
    (layer,) = json.loads(strict.stdout)["layers"]
    assert strict.code == 0 and layer["status"] == "kept" and "--strict-inputs" in layer["reason"]
    assert count(onnx.load(out), BN) == 1 and len(onnx.load(out).graph.input) == len(model.graph.input)


def test_inspect_and_check_take_strict_inputs_as_fold_does(cli, tmp_path):
    source = tmp_path / "ir4.onnx"
    onnx.save(conv_bn(np.random.default_rng(45), inputs_from_initializers=True), source)
    (default,) = json.loads(cli("inspect", source, "--json").stdout)["layers"]
    assert default["fold"]["status"] == "foldable"
    (strict,) = json.loads(cli("inspect", source, "--strict-inputs", "--json").stdout)["layers"]
    assert strict["fold"]["status"] == "kept" and "--strict-inputs" in strict["fold"]["reason"]

    def require_folded(*flags: str) -> tuple[int, str]:
        result = cli("check", source, "--require-folded", "--json", *flags)
        (outcome,) = [p["outcome"] for p in json.loads(result.stdout)["policies"] if p["policy"] == "require-folded"]
        return result.code, outcome

    assert require_folded() == (1, "failed")  # the BN folds, so it must be folded first
    assert require_folded("--strict-inputs") == (0, "passed")  # kept under onnxruntime's rule
