import os
import subprocess
import sys

import pytest

from cascade_vsr.core import allocator

# In a fresh process: optionally apply the settings, then allocate 20 MiB and report glibc's mmapped bytes
# (`hblkhd`, the fifth field of mallinfo2, or of mallinfo before glibc 2.33): a block of that size is mmapped by
# default and kept in the heap after `keep_freed_memory`.
PROBE = """
import ctypes, sys
from cascade_vsr.core.allocator import keep_freed_memory

libc = ctypes.CDLL(None)
field = ctypes.c_size_t if hasattr(libc, "mallinfo2") else ctypes.c_int
class MallInfo(ctypes.Structure):
    _fields_ = [(name, field) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

applied = keep_freed_memory() if sys.argv[1] == "keep" else False
mallinfo = libc.mallinfo2 if hasattr(libc, "mallinfo2") else libc.mallinfo
mallinfo.restype = MallInfo
block = bytearray(20 << 20)
print(applied, mallinfo().hblkhd >= 20 << 20)
"""


def _probe(mode: str, env: dict[str, str]) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True, timeout=60
    )
    return result.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")
def test_keep_freed_memory_keeps_large_blocks_in_the_heap():
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    assert _probe("default", env) == ["False", "True"]  # glibc's default: a 20 MiB block is mmapped
    assert _probe("keep", env) == ["True", "False"]  # kept in the heap
    assert _probe("keep", {**env, "MALLOC_ARENA_MAX": "2"}) == ["False", "True"]  # the user's MALLOC_* wins


def test_keep_freed_memory_leaves_other_platforms_alone(monkeypatch):
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False
