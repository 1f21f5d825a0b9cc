"""Large CPU tensors without a page fault per 4 KiB: glibc's malloc told to keep freed memory.

By default glibc serves every allocation over 32 MiB with a fresh `mmap` and returns it to the
kernel on free, so each forward pass faults in every page of its large activations again. On the
evaluation's shapes that costs more than the arithmetic of the memory-bound ops: GELU over a
[4096, 3072] float32 activation (48 MiB) runs at 0.8 G elements/s into a fresh tensor and at 4 G
elements/s into a reused one (2-core CPU). PyTorch's CPU performance guide recommends a caching
allocator (jemalloc, tcmalloc) for the same reason; this gets the effect from glibc itself: no
`mmap` for allocations, one arena for all threads, freed memory kept in the heap for the next
allocation. The process's resident memory then stays at its peak.

Process-wide. The engine applies it when it evaluates on CPU; CUDA memory is unaffected (PyTorch's
CUDA allocator already caches).
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_KEEP = 2**31 - 1  # bytes of free memory at the top of the heap before it is returned (the int maximum)

_applied = False


def keep_freed_memory() -> bool:
    """Configure glibc's malloc as above, once per process. False where the C library is not glibc."""
    global _applied
    if _applied:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = all(
        mallopt(param, value) == 1 for param, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP), (_M_ARENA_MAX, 1))
    )
    return _applied
