"""Small ONNX models built with onnx.helper, and the check every fold test makes: same outputs in ORT."""

from __future__ import annotations

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
            conv_attrs=None, bn_attrs=None, opset=17):
    """x -> Conv/ConvTranspose -> BN -> y."""
    k = (kernel,) * len(spatial)
    w_shape = (c_out, c_in // group, *k) if op == "Conv" else (c_in, c_out // group, *k)
    inits = {"w": weights(rng, *w_shape, dtype=dtype), **bn_params(rng, c_out, dtype=dtype)}
    if bias:
        inits["b"] = rng.standard_normal(c_out).astype(dtype)
    conv = helper.make_node(op, ["x", "w", *(["b"] if bias else [])], ["c"], name="conv", group=group,
                            **(conv_attrs or {}))
    return make([conv, bn_node("c", "y", **(bn_attrs or {}))], {"x": ((2, c_in, *spatial), dtype)},
                {"y": (None, dtype)}, inits, opset=opset)


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
