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
from bnfold.onnx.graph import opset_version, walk_graphs


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

    def input_specs(self) -> list[InputSpec]:
        initializers = {init.name for init in self.proto.graph.initializer}
        specs = []
        for value in self.proto.graph.input:
            if value.name in initializers:
                continue
            tensor = value.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
            dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "unknown"
            names = tuple(d.dim_param or None for d in tensor.shape.dim)
            specs.append(InputSpec(value.name, shape, dtype, names))
        return specs

    def parameter_count(self) -> int:
        return sum(int(np.prod(init.dims)) for index in walk_graphs(self.proto.graph)
                   for init in index.graph.initializer)

    def save(self, path: Path) -> None:
        """Write `path`; large models (or ones read with external data) get the sidecar `<name>.data`.

        Both files are written into a fresh directory next to `path` and then renamed into place:
        onnx appends to an existing sidecar, which would corrupt an older model's data.
        """
        if not (self.external_data or self.proto.ByteSize() >= EXTERNAL_DATA_THRESHOLD):
            onnx.save(self.proto, str(path))
            return
        location = f"{path.name}.data"
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            proto = onnx.ModelProto()
            proto.CopyFrom(self.proto)  # saving with external data rewrites the tensors it moves
            onnx.save_model(proto, str(staging / path.name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=location, size_threshold=1024)
            if (staging / location).exists():
                os.replace(staging / location, path.parent / location)
            os.replace(staging / path.name, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


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
