"""Keep freed memory from piling up: a fold frees whole models' worth of weights at once (the original
after rewriting, a runtime session after running it), and the next step should not stack on top.

glibc's malloc serves blocks up to its mmap threshold from its heap, raises that threshold (up to
32 MB) whenever it frees a mapped block, and keeps freed heap pages. So after the first freed weight,
weight-sized blocks stay in the heap, fragment it and are not given back: a verified fold of a 300 MB
model peaked at 2.9 times its weights instead of 2.2. The CLI fixes the threshold (`map_large_blocks`);
`release` trims the heap after large frees, for library callers too. Both do nothing without glibc.
"""

from __future__ import annotations

import ctypes
import functools

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers, from glibc's malloc.h
LARGE_BLOCK = 2**20  # bytes: blocks this large get their own mapping in the CLI


def map_large_blocks(threshold: int = LARGE_BLOCK, trim_threshold: int | None = None) -> None:
    """Serve blocks of `threshold` bytes and more from their own mappings, unmapped when freed, for the
    rest of the process; with `trim_threshold`, keep up to that many free bytes atop the heap rather than
    give them back. For a process of bnfold's own (the CLI's, a benchmark's): a library must not change
    its host's allocator."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)
        if trim_threshold is not None:
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)


def release() -> None:
    """Give freed heap memory back to the OS (glibc's malloc_trim)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018 (both exist only in glibc)
    except (OSError, TypeError, AttributeError):  # not glibc (macOS, musl, Windows)
        return None
    return libc
