"""glibc malloc settings for running torch models on the CPU: freed memory is kept for reuse instead of being
handed back to the kernel.

torch takes CPU tensors from malloc. glibc serves a block above its mmap threshold (128 KiB, rising to at most
32 MiB) with a fresh mmap and unmaps it on free, so each activation of a conv net at 224 px is new memory that
the kernel faults in and zeroes page by page. EfficientNet-Lite0 forward passes, 2 threads, AMD EPYC (AVX512)
with 2 cores: at batch 128, 37 images/s with more CPU time in the kernel than in torch (3.6M page faults per 256
images); with malloc's mmap off (M_MMAP_MAX 0) and the heap trimmed only when 2 GiB lie free at its top
(M_TRIM_THRESHOLD), 108 images/s and no faults; batch 16, 60 -> 117 images/s. The results are the same (where
memory comes from does not change the arithmetic; the pinned checkpoints in test_pins.py check it). The cost:
freed memory goes back to the kernel only from the top of the heap once 2 GiB lie free there, so a process's
resident size stays near its peak; hence this is set only in processes that run models, whose peak is their
arrays and activations anyway. jemalloc or tcmalloc would do the same but must be preloaded before the process
starts (LD_PRELOAD), which no Dagster step can do for itself; mallopt takes effect at once.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int

_applied = False


def keep_freed_memory() -> bool:
    """Apply the settings above to this process (once; on glibc only). Returns whether they are in effect."""
    global _applied
    if not _applied and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)
        _applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _applied
