"""The process heap: glibc keeps freed blocks mapped and resident unless it is asked to hand them
back, so a long-lived server creeps up model after model and a measured peak hides in reused blocks."""
from __future__ import annotations

import ctypes
import functools
import gc
from typing import Optional

M_MMAP_THRESHOLD = -3   # mallopt's parameter number in glibc's malloc.h


@functools.cache
def glibc() -> Optional[ctypes.CDLL]:
    """The C library when it is glibc; None elsewhere (macOS, Windows, musl): nothing to hand back."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def trim() -> None:
    """Hand the heap's free pages back to the system."""
    if glibc() is not None:
        glibc().malloc_trim(0)


def return_freed_memory() -> None:
    """Collect what was just released (a model, a session) and hand the freed pages back."""
    gc.collect()
    trim()


def return_large_blocks_on_free(threshold: int = 65536) -> None:
    """Serve every block of `threshold` bytes or more by its own mapping, returned when freed, so
    that each step's peak shows in VmHWM (slower steps: for measuring only)."""
    if glibc() is not None:
        glibc().mallopt(M_MMAP_THRESHOLD, threshold)
