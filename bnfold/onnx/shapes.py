"""Static shapes and element types of values, from ONNX shape inference on a weightless copy.

Folding through Reshape/Flatten/Transpose is exact only when the shapes prove where the channels go;
these facts are what the proof uses. Inference runs on a copy whose large tensors carry no data
(`bnfold.onnx.weightless`: fast, and no second copy of the weights), whose nodes are topologically
sorted and whose IR version lets inference see every initializer; a model that inference rejects
simply yields fewer facts.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, shape_inference

from bnfold.onnx.graph import DEFAULT_DOMAINS, GraphIndex, attribute, walk_graphs
from bnfold.onnx.weightless import Weightless

Shape = tuple[int | None, ...]


@dataclass
class ValueFacts:
    """Known shapes (None marks an unknown dimension) and element types, keyed by value name."""

    shapes: dict[str, Shape] = field(default_factory=dict)
    types: dict[str, int] = field(default_factory=dict)

    def shape(self, name: str) -> Shape | None:
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def dtype(self, name: str) -> np.dtype | None:
        elem_type = self.types.get(name)
        return helper.tensor_dtype_to_np_dtype(elem_type) if elem_type else None

    def rename(self, old: str, new: str) -> None:
        """`old` now goes by `new` (a folded layer took over a removed node's output name)."""
        for table in (self.shapes, self.types):
            if old in table:
                table[new] = table.pop(old)


# Ops whose first output has their first input's element type (the common ones: others are left to
# shape inference).
_SAME_TYPE_OPS = frozenset({
    "Abs", "Add", "AveragePool", "BatchNormalization", "Ceil", "Clip", "Concat", "Conv", "ConvTranspose",
    "DepthToSpace", "Div", "Dropout", "Einsum", "Elu", "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather",
    "Gelu", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "GroupNormalization", "HardSigmoid", "HardSwish",
    "Identity", "InstanceNormalization", "LRN", "LayerNormalization", "LeakyRelu", "Log", "LogSoftmax",
    "LpPool", "MatMul", "Max", "MaxPool", "Mean", "Min", "Mish", "Mul", "Neg", "PRelu", "Pad", "Pow",
    "Reciprocal", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum", "Relu", "Reshape", "Resize", "Round",
    "Selu", "Sigmoid", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt",
    "Squeeze", "Sub", "Sum", "Tanh", "Tile", "Transpose", "Unsqueeze", "Upsample"})


def traced_dtype(index: GraphIndex, name: str) -> np.dtype | None:
    """`name`'s element type, followed back through ops that keep their input's type to an initializer,
    a declared type or a Cast: no shape inference (milliseconds on every call); None where the trail ends."""
    declared = index.declared_types
    for _ in range(len(index.graph.node) + 1):
        if name in index.initializers:
            return helper.tensor_dtype_to_np_dtype(index.initializers[name].data_type)
        if name in declared:
            return helper.tensor_dtype_to_np_dtype(declared[name])
        producer = index.producers.get(name)
        if producer is None or producer.domain not in DEFAULT_DOMAINS or name != producer.output[0]:
            return None
        if producer.op_type == "Cast":
            return helper.tensor_dtype_to_np_dtype(attribute(producer, "to"))
        if producer.op_type not in _SAME_TYPE_OPS or not producer.input:
            return None
        name = producer.input[0]
    return None


def infer_facts(model: onnx.ModelProto) -> ValueFacts:
    """Shapes and types of every value shape inference can reach; never raises."""
    skeleton = _skeleton(model)
    try:
        skeleton = shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except Exception:  # inference rejects the file: keep what it records
        pass
    facts = ValueFacts()
    for index in walk_graphs(skeleton.graph):
        graph = index.graph
        for value in (*graph.input, *graph.value_info, *graph.output):
            tensor = value.type.tensor_type
            if tensor.elem_type:
                facts.types[value.name] = tensor.elem_type
            if tensor.HasField("shape"):
                facts.shapes[value.name] = tuple(
                    dim.dim_value if dim.HasField("dim_value") else None for dim in tensor.shape.dim)
        for init in graph.initializer:
            facts.types[init.name] = init.data_type
            facts.shapes[init.name] = tuple(init.dims)
    return facts


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    skeleton = Weightless(model).proto
    skeleton.ir_version = max(skeleton.ir_version, 4)  # IR 3 hides initializers that are not inputs
    for index in walk_graphs(skeleton.graph):
        _sort_nodes(index.graph)
    return skeleton


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Reorder nodes topologically (stable); files in the wild are not always sorted."""
    order = list(_topological_order(graph.node))
    if order == list(range(len(graph.node))):
        return
    nodes = [onnx.NodeProto() for _ in order]
    for target, position in zip(nodes, order):
        target.CopyFrom(graph.node[position])
    del graph.node[:]
    graph.node.extend(nodes)


def _topological_order(nodes) -> Iterator[int]:
    producer = {output: i for i, node in enumerate(nodes) for output in node.output if output}
    waiting = [{producer[name] for name in node.input if name in producer} - {i} for i, node in enumerate(nodes)]
    readers: dict[int, list[int]] = {}
    for i, deps in enumerate(waiting):
        for dep in deps:
            readers.setdefault(dep, []).append(i)
    ready = [i for i, deps in enumerate(waiting) if not deps]
    heapq.heapify(ready)
    emitted = set()
    while ready:
        i = heapq.heappop(ready)
        emitted.add(i)
        yield i
        for reader in readers.get(i, []):
            waiting[reader].discard(i)
            if not waiting[reader]:
                heapq.heappush(ready, reader)
    yield from (i for i in range(len(nodes)) if i not in emitted)  # a cycle: leave the rest as it was
