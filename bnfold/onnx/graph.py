"""Views of an ONNX graph: who produces and consumes each value, which values are constant, which nodes
an output needs; and deleting from a repeated field in place."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

BN_OP = "BatchNormalization"
DEFAULT_DOMAINS = ("", "ai.onnx")


def opset_version(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain the model imports."""
    for entry in model.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            return entry.version
    return 1


def attribute(node: onnx.NodeProto, name: str, default=None):
    """A node attribute's Python value, or `default` when it is absent."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


@dataclass
class GraphIndex:
    """Producers, consumers and constants of one graph (subgraphs get their own index)."""

    graph: onnx.GraphProto
    path: str = ""  # "" for the main graph, e.g. "If_0/then_branch" for a subgraph
    parent: str | None = None  # path of the enclosing graph; None for the main graph
    producers: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for node in self.graph.node:
            for output in node.output:
                if output:
                    self.producers[output] = node
            for name in node_reads(node):
                self.consumers.setdefault(name, []).append(node)
        self.initializers = {init.name: init for init in self.graph.initializer}

    @functools.cached_property
    def declared_types(self) -> dict[str, int]:
        """Element types the graph declares for its inputs and intermediate values."""
        return {value.name: value.type.tensor_type.elem_type for value in (*self.graph.input, *self.graph.value_info)
                if value.type.tensor_type.elem_type}

    @functools.cached_property
    def declared_ranks(self) -> dict[str, int]:
        """Ranks the graph declares for its inputs and intermediate values (with or without sizes)."""
        return {value.name: len(value.type.tensor_type.shape.dim) for value in (*self.graph.input, *self.graph.value_info)
                if value.type.tensor_type.HasField("shape")}

    @property
    def input_names(self) -> set[str]:
        return {value.name for value in self.graph.input}

    @property
    def output_names(self) -> set[str]:
        return {value.name for value in self.graph.output}

    def is_overridable(self, name: str) -> bool:
        """An initializer also listed as a graph input (IR < 4 style, or keep_initializers_as_inputs)."""
        return name in self.initializers and name in self.input_names

    def is_constant(self, name: str) -> bool:
        """Whether `constant(name)` has a value (without converting an initializer to find out)."""
        return name in self.initializers or self.constant(name) is not None

    def constant(self, name: str) -> np.ndarray | None:
        """The value of `name` if it is an initializer or a Constant node's output, else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            return _constant_node_value(node)
        return None


def node_reads(node: onnx.NodeProto) -> list[str]:
    """The values a node reads: its inputs, and the values its subgraphs capture from outer scopes."""
    names = [name for name in node.input if name]
    for attr in node.attribute:
        for sub in _attr_graphs(attr):
            names.extend(_outer_references(sub))
    return names


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_int"):
            return np.array(onnx.helper.get_attribute_value(attr))
        if attr.name in ("value_floats", "value_ints"):
            return np.array(onnx.helper.get_attribute_value(attr))
    return None


def _attr_graphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


def _outer_references(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads that it does not define itself (values captured from outer scopes)."""
    defined = {v.name for v in graph.input} | {i.name for i in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        defined.update(o for o in node.output if o)
        used.update(i for i in node.input if i)
        for attr in node.attribute:
            for sub in _attr_graphs(attr):
                used.update(_outer_references(sub))
    used.update(o.name for o in graph.output)
    return used - defined


def needed_nodes(nodes: list[onnx.NodeProto], outputs: set[str]) -> tuple[list[onnx.NodeProto], set[str]]:
    """The `nodes` (in order) that `outputs` depend on, values captured by subgraphs included (onnxruntime
    runs every node of a graph, whatever a run fetches), and the names of `outputs` and of every value
    those nodes read."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if any(output in needed for output in node.output):
            kept.append(node)
            needed.update(node_reads(node))
    return kept[::-1], needed


def delete_where(field, predicate) -> None:
    """Delete the elements of a repeated protobuf field that match, without copying the others."""
    for position in reversed(range(len(field))):
        if predicate(field[position]):
            del field[position]


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph, not indexed (see `walk_graphs`)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in _attr_graphs(attr):
                yield from all_graphs(sub)


def walk_graphs(graph: onnx.GraphProto, path: str = "", parent: str | None = None) -> Iterator[GraphIndex]:
    """The graph and every subgraph (If/Loop/Scan bodies), outermost first."""
    yield GraphIndex(graph, path, parent)
    for index, node in enumerate(graph.node):
        for attr in node.attribute:
            for position, sub in enumerate(_attr_graphs(attr)):
                label = node.name or f"{node.op_type}_{index}"
                suffix = attr.name if attr.type == onnx.AttributeProto.GRAPH else f"{attr.name}[{position}]"
                yield from walk_graphs(sub, f"{path}{label}/{suffix}/", path)


def node_label(node: onnx.NodeProto, prefix: str = "") -> str:
    """A stable, human name for a node: its name, else its first output (nodes may be unnamed)."""
    return prefix + (node.name or (node.output[0] if node.output else node.op_type))
