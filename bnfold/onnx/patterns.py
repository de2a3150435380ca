"""Where an affine map folds, and why not: the analysis half of ONNX folding.

An eval-mode BN is y = scale * x + shift per channel (axis 1). It folds exactly into a weighted layer
whose output features are those channels (into the producer), into each branch of a channel Concat
(split), into every layer of an Add or Sum of layer outputs (sum: each takes the scale, one the shift),
into the layer that reads its output (into the consumer), or, summed with a Conv/Gemm/MatMul that reads
the same input, into that layer's centre tap (into a sibling: RepVGG's identity branch). Every check here is a
precondition of one of those rewrites; a failed check raises `Skip` with a reason for the user. The
graph surgery lives in `bnfold.onnx.fold`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from bnfold import foldmath
from bnfold.health import fixed_training, fold_refusal
from bnfold.layers import FoldDecision, FoldDirection, FoldStatus
from bnfold.onnx.constants import Constants
from bnfold.onnx.discover import per_activation, training_fixed_by
from bnfold.onnx.graph import BN_OP, DEFAULT_DOMAINS, GraphIndex, attribute, node_label
from bnfold.onnx.shapes import Shape, ValueFacts

# Ops that only move data: folding through them is exact when the shapes prove where channels go.
SHAPE_OPS = frozenset({"Identity", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"})
# Padding by copying values (not zeros) commutes with a per-channel map on the axes it pads.
_COPY_PAD_MODES = ("reflect", "edge", "wrap")
# Readers of a value's shape only: folding changes values, never shapes, so they do not block a fold.
SHAPE_READERS = ("Shape", "Size")
# Constant per-channel arithmetic after a Conv (a BN written by hand) folds like a BN.
ELEMENTWISE_OPS = frozenset({"Mul", "Add", "Sub", "Div"})
_CONV_OPS = ("Conv", "ConvTranspose")
_MATRIX_OPSET = 7  # Gemm and Add broadcast without a `broadcast` attribute from opset 7


class Skip(Exception):
    """A fold that is not provably exact. `specific` reasons name a weighted layer that could not take
    the BN; generic ones only say there is none."""

    def __init__(self, reason: str, specific: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.specific = specific


@dataclass
class Scope:
    """One graph as the analysis sees it."""

    index: GraphIndex
    constants: Constants
    facts: ValueFacts
    opset: int
    readers: Callable[[str], list[onnx.NodeProto]]  # readers of a name anywhere in the model

    def label(self, node: onnx.NodeProto) -> str:
        return node_label(node, self.index.path)

    def producer(self, name: str) -> onnx.NodeProto | None:
        return self.index.producers.get(name)

    def value_readers(self, name: str) -> list[onnx.NodeProto]:
        """Nodes reading the values of `name` (Shape and Size read only its shape)."""
        return [node for node in self.index.consumers.get(name, [])
                if not (is_op(node, *SHAPE_READERS) and list(node.input) == [name])]

    def sole_reader(self, name: str) -> onnx.NodeProto | None:
        """The one node reading the values of `name`, when exactly one does and it is no graph output."""
        readers = self.value_readers(name)
        if len(readers) != 1 or name in self.index.output_names:
            return None
        return readers[0]

    def is_chain_op(self, node: onnx.NodeProto | None) -> bool:
        """A node that moves values without computing new ones (a shape op or a copying Pad)."""
        if is_op(node, "Pad"):
            return _text(attribute(node, "mode", "constant")) in _COPY_PAD_MODES
        return is_op(node, *SHAPE_OPS)


def describe(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node_label(node)}"


def is_op(node: onnx.NodeProto | None, *ops: str) -> bool:
    return node is not None and node.op_type in ops and node.domain in DEFAULT_DOMAINS


@dataclass
class Affine:
    """A per-channel map y = scale * x + shift in float64 (None: identity part)."""

    scale: np.ndarray | None
    shift: np.ndarray | None
    dtype: np.dtype

    def sliced(self, start: int, stop: int) -> Affine:
        return Affine(None if self.scale is None else self.scale[start:stop],
                      None if self.shift is None else self.shift[start:stop], self.dtype)


@dataclass
class Layer:
    """A Conv, ConvTranspose, Gemm or MatMul (with its constant bias Add) and its constant weights."""

    node: onnx.NodeProto
    weight: np.ndarray
    bias: np.ndarray | None
    bias_add: onnx.NodeProto | None = None  # MatMul only: Add(MatMul, constant bias)

    @property
    def op(self) -> str:
        return self.node.op_type

    @property
    def last(self) -> onnx.NodeProto:
        """The node whose output is the layer's output (the bias Add, when there is one)."""
        return self.bias_add if self.bias_add is not None else self.node

    @property
    def output(self) -> str:
        return self.last.output[0]

    @property
    def weight_name(self) -> str:
        return self.node.input[1]

    @property
    def bias_name(self) -> str | None:
        return _bias_name(self.node, self.bias_add)

    @property
    def group(self) -> int:
        return int(attribute(self.node, "group", 1))

    @property
    def trans_b(self) -> bool:
        return bool(attribute(self.node, "transB", 0))

    @property
    def out_channels(self) -> int:
        shape = self.weight.shape
        if self.op == "ConvTranspose":
            return shape[1] * self.group
        if self.op == "Gemm":
            return shape[0] if self.trans_b else shape[1]
        return shape[1] if self.op == "MatMul" else shape[0]

    @property
    def in_channels(self) -> int:
        shape = self.weight.shape
        if self.op == "Conv":
            return shape[1] * self.group
        if self.op == "Gemm":
            return shape[1] if self.trans_b else shape[0]
        return shape[0]


@dataclass(frozen=True)
class Link:
    """One weighted layer an affine map folds into, named by output names at the time of the fold."""

    affine: str  # output of the BN (or Mul/Add/Sub/Div) that disappears
    layer: str  # first output of the Conv/ConvTranspose/Gemm/MatMul that takes the map
    bias_add: str | None = None  # output of the MatMul's bias Add, folded along
    start: int = 0  # the channels of the map this layer takes (a Concat branch); stop None: all
    stop: int | None = None
    gemm: bool = False  # rewrite MatMul (+ Add) as one Gemm (its input is 2-D)
    shift: bool = True  # False: a summed layer that takes only the scale (another one takes the shift)

    def share(self, affine: Affine, channels: int) -> Affine:
        """The part of the map this layer takes: its slice of the channels, with the shift or without."""
        part = affine.sliced(self.start, self.stop or channels)
        return part if self.shift else Affine(part.scale, None, part.dtype)


@dataclass(frozen=True)
class FoldAction:
    """One rewrite, replayable on a fresh copy of the model the plan was made for."""

    graph: str  # GraphIndex.path of the graph it happens in
    direction: FoldDirection
    links: tuple[Link, ...]
    shared: bool = False  # the layers share one weight: fold it once and point all of them at it


def read_layer(scope: Scope, node: onnx.NodeProto, bias_add: onnx.NodeProto | None = None) -> Layer:
    """The layer's constant weights (the data input is input 0), or Skip when they are not constant."""
    if len(node.input) < 2 or not node.input[1]:
        raise Skip(f"{describe(node)} has no weight input")
    constants = scope.constants
    for name in (node.input[1], _bias_name(node, bias_add)):
        dequantize = _dequantizer(scope, name) if name else None
        if dequantize is not None:
            raise Skip(f"{describe(node)} input {name!r} is dequantized by {describe(dequantize)}: folding would "
                       "replace its quantized values with float ones (fold before quantizing)")
    weight = constants.value(node.input[1])
    if weight is None:
        raise Skip(f"{describe(node)} weight {constants.why_not(node.input[1])}")
    layer = Layer(node, weight, None, bias_add)
    bias_name = layer.bias_name
    if bias_name:
        layer.bias = constants.value(bias_name)
        if layer.bias is None:
            raise Skip(f"{describe(node)} bias {constants.why_not(bias_name)}")
    _check_layer(scope, layer)
    return layer


def _bias_name(node: onnx.NodeProto, bias_add: onnx.NodeProto | None) -> str | None:
    if bias_add is not None:
        return next(name for name in bias_add.input if name != node.output[0])
    return node.input[2] if len(node.input) > 2 and node.input[2] else None


def _dequantizer(scope: Scope, name: str) -> onnx.NodeProto | None:
    """The DequantizeLinear that constant `name` is computed from, if any (a QDQ model's quantized weight)."""
    pending, seen = [name], set()
    while pending:
        value = pending.pop()
        node = scope.producer(value)
        if node is None or id(node) in seen or not scope.constants.is_constant(value):
            continue
        if node.op_type == "DequantizeLinear":
            return node
        seen.add(id(node))
        pending.extend(value for value in node.input if value)
    return None


def _check_layer(scope: Scope, layer: Layer) -> None:
    weight, node = layer.weight, layer.node
    if weight.dtype.kind != "f" and weight.dtype.name != "bfloat16":
        raise Skip(f"{describe(node)} has {weight.dtype.name} weights; only floating point folds")
    if layer.op in _CONV_OPS and (weight.ndim < 3 or layer.group < 1 or weight.shape[0] % layer.group):
        raise Skip(f"{describe(node)} weight {weight.shape} does not fit group={layer.group}")
    if layer.op in ("Gemm", "MatMul"):
        if weight.ndim != 2:
            raise Skip(f"{describe(node)} has a {weight.ndim}-D weight; only 2-D weights fold")
        if scope.opset < _MATRIX_OPSET:
            raise Skip(f"{describe(node)}: Gemm/MatMul folds need opset {_MATRIX_OPSET} or later")
    bias = layer.bias
    if bias is not None and not (bias.shape == (layer.out_channels,) if layer.op in _CONV_OPS
                                 else bias.shape[-1:] in ((), (1,), (layer.out_channels,))):
        raise Skip(f"{describe(node)} bias {bias.shape} does not fit its {layer.out_channels} output channels")


def _matmul_with_bias(scope: Scope, add: onnx.NodeProto) -> Layer | None:
    """Add(MatMul(x, W), b) with b constant along the MatMul's output features only."""
    for position in (0, 1):
        matmul = scope.producer(add.input[position])
        if not is_op(matmul, "MatMul") or scope.sole_reader(matmul.output[0]) is not add:
            continue
        bias = scope.constants.value(add.input[1 - position])
        if bias is None:
            return None
        layer = read_layer(scope, matmul, add)
        rank = scope.facts.rank(add.output[0])
        fits = bias.ndim == 0 or (bias.shape[-1] in (1, layer.out_channels)
                                  and all(size == 1 for size in bias.shape[:-1]))
        return layer if fits and rank is not None and bias.ndim <= rank else None
    return None


def bn_affine(scope: Scope, bn: onnx.NodeProto) -> Affine:
    """The BN's eval-mode map, or Skip when the BN itself cannot fold anywhere."""
    if len(bn.input) < 5 or not all(bn.input[1:5]):
        raise Skip("BN lacks one of its scale, bias, mean and variance inputs")
    if fixed_by := training_fixed_by(bn, scope.opset, scope.index):
        raise Skip(fixed_training(fixed_by))  # as discovery marks it training_fixed
    optional = [name for name in bn.output[1:] if name]
    if optional:
        raise Skip(f"BN has optional output {optional[0]!r} (running statistics), so it runs in training mode")
    params = []
    for role, name in zip(("scale", "bias", "mean", "variance"), bn.input[1:5]):
        value = scope.constants.value(name)
        if value is None:
            raise Skip(f"BN {role} {scope.constants.why_not(name)}")
        params.append(value)
    sizes = {value.size for value in params}
    if len(sizes) != 1 or any(value.ndim != 1 for value in params):
        raise Skip("BN parameters are not vectors of one length "
                   f"({', '.join(str(value.shape) for value in params)})")
    dtypes = {value.dtype for value in params}
    x_dtype = scope.facts.dtype(bn.input[0])
    if x_dtype is not None:
        dtypes.add(x_dtype)
    if len(dtypes) != 1:
        raise Skip(f"mixed dtypes ({', '.join(sorted(d.name for d in dtypes))}): folding would change "
                   "the arithmetic")
    channels = sizes.pop()
    x_shape = scope.facts.shape(bn.input[0])
    if x_shape is not None and len(x_shape) > 1 and x_shape[1] not in (None, channels):
        raise Skip(f"channel count mismatch: BN has {channels} channels of parameters but its input has "
                   f"{x_shape[1]} on axis 1; the model cannot run")
    scale, shift = foldmath.bn_affine(*params, float(attribute(bn, "epsilon", 1e-5)))
    refusal = fold_refusal(scale, shift, params[3])
    if refusal:
        raise Skip(refusal)
    return Affine(scale, shift, params[0].dtype)


def planned_bn_affine(scope: Scope, bn: onnx.NodeProto) -> Affine:
    """`bn_affine` of a BN whose statistics are proven per channel. Planning only: a plan is applied
    without shape facts, and the rank that proved it does not change."""
    rank = scope.facts.rank(bn.input[0])
    if per_activation(bn, scope.opset, rank):
        raise Skip("spatial=0: statistics per activation, not per channel" if rank is not None else
                   "spatial=0: statistics per activation, which are per channel only on an (N, C) input, and "
                   "the rank of this BN's input is unknown")
    return bn_affine(scope, bn)


def elementwise_affine(scope: Scope, node: onnx.NodeProto, layer: Layer) -> Affine | None:
    """Mul/Add/Sub/Div of `layer`'s output by a constant that is the same within each channel."""
    data = layer.output
    if node.input[0] != data and (node.op_type in ("Sub", "Div") or node.input[1] != data):
        return None
    constant = scope.constants.value(node.input[1] if node.input[0] == data else node.input[0])
    rank, channels = layer.weight.ndim, layer.out_channels
    if constant is None or constant.ndim > rank or constant.dtype != layer.weight.dtype:
        return None
    full = (1,) * (rank - constant.ndim) + constant.shape
    if any(size != 1 for axis, size in enumerate(full) if axis != 1) or full[1] not in (1, channels):
        return None
    vector = np.broadcast_to(np.asarray(constant, np.float64).reshape(-1), (channels,)).copy()
    if not np.all(np.isfinite(vector)) or (node.op_type == "Div" and np.any(vector == 0)):
        return None
    if node.op_type in ("Mul", "Div"):
        return Affine(vector if node.op_type == "Mul" else 1.0 / vector, None, constant.dtype)
    return Affine(None, vector if node.op_type == "Add" else -vector, constant.dtype)


def analyze(scope: Scope, node: onnx.NodeProto) -> tuple[FoldAction, list[FoldDecision]] | None:
    """The fold of one BN or elementwise node, with decisions for the BN layers it removes.

    Raises Skip for a BN that cannot fold; returns None for elementwise nodes that are not hand-written BNs.
    """
    if is_op(node, BN_OP):
        return _analyze_bn(scope, node)
    if is_op(node, *ELEMENTWISE_OPS) and len(node.input) == 2 and scope.opset >= _MATRIX_OPSET:
        return _analyze_elementwise(scope, node)
    return None


def _analyze_elementwise(scope: Scope, node: onnx.NodeProto):
    for data in node.input:
        producer = scope.producer(data)
        if is_op(producer, *_CONV_OPS) and scope.sole_reader(data) is node:
            try:
                layer = read_layer(scope, producer)
            except Skip:
                return None
            if elementwise_affine(scope, node, layer) is None:
                return None
            link = Link(node.output[0], producer.output[0])
            return FoldAction(scope.index.path, FoldDirection.INTO_PRODUCER, (link,)), []
    return None


def _analyze_bn(scope: Scope, bn: onnx.NodeProto) -> tuple[FoldAction, list[FoldDecision]]:
    affine = planned_bn_affine(scope, bn)
    try:
        return _into_producers(scope, bn, affine)
    except Skip as backward:
        try:
            return _into_consumer(scope, bn, affine)
        except Skip as forward:
            try:
                return _into_sibling(scope, bn, affine)
            except Skip as sibling:
                specific = [skip.reason for skip in (backward, forward, sibling) if skip.specific]
                reason = "; ".join(specific) or f"nothing to fold into: {backward.reason} and {forward.reason}"
                raise Skip(reason) from None


def _decision(scope: Scope, bn: onnx.NodeProto, layers: list[Layer], direction: FoldDirection) -> FoldDecision:
    biased = next((layer for layer in layers if layer.bias is not None), None)
    producer_bias = (f"{biased.op} {node_label(biased.node)}" if biased is not None and direction not in (
        FoldDirection.INTO_CONSUMER, FoldDirection.INTO_SIBLING) else None)
    return FoldDecision(scope.label(bn), FoldStatus.FOLDABLE, [scope.label(layer.node) for layer in layers],
                        direction, producer_bias=producer_bias)


def _into_producers(scope: Scope, bn: onnx.NodeProto, affine: Affine):
    layers, direction = _producer_layers(scope, bn.input[0], bn, 1)
    channels = affine.scale.size
    sizes = [layer.out_channels for layer in layers]
    if direction is FoldDirection.SUM and len(set(sizes)) > 1:
        terms = " + ".join(f"{layer.out_channels} from {describe(layer.node)}" for layer in layers)
        raise Skip(f"the sum broadcasts over channels ({terms})")
    total = sum(sizes) if direction is FoldDirection.SPLIT else sizes[0]
    if total != channels:
        names = " + ".join(f"{layer.out_channels} ({describe(layer.node)})" for layer in layers)
        raise Skip(f"channel count mismatch: BN has {channels} channels but its input has {names}; "
                   "the model cannot run")
    for layer in layers:
        if layer.weight.dtype != affine.dtype:
            raise Skip(f"mixed dtypes: {describe(layer.node)} is {layer.weight.dtype.name}, BN is "
                       f"{affine.dtype.name}")
    path = scope.index.path
    if direction is FoldDirection.SUM:
        carrier = next((layer for layer in layers if layer.bias is not None), layers[0])  # spares a new bias
        links = tuple(_link(scope, bn, layer, shift=layer is carrier) for layer in layers)
        return FoldAction(path, direction, links), [_decision(scope, bn, layers, direction)]
    if direction is FoldDirection.SPLIT:
        links, start = [], 0
        for layer in layers:
            stop = start + layer.out_channels
            links.append(_link(scope, bn, layer, start, stop))
            start = stop
        return (FoldAction(path, FoldDirection.SPLIT, tuple(links)),
                [_decision(scope, bn, layers, FoldDirection.SPLIT)])
    group = _shared_group(scope, bn, layers[0], affine)
    action = FoldAction(path, FoldDirection.INTO_PRODUCER,
                        tuple(_link(scope, member_bn, member) for member_bn, member in group),
                        shared=len(group) > 1)
    return action, [_decision(scope, member_bn, [member], FoldDirection.INTO_PRODUCER)
                    for member_bn, member in group]


def _link(scope: Scope, affine_node: onnx.NodeProto, layer: Layer, start: int = 0, stop: int | None = None,
          shift: bool = True) -> Link:
    gemm = layer.op == "MatMul" and scope.facts.rank(layer.node.input[0]) == 2
    bias_add = layer.bias_add.output[0] if layer.bias_add is not None else None
    return Link(affine_node.output[0], layer.node.output[0], bias_add, start, stop, gemm, shift)


def _walk_back(scope: Scope, value: str) -> tuple[onnx.NodeProto | None, list[onnx.NodeProto]]:
    """The first non-shape node above `value`, and the shape ops in between (in data-flow order)."""
    chain: list[onnx.NodeProto] = []
    node = scope.producer(value)
    while scope.is_chain_op(node) and len(chain) <= len(scope.index.graph.node):  # a cycle ends the walk
        chain.insert(0, node)
        node = scope.producer(node.input[0])
    return node, chain


def _producer_layers(scope: Scope, value: str, reader: onnx.NodeProto,
                     axis: int) -> tuple[list[Layer], FoldDirection]:
    """The layers whose output features reach `value` on `axis`: one producer (INTO_PRODUCER), the
    branches of a Concat (SPLIT) or the terms of a sum (SUM)."""
    node, chain = _walk_back(scope, value)
    if node is None:
        source = chain[0].input[0] if chain else value
        what = "a constant" if scope.constants.is_constant(source) else "a graph input"
        raise Skip(f"its input {source!r} is {what}", specific=False)
    if is_op(node, "Concat"):
        rank = scope.facts.rank(node.output[0])
        if rank is None:
            raise Skip(f"the rank of {describe(node)}'s output is unknown")
        concat_axis = int(attribute(node, "axis", 1)) % rank
        layers = [layer for name in node.input
                  for layer in _branch(scope, node, name, concat_axis, FoldDirection.SPLIT)]
        _check_path(scope, node, chain, reader, concat_axis, sum(layer.out_channels for layer in layers), axis)
        return layers, FoldDirection.SPLIT
    if _is_sum(scope, node):
        moving = [step for step in chain if step.op_type != "Identity"]
        if moving:
            raise Skip(f"{describe(moving[0])} between {describe(node)} and it may move the channels")
        rank = scope.facts.rank(node.output[0])
        layers = []
        for name in node.input:  # broadcasting aligns trailing axes
            term_rank = scope.facts.rank(name)
            if rank is None or term_rank is None or term_rank < rank - axis:
                raise Skip(f"{describe(node)} may broadcast {name!r} across the channel axis")
            layers += _branch(scope, node, name, axis - rank + term_rank, FoldDirection.SUM)
        _check_path(scope, node, chain, reader, axis, layers[0].out_channels, axis)
        return layers, FoldDirection.SUM
    layer = _as_producer(scope, node)
    rank = scope.facts.rank(layer.output)
    feature_axis = 1 if layer.op != "MatMul" else (rank - 1 if rank is not None else None)
    if feature_axis is None:
        raise Skip(f"the rank of {describe(node)}'s output is unknown, so its feature axis is too")
    _check_path(scope, layer.last, chain, reader, feature_axis, layer.out_channels, axis)
    return [layer], FoldDirection.INTO_PRODUCER


def _is_sum(scope: Scope, node: onnx.NodeProto) -> bool:
    """An Add or Sum of run-time values only (Add of a constant is a bias or a hand-written shift)."""
    return (is_op(node, "Add", "Sum") and scope.opset >= _MATRIX_OPSET and all(node.input)
            and not any(scope.constants.is_constant(name) for name in node.input))


def _branch(scope: Scope, node: onnx.NodeProto, name: str, axis: int, combined: FoldDirection) -> list[Layer]:
    """The layers behind input `name` of a Concat (SPLIT) or sum (SUM) `node`: a producer, or more
    of the same combination (a Concat of Concats, a sum of sums)."""
    if list(node.input).count(name) > 1:
        raise Skip(f"{describe(node)} reads {name!r} twice")
    try:
        layers, direction = _producer_layers(scope, name, node, axis)
    except Skip as skip:
        raise Skip(f"{describe(node)} input {name!r}: {skip.reason}") from None
    if direction not in (FoldDirection.INTO_PRODUCER, combined):
        raise Skip(f"{describe(node)} input {name!r} is a {direction.value} of layers, not one layer's output")
    return layers


def _as_producer(scope: Scope, node: onnx.NodeProto) -> Layer:
    if is_op(node, "Conv", "ConvTranspose", "Gemm", "MatMul"):
        return read_layer(scope, node)
    if is_op(node, "Add"):
        layer = _matmul_with_bias(scope, node)
        if layer is not None:
            return layer
    raise Skip(f"its input comes from {describe(node)}", specific=False)


def _check_path(scope: Scope, head: onnx.NodeProto, chain: list[onnx.NodeProto], reader: onnx.NodeProto,
                axis: int, channels: int, wanted: int) -> None:
    """Every value from `head` through `chain` to `reader` has one reader, and channels land on `wanted`."""
    nodes = [head, *chain]
    for node, next_node in zip(nodes, [*chain, reader]):
        value = node.output[0]
        others = [other for other in scope.value_readers(value) if other is not next_node]
        if others:
            raise Skip(f"{describe(node)} output {value!r} also feeds {describe(others[0])}")
        if value in scope.index.output_names:
            raise Skip(f"{describe(node)} output {value!r} is also a graph output")
    landed = track_axis(scope, chain, axis, channels)
    if channels != 1 and landed != wanted:
        where = "an unknown axis" if landed is None else f"axis {landed}"
        raise Skip(f"the channel axis does not line up: {describe(head)} puts its {channels} features on "
                   f"{where} of the BN input, which normalizes axis {wanted}")


def track_axis(scope: Scope, chain: list[onnx.NodeProto], axis: int, channels: int) -> int | None:
    """The axis that holds the channels after the chain ops in `chain`, or None when not provable."""
    facts = scope.facts
    for node in chain:
        if node.op_type == "Identity":
            continue
        if node.op_type == "Pad":
            if not _pads_spare(scope, node, axis):
                return None
            continue
        if node.op_type == "Transpose":
            rank = facts.rank(node.input[0])
            perm = attribute(node, "perm") or (list(reversed(range(rank))) if rank is not None else None)
            if perm is None or axis not in perm:
                return None
            axis = list(perm).index(axis)
            continue
        axis = _reshaped_axis(facts.shape(node.input[0]), facts.shape(node.output[0]), axis, channels)
        if axis is None:
            return None
    return axis


def _reshaped_axis(source: Shape | None, target: Shape | None, axis: int, channels: int) -> int | None:
    """Where axis `axis` of `source` (size `channels`) lands in `target`, if the row-major layout proves it.

    Element i has channel (i // inner) % channels, inner = product of the dims after the axis; the
    same holds in `target` exactly on an axis of size `channels` with the same inner product.
    """
    if source is None or target is None or axis >= len(source) or any(d is None for d in source[axis + 1:]):
        return None
    inner = int(np.prod(source[axis + 1:], dtype=np.int64))
    product = 1
    for candidate in reversed(range(len(target))):
        size = target[candidate]
        if size is None or size == 0:
            return None
        if product == inner and size == channels:
            return candidate
        product *= size
        if product > inner:
            return None
    return None


def _sharers(scope: Scope, layer: Layer) -> list[onnx.NodeProto]:
    """Other nodes reading the layer's weight or bias."""
    own = {id(layer.node), id(layer.bias_add)}
    return [node for name in (layer.weight_name, layer.bias_name) if name
            for node in scope.readers(name) if id(node) not in own]


def _pads_spare(scope: Scope, pad: onnx.NodeProto, axis: int) -> bool:
    """Whether the Pad leaves `axis` alone (its pads are known and zero there)."""
    if scope.opset < 11:
        pads = attribute(pad, "pads")
        axes = None
    else:
        pads = scope.constants.value(pad.input[1]) if len(pad.input) > 1 else None
        axes = scope.constants.value(pad.input[3]) if len(pad.input) > 3 and pad.input[3] else None
    rank = scope.facts.rank(pad.input[0])
    if pads is None or rank is None:
        return False
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    axes = range(rank) if axes is None else [int(a) % rank for a in np.asarray(axes).reshape(-1)]
    half = len(pads) // 2
    return all(pads[i] == 0 and pads[i + half] == 0 for i, padded in enumerate(axes) if padded == axis)


def _shared_group(scope: Scope, bn: onnx.NodeProto, layer: Layer,
                  affine: Affine) -> list[tuple[onnx.NodeProto, Layer]]:
    """The (BN, layer) pairs that fold together: when every user of a shared weight is an identical
    layer followed by an identical BN, one folded weight serves them all. Otherwise the layer folds
    alone, into copies of the weights (the other users keep the originals)."""
    try:
        return _identical_users(scope, bn, layer, affine)
    except Skip:
        return [(bn, layer)]


def _identical_users(scope: Scope, bn: onnx.NodeProto, layer: Layer,
                     affine: Affine) -> list[tuple[onnx.NodeProto, Layer]]:
    others = _sharers(scope, layer)
    if not others:
        return [(bn, layer)]
    if layer.op == "MatMul":
        raise Skip("a shared MatMul weight")
    group = [(bn, layer)]
    signature = _signature(layer.node)
    seen = {id(layer.node)}
    for other in others:
        if id(other) in seen:
            continue
        seen.add(id(other))
        if _signature(other) != signature or scope.producer(other.output[0]) is not other:
            raise Skip("not an identical layer")
        other_bn = scope.sole_reader(other.output[0])
        if not is_op(other_bn, BN_OP) or other_bn.input[0] != other.output[0]:
            raise Skip("no BN of its own after it")
        other_affine = planned_bn_affine(scope, other_bn)
        if not (np.array_equal(other_affine.scale, affine.scale)
                and np.array_equal(other_affine.shift, affine.shift)):
            raise Skip("a different BN")
        group.append((other_bn, read_layer(scope, other)))
    return group


def _signature(node: onnx.NodeProto) -> tuple:
    """What two layers must share to compute the same function of their data input."""
    return (node.op_type, node.domain, tuple(node.input[1:]),
            tuple(sorted(attr.SerializeToString(deterministic=True) for attr in node.attribute)))


def _into_consumer(scope: Scope, bn: onnx.NodeProto, affine: Affine):
    value, chain = bn.output[0], []
    while True:
        if value in scope.index.output_names:
            raise Skip("its output is a graph output", specific=False)
        readers = scope.value_readers(value)
        if len(readers) != 1:
            raise Skip(f"its output feeds {len(readers)} nodes" if readers else "its output is unused",
                       specific=False)
        node = readers[0]
        if not (scope.is_chain_op(node) and node.input[0] == value):
            break
        chain.append(node)
        value = node.output[0]
    if is_op(node, "ConvTranspose"):
        raise Skip(f"{describe(node)} follows it: a shift before a transposed convolution is no bias "
                   "(border outputs see fewer taps)")
    if not is_op(node, "Conv", "Gemm", "MatMul") or node.input[0] != value:
        raise Skip(f"its output feeds {describe(node)}", specific=False)
    bias_add = None
    if is_op(node, "MatMul"):
        add = scope.sole_reader(node.output[0])
        bias_add = add if is_op(add, "Add") and _matmul_with_bias(scope, add) is not None else None
    layer = read_layer(scope, node, bias_add)
    channels = affine.scale.size
    if is_op(node, "Gemm") and attribute(node, "transA", 0):
        raise Skip(f"{describe(node)} transposes its input (transA=1), so the BN channels are not its features")
    rank = scope.facts.rank(value)
    if layer.op == "MatMul" and rank is None:
        raise Skip(f"the rank of {describe(node)}'s input is unknown, so its feature axis is too")
    wanted = rank - 1 if layer.op == "MatMul" else 1
    landed = track_axis(scope, chain, 1, channels)
    if channels != 1 and landed != wanted:
        raise Skip(f"the channel axis does not line up: {describe(node)} contracts axis {wanted} of its "
                   f"input, but the BN channels are on axis {landed}")
    if layer.in_channels != channels:
        raise Skip(f"channel count mismatch: {describe(node)} takes {layer.in_channels} input channels, "
                   f"BN has {channels}; the model cannot run")
    if layer.weight.dtype != affine.dtype:
        raise Skip(f"mixed dtypes: {describe(node)} is {layer.weight.dtype.name}, BN is {affine.dtype.name}")
    if layer.op == "Conv" and _zero_pads(node, layer.weight) and np.any(affine.shift != 0):
        raise Skip(f"{describe(node)} zero-pads its input: the padded border would see the BN shift, "
                   "so the fold would not be exact")
    link = Link(bn.output[0], node.output[0], bias_add.output[0] if bias_add is not None else None,
                gemm=layer.op == "MatMul" and rank == 2)
    return (FoldAction(scope.index.path, FoldDirection.INTO_CONSUMER, (link,)),
            [_decision(scope, bn, [layer], FoldDirection.INTO_CONSUMER)])


def _into_sibling(scope: Scope, bn: onnx.NodeProto, affine: Affine):
    """BN(x) summed with a Conv, Gemm or MatMul that reads x: into that layer's centre tap (its diagonal)."""
    term, _ = summed_steps(scope, bn.output[0])
    readers = scope.value_readers(term)
    add = next((node for node in readers if _is_sum(scope, node)), None)
    if add is None or list(add.input).count(term) > 1:
        raise Skip("its output feeds no sum", specific=False)
    siblings = [(layer, name, reader) for name, reader in _sum_terms(scope, _whole_sum(scope, add)) if name != term
                for layer in [_reader_of(scope, name, bn.input[0])] if layer is not None]
    if not siblings:
        raise Skip("no layer summed with it reads its input", specific=False)
    others = [node for node in readers if node is not add]
    if others or term in scope.index.output_names:
        also = describe(others[0]) if others else "a graph output"
        raise Skip(f"it feeds a sum beside {describe(siblings[0][0])} but is also {also}")
    reasons = []
    for node, name, reader in siblings:
        try:
            layer = _sibling_layer(scope, node, name, reader, bn, affine)
        except Skip as skip:
            reasons.append(skip.reason)
            continue
        link = _link(scope, bn, layer)
        return (FoldAction(scope.index.path, FoldDirection.INTO_SIBLING, (link,)),
                [_decision(scope, bn, [layer], FoldDirection.INTO_SIBLING)])
    raise Skip(f"the summed {'layer' if len(reasons) == 1 else 'layers'} reading its input cannot take it "
               f"({', '.join(reasons)})")


def summed_steps(scope: Scope, value: str) -> tuple[str, list[onnx.NodeProto]]:
    """The value that a BN output `value` reaches through scalar constant Add/Sub/Mul/Div steps, each read
    by the next alone (MobileOne's `0 + identity_out`), and those steps."""
    steps: list[onnx.NodeProto] = []
    while (node := scope.sole_reader(value)) is not None and _scalar_step(scope, node, value) is not None:
        steps.append(node)
        value = node.output[0]
    return value, steps


def then_steps(scope: Scope, affine: Affine, value: str, steps: list[onnx.NodeProto]) -> Affine:
    """The BN's map followed by `steps`, the scalar steps `summed_steps` found after its output `value`."""
    scale, shift = affine.scale, affine.shift
    for node in steps:
        kind, x_first, constant = _scalar_step(scope, node, value)
        scale, shift = foldmath.compose_step(kind, x_first, scale, shift, constant)
        value = node.output[0]
    return Affine(scale, shift, affine.dtype)


def _scalar_step(scope: Scope, node: onnx.NodeProto, value: str) -> tuple[str, bool, np.ndarray] | None:
    """(kind, value first, constant) of `value <op> c` or `c <op> value` with one constant number c."""
    if not is_op(node, *ELEMENTWISE_OPS) or len(node.input) != 2 or list(node.input).count(value) != 1:
        return None
    x_first = node.input[0] == value
    constant = scope.constants.value(node.input[1 if x_first else 0])
    if constant is None or constant.size != 1 or constant.ndim > 1 or (node.op_type == "Div" and not x_first):
        return None
    return node.op_type.lower(), x_first, np.asarray(constant, np.float64).reshape(1)


def _whole_sum(scope: Scope, add: onnx.NodeProto) -> onnx.NodeProto:
    """The last node of the chain of sums `add` is part of (each partial sum read by the next alone)."""
    while _is_sum(scope, reader := scope.sole_reader(add.output[0])):
        add = reader
    return add


def _sum_terms(scope: Scope, add: onnx.NodeProto) -> list[tuple[str, onnx.NodeProto]]:
    """(term, the sum that reads it) of a chain of sums whose partial sums only the next one reads."""
    terms = []
    for name in add.input:
        inner = scope.producer(name)
        if inner is not None and _is_sum(scope, inner) and scope.sole_reader(name) is add:
            terms += _sum_terms(scope, inner)
        else:
            terms.append((name, add))
    return terms


def _reader_of(scope: Scope, name: str, x: str) -> onnx.NodeProto | None:
    """The Conv, Gemm or MatMul (or MatMul's bias Add) that makes `name` from `x` (directly, through a Pad, or
    followed by a BN), or None."""
    node = scope.producer(name)
    if is_op(node, BN_OP):
        node = scope.producer(node.input[0])
    if is_op(node, "Add"):
        matmul = next((scope.producer(i) for i in node.input if is_op(scope.producer(i), "MatMul")), None)
        return node if matmul is not None and matmul.input[0] == x else None
    if not is_op(node, "Conv", "Gemm", "MatMul"):
        return None
    pad = scope.producer(node.input[0])
    return node if node.input[0] == x or (is_op(node, "Conv") and is_op(pad, "Pad") and pad.input[0] == x) else None


def _sibling_layer(scope: Scope, node: onnx.NodeProto, name: str, reader: onnx.NodeProto, bn: onnx.NodeProto,
                   affine: Affine) -> Layer:
    """The layer behind summed term `name` when it can absorb the BN of its own input, else Skip."""
    if node.output[0] != name:
        raise Skip(f"{describe(node)}'s output reaches the sum through {describe(scope.producer(name))}")
    layer = _matmul_with_bias(scope, node) if is_op(node, "Add") else read_layer(scope, node)
    if layer is None:
        raise Skip(f"{describe(node)} adds more than a bias")
    if name in scope.index.output_names:
        raise Skip(f"{describe(layer.node)}'s output is also a graph output")
    others = [node for node in scope.value_readers(name) if node is not reader]
    if others or list(reader.input).count(name) > 1:
        raise Skip(f"{describe(layer.node)}'s output also feeds {describe(others[0]) if others else 'the sum twice'}")
    channels = affine.scale.size
    if not layer.in_channels == layer.out_channels == channels:
        raise Skip(f"{describe(layer.node)} maps {layer.in_channels} channels to {layer.out_channels} "
                   f"(the BN has {channels})")
    if layer.weight.dtype != affine.dtype:
        raise Skip(f"mixed dtypes: {describe(layer.node)} is {layer.weight.dtype.name}, BN is {affine.dtype.name}")
    if is_op(layer.node, "Conv"):
        misfit = foldmath.centre_tap_misfit(*_conv_geometry(scope, layer))
        if misfit:
            raise Skip(f"{describe(layer.node)} {misfit}")
    elif attribute(layer.node, "transA", 0) or scope.facts.rank(bn.input[0]) != 2:
        raise Skip(f"{describe(layer.node)} may not contract the BN's channel axis (its input is not (N, C))")
    return layer


def _conv_geometry(scope: Scope, layer: Layer) -> tuple[tuple[int, ...], list[int], list[int],
                                                        list[tuple[int, int]] | None]:
    """(kernel, strides, dilations, (begin, end) padding per spatial axis, the Conv's own and a Pad's)."""
    node, kernel = layer.node, tuple(layer.weight.shape[2:])
    spatial = len(kernel)
    strides, dilations = (list(attribute(node, name, [1] * spatial)) for name in ("strides", "dilations"))
    auto_pad = _text(attribute(node, "auto_pad", "NOTSET"))
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):  # odd kernels at stride 1 (checked first) pad evenly
        padding = [(d * (k - 1) // 2,) * 2 for d, k in zip(dilations, kernel)]
    else:
        pads = [0] * 2 * spatial if auto_pad == "VALID" else list(attribute(node, "pads", [0] * 2 * spatial))
        padding = list(zip(pads[:spatial], pads[spatial:]))
    pad = scope.producer(node.input[0])
    if not is_op(pad, "Pad"):
        return kernel, strides, dilations, padding
    rank = spatial + 2
    extra = _pad_amounts(scope, pad, rank)
    if extra is None or any(extra[axis] or extra[rank + axis] for axis in (0, 1)):  # pads batch or channels
        return kernel, strides, dilations, None
    return kernel, strides, dilations, [(before + extra[2 + axis], after + extra[rank + 2 + axis])
                                         for axis, (before, after) in enumerate(padding)]


def _pad_amounts(scope: Scope, pad: onnx.NodeProto, rank: int) -> list[int] | None:
    """A Pad's (begins..., ends...) over all `rank` axes, when they are constant and not negative."""
    if scope.opset < 11:
        pads, axes = attribute(pad, "pads"), None
    else:
        pads = scope.constants.value(pad.input[1]) if len(pad.input) > 1 else None
        axes = scope.constants.value(pad.input[3]) if len(pad.input) > 3 and pad.input[3] else None
    if pads is None:
        return None
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in np.asarray(axes).reshape(-1)]
    if len(pads) != 2 * len(axes) or any(p < 0 for p in pads):
        return None
    full = [0] * 2 * rank
    for position, axis in enumerate(axes):
        full[axis], full[rank + axis] = pads[position], pads[len(axes) + position]
    return full


def _zero_pads(node: onnx.NodeProto, weight: np.ndarray) -> bool:
    """Whether the Conv may read zero padding (SAME padding never pads for 1-wide kernels)."""
    auto_pad = _text(attribute(node, "auto_pad", "NOTSET"))
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return any(size != 1 for size in weight.shape[2:])
    return auto_pad != "VALID" and any(attribute(node, "pads", []))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
