"""The ONNX model adapter: load (with external data, safely), describe, save."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, helper

from bnfold.errors import InputError
from bnfold.layers import BNLayer
from bnfold.model import InputSpec, Model, ModelFormat
from bnfold.onnx.discover import discover
from bnfold.onnx.graph import opset_version, walk_graphs


# Models at least this large (protobuf's 2 GB limit, with headroom) are saved with external data.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


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
        return cls(path, proto, external_data=_load_external_data(proto, path.parent))

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
