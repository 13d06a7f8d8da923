"""`emopipe`: run an experiment's whole chain, and trace or verify the numbers it produced.

    emopipe run [EXPERIMENT]                 the main job for one experiment partition (default: demo)
    emopipe trace EXPERIMENT [--metric M] [--verify] [--full]
    emopipe experiments                      list the catalog's experiments
    emopipe doctor [--fix]                   runs whose process is gone (killed): mark failed, free pool slots
"""

from __future__ import annotations

import argparse
import os
import sys

from emopipe.errors import UserError
from emopipe.paths import PROJECT_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emopipe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="materialize the main job (raw_images ... evaluation) for an experiment")
    run.add_argument("experiment", nargs="?", default="demo")
    run.add_argument("-v", "--verbose", action="store_true", help="show Dagster's own events (DEBUG) too")
    doctor_cmd = sub.add_parser("doctor", help="find runs whose process is gone (they block the gpu pool)")
    doctor_cmd.add_argument("--fix", action="store_true", help="mark them failed and free their pool slots")
    trace = sub.add_parser("trace", help="print the chain from a metric down to the raw images")
    trace.add_argument("experiment")
    trace.add_argument("--metric", help="e.g. accuracy, macro_f1 (default: all headline metrics)")
    trace.add_argument("--verify", action="store_true", help="recompute every fingerprint and hash; exit 1 on a mismatch")
    trace.add_argument("--full", action="store_true", help="with --verify: hash every image file, not a sample")
    sub.add_parser("experiments", help="list the experiments of the catalog (built-in + EMOPIPE_CATALOG)")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return run_experiment(args.experiment, args.verbose)
        if args.command == "doctor":
            return doctor(args.fix)
        if args.command == "trace":
            return trace_experiment(args.experiment, args.metric, args.verify, args.full)
        return list_experiments()
    except UserError as e:
        print(f"emopipe: {e}", file=sys.stderr)
        return 2


def list_experiments() -> int:
    from emopipe.catalog import load_catalog

    catalog = load_catalog()
    for name, exp in sorted(catalog.experiments.items()):
        print(f"{name:24} dataset={exp.dataset:14} {exp.model} @{exp.image_size}px split={exp.split} ({exp.origin})")
    return 0


STOP_GRACE_SECONDS = 5.0  # how long a stopped run may take to end by itself before it is killed


def run_experiment(name: str, verbose: bool = False) -> int:
    """The main job for one experiment partition, in a child process this one supervises.

    Why a child: Dagster defers SIGINT/SIGTERM until a step checks for them, and a step waiting for a pool
    slot never does, so the run could not be stopped. Here a signal stops the child within seconds
    (SIGTERM, then SIGKILL), and the run is then marked canceled with its pool slots freed.
    """
    from emopipe.catalog import load_catalog

    load_catalog().experiment(name)  # an unknown name answers before Dagster and the model libraries load
    # Run history goes to the project's Dagster instance, so `dagster dev` shows this run.
    os.environ.setdefault("DAGSTER_HOME", str(PROJECT_DIR))
    import multiprocessing
    import signal
    import uuid

    import dagster as dg

    from emopipe.dead_runs import describe, release, release_dead_runs

    with dg.DagsterInstance.get() as instance:
        if dead := release_dead_runs(instance):
            print(f"emopipe: {describe(dead)}", file=sys.stderr)
    run_id = str(uuid.uuid4())
    child = multiprocessing.get_context("spawn").Process(target=_execute, args=(name, run_id, verbose), name="emopipe-run")
    stop: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _: stop.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        child.start()
        while child.is_alive() and not stop:
            child.join(0.2)
        if not stop:
            return child.exitcode
        child.terminate()
        child.join(STOP_GRACE_SECONDS)
        if child.is_alive():
            child.kill()
            child.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    with dg.DagsterInstance.get() as instance:
        release(instance, run_id, f"stopped by {signal.Signals(stop[0]).name} to emopipe run", canceled=True)
    print(f"emopipe: stopped by {signal.Signals(stop[0]).name}; run {run_id} marked canceled, its pool slots freed", file=sys.stderr)
    return 128 + stop[0]


def _execute(name: str, run_id: str, verbose: bool) -> None:
    """The child of run_experiment: executes the job in process and prints the summary; exits with its code."""
    import socket

    import dagster as dg

    from emopipe.assets.common import CATALOG
    from emopipe.dead_runs import HOST_TAG, PID_TAG
    from emopipe.definitions import defs
    from emopipe.paths import data_dir, db_path
    from emopipe.run_console import step_lines

    headline_metric = "mse" if CATALOG.experiment(name).task == "regression" else "accuracy"
    job = defs.resolve_job_def("main")
    run_config = {}
    if not verbose:  # only what the steps log themselves: no Dagster engine events, no tracebacks
        job, run_config = job.with_logger_defs({"step_lines": step_lines}), {"loggers": {"step_lines": {}}}
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(partition_key=name, instance=instance, raise_on_error=False, run_id=run_id,
                                        run_config=run_config, tags={PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()})
    if not result.success:
        failures = [e for e in result.all_events if e.is_step_failure]
        mistakes = [e for e in failures if _is_user_error(e)]
        for event in mistakes or failures:
            data = event.event_specific_data
            message = data.user_failure_data.description if mistakes else data.error.message.strip()
            print(f"emopipe: {message}" if mistakes else f"emopipe: step {event.step_key} failed: {message}", file=sys.stderr)
        if mistakes:
            sys.exit(2)
        print(f"emopipe: run {result.run_id} failed; its logs are in the UI (see below)", file=sys.stderr)
        _print_where(data_dir(), db_path(), name)
        sys.exit(1)
    print(f"\nemopipe: experiment {name!r} materialized (run {result.run_id}).\n")
    headline = None
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        shown = {k: v.value for k, v in mat.metadata.items() if k in SUMMARY_KEYS}
        print(f"  {mat.asset_key.to_user_string():16} " + ", ".join(f"{k}={_short(v)}" for k, v in shown.items()))
        if "headline" in mat.metadata:
            headline = mat.metadata["headline"].value
    if headline:
        print(f"\n{headline}\n")
        print(f"Trace a number to its images:  emopipe trace {name} --metric {headline_metric} --verify\n")
        trace_experiment(name, headline_metric, verify=False, full=False)
    _print_where(data_dir(), db_path(), name)
    sys.exit(0)


def _is_user_error(event) -> bool:
    """A step failure raised by assets.common.user_errors (its Failure carries the USER_ERROR mark)."""
    from emopipe.assets.common import USER_ERROR

    failure = event.event_specific_data.user_failure_data
    return bool(failure and failure.metadata.get(USER_ERROR) and failure.metadata[USER_ERROR].value)


def doctor(fix: bool) -> int:
    """Runs of this Dagster home whose process is gone (they hold pool slots and block later runs)."""
    os.environ.setdefault("DAGSTER_HOME", str(PROJECT_DIR))
    import dagster as dg

    from emopipe.dead_runs import describe, find_dead_runs, local_instance, release_dead_runs

    with dg.DagsterInstance.get() as instance:
        if not local_instance(instance):
            print("emopipe: this Dagster instance does not keep its runs in a local SQLite file; runs may live on other "
                  "hosts, so none is checked here")
            return 0
        dead = release_dead_runs(instance) if fix else find_dead_runs(instance)
    if not dead:
        print(f"emopipe: no run of {os.environ['DAGSTER_HOME']} is without its process")
        return 0
    if fix:
        print(f"emopipe: {describe(dead)}")
        return 0
    for d in dead:
        print(f"  run {d.run_id} ({d.partition or 'no partition'}): process {d.pid} is gone, the run still holds its pool slots")
    print("emopipe: run `emopipe doctor --fix` to mark them failed and free their slots")
    return 1


SUMMARY_KEYS = ("n_images", "n_kept", "n_removed", "n_train", "n_val", "n_test", "split_id", "model_id", "best_epoch", "device", "fingerprint")


def _short(value) -> str:
    text = str(value)
    return text[:16] if len(text) == 64 else text


def _print_where(data, db, name: str) -> None:
    print(f"\nResults: {data} (DuckDB: {db})")
    print(f"UI:      DAGSTER_HOME=$PWD dagster dev   (then open http://127.0.0.1:3000, asset partition {name!r})")


def trace_experiment(name: str, metric: str | None, verify: bool, full: bool) -> int:
    from emopipe.core.trace import format_trace, trace
    from emopipe.core.verify import verify as verify_lineage
    from emopipe.paths import objects_dir

    db = _database()
    print(format_trace(trace(db, name, metric)))
    if not verify:
        return 0
    report = verify_lineage(db, name, full=full, objects_root=objects_dir())
    hashed = f"{report.files_hashed} of {report.files_total} image files hashed" + (
        "" if report.files_hashed == report.files_total else ", a random sample; --full for all")
    if report.problems:
        print(f"\nVERIFY FAILED: {len(report.problems)} mismatch(es) ({hashed})", file=sys.stderr)
        for p in report.problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"\nverified: every number, fingerprint and hash above recomputed from the stored data matches ({hashed})")
    return 0


def _database():
    from emopipe.db import Database
    from emopipe.paths import db_path

    return Database(db_path())


if __name__ == "__main__":
    sys.exit(main())
