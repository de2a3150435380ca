"""Values known before run time: initializers, Constant nodes and what constant subgraphs compute.

Exporters often write weights as `Constant` nodes or as small subgraphs over constants (Unsqueeze of
an initializer, ConstantOfShape, Cast); all of these count as constants. Subgraphs are evaluated with
onnx's reference evaluator, lazily and once per value, and only after shape inference has bounded what
they produce: a crafted ConstantOfShape or Expand in a 1 KB file must not allocate terabytes.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from bnfold.onnx.graph import DEFAULT_DOMAINS, GraphIndex, node_label

# Ops whose result differs from run to run: never constant, whatever their inputs.
_RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                         "Multinomial", "Bernoulli"})
# Evaluated constants may hold this many elements beyond twice the model's stored weights, in all.
SPARE_ELEMENTS = 2**24
_SHAPE_DATA = 64  # inputs up to this size reach shape inference with their values (shapes, repeats)


class Constants:
    """Resolve value names of one graph scope (and, through `parent`, the scopes around it) to arrays.

    With `strict_inputs`, an initializer that is also a graph input is not a constant: onnxruntime lets
    a caller feed it, so folding it would change the model's interface contract.
    """

    def __init__(self, index: GraphIndex, opset_imports: list[onnx.OperatorSetIdProto], *,
                 strict_inputs: bool, parent: Constants | None = None,
                 cache: dict[str, np.ndarray] | None = None) -> None:
        self.index = index
        self.opset_imports = opset_imports
        self.strict_inputs = strict_inputs
        self.parent = parent
        self._cache = {} if cache is None else cache  # evaluated values, shared across scopes: names are unique
        self._computable = self._constant_names()
        stored = sum(math.prod(init.dims) for init in index.initializers.values())
        self._budget: int = 2 * stored + (parent._budget if parent is not None else SPARE_ELEMENTS)

    def value(self, name: str) -> np.ndarray | None:
        """The array `name` always holds, or None when it is only known at run time."""
        if not name:
            return None
        if name in self._cache:
            return self._cache[name]
        if not self.is_constant(name):
            return None
        owner = self._owner(name)
        node = owner.index.producers.get(name)
        if node is None or node.op_type == "Constant":  # stored in the model: read again, never held twice
            return owner.index.constant(name)
        value = owner._evaluate(node).get(name)
        if value is not None:
            self._cache[name] = value
        return value

    def is_constant(self, name: str) -> bool:
        """Whether `name` is computable before run time (without evaluating it)."""
        owner = self._owner(name)
        return owner is not None and name in owner._computable

    def why_not(self, name: str) -> str:
        """Why `name` is not a constant, in words for a report that goes on from the value's role ("weight
        ..."). A value computed at run time is named by the node that computes it: its tensor name (an
        exporter's "/layer/Conv_output_0") says nothing more."""
        owner = self._owner(name)
        if owner is None:
            return f"{name!r} is not defined in the graph"
        if name in owner.index.initializers:
            return (f"{name!r} is an initializer that is also a graph input, so a caller may feed it "
                    "(--strict-inputs keeps such layers)")
        if name in owner.index.input_names:
            return f"{name!r} is a graph input, not a constant"
        node = owner.index.producers[name]
        return f"is computed at run time by {node.op_type} {node_label(node)}"

    def _owner(self, name: str) -> Constants | None:
        """The scope that defines `name`."""
        scope: Constants | None = self
        while scope is not None and not scope._defines(name):
            scope = scope.parent
        return scope

    def _defines(self, name: str) -> bool:
        index = self.index
        return name in index.initializers or name in index.input_names or name in index.producers

    def _constant_names(self) -> set[str]:
        """Names this scope can compute without inputs (values are evaluated only on demand)."""
        index = self.index
        names = {name for name in index.initializers
                 if not (self.strict_inputs and name in index.input_names)}
        pending = [node for node in index.graph.node if is_pure(node)]
        changed = True
        while changed:  # a fixpoint, since files are not always topologically sorted
            changed = False
            remaining = []
            for node in pending:
                if all(not name or name in names or self._outer_constant(name) for name in node.input):
                    names.update(output for output in node.output if output)
                    changed = True
                else:
                    remaining.append(node)
            pending = remaining
        return names

    def _outer_constant(self, name: str) -> bool:
        return not self._defines(name) and self.parent is not None and self.parent.is_constant(name)

    def _evaluate(self, node: onnx.NodeProto) -> dict[str, np.ndarray]:
        """Run one constant node; an evaluation failure just means "not a constant"."""
        feeds = {}
        for name in node.input:
            if name:
                value = self.value(name)
                if value is None:
                    return {}
                feeds[name] = value
        untyped = onnx.TypeProto()
        graph = helper.make_graph(
            [node], "constant", [helper.make_value_info(name, untyped) for name in feeds],
            [helper.make_value_info(name, untyped) for name in node.output if name])
        model = helper.make_model(graph, opset_imports=self.opset_imports)
        spent = sum(value.size for value in self._cache.values())
        if (_output_elements(node, feeds, self.opset_imports) or math.inf) > self._budget - spent:
            return {}  # unbounded or too large for a weight of this model: a run-time value
        try:
            results = ReferenceEvaluator(model, new_ops=[Unsqueeze]).run(None, feeds)
        except Exception:  # an op the reference evaluator lacks, or invalid attributes
            return {}
        outputs = [name for name in node.output if name]
        return {name: np.asarray(value) for name, value in zip(outputs, results)}


def _output_elements(node: onnx.NodeProto, feeds: dict[str, np.ndarray],
                     opset_imports: list[onnx.OperatorSetIdProto]) -> int | None:
    """How many elements `node` would produce on `feeds`, by shape inference; None when unknown."""
    try:
        small = [numpy_helper.from_array(value, name) for name, value in feeds.items() if value.size <= _SHAPE_DATA]
        typed = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
                 for name, value in feeds.items() if value.size > _SHAPE_DATA]
        graph = helper.make_graph([node], "bound", typed, [], small)
        inferred = shape_inference.infer_shapes(helper.make_model(graph, opset_imports=opset_imports),
                                                strict_mode=False, data_prop=True)
    except Exception:  # an op or dtype inference does not know
        return None
    shapes = {value.name: value.type.tensor_type.shape for value in inferred.graph.value_info}
    total = 0
    for name in filter(None, node.output):
        shape = shapes.get(name)
        if shape is None or not all(dim.HasField("dim_value") for dim in shape.dim):
            return None
        total += math.prod(dim.dim_value for dim in shape.dim)
    return total


def is_pure(node: onnx.NodeProto) -> bool:
    """A node whose outputs depend only on its inputs (no randomness, no subgraphs, no custom domain)."""
    return (node.domain in DEFAULT_DOMAINS and node.op_type not in _RANDOM_OPS
            and not any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                        for attr in node.attribute))


class Unsqueeze(OpRun):
    """Unsqueeze for every opset. onnx's reference inserts attribute axes one at a time, which puts
    negative axes in the wrong place ([C] with axes [-2, -1] gives (1, C, 1), not (C, 1, 1))."""

    op_domain = ""

    def _run(self, data, axes=None):
        axes = [int(axis) for axis in np.asarray(axes).reshape(-1)]
        rank = data.ndim + len(axes)
        shape = iter(data.shape)
        inserted = {axis % rank for axis in axes}
        return (np.reshape(data, [1 if axis in inserted else next(shape) for axis in range(rank)]),)
