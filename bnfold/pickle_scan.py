"""List what a pickle would import, without executing it.

Unpickling runs arbitrary code through the globals it imports (GLOBAL / STACK_GLOBAL opcodes). Walking
the opcode stream with `pickletools` reads those names and runs nothing, so a refusal can tell the user
exactly which classes and functions a file would load.
"""

from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path

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


def archive_pickle_imports(path: Path) -> list[str]:
    """Imports of the main pickle in a torch.save zip archive, or of a legacy (non-zip) pickle file."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            return pickle_imports(archive.read(min(names, key=len))) if names else []
    return pickle_imports(path.read_bytes())


_TORCH_WEIGHT_GLOBALS = ("torch._utils.", "torch.", "collections.OrderedDict", "builtins.")


def foreign_imports(imports: list[str]) -> list[str]:
    """The imports that are not part of torch's tensor-rebuilding machinery: the user's classes."""
    return [name for name in imports if not name.startswith(_TORCH_WEIGHT_GLOBALS)]
