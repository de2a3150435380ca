"""Find BatchNormalization nodes (main graph and subgraphs) and describe them as `BNLayer`s."""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.layers import BNLayer
from bnfold.onnx.constants import Constants
from bnfold.onnx.graph import BN_OP, DEFAULT_DOMAINS, GraphIndex, attribute, node_label, walk_graphs
from bnfold.onnx.shapes import ValueFacts, infer_facts

# Ops whose bias input makes the BN after them subtract the bias again.
_BIASED_PRODUCERS = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}


def is_training_mode(node: onnx.NodeProto, opset: int) -> bool:
    """BN normalizes with batch statistics: training_mode=1 (opset 14+) or is_test=0 (opset < 7)."""
    if opset >= 14:
        return bool(attribute(node, "training_mode", 0))
    if opset < 7:
        return not attribute(node, "is_test", 0)
    return False


def spatial_zero(node: onnx.NodeProto, opset: int) -> bool:
    """spatial=0 before opset 9: statistics per activation, (C, *spatial), whatever the input's rank."""
    return opset < 9 and attribute(node, "spatial", 1) == 0


def per_activation(node: onnx.NodeProto, opset: int, input_rank: int | None) -> bool:
    """spatial=0 before opset 9 keeps statistics per activation, (C, *spatial): per channel only on an
    (N, C) input, so an input of any other rank, or of unknown rank, is treated as per activation."""
    return spatial_zero(node, opset) and input_rank != 2


def training_fixed_by(node: onnx.NodeProto, opset: int, index: GraphIndex) -> str | None:
    """What makes a BN normalize by batch statistics in every run (`BNLayer.training_fixed`), as fold and
    recalibrate name it; None for a BN in inference mode."""
    if is_training_mode(node, opset):
        return "is_test=0" if opset < 7 else "training_mode=1"
    if used_optional_outputs(node, index):
        return "its running-statistics outputs are read"
    return None


def used_optional_outputs(node: onnx.NodeProto, index: GraphIndex) -> list[str]:
    """Names of BN outputs beyond Y that something reads (running stats or saved mean/var)."""
    return [name for name in node.output[1:]
            if name and (name in index.consumers or name in index.output_names)]


def operator_version(op_type: str, opset: int) -> int:
    """The version of a default-domain operator in effect at `opset`: the opset its schema last changed in
    (BatchNormalization at opset 17 is BatchNormalization-15). An opset newer than the installed onnx knows
    may have changed the operator again, so it stays the model's opset then."""
    if opset > onnx.defs.onnx_opset_version():
        return opset
    try:
        return int(onnx.defs.get_schema(op_type, opset).since_version)
    except onnx.defs.SchemaError:
        return opset


def describe_bn(node: onnx.NodeProto, index: GraphIndex, opset: int, constants: Constants) -> BNLayer:
    """One BN node as a BNLayer; statistics are None when they are not constants in the file
    (initializers, Constant nodes or constant subgraphs, as the fold analysis sees them)."""
    parameters = [constants.value(name) for name in _param_names(node)]
    scale, bias, mean, var = parameters
    known = [array for array in (scale, bias, mean, var) if array is not None]
    channels = int(known[0].size) if known else None  # else from declared shapes (`discover`)
    dtype = known[0].dtype.name if known else "unknown"
    extra: dict = {"opset": opset, "node": node_label(node)}
    producer = index.producers.get(node.input[0])
    if producer is not None and producer.op_type in _BIASED_PRODUCERS and producer.domain in DEFAULT_DOMAINS:
        bias_position = _BIASED_PRODUCERS[producer.op_type]
        if len(producer.input) > bias_position and producer.input[bias_position]:
            extra["producer_bias"] = f"{producer.op_type} {node_label(producer)}"
    overridable = [name for name in node.input[1:] if index.is_overridable(name)]
    if overridable:
        extra["overridable_params"] = overridable
    runtime_params = [name for name, value in zip(_param_names(node), parameters) if name and value is None]
    if runtime_params:
        extra["runtime_params"] = runtime_params
    stats_known = mean is not None and var is not None
    training = training_fixed_by(node, opset, index) is not None
    return BNLayer(
        name=node_label(node, index.path),
        kind=f"{BN_OP}-{operator_version(BN_OP, opset)}",
        framework="onnx",
        channels=channels,
        eps=float(np.float32(attribute(node, "epsilon", 1e-5))),  # a float32 attribute, also its default
        eps_float32=True,
        momentum=float(attribute(node, "momentum", 0.9)),
        affine=True,
        track_running_stats=stats_known,
        running_mean=_as_float64(mean),
        running_var=_as_float64(var),
        weight=_as_float64(scale),
        bias=_as_float64(bias),
        dtype=dtype,
        training=training,
        training_fixed=training,  # a graph has no mode to switch
        extra=extra,
    )


def _param_names(node: onnx.NodeProto) -> list[str]:
    names = list(node.input[1:5])
    return names + [""] * (4 - len(names))


def _as_float64(array: np.ndarray | None) -> np.ndarray | None:
    return None if array is None else np.asarray(array, dtype=np.float64).ravel()


def declared_channels(node: onnx.NodeProto, facts: ValueFacts, per_activation: bool) -> int | None:
    """The channels of a BN whose parameters are no constants, from the shapes the file declares or
    shape inference derives: a parameter's, else axis 1 of its input or output; None when none says."""
    for name in _param_names(node):
        shape = facts.shape(name) if name else None
        if shape and all(size is not None for size in shape):
            return int(np.prod(shape))
    for name in () if per_activation else (node.input[0], node.output[0] if node.output else ""):
        shape = facts.shape(name)
        if shape is not None and len(shape) > 1 and shape[1] is not None:
            return shape[1]
    return None


def discover(model: onnx.ModelProto, opset: int) -> list[BNLayer]:
    """Every BN node in the model, main graph first, then subgraphs. A spatial=0 BN is marked
    per activation by the rule fold planning applies, on the input rank shape inference gives it."""
    layers: list[BNLayer] = []
    scopes: dict[str, Constants] = {}
    facts: ValueFacts | None = None  # shape inference, only for a spatial=0 BN or one without constant parameters
    for index in walk_graphs(model.graph):
        parent = scopes[index.parent] if index.parent is not None else None
        constants = scopes[index.path] = Constants(index, list(model.opset_import), strict_inputs=False, parent=parent)
        for node in index.graph.node:
            if node.op_type == BN_OP and node.domain in DEFAULT_DOMAINS:
                layer = describe_bn(node, index, opset, constants)
                if spatial_zero(node, opset) or layer.channels is None:
                    facts = infer_facts(model) if facts is None else facts
                if per_activation(node, opset, facts.rank(node.input[0]) if facts is not None else None):
                    layer.extra["per_activation"] = True
                if layer.channels is None:
                    layer.channels = declared_channels(node, facts, bool(layer.extra.get("per_activation")))
                layers.append(layer)
    return layers
