"""One rule for CPU threads: worker processes × intra-op threads per process = the cores this process may
use, and OpenMP threads that sleep rather than spin while they wait.

Oversubscribed OpenMP threads spin: 2 worker processes × 2 torch threads on 2 cores ran ~3× slower in
wall time than × 1. And a spinning team starves whatever shares its cores: on 2 cores, 200 passes of a
small conv net on 2 torch threads took 1.05 s alone and 8.9 s beside one busy Pillow process with
OpenMP's default (active) waiting, 1.15 s and 1.7 s with OMP_WAIT_POLICY=PASSIVE (measured here:
Intel Xeon, AVX512-BF16). So PASSIVE costs ~10 % on idle cores and saves 5× on shared ones, and the
steps set it. It must be in the environment before the OpenMP runtime loads (torch's first import), so
it is set when `emopipe.definitions` is imported and passed to every worker process we start.
"""

from __future__ import annotations

import os

WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE"}


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, as a container or taskset limits it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Intra-op threads for each of `workers` processes sharing `cores` (default: available_cores())."""
    return max(1, (cores or available_cores()) // max(1, workers))


def worker_environment(threads: int) -> dict[str, str]:
    """Environment variables for a worker process that should use `threads` intra-op threads."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **WAIT_POLICY}


def prefer_passive_waiting() -> None:
    """Set OMP_WAIT_POLICY=PASSIVE for this process and its children, unless the user chose a policy."""
    for key, value in WAIT_POLICY.items():
        os.environ.setdefault(key, value)
