"""The aggregator process's heap: large buffers go back to the system when freed.

glibc serves a large allocation with its own mmap, returned to the system on free, but
raises that threshold after each such free (up to 32 MiB). After the first freed tensor
of an upload, same-size tensors and bodies come from the per-thread arenas instead, and
each of the many request threads' arenas keeps what it once held: measured on 16
concurrent 8 MiB uploads, the peak RSS grew by 174 MiB with the moving threshold and by
46 MiB (one round's accumulator and result) with a fixed one. Fixing it keeps the peak
flat in the number of concurrent uploads.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h); setting it also stops the dynamic adjustment
THRESHOLD = 1024 * 1024


def return_large_buffers(threshold: int = THRESHOLD) -> bool:
    """Serve allocations of `threshold` bytes or more by mmap for good; False where libc is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
