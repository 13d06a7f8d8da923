"""Runs whose process is gone: found, marked failed, and their pool slots freed.

A run killed with SIGKILL (or by the OOM killer, or a lost machine) never reports its end: Dagster keeps
it STARTED and keeps the `gpu` pool slot it claimed, so every later training waits forever ("Step
blocked by limit for pool gpu"). The daemon's run monitoring cannot see it either: the default run
launcher offers no worker health check, and runs started from the command line (`emopipe run`,
`dagster asset materialize`) have no launcher at all. So emopipe checks the process itself: the pid
recorded with the run's RUN_START event must still exist on this host and must have started before
the run did (a pid the system has since given to another process does not count as alive).

This only applies to an instance whose run storage is SQLite, i.e. whose runs all ran on this host; a
run tagged `emopipe/host` with another host name is never touched. Used by `emopipe run` before it
launches, by `emopipe doctor --fix`, and by the `dead_runs` sensor while a daemon runs.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import dagster as dg

HOST_TAG = "emopipe/host"
PID_TAG = "emopipe/pid"
ACTIVE = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


@dataclass(frozen=True)
class DeadRun:
    run_id: str
    partition: str | None
    pid: int


def process_start_time(pid: int) -> float | None:
    """When the process started (seconds since the epoch), or None when there is no such process or it
    has ended (a zombie: killed, not yet reaped by its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # after the command name in parentheses (which may itself hold spaces): field 3 the state, 22 the start
            fields = f.read().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            return None
        ticks = int(fields[19])
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def alive(pid: int, run_started: float | None) -> bool:
    started = process_start_time(pid)
    # /proc's start time has a resolution of one clock tick and boot time one second: allow both.
    return started is not None and (run_started is None or started <= run_started + 2.0)


def _run_pid(instance: dg.DagsterInstance, run: dg.DagsterRun) -> int | None:
    if run.tags.get(PID_TAG, "").isdigit():
        return int(run.tags[PID_TAG])
    starts = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_START)
    pids = [e.dagster_event.pid for e in starts if e.dagster_event and e.dagster_event.pid]
    return pids[-1] if pids else None


def local_instance(instance: dg.DagsterInstance) -> bool:
    """Whether every run of this instance ran on this host (its run storage is a local SQLite file)."""
    return type(instance.run_storage).__name__.startswith("Sqlite")


def find_dead_runs(instance: dg.DagsterInstance) -> list[DeadRun]:
    if not local_instance(instance):
        return []
    host = socket.gethostname()
    dead = []
    for record in instance.get_run_records(dg.RunsFilter(statuses=ACTIVE)):
        run = record.dagster_run
        if run.tags.get(HOST_TAG, host) != host:
            continue
        pid = _run_pid(instance, run)
        if pid is not None and not alive(pid, record.start_time):
            dead.append(DeadRun(run.run_id, run.tags.get("dagster/partition"), pid))
    return dead


def release(instance: dg.DagsterInstance, run_id: str, message: str, *, canceled: bool = False) -> None:
    """Mark the run failed (or canceled) if it has not ended, and free every pool slot it holds or waits for."""
    run = instance.get_run_by_id(run_id)
    if run is not None and not run.is_finished:
        if canceled:
            instance.report_run_canceled(run, message)
        else:
            instance.report_run_failed(run, message)
    instance.event_log_storage.free_concurrency_slots_for_run(run_id)


def release_dead_runs(instance: dg.DagsterInstance) -> list[DeadRun]:
    dead = find_dead_runs(instance)
    for d in dead:
        release(instance, d.run_id, f"its process {d.pid} no longer exists on {socket.gethostname()} "
                                    "(killed?); marked failed by emopipe, its pool slots freed")
    return dead


def describe(dead: list[DeadRun]) -> str:
    """One line for the user."""
    runs = ", ".join(f"{d.run_id[:8]} ({d.partition or 'no partition'}, pid {d.pid})" for d in dead)
    return f"marked {len(dead)} run(s) whose process is gone as failed and freed their pool slots: {runs}"


@dg.sensor(minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Marks runs whose process no longer exists (killed) as failed and frees their pool slots, "
                       "so a killed training never blocks the `gpu` pool.")
def dead_runs(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    found = release_dead_runs(context.instance)
    if found:
        context.log.warning(describe(found))
    return dg.SkipReason(describe(found) if found else "no run without a process")
