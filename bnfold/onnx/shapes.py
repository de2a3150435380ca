"""Static shapes and element types of values, from ONNX shape inference on a weightless copy.

Folding through Reshape/Flatten/Transpose is exact only when the shapes prove where the channels go;
these facts are what the proof uses. Inference runs on a copy whose large tensors carry no data
(`bnfold.onnx.weightless`: fast, and no second copy of the weights), whose nodes are topologically
sorted and whose IR version lets inference see every initializer; a model that inference rejects
simply yields fewer facts. A symbolic dim (dim_param) that a layer's weights force to one length (a
BN's channel axis, a Conv's input channels) counts as that length: no input of another length runs.
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
Dim = int | str | None  # a length, a symbol (dim_param) or unknown


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


# Ops whose (first) output has their first input's rank, and ops whose output has the highest rank of
# their inputs (they broadcast): what `traced_rank` follows.
_RANK_KEEPING_OPS = frozenset({
    "Abs", "AveragePool", "BatchNormalization", "Cast", "Ceil", "Clip", "Dropout", "Elu", "Erf", "Exp", "Floor",
    "Gelu", "GlobalAveragePool", "GlobalMaxPool", "HardSigmoid", "HardSwish", "Identity", "InstanceNormalization",
    "LRN", "LeakyRelu", "Log", "LpPool", "MaxPool", "Mish", "Neg", "PRelu", "Pad", "Reciprocal", "Relu", "Round",
    "Selu", "Sigmoid", "Softplus", "Softsign", "Sqrt", "Tanh"})
_BROADCASTING_OPS = frozenset({"Add", "Div", "Max", "Mean", "Min", "Mul", "Pow", "Sub", "Sum"})


def traced_rank(index: GraphIndex, name: str, known: dict[str, int | None], depth: int = 200) -> int | None:
    """`name`'s rank, followed back to a Conv's weight, a constant or a declared shape through ops that keep
    or broadcast ranks, as `traced_dtype` follows types; None where the trail ends. `known` holds the ranks
    traced so far (residual branches meet again at every Add)."""
    if name not in known:
        producer = index.producers.get(name)
        if name in index.initializers:
            rank = len(index.initializers[name].dims)
        elif name in index.declared_ranks:
            rank = index.declared_ranks[name]
        elif depth == 0 or producer is None or producer.domain not in DEFAULT_DOMAINS:
            rank = None
        elif producer.op_type in ("Conv", "ConvTranspose") and len(producer.input) > 1:
            rank = traced_rank(index, producer.input[1], known, depth - 1)
        elif producer.op_type in _RANK_KEEPING_OPS and name == producer.output[0]:
            rank = traced_rank(index, producer.input[0], known, depth - 1)
        elif producer.op_type in _BROADCASTING_OPS and all(producer.input):
            ranks = [traced_rank(index, value, known, depth - 1) for value in producer.input]
            rank = None if None in ranks else max(ranks)
        else:
            rank = None
        known[name] = rank
    return known[name]


def infer_facts(model: onnx.ModelProto) -> ValueFacts:
    """Shapes and types of every value shape inference can reach, a symbolic dim as the one length the
    graph forces on it (see `input_dim_sizes`); never raises."""
    inferred, classes = _inferred(_skeleton(model))
    facts = ValueFacts()
    for name, elem_type, dims in _values(inferred):
        if elem_type:
            facts.types[name] = elem_type
        if dims is not None:
            facts.shapes[name] = tuple(classes.length(dim) if isinstance(dim, str) else dim for dim in dims)
    return facts


def input_dim_sizes(model: onnx.ModelProto) -> dict[tuple[str, int], int | str]:
    """What the graph says about the dynamic dims of its inputs, keyed by (input, axis): the length an
    operator forces on it (a BN's channel axis is as long as its constant parameters, a Conv's input
    channels are its weight's), else a symbol shared by every dim that must be as long (a BN parameter
    fed as an input of shape ["C"] and the channel axis "K" of the activation it normalizes). Absent:
    the graph says nothing, or asks for two lengths at once. Never raises."""
    skeleton = _skeleton(model)
    initializers = {init.name for init in skeleton.graph.initializer}
    dynamic = {(value.name, axis): dim.dim_param for value in skeleton.graph.input if value.name not in initializers
               for axis, dim in enumerate(value.type.tensor_type.shape.dim) if not dim.HasField("dim_value")}
    if not dynamic:
        return {}
    _, classes = _inferred(skeleton)
    sizes = {key: classes.length(symbol) or classes.shared_name(symbol) for key, symbol in dynamic.items()}
    return {key: size for key, size in sizes.items() if size is not None}


def _inferred(skeleton: onnx.ModelProto) -> tuple[onnx.ModelProto, _SizeClasses]:
    """The skeleton after shape inference, and the symbols its layers tie to each other and to lengths."""
    try:
        skeleton = shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except Exception:  # inference rejects the file: keep what it records
        pass
    shapes = {name: dims for name, _, dims in _values(skeleton) if dims is not None}
    classes = _SizeClasses()
    for index in walk_graphs(skeleton.graph):
        for node in index.graph.node:
            if node.domain in DEFAULT_DOMAINS:
                for first, second in _tied_dims(node, shapes):
                    classes.tie(first, second)
    return skeleton, classes


def _values(model: onnx.ModelProto) -> Iterator[tuple[str, int, tuple[Dim, ...] | None]]:
    """(name, element type, dims) of every declared or inferred value and initializer, subgraphs included."""
    for index in walk_graphs(model.graph):
        graph = index.graph
        for value in (*graph.input, *graph.value_info, *graph.output):
            tensor = value.type.tensor_type
            dims = tuple(dim.dim_value if dim.HasField("dim_value") else dim.dim_param or None
                         for dim in tensor.shape.dim) if tensor.HasField("shape") else None
            yield value.name, tensor.elem_type, dims
        for init in graph.initializer:
            yield init.name, init.data_type, tuple(init.dims)


def _tied_dims(node: onnx.NodeProto, shapes: dict[str, tuple[Dim, ...]]) -> Iterator[tuple[Dim, Dim]]:
    """Pairs of dims that `node` needs equally long: an activation's against its layer's parameters."""
    def dim(position: int, axis: int) -> Dim:
        shape = shapes.get(node.input[position]) if position < len(node.input) and node.input[position] else None
        return shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None

    op = node.op_type
    if op in ("BatchNormalization", "InstanceNormalization"):
        for position in range(1, len(node.input)):
            yield dim(0, 1), dim(position, 0)
    elif op == "Conv":
        group, per_group = attribute(node, "group", 1), dim(1, 1)
        if group == 1 or isinstance(per_group, int):  # a symbol times a group is no symbol
            yield dim(0, 1), per_group * group if isinstance(per_group, int) else per_group
    elif op == "ConvTranspose":
        yield dim(0, 1), dim(1, 0)
    elif op == "Gemm":
        yield dim(0, 0 if attribute(node, "transA", 0) else 1), dim(1, 1 if attribute(node, "transB", 0) else 0)
    elif op == "MatMul":
        matrix = len(node.input) > 1 and len(shapes.get(node.input[1], ())) >= 2
        yield dim(0, -1), dim(1, -2 if matrix else 0)


class _SizeClasses:
    """Symbols that must be equally long, merged into classes, with the lengths each class is tied to."""

    def __init__(self) -> None:
        self._parent: dict[str, str] = {}
        self._lengths: dict[str, set[int]] = {}
        self._members: dict[str, int] = {}

    def _root(self, symbol: str) -> str:
        while self._parent.setdefault(symbol, symbol) != symbol:
            symbol = self._parent[symbol]
        return symbol

    def tie(self, first: Dim, second: Dim) -> None:
        if isinstance(first, int):
            first, second = second, first
        if not isinstance(first, str) or second is None:
            return
        root = self._root(first)
        if isinstance(second, int):
            self._lengths.setdefault(root, set()).add(second)
            return
        other = self._root(second)
        if other != root:
            self._parent[other] = root
            self._lengths.setdefault(root, set()).update(self._lengths.pop(other, ()))
            self._members[root] = self._members.get(root, 1) + self._members.pop(other, 1)

    def length(self, symbol: str | None) -> int | None:
        """The one length `symbol` is tied to; None when none (or two: no input runs the model then)."""
        lengths = self._lengths.get(self._root(symbol), set()) if symbol else set()
        return next(iter(lengths)) if len(lengths) == 1 else None

    def shared_name(self, symbol: str) -> str | None:
        """The name of every symbol tied to `symbol` and to no length; None when none is."""
        root = self._root(symbol)
        return root if self._members.get(root, 1) > 1 and not self._lengths.get(root) else None


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    skeleton = Weightless(model).proto
    skeleton.ir_version = max(skeleton.ir_version, 4)  # IR 3 hides initializers that are not inputs
    initializers = {init.name for init in skeleton.graph.initializer}
    for value in skeleton.graph.input:  # an unnamed open dim gets a name, which inference carries along
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if value.name not in initializers and not dim.HasField("dim_value") and not dim.dim_param:
                dim.dim_param = f"{value.name}[{axis}]"
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
