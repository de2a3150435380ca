"""Recognise a model file by its content and load it through the matching adapter.

Detection reads bytes only (never imports torch, never unpickles), so ONNX stays torch-free and a pickle
renamed to `.onnx` or `.pt2` is still recognised as a pickle.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from bnfold.errors import InputError, UnsupportedFormatError
from bnfold.model import LoadOptions, Model, ModelFormat

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = 0x80
# Declared unpacked size over file size above which a zip is a decompression bomb (torch stores tensors
# uncompressed, so its archives unpack to about their own size).
MAX_ZIP_RATIO = 100


class FileKind:
    """Content classes that `sniff` tells apart before any framework is imported."""

    ONNX = "onnx"
    EXPORTED_PROGRAM = "pt2"
    TORCHSCRIPT = "torchscript"
    TORCH_PICKLE = "torch-pickle"  # torch.save output: a state_dict or a pickled module
    SAFETENSORS = "safetensors"


def sniff(path: Path) -> str:
    """The `FileKind` of a file, from its bytes."""
    if not path.exists():
        raise InputError(f"no such file: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a model file")
    with path.open("rb") as handle:
        head = handle.read(16)
    if not head:
        raise InputError(f"{path} is empty")
    if head.startswith(ZIP_MAGIC):
        return _sniff_zip(path)
    if head[0] == PICKLE_PROTO:
        return FileKind.TORCH_PICKLE
    if _is_safetensors(path, head):
        return FileKind.SAFETENSORS
    if _looks_like_onnx(path):
        return FileKind.ONNX
    raise UnsupportedFormatError(
        f"{path} is not a model bnfold can read",
        "supported: ONNX, torch.export .pt2, TorchScript, torch.save pickles and state_dicts, safetensors")


def _sniff_zip(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            unpacked = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise InputError(f"{path} is a damaged zip archive ({error})") from None
    if len(set(names)) != len(names):  # zipfile and torch's reader would disagree on which copy counts
        raise InputError(f"{path} is a damaged zip archive (an entry name occurs twice)")
    if unpacked > max(MAX_ZIP_RATIO * path.stat().st_size, 2**26):
        raise InputError(f"{path} would unpack to {unpacked:,} bytes, {unpacked // path.stat().st_size}x its "
                         "size: a zip bomb, not a model (torch stores weights uncompressed)")
    leaves = {name.split("/", 1)[-1] for name in names}
    if "archive_format" in leaves or any(leaf.startswith("models/") for leaf in leaves):
        return FileKind.EXPORTED_PROGRAM
    if "constants.pkl" in leaves or any(leaf.startswith("code/") for leaf in leaves):
        return FileKind.TORCHSCRIPT
    if "data.pkl" in leaves:
        return FileKind.TORCH_PICKLE
    raise UnsupportedFormatError(f"{path} is a zip archive but not one written by torch")


def _is_safetensors(path: Path, head: bytes) -> bool:
    if len(head) < 9:
        return False
    (header_size,) = struct.unpack("<Q", head[:8])
    if head[8:9] != b"{" or header_size > path.stat().st_size - 8:
        return False
    with path.open("rb") as handle:
        handle.seek(8)
        try:
            json.loads(handle.read(header_size))
        except ValueError:
            return False
    return True


def _looks_like_onnx(path: Path) -> bool:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError, UnicodeDecodeError):
        return False
    except Exception:  # protobuf raises a variety of errors on garbage
        return False
    return model.ir_version > 0 and model.HasField("graph")


def load_model(path: str | Path, options: LoadOptions | None = None) -> Model:
    """Load any supported model file; the format comes from the content, not the extension."""
    path = Path(path)
    options = options or LoadOptions()
    kind = sniff(path)
    if kind == FileKind.ONNX:
        from bnfold.onnx.model import OnnxModel

        return OnnxModel.load(path)
    from bnfold.pytorch.model import load_torch_model

    return load_torch_model(path, kind, options)




def as_model(source: object, options: LoadOptions | None = None) -> Model:
    """A `Model` from a path, an already loaded `Model`, an onnx.ModelProto or a torch object."""
    if isinstance(source, Model):
        return source
    if isinstance(source, (str, Path)):
        return load_model(source, options)
    module_name = type(source).__module__
    if module_name.startswith("onnx"):
        from bnfold.onnx.model import OnnxModel

        return OnnxModel(Path("<memory>.onnx"), source)  # type: ignore[arg-type]
    if module_name.startswith("torch") or hasattr(source, "named_modules"):
        from bnfold.pytorch.model import wrap_torch_object

        return wrap_torch_object(source)
    raise UnsupportedFormatError(f"cannot use a {type(source).__name__} as a model",
                                 "pass a file path, an onnx.ModelProto or a torch nn.Module")


__all__ = ["FileKind", "LoadOptions", "Model", "ModelFormat", "as_model", "load_model", "sniff"]
