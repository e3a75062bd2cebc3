"""Process-level tuning for moving bulk data through Python buffers.

Every socket read hands the relay a fresh ``bytes`` of up to 256 KiB. glibc serves allocations above its
*dynamic* mmap threshold (128 KiB until the first large free raises it) with a private mapping each
time: map, fault in and zero 64 pages, unmap, per read. Whether a process escapes that depends on
allocation history, so identical proxy processes were measured at 0.9 or 1.5 CPU seconds per GB.
Pinning the thresholds makes big buffers come from (and return to) the heap, deterministically.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("mesh.hbone.tuning")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 1024 * 1024  # above any buffer the tunnel allocates (frames are at most 1 MiB)
TRIM_THRESHOLD = 32 * 1024 * 1024  # free heap kept before it is given back to the kernel

_done: bool | None = None


def tune_allocator() -> bool:
    """Pin glibc's malloc thresholds (once per process); False where that is not glibc."""
    global _done
    if _done is not None:
        return _done
    _done = False
    try:
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
        if mallopt is None:
            return False
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
        _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except OSError as exc:
        log.debug("cannot tune malloc: %s", exc)
    return _done
