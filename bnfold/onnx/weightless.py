"""Copies of an ONNX model whose large initializers carry no data, pointing back at the originals.

protobuf (upb) keeps every byte a message ever held until the whole message is freed: clearing,
replacing or deleting a tensor frees nothing. So the copies that bnfold edits or hands to other tools
(fold planning and rewriting, shape inference, external-data writing) start without weight data and read
the original tensors when they need values; copying the model's structure costs next to nothing. A
stripped tensor keeps its name, type and dims and is marked as external data at `LOCATION` (no file),
with the index of its original.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from onnx import TensorProto

from bnfold.onnx.graph import walk_graphs

LOCATION = "bnfold:in-memory"
KEEP_UP_TO = 64  # elements: shape tensors and other small constants keep their data (shape inference reads them)
_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data",
                "uint64_data", "data_location", "external_data")


class Weightless:
    """`proto`: a copy of a model in which every initializer above `KEEP_UP_TO` elements that stores
    raw data (what exporters write) is a stand-in; `original` finds the tensor a stand-in stands for."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.proto = onnx.ModelProto()
        self._originals: list[TensorProto] = []
        copy_fields(self.proto, model, _skip("graph"))
        if model.HasField("graph"):
            self._copy_graph(self.proto.graph, model.graph)

    def original(self, tensor: TensorProto) -> TensorProto | None:
        """The tensor with data that `tensor` stands for; None when `tensor` is no stand-in."""
        if tensor.data_location != TensorProto.EXTERNAL:
            return None
        info = {entry.key: entry.value for entry in tensor.external_data}
        return self._originals[int(info["index"])] if info.get("location") == LOCATION else None

    def stand_ins(self, *, main_graph: bool = True) -> Iterator[tuple[TensorProto, TensorProto]]:
        """(stand-in, original) for every stand-in still in the copy: subgraphs', and the main graph's
        unless `main_graph` is False."""
        for index in walk_graphs(self.proto.graph):
            if index.parent is None and not main_graph:
                continue
            for tensor in index.graph.initializer:
                original = self.original(tensor)
                if original is not None:
                    yield tensor, original

    def restore(self, *, main_graph: bool = True) -> onnx.ModelProto:
        """The copy as a complete model: every stand-in left in it (or, without `main_graph`, those of
        subgraphs) gets its original's data back."""
        for tensor, original in list(self.stand_ins(main_graph=main_graph)):
            tensor.CopyFrom(original)
        return self.proto

    def _copy_graph(self, target: onnx.GraphProto, graph: onnx.GraphProto) -> None:
        copy_fields(target, graph, _skip("node", "initializer"))
        for tensor in graph.initializer:
            copy = target.initializer.add()
            if not _strippable(tensor):
                copy.CopyFrom(tensor)
                continue
            copy_fields(copy, tensor, _skip(*_DATA_FIELDS))
            copy.data_location = TensorProto.EXTERNAL
            copy.external_data.add(key="location", value=LOCATION)
            copy.external_data.add(key="index", value=str(len(self._originals)))
            self._originals.append(tensor)
        for node in graph.node:
            copy = target.node.add()
            copy_fields(copy, node, _skip("attribute"))
            for attr in node.attribute:
                attr_copy = copy.attribute.add()
                copy_fields(attr_copy, attr, _skip("g", "graphs"))
                if attr.HasField("g"):
                    self._copy_graph(attr_copy.g, attr.g)
                for sub in attr.graphs:
                    self._copy_graph(attr_copy.graphs.add(), sub)


def _strippable(tensor: TensorProto) -> bool:
    return (tensor.HasField("raw_data") and math.prod(tensor.dims) > KEEP_UP_TO
            and tensor.data_location != TensorProto.EXTERNAL)


def _skip(*names: str) -> Callable[[FieldDescriptor], bool]:
    return lambda field: field.name not in names


def copy_fields(target: Message, source: Message, keep: Callable[[FieldDescriptor], bool], *,
                unknown: bool = True) -> None:
    """Copy the set fields of `source` that `keep` accepts into `target` (a message of the same type),
    and with `unknown` the fields this version of onnx does not know (a newer file's), as they were."""
    for field, value in source.ListFields():
        if not keep(field):
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)
    if unknown:
        target.MergeFromString(_encoded(_unknown_fields(source)))


def varint(value: int) -> bytes:
    """protobuf's base-128 encoding of an unsigned integer."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _unknown_fields(message: Message):
    try:
        from google.protobuf.unknown_fields import UnknownFieldSet
    except ImportError:  # protobuf before 4.24
        return message.UnknownFields()
    return UnknownFieldSet(message)


def _encoded(fields) -> bytes:
    """Unknown fields serialized again (wire types: 0 varint, 1 fixed64, 2 bytes, 3 group, 5 fixed32)."""
    out = bytearray()
    for field in fields:
        out += varint(field.field_number << 3 | field.wire_type)
        if field.wire_type == 0:
            out += varint(field.data & 0xFFFF_FFFF_FFFF_FFFF)  # negative integers travel as 64-bit
        elif field.wire_type in (1, 5):
            out += field.data.to_bytes(8 if field.wire_type == 1 else 4, "little")
        elif field.wire_type == 2:
            out += varint(len(field.data)) + field.data
        else:  # a group, closed by its end tag
            out += _encoded(field.data) + varint(field.field_number << 3 | 4)
    return bytes(out)
