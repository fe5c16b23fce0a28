import ctypes
import os
import subprocess
import sys

import pytest

from cascade_vsr.core import allocator

# In a fresh process: optionally apply the settings, then allocate 20 MiB and report glibc's mmapped bytes
# (mallinfo2().hblkhd, the fifth field): a block of that size is mmapped by default and kept in the heap after
# `keep_freed_memory`.
PROBE = """
import ctypes, sys
from cascade_vsr.core.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

applied = keep_freed_memory() if sys.argv[1] == "keep" else False
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
block = bytearray(20 << 20)
print(applied, mallinfo2().hblkhd >= 20 << 20)
"""


def _probe(mode: str, env: dict[str, str]) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True, timeout=60
    )
    return result.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")
def test_keep_freed_memory_keeps_large_blocks_in_the_heap():
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("no glibc >= 2.33 mallinfo2 to observe the heap")
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    assert _probe("default", env) == ["False", "True"]  # glibc's default: a 20 MiB block is mmapped
    assert _probe("keep", env) == ["True", "False"]  # kept in the heap
    assert _probe("keep", {**env, "MALLOC_ARENA_MAX": "2"}) == ["False", "True"]  # the user's MALLOC_* wins


def test_keep_freed_memory_leaves_other_platforms_alone(monkeypatch):
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False
