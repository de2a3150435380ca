"""BN folding on ONNX graphs: `plan_folds` analyses, `apply_folds` replays the plan on a fresh copy.

Planning runs the fold passes on a scratch copy until nothing changes (a fold can expose the next one:
Conv -> BN -> BN, or Conv -> BN -> Mul -> Add), recording every rewrite as a `FoldAction`. Applying
replays those actions in order on a fresh copy, so `inspect` and `fold` share one source of truth and
the caller's ModelProto is never touched. Both copies are weightless (`bnfold.onnx.weightless`): they
read the caller's weights and hold only what a fold writes, so planning costs no copy of the weights
(its folded weights are stand-ins of the right shape and dtype: analysis reads nothing else of a
layer's weight) and the folded model holds one. Weights are folded in float64 by
`bnfold.foldmath` and written once, as new initializers in the tensor's own dtype. Originals are never
changed in place, so a weight shared by several nodes stays intact for the others: a folded node gets
its own copy, unless every user is an identical layer with an identical BN (then one copy serves all).

Initializers that are also graph inputs fold by default: nobody feeds BN statistics at run time, and
onnxruntime's refusal of them (it treats them as overridable) leaves most IR-4 exports unfolded. Such
inputs are removed once nothing reads them. `FoldOptions(strict_inputs=True)` keeps onnxruntime's rule.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper

from bnfold import __version__, foldmath
from bnfold.layers import FoldDecision, FoldDirection, FoldStatus
from bnfold.onnx.constants import Constants, is_pure
from bnfold.onnx.graph import BN_OP, GraphIndex, attribute, delete_where, node_label, opset_version, walk_graphs
from bnfold.onnx.patterns import (ELEMENTWISE_OPS, Affine, FoldAction, Layer, Link, Scope, Skip, analyze,
                                  bn_affine, elementwise_affine, is_op, read_layer, summed_steps, then_steps)
from bnfold.onnx.shapes import ValueFacts, infer_facts
from bnfold.onnx.weightless import Weightless
from bnfold.plan import FoldOptions, FoldPlan

METADATA_KEY = "bnfold.fold"


def plan_folds(model: onnx.ModelProto, options: FoldOptions = FoldOptions()) -> FoldPlan:
    """Per-BN decisions and the rewrites that carry them out; `model` is not changed."""
    state = _FoldState(model, options, analyse=True)
    decisions = {label: FoldDecision(label, FoldStatus.KEPT, reason="not analysed")
                 for label in state.bn_labels()}
    actions: list[FoldAction] = []
    progress = True
    while progress:
        progress = False
        for path, op_type, output in state.candidates():
            scope = state.scopes[path]
            node = scope.producer(output)
            if node is None or node.op_type != op_type:
                continue  # folded away earlier in this sweep
            try:
                found = analyze(scope, node)
            except Skip as skip:
                decisions[scope.label(node)] = FoldDecision(scope.label(node), FoldStatus.KEPT, reason=skip.reason)
                continue
            if found is None:
                continue
            action, folded = found
            state.execute(action)
            actions.append(action)
            decisions.update((decision.layer, decision) for decision in folded)
            progress = True
    return FoldPlan(decisions=list(decisions.values()), actions=actions)


def apply_folds(model: onnx.ModelProto, plan: FoldPlan) -> onnx.ModelProto:
    """A new model with the plan's actions carried out, dead weights removed and provenance recorded."""
    state = _FoldState(model, FoldOptions(), analyse=False)
    for action in plan.actions:
        try:
            state.execute(action)
        except (Skip, KeyError, AttributeError) as error:
            raise ValueError(f"the fold plan does not match this model ({error})") from None
    state.finish(plan)
    return state.weightless.restore()


class _FoldState:
    """A weightless copy of a model being folded, with an index per graph that is rebuilt after every
    rewrite. With `analyse` (planning), folded weights are stand-ins; otherwise they are computed."""

    def __init__(self, model: onnx.ModelProto, options: FoldOptions, *, analyse: bool) -> None:
        self.weightless = Weightless(model)
        self.proto = proto = self.weightless.proto
        self.options = options
        self.analyse = analyse
        self.opset = opset_version(proto)
        self.facts = infer_facts(proto) if analyse else ValueFacts()
        self._graphs = {index.path: (index.graph, index.parent) for index in walk_graphs(proto.graph)}
        self._cache: dict[str, np.ndarray] = {}
        self._names = _Names(proto)
        self._orphans: list[str] = []  # names a rewrite stopped reading: pruned at the end if unused
        self._gone: set[str] = set()  # values that no longer exist: their value_info is dropped
        self._created: list[tuple[onnx.GraphProto, onnx.ValueInfoProto]] = []  # new initializers
        self.refresh()

    def refresh(self) -> None:
        self.scopes: dict[str, Scope] = {}
        readers: dict[str, list[onnx.NodeProto]] = {}

        def reader_list(name: str) -> list[onnx.NodeProto]:  # a bound method would make a reference cycle,
            return readers.get(name, [])  # keeping the state and the weights it reads until a collection

        for path, (graph, parent) in self._graphs.items():
            index = GraphIndex(graph, path, parent)
            index.initializers = {name: self.weightless.original(tensor) or tensor
                                  for name, tensor in index.initializers.items()}
            outer = self.scopes[parent].constants if parent is not None else None
            constants = Constants(index, list(self.proto.opset_import), strict_inputs=self.options.strict_inputs,
                                  parent=outer, cache=self._cache)
            self.scopes[path] = Scope(index, constants, self.facts, self.opset, reader_list)
            for node in graph.node:
                for name in node.input:
                    if name:
                        readers.setdefault(name, []).append(node)

    def bn_labels(self) -> list[str]:
        return [node_label(node, path) for path, (graph, _) in self._graphs.items()
                for node in graph.node if is_op(node, BN_OP)]

    def candidates(self) -> list[tuple[str, str, str]]:
        """(graph path, op type, output) of every node a pass may fold, in graph order."""
        return [(path, node.op_type, node.output[0]) for path, (graph, _) in self._graphs.items()
                for node in graph.node if is_op(node, BN_OP, *ELEMENTWISE_OPS) and node.output]

    # --- rewrites -------------------------------------------------------------------------------

    def execute(self, action: FoldAction) -> None:
        scope = self.scopes[action.graph]
        if action.direction is FoldDirection.INTO_CONSUMER:
            self._fold_forward(scope, action.links[0])
        elif action.direction is FoldDirection.INTO_SIBLING:
            self._fold_sibling(scope, action.links[0])
        else:
            self._fold_back(scope, action)
        self.refresh()

    def _layer(self, scope: Scope, link: Link) -> Layer:
        bias_add = scope.producer(link.bias_add) if link.bias_add else None
        return read_layer(scope, scope.producer(link.layer), bias_add)

    def _fold_back(self, scope: Scope, action: FoldAction) -> None:
        """Into producers: scale each layer's weights, fold the shift into its bias, drop the map."""
        maps: dict[str, tuple[onnx.NodeProto, Affine, str]] = {}
        names = None
        for link in action.links:
            layer = self._layer(scope, link)
            if link.affine not in maps:
                node = scope.producer(link.affine)
                if is_op(node, BN_OP):
                    maps[link.affine] = (node, bn_affine(scope, node), node.input[0])
                else:
                    maps[link.affine] = (node, elementwise_affine(scope, node, layer), layer.output)
            affine = link.share(maps[link.affine][1], layer.out_channels)
            if names is None or not action.shared:
                weight, bias = _producer_fold(layer, affine)
                names = self._write_layer(scope, layer, weight, bias, link.gemm)
            else:  # the same folded weight, computed once, serves every layer sharing it
                self._point_layer(scope, layer, *names, link.gemm)
        for node, _, data in maps.values():
            self._remove(scope.index.graph, node, keep=data)
            self._rename(scope.index.graph, data, node.output[0])

    def _fold_forward(self, scope: Scope, link: Link) -> None:
        """Into the consumer: scale its input channels, push the shift through its weights into the bias."""
        bn = scope.producer(link.affine)
        layer = self._layer(scope, link)
        weight, bias = _consumer_fold(layer, bn_affine(scope, bn))
        self._write_layer(scope, layer, weight, bias, link.gemm)
        graph = scope.index.graph
        for node in graph.node:
            for position, name in enumerate(node.input):
                if name == bn.output[0]:
                    node.input[position] = bn.input[0]
        self._gone.add(bn.output[0])
        self._remove(graph, bn, keep=bn.input[0])

    def _fold_sibling(self, scope: Scope, link: Link) -> None:
        """Beside the layer: the BN into its centre tap and bias, and the BN's term out of the sum."""
        bn = scope.producer(link.affine)
        layer = self._layer(scope, link)
        term, steps = summed_steps(scope, bn.output[0])
        weight, bias = _sibling_fold(layer, then_steps(scope, bn_affine(scope, bn), bn.output[0], steps))
        (add,) = scope.value_readers(term)
        graph = scope.index.graph
        self._drop_term(scope, add, term)
        for node in [bn, *steps]:
            self._gone.add(node.output[0])
            self._remove(graph, node)
        self._write_layer(scope, layer, weight, bias, link.gemm)

    def _drop_term(self, scope: Scope, add: onnx.NodeProto, term: str) -> None:
        """Remove input `term` from a sum: from a Sum of more, else the sum is its other input, under the
        sum's name (or an Identity of it, when that input is no node's own output the sum alone reads)."""
        graph = scope.index.graph
        if len(add.input) > 2:
            del add.input[list(add.input).index(term)]
            return
        other = next(name for name in add.input if name != term)
        self._orphans.append(term)
        if scope.producer(other) is None or scope.readers(other) != [add] or other in scope.index.output_names:
            add.op_type, add.domain = "Identity", ""
            add.input[:] = [other]
            return
        self._remove(graph, add, keep=other)
        self._rename(graph, other, add.output[0])

    def _write_layer(self, scope: Scope, layer: Layer, weight: np.ndarray | None, bias: np.ndarray | None,
                     gemm: bool) -> tuple[str, str | None]:
        """New initializers for the folded weight and bias (None: unchanged), wired into the layer."""
        graph = scope.index.graph
        weight_name, bias_name = layer.weight_name, layer.bias_name
        if weight is not None:
            weight_name = self._initializer(graph, layer.weight_name, weight)
        if bias is not None:
            bias_name = self._initializer(graph, layer.bias_name or f"{layer.weight_name}_bias", bias)
        self._point_layer(scope, layer, weight_name, bias_name, gemm)
        return weight_name, bias_name

    def _point_layer(self, scope: Scope, layer: Layer, weight: str, bias: str | None, gemm: bool) -> None:
        node, graph = layer.node, scope.index.graph
        self._orphans += [name for name in (layer.weight_name, layer.bias_name) if name]
        if layer.op == "MatMul":
            self._point_matmul(graph, layer, weight, bias, gemm)
            return
        node.input[1] = weight
        if bias is not None:
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = bias
        if layer.op == "Gemm":  # the folded C already includes beta
            _set_attribute(node, helper.make_attribute("beta", 1.0))

    def _point_matmul(self, graph: onnx.GraphProto, layer: Layer, weight: str, bias: str | None,
                      gemm: bool) -> None:
        node, bias_add = layer.node, layer.bias_add
        if gemm and bias is not None:  # a 2-D input: one Gemm replaces MatMul (+ Add), keeping the last output name
            output = layer.output
            if bias_add is not None:
                self._remove(graph, bias_add, keep=node.output[0])
                self._rename(graph, node.output[0], output)
            node.op_type = "Gemm"  # in place: the node keeps its name, doc string and metadata
            node.input[:] = [node.input[0], weight, bias]
            node.output[:] = [output]
            return
        node.input[1] = weight
        if bias is None:  # a summed MatMul without bias that leaves the BN shift to another layer
            return
        if bias_add is not None:
            position = 0 if bias_add.input[0] == layer.bias_name else 1
            bias_add.input[position] = bias
            return
        unbiased = self._names.fresh(f"{node.output[0]}_unbiased")
        add = helper.make_node("Add", [unbiased, bias], [node.output[0]],
                               name=self._names.fresh(f"{node.name or node.output[0]}_bias"))
        self.facts.rename(node.output[0], unbiased)
        node.output[0] = unbiased
        graph.node.insert(_position(graph, node) + 1, add)

    def _initializer(self, graph: onnx.GraphProto, base: str, values: np.ndarray) -> str:
        """A new initializer holding `values` (rounded already); while planning, only its shape and dtype."""
        name = self._names.fresh(f"{base}_folded")
        tensor = graph.initializer.add(name=name, dims=values.shape,
                                       data_type=helper.np_dtype_to_tensor_dtype(values.dtype))
        if self.analyse:  # shape and dtype are all that analysis reads of a folded weight
            self._cache[name] = np.broadcast_to(np.zeros((), values.dtype), values.shape)
        else:  # raw data is little-endian; written straight into the model, not copied in with a tensor
            tensor.raw_data = values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()
        self._created.append((graph, helper.make_tensor_value_info(name, tensor.data_type, tensor.dims)))
        return name

    def _rename(self, graph: onnx.GraphProto, old: str, new: str) -> None:
        """Value `old` is now called `new` (a removed node's output name), for its producer and for
        the Shape/Size nodes still reading it."""
        for node in graph.node:
            for names in (node.output, node.input):
                for position, name in enumerate(names):
                    if name == old:
                        names[position] = new
        self.facts.rename(old, new)
        self._gone.add(old)

    def _remove(self, graph: onnx.GraphProto, node: onnx.NodeProto, keep: str | None = None) -> None:
        self._orphans += [name for name in node.input if name and name != keep]
        del graph.node[_position(graph, node)]

    # --- finishing ------------------------------------------------------------------------------

    def finish(self, plan: FoldPlan) -> None:
        self._prune()
        if self.proto.ir_version < 4:  # IR 3: every initializer must also be a graph input
            for graph, value in self._created:
                if any(init.name == value.name for init in graph.initializer):
                    graph.input.append(value)
        for graph, _ in self._graphs.values():
            delete_where(graph.value_info, lambda value: value.name in self._gone)
        kept = sum(decision.status is FoldStatus.KEPT for decision in plan.decisions)
        folded = len(plan.decisions) - kept
        affines = {link.affine for action in plan.actions for link in action.links}
        stamp = {"version": __version__, "folded": folded, "kept": kept, "other_ops_folded": len(affines) - folded}
        delete_where(self.proto.metadata_props, lambda prop: prop.key == METADATA_KEY)
        self.proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(stamp, sort_keys=True))

    def _prune(self) -> None:
        """Remove initializers and constant nodes that only the folded layers read."""
        readers: Counter[str] = Counter()
        definitions: dict[str, tuple[onnx.GraphProto, onnx.NodeProto | None]] = {}
        for graph, _ in self._graphs.values():
            for node in graph.node:
                readers.update(name for name in node.input if name)
                definitions.update((name, (graph, node)) for name in node.output if name)
            readers.update(value.name for value in graph.output)
            definitions.update((init.name, (graph, None)) for init in graph.initializer)
        dead: dict[int, tuple[onnx.GraphProto, set[str]]] = {}
        queue = list(dict.fromkeys(self._orphans))
        while queue:
            name = queue.pop()
            if readers[name] or name not in definitions:
                continue
            graph, node = definitions.pop(name)
            if node is None:
                dead.setdefault(id(graph), (graph, set()))[1].add(name)
            elif is_pure(node) and not any(readers[output] for output in node.output if output):
                del graph.node[_position(graph, node)]
                for input_name in node.input:
                    if input_name:
                        readers[input_name] -= 1
                        queue.append(input_name)
        for graph, names in dead.values():
            delete_where(graph.initializer, lambda init: init.name in names)
            delete_where(graph.input, lambda value: value.name in names)


def _producer_fold(layer: Layer, affine: Affine) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Folded (weight, bias) for a map after the layer, in its dtype; None where nothing changes."""
    channels = layer.out_channels
    scale = affine.scale if affine.scale is not None else np.ones(channels)
    shift = affine.shift if affine.shift is not None else np.zeros(channels)
    if layer.op == "ConvTranspose":
        weight, bias = foldmath.fold_into_conv_transpose(layer.weight, layer.bias, scale, shift, layer.group)
    elif layer.op == "Gemm":
        weight, bias = foldmath.fold_into_gemm(layer.weight, layer.bias, *_alpha_beta(layer.node), scale, shift,
                                               layer.trans_b)
    else:
        weight, bias = foldmath.fold_into_producer(layer.weight, layer.bias, scale, shift,
                                                   out_axis=1 if layer.op == "MatMul" else 0)
    keep_bias = affine.shift is not None or layer.bias is not None
    return (_rounded(weight, layer) if affine.scale is not None else None,
            _rounded(bias, layer) if keep_bias else None)


def _sibling_fold(layer: Layer, affine: Affine) -> tuple[np.ndarray, np.ndarray]:
    """Folded (weight, bias) for a BN of the layer's input summed with its output, in its dtype. Gemm's
    alpha scales the product (so the diagonal takes scale / alpha); its new C is meant for beta = 1."""
    bias, scale = layer.bias, affine.scale
    if layer.op == "Gemm":
        alpha, beta = _alpha_beta(layer.node)
        bias = None if bias is None else np.broadcast_to(np.float64(beta) * bias, (layer.out_channels,))
        scale = scale / alpha
    elif bias is not None:  # a MatMul's bias Add may hold it as (1, N) or one number
        bias = np.broadcast_to(np.asarray(bias, np.float64).reshape(-1), (layer.out_channels,))
    groups = layer.group if layer.op == "Conv" else 1
    weight, bias = foldmath.fold_into_sibling(layer.weight, bias, scale, affine.shift, groups)
    return _rounded(weight, layer), _rounded(bias, layer)


def _consumer_fold(layer: Layer, affine: Affine) -> tuple[np.ndarray, np.ndarray]:
    """Folded (weight, bias) for a BN before the layer, in its dtype."""
    if layer.op == "Conv":
        weight, bias = foldmath.fold_into_consumer(layer.weight, layer.bias, affine.scale, affine.shift, layer.group)
    elif layer.op == "Gemm":
        weight, bias = foldmath.fold_into_gemm_consumer(layer.weight, layer.bias, *_alpha_beta(layer.node),
                                                        affine.scale, affine.shift, layer.trans_b)
    else:
        weight, bias = foldmath.fold_into_matrix_consumer(layer.weight, layer.bias, affine.scale, affine.shift,
                                                          in_axis=0)
    return _rounded(weight, layer), _rounded(bias, layer)


def _rounded(values: np.ndarray, layer: Layer) -> np.ndarray:
    """Float64 fold results rounded once to the layer's dtype, so that no float64 copy of a weight
    outlives its fold (it would sit next to the rounded weight and its bytes)."""
    return foldmath.round_to(values, layer.weight.dtype)


def _alpha_beta(node: onnx.NodeProto) -> tuple[float, float]:
    return float(attribute(node, "alpha", 1.0)), float(attribute(node, "beta", 1.0))


def _set_attribute(node: onnx.NodeProto, value: onnx.AttributeProto) -> None:
    delete_where(node.attribute, lambda attr: attr.name == value.name)
    node.attribute.append(value)


def _position(graph: onnx.GraphProto, node: onnx.NodeProto) -> int:
    return next(i for i, candidate in enumerate(graph.node) if candidate is node)


class _Names:
    """Fresh names, unique across every graph, value and node of the model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._used: set[str] = set()
        for index in walk_graphs(model.graph):
            graph = index.graph
            self._used.update(value.name for value in (*graph.input, *graph.output, *graph.value_info))
            self._used.update(init.name for init in graph.initializer)
            for node in graph.node:
                self._used.update(_node_names(node))

    def fresh(self, base: str) -> str:
        name, counter = base, 0
        while name in self._used:
            counter += 1
            name = f"{base}_{counter}"
        self._used.add(name)
        return name


def _node_names(node: onnx.NodeProto) -> Iterable[str]:
    yield node.name
    yield from node.input
    yield from node.output
