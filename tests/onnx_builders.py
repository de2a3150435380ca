"""Small ONNX models built with onnx.helper, and the check every fold test makes: same outputs in ORT."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.onnx import runtime
from bnfold.onnx.fold import apply_folds, plan_folds
from bnfold.plan import FoldOptions, FoldPlan

OPSET = 17
BN = "BatchNormalization"


def elem_type(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def make(nodes, inputs: dict, outputs: dict, initializers: dict | None = None, *, opset: int = OPSET,
         ir: int = 8, inputs_from_initializers: bool = False) -> onnx.ModelProto:
    """A model; `inputs`/`outputs` map names to (shape, dtype). Shape inference fills in unknown output
    shapes (None) and value_info, as exporters do."""
    inits = [numpy_helper.from_array(np.asarray(value), name) for name, value in (initializers or {}).items()]
    graph_inputs = [helper.make_tensor_value_info(name, elem_type(dtype), shape)
                    for name, (shape, dtype) in inputs.items()]
    if inputs_from_initializers:
        graph_inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits]
    graph = helper.make_graph(nodes, "g", graph_inputs,
                              [helper.make_tensor_value_info(name, elem_type(dtype), shape)
                               for name, (shape, dtype) in outputs.items()], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir,
                              producer_name="bnfold-tests")
    return onnx.shape_inference.infer_shapes(model)


def bn_params(rng: np.random.Generator, channels: int, prefix: str = "bn", dtype=np.float32) -> dict:
    """Scale, bias, mean, var initializers (variance positive), named `<prefix>.<role>`."""
    return {f"{prefix}.scale": (rng.standard_normal(channels) + 1.5).astype(dtype),
            f"{prefix}.bias": rng.standard_normal(channels).astype(dtype),
            f"{prefix}.mean": rng.standard_normal(channels).astype(dtype),
            f"{prefix}.var": (rng.random(channels) + 0.5).astype(dtype)}


def bn_node(x: str, y: str, prefix: str = "bn", **attrs) -> onnx.NodeProto:
    return helper.make_node(BN, [x, *(f"{prefix}.{r}" for r in ("scale", "bias", "mean", "var"))], [y],
                            name=prefix, **attrs)


def weights(rng: np.random.Generator, *shape: int, dtype=np.float32) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]) or 1)).astype(dtype)


def conv_bn(rng, *, c_in=4, c_out=6, group=1, bias=True, spatial=(5, 5), kernel=3, dtype=np.float32, op="Conv",
            conv_attrs=None, bn_attrs=None, opset=17, inputs_from_initializers=False):
    """x -> Conv/ConvTranspose -> BN -> y (`inputs_from_initializers`: every initializer also a graph input)."""
    k = (kernel,) * len(spatial)
    w_shape = (c_out, c_in // group, *k) if op == "Conv" else (c_in, c_out // group, *k)
    inits = {"w": weights(rng, *w_shape, dtype=dtype), **bn_params(rng, c_out, dtype=dtype)}
    if bias:
        inits["b"] = rng.standard_normal(c_out).astype(dtype)
    conv = helper.make_node(op, ["x", "w", *(["b"] if bias else [])], ["c"], name="conv", group=group,
                            **(conv_attrs or {}))
    return make([conv, bn_node("c", "y", **(bn_attrs or {}))], {"x": ((2, c_in, *spatial), dtype)},
                {"y": (None, dtype)}, inits, opset=opset, inputs_from_initializers=inputs_from_initializers)


def count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(node.op_type == op_type for node in model.graph.node)


def feeds(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random inputs for every graph input that is not an initializer (dynamic dims: 2)."""
    inits = {init.name for init in model.graph.initializer}
    result = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 2 for d in tensor.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        result[value.name] = rng.standard_normal(shape).astype(dtype)
    return result


def run(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return runtime.run(runtime.session(model), inputs)


def relative_error(expected: list[np.ndarray], actual: list[np.ndarray]) -> float:
    worst = 0.0
    for a, b in zip(expected, actual, strict=True):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a64.shape == b64.shape
        worst = max(worst, float(np.max(np.abs(a64 - b64)) / max(np.max(np.abs(a64)), 1e-30)))
    return worst


def fold_checked(model: onnx.ModelProto, options: FoldOptions = FoldOptions(), *, tolerance: float = 1e-5,
                 seed: int = 0, check: bool = True) -> tuple[onnx.ModelProto, FoldPlan]:
    """Plan and apply; assert the folded model computes what the original does (ORT, no optimization),
    keeps the output names and passes the full checker when the original did."""
    before = model.SerializeToString()
    plan = plan_folds(model, options)
    folded = apply_folds(model, plan)
    assert model.SerializeToString() == before, "the caller's model was modified"
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]
    inputs = feeds(model, np.random.default_rng(seed))
    error = relative_error(run(model, inputs), run(folded, inputs))
    assert error <= tolerance, f"relative error {error:.3g} > {tolerance:.3g}"
    if check:
        onnx.checker.check_model(model, full_check=True)
        onnx.checker.check_model(folded, full_check=True)
    return folded, plan


def statuses(plan: FoldPlan) -> list[str]:
    return [decision.status.value for decision in plan.decisions]


# --- Pattern models: one per ONNX pattern of issue 4 (benchmarks/coverage.py, test_onnx_patterns.py) ----

F32 = np.float32


@dataclass(frozen=True)
class Pattern:
    """A small ONNX model showing one pattern, and how many of its BN nodes bnfold must fold (and prove):
    0 where keeping the BN is the right answer."""
    name: str
    what: str
    build: Callable[[np.random.Generator], onnx.ModelProto]
    foldable: int


def _node(op: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], name=output, **attrs)


def _chain(rng, x_shape, nodes, inits: dict, bns: dict[str, int], **options) -> onnx.ModelProto:
    """x -> nodes -> y, with BN parameters `bns` (prefix -> channels) added to `inits`."""
    for prefix, channels in bns.items():
        inits = {**inits, **bn_params(rng, channels, prefix)}
    return make(nodes, {"x": (x_shape, F32)}, {"y": (None, F32)}, inits, **options)


def _hand_scaled_conv(rng):
    inits = {"w": weights(rng, 6, 4, 3, 3), "s": rng.uniform(0.5, 2, (6, 1, 1)).astype(F32),
             "t": rng.standard_normal((6, 1, 1)).astype(F32)}
    return _chain(rng, (2, 4, 7, 7), [_node("Conv", ["x", "w"], "c"), _node("Mul", ["c", "s"], "m"),
                                      _node("Add", ["m", "t"], "a"), bn_node("a", "n"), _node("Relu", ["n"], "y")],
                  inits, {"bn": 6})


def _gemm_transposed(rng):
    gemm = _node("Gemm", ["x", "w", "c"], "g", transA=1, transB=1, alpha=0.7, beta=1.3)
    return _chain(rng, (5, 3), [gemm, bn_node("g", "y")],
                  {"w": weights(rng, 8, 5), "c": rng.standard_normal(8).astype(F32)}, {"bn": 8})


def _matmul_then(rng, x_shape, between: list, extra: dict | None = None, tail: list | None = None):
    """x @ w + b -> `between` -> BN -> `tail` (each a list of (op, attrs, constant inputs))."""
    inits = {"w": weights(rng, x_shape[-1], 8), "b": rng.standard_normal(8).astype(F32), **(extra or {})}
    nodes, last = [_node("MatMul", ["x", "w"], "m"), _node("Add", ["m", "b"], "mb")], "mb"
    for position, (op, attrs, constants) in enumerate([*between, ("BN", {}, []), *(tail or [])]):
        out = "y" if position == len(between) + len(tail or []) else f"t{position}"
        nodes.append(bn_node(last, out) if op == "BN" else _node(op, [last, *constants], out, **attrs))
        last = out
    return _chain(rng, x_shape, nodes, inits, {"bn": 8})


def _constant_made(rng):
    params = bn_params(rng, 6)
    const = {role: helper.make_node("Constant", [], [f"bn.{role}"], value=numpy_helper.from_array(params[f"bn.{role}"]))
             for role in ("scale", "bias")}
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weights(rng, 6, 4, 3, 3))),
             const["scale"], const["bias"], _node("Conv", ["x", "w"], "c"),
             helper.make_node("ConstantOfShape", ["six"], ["bn.mean"], value=numpy_helper.from_array(np.ones(1, F32))),
             _node("Add", ["bn.mean", "half"], "bn.var"), bn_node("c", "y")]
    return make(nodes, {"x": ((2, 4, 6, 6), F32)}, {"y": (None, F32)},
                {"six": np.array([6]), "half": np.array(0.5, F32)})


def _two_conv_bn(rng, x_shape=(2, 4, 6, 6), **options):
    inits = {"w1": weights(rng, 6, 4, 3, 3), "b1": rng.standard_normal(6).astype(F32), "w2": weights(rng, 5, 6, 1, 1)}
    nodes = [_node("Conv", ["x", "w1", "b1"], "c1", pads=[1, 1, 1, 1]), bn_node("c1", "n1", "bn1"),
             _node("Relu", ["n1"], "r"), _node("Conv", ["r", "w2"], "c2"), bn_node("c2", "y", "bn2")]
    return _chain(rng, x_shape, nodes, inits, {"bn1": 6, "bn2": 5}, **options)


def _concat_convs(rng):
    inits = {"w1": weights(rng, 3, 4, 3, 3), "w2": weights(rng, 5, 4, 1, 1), "b2": rng.standard_normal(5).astype(F32)}
    nodes = [_node("Conv", ["x", "w1"], "c1", pads=[1, 1, 1, 1]), _node("Conv", ["x", "w2", "b2"], "c2"),
             _node("Concat", ["c1", "c2"], "cat", axis=1), bn_node("cat", "n"), _node("Relu", ["n"], "y")]
    return _chain(rng, (2, 4, 6, 6), nodes, inits, {"bn": 8})


def _bn_into(rng, x_shape, layer: onnx.NodeProto, inits: dict, before: list | None = None):
    """x -> BN -> `before` -> `layer` (reading 'l' and writing 'y')."""
    nodes, last = [bn_node("x", "n")], "n"
    for node in before or []:
        node.input[0], last = last, node.output[0]
    layer.input[0] = last
    return _chain(rng, x_shape, [*nodes, *(before or []), layer], inits, {"bn": x_shape[1]})


def _if_branches(rng):
    def branch(name):
        nodes = [_node("Conv", ["x", f"w_{name}"], f"{name}_c"), bn_node(f"{name}_c", f"{name}_y", f"bn_{name}")]
        output = helper.make_tensor_value_info(f"{name}_y", onnx.TensorProto.FLOAT, None)
        return helper.make_graph(nodes, name, [], [output],
                                 [numpy_helper.from_array(v, k) for k, v in bn_params(rng, 6, f"bn_{name}").items()])

    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then"), else_branch=branch("else"))
    return make([node], {"x": ((2, 4, 5, 5), F32), "cond": ((), np.bool_)}, {"y": (None, F32)},
                {"w_then": weights(rng, 6, 4, 3, 3), "w_else": weights(rng, 6, 4, 3, 3)})


def _body(nodes, inputs: dict, outputs: dict, rng, channels: int) -> onnx.GraphProto:
    value = helper.make_tensor_value_info
    return helper.make_graph(nodes, "body", [value(k, t, s) for k, (t, s) in inputs.items()],
                             [value(k, t, s) for k, (t, s) in outputs.items()],
                             [numpy_helper.from_array(v, k) for k, v in bn_params(rng, channels).items()])


def _loop_body(rng):
    FLOAT, BOOL = onnx.TensorProto.FLOAT, onnx.TensorProto.BOOL
    body = _body([_node("Identity", ["go"], "go_on"), _node("Conv", ["h", "w"], "c", pads=[1, 1, 1, 1]),
                  bn_node("c", "h_next")],
                 {"i": (onnx.TensorProto.INT64, []), "go": (BOOL, []), "h": (FLOAT, [2, 4, 5, 5])},
                 {"go_on": (BOOL, []), "h_next": (FLOAT, [2, 4, 5, 5])}, rng, 4)
    return make([helper.make_node("Loop", ["trips", "", "x"], ["y"], name="loop", body=body)],
                {"x": ((2, 4, 5, 5), F32)}, {"y": ((2, 4, 5, 5), F32)},
                {"trips": np.array(3, np.int64), "w": weights(rng, 4, 4, 3, 3)})


def _scan_body(rng):
    FLOAT = onnx.TensorProto.FLOAT
    body = _body([_node("Gemm", ["row", "w"], "g"), bn_node("g", "out")], {"row": (FLOAT, [3, 5])},
                 {"out": (FLOAT, [3, 6])}, rng, 6)
    return make([helper.make_node("Scan", ["x"], ["y"], name="scan", body=body, num_scan_inputs=1)],
                {"x": ((4, 3, 5), F32)}, {"y": (None, F32)}, {"w": weights(rng, 5, 6)})


def _conv_output_also_read(rng):
    nodes = [_node("Conv", ["x", "w"], "c"), bn_node("c", "y"), _node("Relu", ["c"], "r")]
    return make(nodes, {"x": ((2, 4, 5, 5), F32)}, {"y": (None, F32), "r": (None, F32)},
                {"w": weights(rng, 6, 4, 3, 3), **bn_params(rng, 6)})


def _training_mode(rng):
    bn = helper.make_node(BN, ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["y", "running_mean", "running_var"],
                          name="bn", training_mode=1)
    return _chain(rng, (2, 4, 5, 5), [_node("Conv", ["x", "w"], "c"), bn], {"w": weights(rng, 6, 4, 3, 3)}, {"bn": 6})


def _shared_weights(rng):
    """Two Convs sharing one weight and bias, each into its own BN (a fold must copy the weight)."""
    nodes = [_node("Conv", ["x", "w", "b"], "c1"), bn_node("c1", "n1", "bn1"), _node("Relu", ["x"], "r"),
             _node("Conv", ["r", "w", "b"], "c2"), bn_node("c2", "n2", "bn2"), _node("Add", ["n1", "n2"], "y")]
    return _chain(rng, (2, 4, 5, 5), nodes, {"w": weights(rng, 6, 4, 3, 3), "b": rng.standard_normal(6).astype(F32)},
                  {"bn1": 6, "bn2": 6})


def _conformance(name: str) -> Callable[[np.random.Generator], onnx.ModelProto]:
    from tests.conftest import CONFORMANCE

    return lambda rng: onnx.load(str(CONFORMANCE / "onnx" / "ort" / name))


PATTERNS = [
    Pattern("conv-mul-add-bn", "Conv -> per-channel Mul, Add (a BN by hand) -> BN -> Relu", _hand_scaled_conv, 1),
    Pattern("ort-conv-bn-mul-add", "onnxruntime's Conv -> BN -> Mul, Add of Unsqueezed constants (A3)",
            _conformance("fuse-conv-bn-mul-add-unsqueeze.onnx"), 1),
    Pattern("gemm-transposed", "Gemm transA=1 transB=1 alpha=0.7 beta=1.3 -> BN", _gemm_transposed, 1),
    Pattern("matmul-unsqueeze-flatten", "MatMul + bias -> Unsqueeze -> BN -> Flatten",
            lambda rng: _matmul_then(rng, (3, 6), [("Unsqueeze", {}, ["axes"])], {"axes": np.array([2, 3])},
                                     [("Flatten", {}, [])]), 1),
    Pattern("matmul-3d-transpose", "MatMul + bias on (N, T, C) -> Transpose -> BN over C",
            lambda rng: _matmul_then(rng, (2, 5, 6), [("Transpose", {"perm": [0, 2, 1]}, [])]), 1),
    Pattern("matmul-reshape-squeeze", "MatMul + bias -> Reshape (N, C, 1, 1) -> Squeeze -> BN",
            lambda rng: _matmul_then(rng, (3, 6), [("Reshape", {}, ["shape"]), ("Squeeze", {}, ["axis"])],
                                     {"shape": np.array([3, 8, 1, 1]), "axis": np.array([3])}), 1),
    Pattern("ort-matmul-reshape-transpose", "onnxruntime's MatMul -> Reshape -> Transpose -> BN (A7)",
            _conformance("fuse-matmul-bn-with-reshape.onnx"), 1),
    Pattern("ort-matmul-identity", "onnxruntime's MatMul -> Identity -> BN (A11)",
            _conformance("fuse-matmul-bn-non-ignorable-node.onnx"), 1),
    Pattern("constant-nodes", "Conv weight and BN scale/bias from Constant nodes, mean/var from ConstantOfShape",
            _constant_made, 1),
    Pattern("ir4-initializer-inputs", "Conv -> BN -> Relu -> Conv -> BN, initializers listed as inputs (IR 4)",
            lambda rng: _two_conv_bn(rng, ir=4, inputs_from_initializers=True), 2),
    Pattern("ort-2019-no-bias", "onnxruntime's 2019 Conv -> BN, initializers listed as inputs but IR 3 (constants)",
            _conformance("fuse-conv-bn-no-bias.2019.onnx"), 1),
    Pattern("shared-weights", "two Convs sharing weight and bias, each -> its own BN -> Add", _shared_weights, 2),
    Pattern("concat-of-convs", "two Convs -> channel Concat -> BN -> Relu", _concat_convs, 1),
    Pattern("bn-conv", "BN -> unpadded Conv (fold forward)",
            lambda rng: _bn_into(rng, (2, 4, 6, 6), _node("Conv", ["l", "w", "b"], "y"),
                                 {"w": weights(rng, 8, 4, 3, 3), "b": rng.standard_normal(8).astype(F32)}), 1),
    Pattern("bn-flatten-gemm", "BN -> Flatten -> Gemm transB=1 alpha beta (fold forward)",
            lambda rng: _bn_into(rng, (3, 4, 1, 1), _node("Gemm", ["l", "w", "c"], "y", transB=1, alpha=0.5, beta=2.0),
                                 {"w": weights(rng, 6, 4), "c": rng.standard_normal(6).astype(F32)},
                                 [_node("Flatten", ["n"], "f")]), 1),
    Pattern("if-branches", "Conv -> BN in both branches of an If", _if_branches, 2),
    Pattern("loop-body", "Conv -> BN in a Loop body (weight from the outer graph)", _loop_body, 1),
    Pattern("scan-body", "Gemm -> BN in a Scan body (weight from the outer graph)", _scan_body, 1),
    Pattern("opset7", "opset 7 (BatchNormalization-7, Gemm C required): Conv -> BN -> Relu -> Conv -> BN",
            lambda rng: _two_conv_bn(rng, opset=7), 2),
    Pattern("convtranspose-grouped", "ConvTranspose group=2 -> BN (scale weight axis 1 per group)",
            lambda rng: conv_bn(rng, op="ConvTranspose", group=2, c_in=4, c_out=6), 1),
    Pattern("keep-bn-padded-conv", "BN -> zero-padded Conv (the shift is no bias at the borders)",
            lambda rng: _bn_into(rng, (2, 4, 6, 6), _node("Conv", ["l", "w"], "y", pads=[1, 1, 1, 1]),
                                 {"w": weights(rng, 8, 4, 3, 3)}), 0),
    Pattern("keep-conv-output-read", "Conv -> BN, the Conv output also read by a Relu (A15)",
            _conv_output_also_read, 0),
    Pattern("keep-features-on-axis-2", "(N, C, L) MatMul -> BN with L == C: features are not the channels (E8)",
            lambda rng: _chain(rng, (2, 8, 8), [_node("MatMul", ["x", "w"], "m"), bn_node("m", "y")],
                               {"w": weights(rng, 8, 8)}, {"bn": 8}), 0),
    Pattern("keep-training-mode", "Conv -> BN training_mode=1 (batch statistics)",
            _training_mode, 0),
]
