"""Peer projects' BN test models and cases (../shared/conformance/CASES.md), with bnfold's behaviour pinned.

Every model under conformance/onnx is read, planned, folded and inspected. Where peers disagree, bnfold's
documented choice is pinned here:
- A9/A10 (`fuse-matmul-bn-only-reshape`/`-only-transpose`): onnxruntime fuses them, but the BN channel
  count does not match its input, so the models cannot run; bnfold keeps the BN and says so.
- A11 (`non-ignorable-node`): an Identity between MatMul and BN does not stop bnfold (ORT's full session
  agrees; its single rule does not).
- A14/C6 (initializers that are also graph inputs): folded by default and removed from the inputs;
  `strict_inputs=True` keeps onnxruntime's rule.
- A13 (Conv + Conv -> Add -> BN): kept; bnfold does not turn a BN into a depthwise convolution.
- A17 (ConvTranspose -> BN): folded, group-aware.
- B5 (parameters that do not fit): kept with a reason, never an error.
Cases that are patterns rather than files (C1-C4, C7, C8, A15, A16, E8) are in test_onnx_fold.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold import foldmath
from bnfold.folding import fold
from bnfold.layers import FoldStatus
from bnfold.onnx.fold import apply_folds, plan_folds
from bnfold.plan import FoldOptions
from tests.conftest import CONFORMANCE
from tests.onnx_builders import (BN, bn_node, bn_params, conv_bn, count, feeds, fold_checked, make, run,
                                 statuses, weights)

MODELS = CONFORMANCE / "onnx"
pytestmark = pytest.mark.skipif(not MODELS.is_dir(), reason="../shared/conformance is not available")
F32 = np.float32

NOT_CONSTANT = "is a graph input, not a constant"
ORT_BN6 = "does not run"  # onnxruntime 1.31 has no BatchNormalization-6 kernel
# model -> (bnfold's decision, a fragment of its reason, BN nodes left after folding)
EXPECTED = {
    "node/test_BatchNorm1d_3d_input_eval/model.onnx": ("kept", "nothing to fold into", 1),  # F3
    "node/test_BatchNorm2d_eval/model.onnx": ("kept", "nothing to fold into", 1),
    "node/test_BatchNorm2d_momentum_eval/model.onnx": ("kept", "nothing to fold into", 1),
    "node/test_BatchNorm3d_eval/model.onnx": ("kept", "nothing to fold into", 1),
    "node/test_BatchNorm3d_momentum_eval/model.onnx": ("kept", "nothing to fold into", 1),
    "node/test_batchnorm_epsilon/model.onnx": ("kept", NOT_CONSTANT, 1),  # F1
    "node/test_batchnorm_example/model.onnx": ("kept", NOT_CONSTANT, 1),
    "node/test_batchnorm_epsilon_training_mode/model.onnx": ("kept", "training_mode=1", 1),  # F2
    "node/test_batchnorm_example_training_mode/model.onnx": ("kept", "training_mode=1", 1),
    "openvino/batchnorm_opset1.onnx": ("kept", "is_test=0", 1),  # F4
    "openvino/batchnorm_opset6.onnx": ("kept", "is_test=0", 1),
    "openvino/batchnorm_opset15.onnx": ("kept", NOT_CONSTANT, 1),
    "openvino/batchnorm_training_mode_f16.onnx": ("kept", "training_mode=1", 1),  # F5
    "ort/fuse-conv-bn-no-bias.onnx": ("foldable", None, 0),  # A1
    "ort/fuse-conv-bn-no-bias.2019.onnx": ("foldable", None, 0),  # A14: bnfold's default
    "ort/fuse-conv-bn-mul-add-unsqueeze.onnx": ("foldable", None, 0),  # A3
    "ort/fuse-conv-bn-mul-add-unsqueeze.negative_axes.onnx": ("foldable", None, 0),
    "ort/fuse-conv-bn-mul-add-unsqueeze-no-bias.onnx": ("foldable", None, 0),
    "ort/fuse-conv-bn-mul-add-unsqueeze-no-bias.2019.onnx": ("foldable", None, 0),
    "ort/fuse-conv-bn-add-mul-float16.onnx": ("foldable", None, 0),  # A4
    "ort/fuse-conv-bn-add-mul-float16.2019.onnx": ("foldable", None, 0),  # A14
    "ort/fuse-matmul-bn-directly.onnx": ("foldable", None, 0),  # A5
    "ort/fuse-matmul-bn-directly-dont-fuse.onnx": ("kept", "channel count mismatch", 1),  # A6
    "ort/fuse-matmul-bn-with-reshape.onnx": ("foldable", None, 0),  # A7
    "ort/fuse-matmul-bn-only-reshape.onnx": ("kept", "channel count mismatch", 1),  # A9
    "ort/fuse-matmul-bn-only-transpose.onnx": ("kept", "channel count mismatch", 1),  # A10
    "ort/fuse-matmul-bn-non-ignorable-node.onnx": ("foldable", None, 0),  # A11
}
# Models onnxruntime cannot run, so no fold of them can be verified.
UNRUNNABLE = {name for name in EXPECTED if name.startswith("node/test_BatchNorm") or "opset1.onnx" in name
              or "opset6" in name or "dont-fuse" in name or "only-" in name}


def load(name: str) -> onnx.ModelProto:
    return onnx.load(str(MODELS / name))


def passes_checker(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception:
        return False
    return True


def test_every_conformance_model_has_an_expectation():
    assert {str(path.relative_to(MODELS)) for path in MODELS.rglob("*.onnx")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_plan_matches_the_expected_behaviour(name):
    status, reason, _ = EXPECTED[name]
    (decision,) = plan_folds(load(name)).decisions
    assert decision.status.value == status, decision.reason
    if reason:
        assert reason in decision.reason


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fold_is_verified_or_reported_unverifiable(name, tmp_path):
    output = tmp_path / "folded.onnx"
    report = fold(MODELS / name, output)
    if name in UNRUNNABLE:
        assert not report.passed and ORT_BN6 in report.verify_error and not output.exists()
        return
    assert report.passed and report.difference.max_rel <= (1e-2 if "float16" in name else 1e-5)
    folded = onnx.load(str(output))
    assert count(folded, BN) == EXPECTED[name][2]
    if passes_checker(load(name)):
        assert passes_checker(folded)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_inspect_reports_every_model(cli, name):
    result = cli("inspect", MODELS / name)
    assert result.code in (0, 1) and "Traceback" not in result.stderr, result.stderr
    assert "BatchNormalization" in result.stdout or "model.onnx" in result.stdout


# --- onnxruntime's expectations, file by file (A) ------------------------------------------------

def test_a1_conv_takes_the_bn_output_name_and_gains_a_bias():
    model = load("ort/fuse-conv-bn-no-bias.onnx")
    model.graph.node[1].output.append("")  # an empty-named optional output is no output
    folded = apply_folds(model, plan_folds(model))
    conv = folded.graph.node[0]
    assert conv.op_type == "Conv" and conv.output[0] == "conv1/bn_1" and len(conv.input) == 3


def test_a2_a8_real_optional_outputs_keep_the_bn():
    for name in ("ort/fuse-conv-bn-no-bias.onnx", "ort/fuse-matmul-bn-with-reshape.onnx"):
        model = load(name)
        bn = next(node for node in model.graph.node if node.op_type == BN)
        bn.output.append(f"{bn.input[3]}.output")
        (decision,) = plan_folds(model).decisions
        assert decision.status is FoldStatus.KEPT and "optional output" in decision.reason


def test_a3_mul_add_and_unsqueeze_are_absorbed_into_the_conv():
    for name in ("ort/fuse-conv-bn-mul-add-unsqueeze.onnx", "ort/fuse-conv-bn-mul-add-unsqueeze.negative_axes.onnx",
                 "ort/fuse-conv-bn-mul-add-unsqueeze-no-bias.onnx"):
        model = load(name)
        folded = apply_folds(model, plan_folds(model))
        assert {node.op_type for node in folded.graph.node} <= {"Sub", "Conv", "Flatten"}, name
        inputs = feeds(model, np.random.default_rng(0))
        expected, actual = run(model, inputs), run(folded, inputs)
        assert np.allclose(expected[0], actual[0], rtol=1e-5, atol=1e-4)


def test_a4_float16_output_is_exactly_six():
    model = load("ort/fuse-conv-bn-add-mul-float16.onnx")
    folded = apply_folds(model, plan_folds(model))
    (output,) = run(folded, {"X": np.ones((1, 1, 3, 3), np.float16)})
    assert output.dtype == np.float16 and output.shape == (1, 1, 2, 2) and np.all(output == 6.0)


def test_a5_a7_matmul_becomes_gemm_under_the_expected_names():
    direct = load("ort/fuse-matmul-bn-directly.onnx")
    folded = apply_folds(direct, plan_folds(direct))
    assert [(n.op_type, n.output[0]) for n in folded.graph.node] == [("Gemm", "output")]
    chained = load("ort/fuse-matmul-bn-with-reshape.onnx")
    folded = apply_folds(chained, plan_folds(chained))
    assert [(n.op_type, n.output[0]) for n in folded.graph.node] == [
        ("Gemm", "matmul_output"), ("Reshape", "reshape_output0"), ("Transpose", "bn_output"), ("Identity", "output")]


def test_a12_matmul_without_bn_is_left_alone():
    model = load("ort/fuse-matmul-bn-only-transpose.onnx")
    bn = next(node for node in model.graph.node if node.op_type == BN)
    model.graph.node.remove(bn)
    model.graph.node[-1].output[0] = "output"
    plan = plan_folds(model)
    assert plan.decisions == [] and plan.actions == []
    assert [n.op_type for n in apply_folds(model, plan).graph.node] == ["MatMul", "Transpose"]


def test_a13_bn_after_an_add_of_convs_folds_into_both():
    """onnxruntime at best turns this BN into a depthwise 1x1 conv (NCHWc, tolerance 2.5e-4); bnfold
    folds it exactly: both convs take the scale, one takes the shift."""
    rng = np.random.default_rng(1)
    inits = {"w1": weights(rng, 34, 8, 3, 3), "w2": weights(rng, 34, 8, 3, 3), **bn_params(rng, 34)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w2"], ["b"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["a", "b"], ["s"], name="add"), bn_node("s", "n"),
             helper.make_node("Relu", ["n"], ["y"], name="relu")]
    model = make(nodes, {"x": ((1, 8, 6, 6), F32)}, {"y": (None, F32)}, inits)
    folded, plan = fold_checked(model)
    assert statuses(plan) == ["foldable"] and count(folded, BN) == 0
    assert [node.op_type for node in folded.graph.node] == ["Conv", "Conv", "Add", "Relu"]


@pytest.mark.parametrize("name", ["ort/fuse-conv-bn-add-mul-float16.2019.onnx", "ort/fuse-conv-bn-no-bias.2019.onnx"])
def test_a14_initializers_listed_as_inputs(name):
    model = load(name)
    assert statuses(plan_folds(model, FoldOptions(strict_inputs=True))) == ["kept"]
    folded = apply_folds(model, plan_folds(model))
    initializers = {i.name for i in folded.graph.initializer}
    inputs = {value.name for value in folded.graph.input}
    data = {value.name for value in model.graph.input} - {i.name for i in model.graph.initializer}
    assert data <= inputs <= data | initializers  # inputs that were only BN statistics went with them
    assert model.graph.node[1].input[3] not in initializers | inputs


def test_a17_conv_transpose_folds():
    folded, _ = fold_checked(conv_bn(np.random.default_rng(2), op="ConvTranspose", c_in=3, c_out=16,
                                     conv_attrs={"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}))
    assert count(folded, BN) == 0


# --- onnx/optimizer (B) ----------------------------------------------------------------------------

def test_b1_one_conv_two_initializers_and_the_reference_formula():
    rng = np.random.default_rng(3)
    w, b = rng.standard_normal((3, 2, 5, 5)).astype(F32), rng.standard_normal(3).astype(F32)
    scale, bias, mean = (rng.standard_normal(3).astype(F32) + 2 for _ in range(3))
    var = (np.abs(rng.standard_normal(3)) + 2).astype(F32)
    inits = {"W": w, "B": b, "bn.scale": scale, "bn.bias": bias, "bn.mean": mean, "bn.var": var}
    nodes = [helper.make_node("Conv", ["X", "W", "B"], ["c"]), bn_node("c", "Y")]
    model = make(nodes, {"X": ((5, 2, 28, 28), F32)}, {"Y": (None, F32)}, inits, inputs_from_initializers=True)
    folded, _ = fold_checked(model)
    assert len(folded.graph.node) == 1 and len(folded.graph.initializer) == 2
    arrays = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    f = scale / np.sqrt(var + 1e-5)
    np.testing.assert_almost_equal(arrays["W_folded"], w * f[:, None, None, None], decimal=5)
    np.testing.assert_almost_equal(arrays["B_folded"], (b - mean) * f + bias, decimal=5)


def test_b3_conv_bias_computed_at_run_time_keeps_the_bn():
    model = conv_bn(np.random.default_rng(4), bias=False)
    model.graph.input.append(helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [6]))
    model.graph.node[0].input.append("b")
    (decision,) = plan_folds(model).decisions
    assert decision.status is FoldStatus.KEPT and "bias 'b' is a graph input" in decision.reason


def test_b4_parameter_dtypes_that_differ_keep_the_bn():
    model = conv_bn(np.random.default_rng(5))
    var = next(i for i in model.graph.initializer if i.name == "bn.var")
    var.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(var).astype(np.float64), "bn.var"))
    (decision,) = plan_folds(model).decisions
    assert decision.status is FoldStatus.KEPT and decision.reason.startswith("mixed dtypes")


@pytest.mark.parametrize("scale_size, conv_out, reason", [
    (4, 3, "not vectors of one length"), (3, 4, "channel count mismatch")])
def test_b5_parameters_that_do_not_fit_are_kept_not_an_error(scale_size, conv_out, reason):
    rng = np.random.default_rng(6)
    inits = {"w": weights(rng, conv_out, 2, 3, 3), **bn_params(rng, 3)}
    inits["bn.scale"] = np.ones(scale_size, F32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 5, 5])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    (decision,) = plan_folds(helper.make_model(graph)).decisions
    assert decision.status is FoldStatus.KEPT and reason in decision.reason


# --- onnxscript (C) ---------------------------------------------------------------------------------

def test_c5_weights_and_parameters_that_are_all_graph_inputs_keep_the_bn():
    model = conv_bn(np.random.default_rng(7))
    for init in list(model.graph.initializer):
        model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, init.dims))
    del model.graph.initializer[:]
    (decision,) = plan_folds(model).decisions
    assert decision.status is FoldStatus.KEPT and NOT_CONSTANT in decision.reason


def test_c6_weight_that_is_also_an_input_folds_by_default_and_is_kept_when_strict():
    model = conv_bn(np.random.default_rng(8), bias=False)
    model.graph.input.append(helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [6, 4, 3, 3]))
    folded, plan = fold_checked(model)
    assert statuses(plan) == ["foldable"] and [v.name for v in folded.graph.input] == ["x"]
    (strict,) = plan_folds(model, FoldOptions(strict_inputs=True)).decisions
    assert strict.status is FoldStatus.KEPT
    assert "weight 'w' is an initializer that is also a graph input" in strict.reason


def test_c9_missing_epsilon_means_the_default():
    model = conv_bn(np.random.default_rng(9), bias=False)
    assert not model.graph.node[1].attribute
    folded = apply_folds(model, plan_folds(model))
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    _, shift = foldmath.bn_affine(arrays["bn.scale"], arrays["bn.bias"], arrays["bn.mean"], arrays["bn.var"], 1e-5)
    bias = next(numpy_helper.to_array(i) for i in folded.graph.initializer if i.name == "w_bias_folded")
    assert np.array_equal(bias, shift.astype(F32))


# --- OnnxSlim (D) -------------------------------------------------------------------------------------

def test_d1_strided_padded_conv_without_bias():
    model = conv_bn(np.random.default_rng(10), c_in=3, c_out=16, bias=False, spatial=(9, 9), opset=11,
                    conv_attrs={"strides": [2, 2], "pads": [1, 1, 1, 1]})
    model.ir_version = 7
    folded, _ = fold_checked(model)
    assert len(folded.graph.node) < len(model.graph.node)


def test_d2_unnamed_pairs_on_one_input_fold_and_go_by_their_output_names():
    inits = {"wa": np.ones((4, 3, 1, 1), F32), "wb": np.ones((4, 3, 1, 1), F32)}
    for prefix in ("bna", "bnb"):
        inits.update({f"{prefix}.scale": np.ones(4, F32), f"{prefix}.bias": np.zeros(4, F32),
                      f"{prefix}.mean": np.zeros(4, F32), f"{prefix}.var": np.ones(4, F32)})
    nodes = [helper.make_node("Conv", ["x", "wa"], ["conv_output_a"]), bn_node("conv_output_a", "ya", "bna"),
             helper.make_node("Conv", ["x", "wb"], ["conv_output_b"]), bn_node("conv_output_b", "yb", "bnb")]
    for node in nodes:
        node.name = ""
    model = make(nodes, {"x": ((1, 3, 4, 4), F32)}, {"ya": (None, F32), "yb": (None, F32)}, inits)
    folded, plan = fold_checked(model)
    assert [d.targets for d in plan.decisions] == [["conv_output_a"], ["conv_output_b"]]
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Conv"]


def test_d3_conv_transpose_with_output_padding():
    folded, _ = fold_checked(conv_bn(np.random.default_rng(11), op="ConvTranspose", c_in=3, c_out=16, bias=False,
                                     conv_attrs={"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}))
    assert [n.op_type for n in folded.graph.node] == ["ConvTranspose"]


def test_d4_single_channel_conv_bn_is_exactly_one_conv():
    folded, _ = fold_checked(conv_bn(np.random.default_rng(12), c_in=1, c_out=1, bias=False, opset=14))
    assert [n.op_type for n in folded.graph.node] == ["Conv"]


def test_d5_standalone_bn_is_kept_without_error():
    rng = np.random.default_rng(13)
    model = make([bn_node("x", "y")], {"x": ((2, 3, 4, 4), F32)}, {"y": (None, F32)}, bn_params(rng, 3))
    folded, plan = fold_checked(model)
    assert statuses(plan) == ["kept"] and count(folded, BN) == 1
