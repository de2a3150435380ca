"""Write outputs atomically: a temp file in the destination directory, then one rename.

An interrupt, a full disk or a crash leaves either the old file or the new one, never a mix, and never
touches the input unless the caller explicitly writes in place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from bnfold.errors import OutputError


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


def atomic_write(output: Path, write: Callable[[Path], None]) -> int:
    """Call `write(path)` inside a fresh staging directory, then rename what it wrote into place.

    `path` already has the output's final name, so sidecar files a writer adds next to it (ONNX
    external data, `<name>.data`) are named right; they are moved first, the output file last.
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
            os.replace(written, output.parent / written.name)
    except OSError as error:
        raise OutputError(f"could not write {output}: {error.strerror or error}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return size
