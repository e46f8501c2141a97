"""Freed block buffers go back to the operating system at once, in the streaming commands.

glibc's malloc serves large allocations with ``mmap`` and returns them on ``free``, but after the
first such free it raises that threshold to the freed size: from then on the streaming commands'
blocks (tens of MiB, allocated on one thread and freed on the writer thread) come from heaps that
are not returned, and peak RSS grows by a few blocks per thread (measured: 489 -> 309 MiB for a
1 GiB bf16 graft). A fixed threshold keeps them mapped and unmapped. Training is not affected:
only upcycle, graft and export call this.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_MMAP_THRESHOLD = -3  # mallopt parameter of glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20


def return_freed_blocks_to_the_os() -> bool:
    """Fix glibc's mmap threshold at 1 MiB; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
