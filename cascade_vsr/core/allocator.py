"""glibc allocator settings for the command line's CPU work.

A transformer on CPU frees and allocates activations of a few MiB at every layer. With glibc's defaults a freed
block that large goes back to the OS (unmapped, or trimmed from the heap's top) and the next one of its size is
fresh memory again, paid for in page faults: about 300 per frame when streaming the demo model, and more in the
windowed path's larger layouts. `keep_freed_memory` tells glibc to keep such blocks for reuse, as `make demo`'s
`MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` variables do (or jemalloc / tcmalloc would). The process's
peak memory is unchanged; its resident memory no longer shrinks after the peak.
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's cap on M_MMAP_THRESHOLD on 64-bit systems
TRIM_NEVER = 2**31 - 1


def keep_freed_memory() -> bool:
    """Keep freed blocks of up to 32 MiB in glibc's heap and never trim it, unless the environment already sets a
    `MALLOC_*` variable (the user's choice wins). Returns whether the settings were applied: False on other
    platforms or C libraries."""
    if not sys.platform.startswith("linux") or any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_NEVER))
