"""The thread rule (emopipe/threads.py): workers x threads = cores, and OpenMP waits passively in the
step processes and the workers they start unless the user chose otherwise."""

import os
import subprocess
import sys

from emopipe.catalog import ExperimentSpec
from emopipe.core.trained_model.distributed import rank_environment
from emopipe.threads import threads_per_worker


def test_workers_times_threads_is_the_cores():
    assert [threads_per_worker(w, 16) for w in (1, 2, 3, 4, 16, 32)] == [16, 8, 5, 4, 1, 1]
    assert threads_per_worker(2, 2) == 1 and threads_per_worker(0, 2) == 2


def test_cpu_ranks_share_the_cores():
    env = rank_environment(ExperimentSpec(name="e", dataset="d", gpus=2), use_cuda=False)
    assert int(env["OMP_NUM_THREADS"]) == threads_per_worker(2) and env["OMP_WAIT_POLICY"] == "PASSIVE"


def wait_policy_after_loading_definitions(**env) -> str:
    code = "import os, emopipe.definitions; print(os.environ.get('OMP_WAIT_POLICY'))"
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
    return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_step_processes_wait_passively_unless_the_user_says_otherwise():
    assert wait_policy_after_loading_definitions() == "PASSIVE"
    assert wait_policy_after_loading_definitions(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
