"""Find what a torch file would execute, without executing it.

Unpickling runs arbitrary code through the globals it imports (GLOBAL / STACK_GLOBAL opcodes). Walking
the opcode stream with `pickletools` reads those names and runs nothing, so a refusal can tell the user
exactly which classes and functions a file would load.

Archives hide code in more places. `torch.export.load` unpickles sample inputs, pickled weights and
constants (falling back to full unpickling when a weights-only load fails) and loads AOTInductor's
compiled libraries; TorchScript code runs at load time (`__setstate__`) and, like an exported graph,
may call operators that read or overwrite any file the user can access. `scan_exported_program` and
`scan_torchscript` list all of it; the loader refuses what it cannot prove harmless.
"""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_MEMO_PUT = {"BINPUT", "LONG_BINPUT", "PUT"}
_MEMO_GET = {"BINGET", "LONG_BINGET", "GET"}


def pickle_imports(data: bytes) -> list[str]:
    """Sorted `module.name` strings of every global the pickle references."""
    found: set[str] = set()
    memo: dict[int, object] = {}
    recent: list[object] = []  # the values last pushed, enough to resolve STACK_GLOBAL
    try:
        for opcode, arg, _ in pickletools.genops(data):
            name = opcode.name
            if name in _STRING_OPS:
                recent.append(arg)
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name in _MEMO_PUT:
                memo[int(arg)] = recent[-1] if recent else None
            elif name in _MEMO_GET:
                recent.append(memo.get(int(arg)))
            elif name == "GLOBAL":
                module, _, attribute = str(arg).partition(" ")
                found.add(f"{module}.{attribute}")
            elif name == "STACK_GLOBAL":
                module, attribute = (recent[-2], recent[-1]) if len(recent) >= 2 else (None, None)
                found.add(f"{module}.{attribute}" if isinstance(module, str) and isinstance(attribute, str)
                          else "<unresolved global>")
                recent.append(None)
            else:
                recent.append(None)
            del recent[:-2]
    except Exception:  # a truncated or odd stream: report what was read so far
        found.add("<unreadable remainder>")
    return sorted(found)


def archive_pickle_imports(source: Path | bytes) -> list[str]:
    """Imports of the main pickle in a torch.save zip archive, or of a legacy (non-zip) pickle."""
    stream: IO[bytes] = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    with stream:
        if not zipfile.is_zipfile(stream):
            stream.seek(0)
            return pickle_imports(stream.read())
        try:
            with zipfile.ZipFile(stream) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                return pickle_imports(archive.read(min(names, key=len))) if names else []
        except Exception:  # a damaged archive (CRC, headers, compression): nothing more can be listed
            return ["<unreadable archive>"]


_TORCH_WEIGHT_GLOBALS = ("torch._utils.", "torch.", "collections.OrderedDict", "builtins.")


def foreign_imports(imports: list[str]) -> list[str]:
    """The imports that are not part of torch's tensor-rebuilding machinery: the user's classes."""
    return [name for name in imports if not name.startswith(_TORCH_WEIGHT_GLOBALS)]


# Operators that read or write a file the model names: a model calling them can leak or overwrite any
# file the user can access, so they count as code. (No other registered operator takes a path.)
FILE_OPS = {"from_file": "aten::from_file", "save": "aten::save", "load_tensor": "debugprims::load_tensor"}
_FILE_OP_WORD = re.compile(r"\b(" + "|".join(FILE_OPS) + r")\b")
_FILE_OP_TARGET = re.compile(r"(?:^|[.:#])(" + "|".join(FILE_OPS) + r")(?:[.:]|$)")
# .pt2 members torch reads as text or JSON, never unpickles (paths below the archive's root folder).
_PT2_TEXT = re.compile(r"archive_format|archive_version|byteorder|version|\.data/(version|serialization_id)"
                       r"|models/[^/]+\.json|data/(weights|constants)/[^/]+_config\.json|extra/.+"
                       r"|serialized_\w+\.json")
_AOTINDUCTOR = "data/aotinductor/"


@dataclass
class ArchiveScan:
    """What loading or running a torch archive may execute, found without executing anything."""

    pickles: dict[str, bytes] = field(default_factory=dict)  # harmless only if they load weights-only
    code: dict[str, list[str]] = field(default_factory=dict)  # member -> what it runs, whatever its data


def scan_exported_program(path: Path) -> ArchiveScan:
    """Every .pt2 member torch may unpickle (all but text, JSON and declared raw tensor data), the
    AOTInductor libraries it would load, and graphs that call file operators."""
    scan = ArchiveScan()
    with zipfile.ZipFile(path) as archive:
        members = {name.split("/", 1)[-1]: name for name in archive.namelist() if not name.endswith("/")}
        raw = _raw_payloads(archive, members)
        for leaf, name in members.items():
            if leaf.startswith(_AOTINDUCTOR):
                scan.code[leaf] = ["AOTInductor compiled native code"]
            elif leaf.startswith("models/") and leaf.endswith(".json"):
                ops = _graph_file_ops(archive.read(name))
                if ops:
                    scan.code[leaf] = ops
            elif not (_PT2_TEXT.fullmatch(leaf) or leaf in raw):
                scan.pickles[leaf] = archive.read(name)
    return scan


def _raw_payloads(archive: zipfile.ZipFile, members: dict[str, str]) -> set[str]:
    """Members that weights/constants configs declare as raw tensor bytes (read without unpickling)."""
    raw, pickled = set(), set()
    for leaf, name in members.items():
        match = re.fullmatch(r"(data/(?:weights|constants)/)[^/]+_config\.json", leaf)
        if not match:
            continue
        try:
            entries = json.loads(archive.read(name))["config"].values()
            for entry in entries:
                (pickled if entry.get("use_pickle", True) else raw).add(match.group(1) + str(entry["path_name"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # torch cannot read this config either; its members stay suspects
    return raw - pickled


def _graph_file_ops(document: bytes) -> list[str]:
    """File operators named anywhere in a serialized graph (targets, operator arguments)."""
    try:
        pending = [json.loads(document)]
    except ValueError:
        return []  # torch.export.load rejects it before running anything
    found = set()
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            found.update(FILE_OPS[op] for op in _FILE_OP_TARGET.findall(item))
    return sorted(found)


def scan_torchscript(path: Path) -> ArchiveScan:
    """TorchScript code that calls file operators. Its pickles need no scan: TorchScript's own
    unpickler resolves only TorchScript types and refuses any Python global."""
    scan = ArchiveScan()
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if "/code/" in f"/{name}" and name.endswith(".py"):
                text = archive.read(name).decode("utf-8", errors="replace")
                ops = sorted({FILE_OPS[word] for word in _FILE_OP_WORD.findall(text)})
                if ops:
                    scan.code[name.split("/", 1)[-1]] = ops
    return scan


class _Stub:
    """Stands in for every class a pickle names, so reading it imports and runs nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:  # containers (OrderedDict) fill themselves
        pass

    def append(self, value: object) -> None:
        pass

    def extend(self, values: object) -> None:
        pass


class _StorageReader(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: list[tuple] = []

    def find_class(self, module: str, name: str) -> type:
        return type(name, (_Stub,), {"__qualname__": f"{module}.{name}"})

    def persistent_load(self, pid: object) -> None:
        self.storages.append(pid if isinstance(pid, tuple) else (pid,))


def storage_records(data: bytes) -> list[tuple[str, str, int]]:
    """(storage class, record key, element count) of every tensor storage a torch pickle refers to.

    Read with stand-in classes: no global is imported and no code runs. Raises ValueError when the
    pickle cannot be read or names a storage in an unexpected form.
    """
    reader = _StorageReader(data)
    try:
        reader.load()
    except Exception as error:  # a damaged pickle: whatever went wrong, it cannot be trusted
        raise ValueError(f"unreadable pickle ({type(error).__name__})") from None
    records = []
    for pid in reader.storages:
        if len(pid) != 5 or pid[0] != "storage" or not isinstance(pid[2], str) or not isinstance(pid[4], int):
            raise ValueError(f"unexpected storage reference {pid!r:.80}")
        records.append((getattr(pid[1], "__qualname__", repr(pid[1])), pid[2], pid[4]))
    return records
