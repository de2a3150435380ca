"""The ONNX model adapter: load (with external data, safely), describe, save."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, external_data_helper, helper

from bnfold.errors import InputError
from bnfold.layers import BNLayer
from bnfold.model import InputSpec, Model, ModelFormat
from bnfold.onnx.discover import discover
from bnfold.onnx.graph import all_graphs, opset_version
from bnfold.onnx.shapes import input_dim_sizes
from bnfold.onnx.weightless import Weightless, copy_fields, varint


# Models at least this large (protobuf's 2 GB limit, with headroom) are saved with external data.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
# Element types packed several to a byte: their stored sizes are not checked against their dims.
_SUB_BYTE = {getattr(TensorProto, name, -1) for name in ("INT2", "UINT2", "INT4", "UINT4", "FLOAT4E2M1",
                                                          "FLOAT6E2M3", "FLOAT6E3M2")}
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


class OnnxModel(Model):
    """An ONNX ModelProto; `external_data` records whether the file kept its tensors in a sidecar."""

    format = ModelFormat.ONNX

    def __init__(self, path: Path, proto: onnx.ModelProto, *, external_data: bool = False) -> None:
        super().__init__(path)
        self.proto = proto
        self.external_data = external_data

    @classmethod
    def load(cls, path: Path) -> OnnxModel:
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except (DecodeError, ValueError, OSError) as error:
            raise InputError(f"{path} is not a readable ONNX model ({error})") from None
        external = _load_external_data(proto, path.parent)
        for tensor in external_data_helper._get_all_tensors(proto):
            problem = _size_problem(tensor)
            if problem:
                raise InputError(f"{path}: tensor {tensor.name!r} {problem}; the file is damaged")
        return cls(path, proto, external_data=external)

    @property
    def opset(self) -> int:
        return opset_version(self.proto)

    def bn_layers(self) -> list[BNLayer]:
        return discover(self.proto, self.opset)

    def input_specs(self, sized: bool = True) -> list[InputSpec]:
        """The declared inputs, with the dynamic dims the graph sizes filled in (a BN parameter fed as
        an input of shape ["C"] is as long as the channels it normalizes), and the dims it ties together
        under one symbol, so that random inputs fit the model. `sized=False`: as declared, without the
        shape inference that sizing takes (3.5 ms on the zoo ResNet, whose fast recalibration takes 60)."""
        initializers = {init.name for init in self.proto.graph.initializer}
        variances = {node.input[4] for node in self.proto.graph.node
                     if node.op_type == "BatchNormalization" and len(node.input) > 4}
        sizes = input_dim_sizes(self.proto) if sized else {}
        specs = []
        for value in self.proto.graph.input:
            if value.name in initializers:
                continue
            tensor = value.type.tensor_type
            dims = [(d.dim_value if d.HasField("dim_value") else sizes.get((value.name, axis)), d.dim_param or None)
                    for axis, d in enumerate(tensor.shape.dim)]
            shape = tuple(size if isinstance(size, int) else None for size, _ in dims)
            names = tuple(size if isinstance(size, str) else name for size, name in dims)
            dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "unknown"
            specs.append(InputSpec(value.name, shape, dtype, names, positive=value.name in variances))
        return specs

    def parameter_count(self) -> int:
        return self.weight_count(self.proto)

    @staticmethod
    def weight_count(proto: onnx.ModelProto) -> int:
        """The elements of every initializer, subgraphs included (from their shapes, reading no data)."""
        return sum(math.prod(init.dims) for graph in all_graphs(proto.graph) for init in graph.initializer)

    def save(self, path: Path) -> None:
        save_model(self.proto, path, external=self.external_data)


def save_model(proto: onnx.ModelProto, path: Path, *, external: bool = False) -> None:
    """Write `path`; large models (or `external`: ones read with external data) get the sidecar
    `<name>.data`.

    Both files are written into a fresh directory next to `path` and then renamed into place, so
    an older model's sidecar is replaced whole, never mixed with the new one.
    """
    weightless = Weightless(proto)
    if not (external or _serialized_size(weightless) >= EXTERNAL_DATA_THRESHOLD):
        write_model(weightless, path)
        return
    location = f"{path.name}.data"
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write_model(weightless, staging / path.name, external=True)
        if (staging / location).exists():
            os.replace(staging / location, path.parent / location)
        os.replace(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_model(weightless: Weightless, path: Path, *, external: bool = False) -> None:
    """Write the model `weightless` was copied from, one large tensor at a time (this fills in or
    re-points the copy's stand-ins: use a copy once).

    protobuf serializes a whole message into one buffer that grows by doubling, then copies it into
    Python bytes: up to three times the model at once. This writes the same bytes (fields in field
    number order, as protobuf does), serializing each large tensor on its own. With `external`, large
    tensors go to a new sidecar `<name>.data` instead.
    """
    proto = weightless.proto
    if external:
        _write_sidecar(weightless, path)
    else:
        weightless.restore(main_graph=False)  # subgraph weights travel with the structure
    if external or not proto.HasField("graph"):
        path.write_bytes(proto.SerializeToString())
        return
    tensors = [weightless.original(tensor) or tensor for tensor in proto.graph.initializer]
    graph_head, graph_tail = _split(proto.graph, _INITIALIZER)
    model_head, model_tail = _split(proto, _GRAPH)
    graph_size = len(graph_head) + len(graph_tail) + sum(_field_size(tensor.ByteSize()) for tensor in tensors)
    with path.open("wb") as handle:
        handle.write(model_head + _key(_GRAPH) + varint(graph_size) + graph_head)
        for tensor in tensors:
            data = tensor.SerializeToString()
            handle.write(_key(_INITIALIZER) + varint(len(data)))
            handle.write(data)
        handle.write(graph_tail + model_tail)


_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_LENGTH_DELIMITED = 2  # protobuf wire type of embedded messages


def _write_sidecar(weightless: Weightless, path: Path) -> None:
    """Write the data of every stand-in to `<path>.data` and point the stand-ins at it."""
    stand_ins = list(weightless.stand_ins())
    if not stand_ins:
        return
    location = f"{path.name}.data"
    with (path.parent / location).open("wb") as sidecar:
        for tensor, original in stand_ins:
            offset = sidecar.tell()
            sidecar.write(original.raw_data)
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", offset), ("length", sidecar.tell() - offset)):
                tensor.external_data.add(key=key, value=str(value))


def _serialized_size(weightless: Weightless) -> int:
    """The model's serialized size, without serializing it whole (protobuf's ByteSize does)."""
    return weightless.proto.ByteSize() + sum(original.ByteSize() for _, original in weightless.stand_ins())


def _split(message, number: int) -> tuple[bytes, bytes]:
    """The serialized fields of `message` numbered below and above `number`."""
    head, tail = type(message)(), type(message)()
    copy_fields(head, message, lambda field: field.number < number, unknown=False)
    copy_fields(tail, message, lambda field: field.number > number)  # protobuf writes unknown fields last
    return head.SerializeToString(), tail.SerializeToString()


def _field_size(size: int) -> int:
    """Bytes of one initializer field holding `size` bytes: key, length, data."""
    return len(_key(_INITIALIZER)) + len(varint(size)) + size


def _key(number: int) -> bytes:
    return varint(number << 3 | _LENGTH_DELIMITED)


def _load_external_data(proto: onnx.ModelProto, base_dir: Path) -> bool:
    """Read external tensors, refusing locations that escape the model's directory; True if any."""
    tensors = [t for t in external_data_helper._get_all_tensors(proto)
               if external_data_helper.uses_external_data(t)]
    if not tensors:
        return False
    root = base_dir.resolve()
    for tensor in tensors:
        info = external_data_helper.ExternalDataInfo(tensor)
        target = (root / info.location).resolve()
        if os.path.isabs(info.location) or root not in target.parents:
            raise InputError(f"external data location {info.location!r} of tensor {tensor.name!r} points "
                             "outside the model's directory; refusing to read it")
        if not target.is_file():
            raise InputError(f"external data file {info.location!r} of tensor {tensor.name!r} is missing",
                             f"expected it at {target}")
    try:
        external_data_helper.load_external_data_for_model(proto, str(root))
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read the external data of the model ({error})") from None
    return True


def _size_problem(tensor: TensorProto) -> str | None:
    """Why a tensor's declared shape does not match the data it stores (None when it does).

    Checked once at load, so no later numpy conversion or runtime trusts a header that claims far more
    (or fewer) elements than the file holds.
    """
    dims = list(tensor.dims)
    if any(dim < 0 for dim in dims):
        return f"has a negative dimension {dims}"
    if tensor.data_type in _SUB_BYTE:
        return None
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return f"has an unknown element type {tensor.data_type}"
    elements = math.prod(dims)
    if tensor.HasField("raw_data"):
        stored, expected, unit = len(tensor.raw_data), elements * itemsize, "bytes"
    else:
        parts = 2 if tensor.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128) else 1
        stored, expected, unit = sum(len(getattr(tensor, name)) for name in _TYPED_FIELDS), elements * parts, "values"
    if stored != expected:
        return f"declares shape {dims} ({expected:,} {unit}) but stores {stored:,}"
    return None
