"""Write outputs atomically: a temp file in the destination directory, then one rename.

An interrupt, a full disk or a crash leaves either the old file or the new one, never a mix, and never
touches the input unless the caller explicitly writes in place. Two runs racing for one output each
publish a complete file; without `replace`, the later one fails instead of replacing the first.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from bnfold.errors import OutputError, UsageError
from bnfold.model import Model, ModelFormat


def check_output_path(output: Path, source: Path | None, *, force: bool = False, in_place: bool = False) -> None:
    """Refuse outputs that would overwrite the input or an existing file without consent."""
    if output.is_dir():
        raise OutputError(f"output {output} is a directory", "give a file path with -o")
    same_as_input = source is not None and source.exists() and output.exists() and output.samefile(source)
    if same_as_input and not in_place:
        raise OutputError(f"output {output} is the input file", "pass --in-place to overwrite the input")
    if output.exists() and not (force or same_as_input):
        raise OutputError(f"output {output} already exists", "pass --force to replace it")
    if not output.parent.exists():
        raise OutputError(f"output directory {output.parent} does not exist")
    if not os.access(output.parent, os.W_OK):
        raise OutputError(f"output directory {output.parent} is not writable")


def check_output_name(output: Path, model: Model, command: str, written: ModelFormat | None = None) -> None:
    """Refuse, before any work, a name under which `command`'s output would not load: torch.export.load
    reads a program only from a `.pt2` file (torch warns, and says it will refuse), and torch.load reads a
    file named `.safetensors` as safetensors. `written`: the format `command` writes, when not `model`'s."""
    written = written or model.format
    safetensors = getattr(model, "safetensors", False)  # a state_dict read from safetensors
    what = f"{command} writes a {'safetensors' if safetensors else _NAMES.get(model.format, '')} model"
    if written is ModelFormat.EXPORTED_PROGRAM and output.suffix != ".pt2":
        raise UsageError(f"{what} as a torch.export program: name the output {output.with_suffix('.pt2').name}",
                         "torch.export.load reads a program only from a file named .pt2")
    pickled = written is ModelFormat.PICKLE or (written is ModelFormat.STATE_DICT and not safetensors)
    if pickled and output.suffix == ".safetensors":
        raise UsageError(f"{what} as a torch.save pickle: name the output {output.with_suffix('.pt').name}",
                         "torch.load reads a file named .safetensors as safetensors")


_NAMES = {ModelFormat.EXPORTED_PROGRAM: ".pt2", ModelFormat.PICKLE: "pickled", ModelFormat.STATE_DICT: "state_dict"}


def atomic_write(output: Path, write: Callable[[Path], None], *, replace: bool = True) -> int:
    """Call `write(path)` inside a fresh staging directory, then rename what it wrote into place.

    `path` already has the output's final name, so sidecar files a writer adds next to it (ONNX
    external data, `<name>.data`) are named right; they are moved first, the output file last. Without
    `replace`, the output is linked into place, which fails if another run created it meanwhile (the
    existence check before the work cannot see a run that finishes during it).
    Returns the bytes written, sidecars included.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    target = staging / output.name
    try:
        write(target)
        size = 0
        for written in sorted(staging.iterdir(), key=lambda path: path == target):
            size += written.stat().st_size
            with open(written, "rb") as handle:
                os.fsync(handle.fileno())
            _publish(written, output.parent / written.name, replace or written != target)
    except FileExistsError:
        raise OutputError(f"output {output} appeared while bnfold was working (another run?)",
                          "pass --force to replace it") from None
    except OSError as error:
        raise OutputError(f"could not write {output}: {error.strerror or error}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return size


def _publish(staged: Path, output: Path, replace: bool) -> None:
    """Rename `staged` to `output`; without `replace`, link it, which fails if `output` exists."""
    if replace:
        os.replace(staged, output)
        return
    try:
        os.link(staged, output)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP) or output.exists():
            raise
        os.replace(staged, output)  # a file system without hard links: the early check has to do
