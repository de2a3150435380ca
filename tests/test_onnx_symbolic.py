"""ONNX models whose inputs have symbolic dims (dim_param): random verification inputs are sized as the
graph needs (one size per symbol), constant BNs still fold and verify, BNs fed their parameters at run
time are kept with a reason, and a dim the graph does not size is named in a one-line error."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from bnfold import fold
from bnfold.layers import FoldStatus
from bnfold.onnx.model import OnnxModel
from tests.onnx_builders import BN, bn_node, bn_params, make, weights

F32 = np.float32
ACTIVATION = ["N", "C", "H", "W"]


def _onnx(model: onnx.ModelProto, tmp_path, name: str = "m.onnx") -> OnnxModel:
    path = tmp_path / name
    onnx.save(model, path)
    return OnnxModel.load(path)


def _specs(model, tmp_path) -> dict[str, tuple]:
    return {spec.name: (spec.shape, spec.dim_names) for spec in _onnx(model, tmp_path).input_specs()}


def _conv(rng, x: str, y: str, c_in: int, c_out: int, group: int = 1) -> tuple[onnx.NodeProto, dict]:
    node = helper.make_node("Conv", [x, f"{y}.w"], [y], name=y, group=group, pads=[1, 1, 1, 1])
    return node, {f"{y}.w": weights(rng, c_out, c_in // group, 3, 3)}


def _runtime_bn(x: str, y: str, shape) -> tuple:
    """A BN whose scale, bias, mean and var are graph inputs of `shape`."""
    names = [f"{y}.{role}" for role in ("s", "b", "m", "v")]
    return helper.make_node(BN, [x, *names], [y], name=y), {name: ([*shape], F32) for name in names}


def _status(report, layer: str) -> FoldStatus:
    return next(decision.status for decision in report.decisions if decision.layer == layer)


# --- constant BNs on activations with symbolic dims fold and verify -------------------------------

def test_conv_bn_on_symbolic_channels_folds_and_verifies(tmp_path):
    rng = np.random.default_rng(0)
    conv, inits = _conv(rng, "x", "c", 4, 6)
    model = make([conv, bn_node("c", "y")], {"x": (ACTIVATION, F32)}, {"y": (None, F32)},
                 {**inits, **bn_params(rng, 6)})
    assert _specs(model, tmp_path)["x"] == ((None, 4, None, None), tuple(ACTIVATION))  # the Conv's weight says 4
    report = fold(_onnx(model, tmp_path), tmp_path / "out.onnx")
    assert report.passed and report.verify_error is None, report.verify_error
    assert _status(report, "bn") is FoldStatus.FOLDED
    assert report.difference.max_rel < 1e-5


def test_bn_on_a_symbolic_channel_input_takes_its_parameters_length(tmp_path):
    rng = np.random.default_rng(1)
    model = make([bn_node("x", "y"), helper.make_node("Relu", ["y"], ["z"])], {"x": (ACTIVATION, F32)},
                 {"z": (ACTIVATION, F32)}, bn_params(rng, 6))
    assert _specs(model, tmp_path)["x"][0] == (None, 6, None, None)
    report = fold(_onnx(model, tmp_path))
    assert report.passed and report.verify_error is None, report.verify_error


def test_symbolic_value_info_on_constant_parameters_does_not_stop_the_fold(tmp_path):
    rng = np.random.default_rng(2)
    params = bn_params(rng, 6)
    conv, inits = _conv(rng, "x", "c", 4, 6)
    model = make([conv, bn_node("c", "y")], {"x": (ACTIVATION, F32)}, {"y": (ACTIVATION, F32)}, {**inits, **params})
    model.graph.value_info.extend([helper.make_tensor_value_info(name, 1, ["C"]) for name in params]
                                  + [helper.make_tensor_value_info("c", 1, ACTIVATION)])
    report = fold(_onnx(model, tmp_path))
    assert report.passed, report.verify_error
    assert _status(report, "bn") is FoldStatus.FOLDED


# --- BNs fed their parameters at run time: kept, and the model still verifies ---------------------

def test_bn_with_parameter_inputs_is_kept_and_its_inputs_get_the_channel_count(tmp_path, cli):
    rng = np.random.default_rng(3)
    conv, inits = _conv(rng, "x", "c", 4, 6)
    bn, params = _runtime_bn("c", "y", ["features"])
    model = make([conv, bn], {"x": (ACTIVATION, F32), **params}, {"y": (None, F32)}, inits)
    specs = _specs(model, tmp_path)
    assert all(specs[name] == ((6,), ("features",)) for name in params)  # the Conv makes 6 channels
    assert specs["x"][0] == (None, 4, None, None)
    report = fold(_onnx(model, tmp_path))
    assert report.passed and report.verify_error is None, report.verify_error
    decision = report.decisions[0]
    assert decision.status is FoldStatus.KEPT and "graph input" in decision.reason
    model_path = tmp_path / "m.onnx"
    result = cli("fold", model_path, "-o", tmp_path / "out.onnx", "--json")
    assert result.code == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["verify_error"] is None


def test_symbols_a_bn_ties_together_get_one_size(tmp_path):
    """Nothing fixes the channels: the activation's "K" and the parameters' "C" must still agree."""
    bn, params = _runtime_bn("x", "y", ["C"])
    model = make([bn], {"x": (["N", "K", "H", "W"], F32), **params}, {"y": (None, F32)})
    specs = _specs(model, tmp_path)
    tied = specs["x"][1][1]
    assert tied in ("C", "K") and all(specs[name] == ((None,), (tied,)) for name in params)
    report = fold(_onnx(model, tmp_path))
    assert report.passed and report.verify_error is None, report.verify_error


def test_runtime_bn_before_a_constant_bn_sizes_both_from_the_conv(tmp_path):
    rng = np.random.default_rng(4)
    conv, inits = _conv(rng, "a", "c", 4, 6)
    first, params = _runtime_bn("x", "a", ["C"])
    model = make([first, conv, bn_node("c", "y")], {"x": (ACTIVATION, F32), **params}, {"y": (None, F32)},
                 {**inits, **bn_params(rng, 6)})
    specs = _specs(model, tmp_path)
    assert specs["x"][0] == (None, 4, None, None) and all(specs[name][0] == (4,) for name in params)
    report = fold(_onnx(model, tmp_path))
    assert report.verify_error is None, report.verify_error
    assert _status(report, "a") is FoldStatus.KEPT and _status(report, "bn") is not FoldStatus.KEPT


# --- the layers whose weights fix an input's length -----------------------------------------------

def _sized_by(rng, op: str):
    """(model, the length its layer forces on x's dim 1)."""
    if op == "Conv-grouped":
        conv, inits = _conv(rng, "x", "y", 6, 6, group=3)
        return make([conv], {"x": (ACTIVATION, F32)}, {"y": (None, F32)}, inits), 6
    if op == "ConvTranspose":
        node = helper.make_node(op, ["x", "w"], ["y"])
        return make([node], {"x": (ACTIVATION, F32)}, {"y": (None, F32)}, {"w": weights(rng, 5, 3, 2, 2)}), 5
    if op == "InstanceNormalization":
        node = helper.make_node(op, ["x", "s", "b"], ["y"])
        inits = {"s": np.ones(7, F32), "b": np.zeros(7, F32)}
        return make([node], {"x": (ACTIVATION, F32)}, {"y": (None, F32)}, inits), 7
    if op == "Gemm":
        node = helper.make_node(op, ["x", "w"], ["y"], transB=1)
        return make([node], {"x": (["N", "K"], F32)}, {"y": (None, F32)}, {"w": weights(rng, 3, 9)}), 9
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    return make([node], {"x": (["N", "K"], F32)}, {"y": (None, F32)}, {"w": weights(rng, 5, 3)}), 5


@pytest.mark.parametrize("op", ["Conv-grouped", "ConvTranspose", "InstanceNormalization", "Gemm", "MatMul"])
def test_a_layer_weight_sizes_the_symbolic_dim_it_reads(op, tmp_path):
    model, length = _sized_by(np.random.default_rng(5), op)
    assert _specs(model, tmp_path)["x"][0][1] == length
    report = fold(_onnx(model, tmp_path))  # no BN: verification alone must run
    assert report.verify_error is None, report.verify_error


def test_sizing_inputs_leaves_the_model_unchanged(tmp_path):
    bn, params = _runtime_bn("x", "y", [None])
    model = make([bn], {"x": (["N", 6, "H", "W"], F32), **params}, {"y": (None, F32)})
    loaded = _onnx(model, tmp_path)
    before = loaded.proto.SerializeToString()
    assert {spec.name: spec.shape for spec in loaded.input_specs()}["y.s"] == (6,)  # an unnamed dim is sized too
    assert loaded.proto.SerializeToString() == before


# --- dims the graph does not size: one line that names them ---------------------------------------

def test_a_dim_the_graph_does_not_size_is_named_in_a_one_line_error(tmp_path, cli):
    rng = np.random.default_rng(6)
    shape = np.array([-1, 4, 2, 3], np.int64)  # a Reshape fixes K = 24: no layer weight says so
    conv, inits = _conv(rng, "r", "c", 4, 6)
    model = make([helper.make_node("Reshape", ["x", "shape"], ["r"]), conv, bn_node("c", "y")],
                 {"x": (["N", "K"], F32)}, {"y": (None, F32)}, {"shape": shape, **inits, **bn_params(rng, 6)})
    _onnx(model, tmp_path)
    result = cli("fold", tmp_path / "m.onnx", "-o", tmp_path / "out.onnx")
    assert result.code == 1
    assert "Traceback" not in result.stdout + result.stderr
    error = next(line for line in result.stdout.splitlines() if line.startswith("not verified"))
    assert "x: N=2, K=8" in error and "--input-shape" in error
    result = cli("fold", tmp_path / "m.onnx", "-o", tmp_path / "out.onnx", "--input-shape", "2,24")
    assert result.code == 0, result.stdout


def test_a_symbol_tied_to_two_lengths_is_left_open_and_reported(tmp_path):
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("MatMul", ["x", "w5"], ["a"]), helper.make_node("MatMul", ["x", "w4"], ["b"])]
    model = make(nodes, {"x": (["N", "K"], F32)}, {"a": (None, F32), "b": (None, F32)},
                 {"w5": weights(rng, 5, 3), "w4": weights(rng, 4, 3)})
    assert _specs(model, tmp_path)["x"][0] == (None, None)
    report = fold(_onnx(model, tmp_path))
    assert not report.passed and "x: N=2, K=8" in report.verify_error


def test_inspect_counts_the_channels_of_a_runtime_bn_that_a_later_conv_sizes(tmp_path, cli):
    rng = np.random.default_rng(8)
    conv, inits = _conv(rng, "a", "c", 4, 6)
    first, params = _runtime_bn("x", "a", ["C"])
    model = make([first, conv], {"x": (ACTIVATION, F32), **params}, {"c": (None, F32)}, inits)
    _onnx(model, tmp_path)
    result = cli("inspect", tmp_path / "m.onnx", "--json")
    assert result.code == 0, result.stderr
    layer = json.loads(result.stdout)["layers"][0]
    assert layer["channels"] == 4


# --- verification compares finite outputs, or says it compared nothing -------------------------------

def test_a_runtime_bn_variance_gets_positive_random_values_so_the_fold_is_compared(tmp_path):
    """Half of normal random values are negative: a BN variance fed them made every output NaN, and a
    fold downstream 'verified' with error 0 while comparing nothing."""
    rng = np.random.default_rng(4)
    conv, inits = _conv(rng, "a", "c", 4, 6)
    first, params = _runtime_bn("x", "a", ["C"])
    model = make([first, conv, bn_node("c", "y")], {"x": (ACTIVATION, F32), **params}, {"y": (None, F32)},
                 {**inits, **bn_params(rng, 6)})
    report = fold(_onnx(model, tmp_path))
    assert report.passed and report.verify_error is None, report.verify_error
    assert report.difference.compared > 0 and not report.difference.non_finite


def test_a_fold_whose_outputs_are_nan_everywhere_is_not_verified(tmp_path):
    rng = np.random.default_rng(6)
    conv, inits = _conv(rng, "x", "c", 4, 6)
    nodes = [conv, bn_node("c", "b"), helper.make_node("Abs", ["b"], ["positive"]),
             helper.make_node("Neg", ["positive"], ["negative"]),
             helper.make_node("Sqrt", ["negative"], ["y"])]  # NaN (or 0 where b is exactly 0: never here)
    model = make(nodes, {"x": ([2, 4, 5, 5], F32)}, {"y": (None, F32)}, {**inits, **bn_params(rng, 6)})
    report = fold(_onnx(model, tmp_path), tmp_path / "out.onnx")
    assert not report.passed and report.difference.compared == 0
    assert "nothing was compared" in report.verify_error
    assert not (tmp_path / "out.onnx").exists()


def test_sizing_inputs_survives_a_matmul_missing_its_second_input():
    """Found by the fuzzer: a mutated MatMul with one input made inspect crash while sizing inputs."""
    from bnfold.onnx.shapes import input_dim_sizes

    node = helper.make_node("MatMul", ["x"], ["y"])
    model = make([node], {"x": (["N", "K"], F32)}, {"y": (None, F32)})
    assert input_dim_sizes(model) == {}
