import os
import platform

import numpy as np
import pytest

from emopipe.allocator import keep_freed_memory

BLOCK = 64 << 20


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_freed_block_is_kept_and_reused():
    assert keep_freed_memory() and keep_freed_memory()  # once per process; a second call changes nothing
    np.ones(BLOCK // 8)  # written, then freed at once
    resident = _resident_bytes()
    block = np.ones(BLOCK // 8)
    # Reused: no new memory. glibc's default maps a fresh block and unmaps it on free (+64 MiB here).
    assert _resident_bytes() - resident < BLOCK // 8, block.size
