"""Training on several GPUs or machines: DistributedDataParallel processes (torchrun across machines).

The parent (the `trained_model` asset) trains nothing and loads no model: it writes the training data
once into the run folder (<work_dir>/runs/<run key>/job/: one .npy file per array, memory-mapped by
every rank, plus job.json), starts the ranks (`python -m emopipe.core.trained_model.distributed <job folder>`)
and streams their output. DuckDB stays with the parent: the ranks never open the database
(one read-write process per file), and the parent records the `models` row from the result.json that
rank 0 writes. Each rank runs train_model's loop (run.py) on its shard of every epoch.

One machine: no torchrun. The parent starts the ranks itself and they meet in a FileStore in the job
folder, so no port is opened for the rendezvous: torchrun's rendezvous server (a TCPStore) listens on
every interface whatever address it is given, and has no authentication. Gloo and NCCL's bootstrap
then connect over the loopback interface. Several machines: torchrun; the rendezvous endpoint
(host:port of the first node) comes from the caller or EMOPIPE_RDZV_ENDPOINT, and the same torchrun
command, logged by the parent, is run on every other node; the data directory must be on storage that
all nodes mount at the same path.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import queue
import subprocess
import sys
import threading
from collections import deque
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

import emopipe
from emopipe.threads import threads_per_worker, worker_environment
from emopipe.atomic import atomic_write
from emopipe.catalog import ExperimentSpec
from emopipe.core.device_data import Ranks
from emopipe.core.trained_model.checkpoint import experiment_from_dict, spec_dict
from emopipe.core.trained_model.data import Log, TrainingData, TrainingError, check_data
from emopipe.core.trained_model.run import TrainResult, finished_result, run_directory, train_model
from emopipe.paths import data_dir

RDZV_ENDPOINT_ENV = "EMOPIPE_RDZV_ENDPOINT"
STORE_ENV = "EMOPIPE_RANK_STORE"  # one machine: the FileStore the ranks meet in
STORE_FILE = "rendezvous"
# Rank 0 alone fills a linear probe's feature cache while the others wait in a barrier.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)
ARRAYS = ("x_train", "x_val", "y_train", "y_val")


def world_size(experiment: ExperimentSpec) -> int:
    return experiment.gpus * experiment.nodes


def train_distributed(experiment: ExperimentSpec, data: TrainingData, *, split_id: str, work_dir: Path,
                      log: Log = print, device: str | None = None, feature_cache: Path | None = None,
                      rdzv_endpoint: str | None = None) -> TrainResult:
    """Train with experiment.gpus processes on each of experiment.nodes machines (torchrun) and return
    rank 0's TrainResult; a finished run with the same inputs is returned without starting anything.

    Each process takes batch_size images per step (the global batch is world size x batch_size).
    device: None: a GPU per process (nccl) when CUDA is there, else CPU processes (gloo); "cpu": CPU.
    rdzv_endpoint: host:port of the rendezvous for several nodes (default: $EMOPIPE_RDZV_ENDPOINT).
    """
    check_data(experiment, data)
    world = world_size(experiment)
    work_dir = Path(work_dir).resolve()
    run_dir, _ = run_directory(experiment, data, split_id, work_dir, world)
    finished = finished_result(run_dir)
    if finished is not None:
        log(f"{experiment.name}: already trained (run {run_dir.name}): model {finished.model_id}")
        return finished
    if device not in (None, "cpu"):
        raise ValueError(f"device: None or 'cpu', not {device!r} (each rank takes the GPU of its local rank)")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda and experiment.gpus > torch.cuda.device_count():
        raise TrainingError(f"experiment {experiment.name!r}: gpus: {experiment.gpus} but this machine has "
                            f"{torch.cuda.device_count()} CUDA GPU(s)")
    if not use_cuda:
        log(f"{experiment.name}: {world} CPU training processes (gloo); no CUDA GPU is used")
    job_dir = write_job(run_dir / "job", experiment, data, split_id=split_id, work_dir=work_dir,
                        feature_cache=Path(feature_cache).resolve() if feature_cache else data_dir().resolve() / "features",
                        device="cuda" if use_cuda else "cpu")
    if experiment.nodes == 1:
        log(f"{experiment.name}: {world} training processes on this machine, meeting in {job_dir / STORE_FILE}")
        _run_ranks(rank_command(job_dir), world, job_dir / STORE_FILE, rank_environment(experiment, use_cuda), log)
    else:
        command = torchrun_command(experiment, job_dir, rdzv_endpoint=rdzv_endpoint, run_id=run_dir.name[:16])
        log(f"{experiment.name}: waiting for {experiment.nodes - 1} more node(s); on each, in this project's "
            f"environment, run: {shlex.join(['torchrun', *command[3:]])}")
        log(f"{experiment.name}: {shlex.join(command)}")
        _run(command, rank_environment(experiment, use_cuda), log)
    result = finished_result(run_dir)
    if result is None:
        raise TrainingError(f"experiment {experiment.name!r}: the training processes finished but {run_dir / 'result.json'} "
                            f"names no checkpoint")
    shutil.rmtree(job_dir, ignore_errors=True)  # a copy of the arrays; the run folder keeps last.pt
    return result


def write_job(job_dir: Path, experiment: ExperimentSpec, data: TrainingData, *, split_id: str, work_dir: Path,
              feature_cache: Path, device: str) -> Path:
    """The ranks' inputs: the arrays as .npy files and job.json (written last: the job is complete
    once it exists). The folder belongs to one run key, so a resumed run reuses it as it is."""
    if (job_dir / "job.json").is_file():
        return job_dir
    job_dir.mkdir(parents=True, exist_ok=True)
    for name in ARRAYS:
        array = np.ascontiguousarray(getattr(data, name))
        atomic_write(job_dir / f"{name}.npy", lambda f: np.save(f, array))
    job = {"experiment": spec_dict(experiment), "origin": experiment.origin, "split_id": split_id,
           "work_dir": str(work_dir), "feature_cache": str(feature_cache), "device": device,
           "world_size": world_size(experiment), "classes": data.classes, "targets": data.targets,
           "train_ids": data.train_ids, "val_ids": data.val_ids}
    atomic_write(job_dir / "job.json", lambda f: f.write(json.dumps(job).encode()))
    return job_dir


def rank_command(job_dir: Path) -> list[str]:
    return [sys.executable, "-m", "emopipe.core.trained_model.distributed", str(job_dir)]


def torchrun_command(experiment: ExperimentSpec, job_dir: Path, *, rdzv_endpoint: str | None = None,
                     run_id: str = "emopipe") -> list[str]:
    """python -m torch.distributed.run for several machines: this machine's processes and the rendezvous."""
    endpoint = rdzv_endpoint or os.environ.get(RDZV_ENDPOINT_ENV)
    if not endpoint:
        raise TrainingError(
            f"experiment {experiment.name!r}: nodes: {experiment.nodes} needs a rendezvous endpoint, host:port of "
            f"the first node reachable from every node: set {RDZV_ENDPOINT_ENV} (see README, 'Scale-out')")
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(experiment.nodes),
            "--nproc-per-node", str(experiment.gpus), "--max-restarts", "0",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id, *rank_command(job_dir)]


def _run_ranks(command: list[str], world: int, store: Path, env: dict[str, str], log: Log) -> None:
    """Start `world` ranks of `command` on this machine (RANK, LOCAL_RANK, WORLD_SIZE as torchrun sets them,
    plus the FileStore), stream their output, and stop the others as soon as one fails."""
    store.unlink(missing_ok=True)  # a FileStore left by a killed run would hold its old keys
    read_end, write_end = os.pipe()  # one pipe for all: lines of up to PIPE_BUF bytes do not interleave
    ranks = []
    try:
        for rank in range(world):
            rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                        "LOCAL_WORLD_SIZE": str(world), STORE_ENV: str(store)}
            ranks.append(subprocess.Popen(command, env=rank_env, stdout=write_end, stderr=write_end))
    finally:
        os.close(write_end)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(read_end, lines), daemon=True).start()
    tail: deque[str] = deque(maxlen=40)
    try:  # log() runs here, in the caller's thread: what it raises stops the ranks
        while True:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                if any(r.poll() not in (None, 0) for r in ranks):
                    break  # one failed: the others would wait for it in a collective
                continue
            if line is None:  # every rank closed its output
                break
            tail.append(line)
            log(line)
    finally:
        for r in ranks:
            if r.poll() is None:
                r.terminate()
        for r in ranks:
            try:
                r.wait(timeout=60)
            except subprocess.TimeoutExpired:
                r.kill()
                r.wait()
    failed = [(n, r.returncode) for n, r in enumerate(ranks) if r.returncode != 0]
    if failed:
        raise TrainingError(f"distributed training failed (rank {failed[0][0]} exit code {failed[0][1]}); last output:\n"
                            + "\n".join(tail))


def _read_lines(fd: int, lines: queue.Queue) -> None:
    with os.fdopen(fd, errors="replace") as stream:
        for line in stream:
            lines.put(line.rstrip())
    lines.put(None)


def rank_environment(experiment: ExperimentSpec, use_cuda: bool) -> dict[str, str]:
    env = dict(os.environ)
    package_root = str(Path(emopipe.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    if not use_cuda:  # CPU ranks share the cores: ranks x threads = cores (emopipe/threads.py)
        for key, value in worker_environment(threads_per_worker(experiment.gpus)).items():
            env.setdefault(key, value)
    if experiment.nodes == 1 and Path("/sys/class/net/lo").exists():
        # One machine: gloo and NCCL's bootstrap connect over the loopback interface only.
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    return env


def _run(command: list[str], env: dict[str, str], log: Log) -> None:
    tail: deque[str] = deque(maxlen=40)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               bufsize=1)
    try:
        for line in process.stdout:
            line = line.rstrip()
            tail.append(line)
            log(line)
        returncode = process.wait()
    finally:
        if process.poll() is None:  # the parent was interrupted: torchrun stops its ranks on SIGTERM
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    if returncode != 0:
        raise TrainingError(f"distributed training failed (torchrun exit code {returncode}); last output:\n"
                            + "\n".join(tail))


# --- one rank -----------------------------------------------------------------------------------------


def read_job(job_dir: Path) -> tuple[dict, ExperimentSpec, TrainingData]:
    """(job.json, the experiment, the training data memory-mapped copy-on-write: shared page cache)."""
    job = json.loads((job_dir / "job.json").read_text())
    arrays = {name: np.load(job_dir / f"{name}.npy", mmap_mode="c") for name in ARRAYS}
    data = TrainingData(job["classes"], job["targets"], job["train_ids"], job["val_ids"], **arrays)
    return job, experiment_from_dict(job["experiment"], job["origin"]), data


def main(argv: list[str] | None = None) -> int:
    """A rank: `python -m emopipe.core.trained_model.distributed JOB_DIR` (RANK, WORLD_SIZE, LOCAL_RANK from torchrun or _run_ranks)."""
    import torch.distributed as dist

    argv = sys.argv[1:] if argv is None else argv
    job, experiment, data = read_job(Path(argv[0]))
    rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if world != job["world_size"]:
        raise SystemExit(f"{world} processes were started in all but experiment {experiment.name!r} "
                         f"trains with gpus x nodes = {job['world_size']}")
    use_cuda = job["device"] == "cuda"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    # One machine: the FileStore train_distributed named (no port); several: torchrun's env:// rendezvous.
    store = os.environ.get(STORE_ENV)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=COLLECTIVE_TIMEOUT,
                            device_id=device if use_cuda else None,
                            **({"init_method": f"file://{store}", "rank": rank, "world_size": world} if store else {}))
    try:
        train_model(experiment, data, split_id=job["split_id"], work_dir=Path(job["work_dir"]),
                    log=(lambda line: print(line, flush=True)) if rank == 0 else (lambda _: None),
                    device=device, feature_cache=Path(job["feature_cache"]), ranks=Ranks(rank, world, local_rank))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
