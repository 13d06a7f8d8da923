"""`emopipe`: run an experiment's whole chain, and trace or verify the numbers it produced.

    emopipe run [EXPERIMENT]                 the main job for one experiment partition (default: demo)
    emopipe trace EXPERIMENT [--metric M] [--verify] [--full]
    emopipe report EXPERIMENT [--out PATH]   one self-contained HTML file: numbers, plots, lineage (prints its path)
    emopipe experiments                      list the catalog's experiments
    emopipe compare [EXPERIMENT ...] [--dataset D] [--part test] [--format md|csv|latex|json] [--paired]
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
    report = sub.add_parser("report", help="write a self-contained HTML report of the experiment's evaluated model")
    report.add_argument("experiment")
    report.add_argument("--out", help="the HTML file to write (default: data/reports/<experiment>-<model_id[:12]>.html)")
    compare = sub.add_parser("compare", help="the headline metrics of the models the experiments' latest evaluations "
                             "recorded, side by side (seeds: each seed and mean ± std); --paired: A against B")
    compare.add_argument("experiments", nargs="*", help="experiment partitions (a seeded experiment's name brings all its "
                         "seeds; default: every experiment)")
    compare.add_argument("--dataset", help="only this dataset (--paired: default the first experiment's dataset)")
    compare.add_argument("--part", default="test", choices=("test", "val"))
    compare.add_argument("--format", default="md", choices=("md", "csv", "latex", "json"))
    compare.add_argument("--paired", action="store_true", help="two experiments: A − B in accuracy and macro-F1 on the "
                         "same images (paired bootstrap, 10,000 resamples) and McNemar's exact test")
    args = parser.parse_args(argv)
    try:
        if args.command == "compare":
            return compare_experiments(args.experiments, args.dataset, args.part, args.format, args.paired)
        if args.command == "run":
            return run_experiment(args.experiment, args.verbose)
        if args.command == "doctor":
            return doctor(args.fix)
        if args.command == "trace":
            return trace_experiment(args.experiment, args.metric, args.verify, args.full)
        if args.command == "report":
            return report_experiment(args.experiment, args.out)
        return list_experiments()
    except UserError as e:
        print(f"emopipe: {e}", file=sys.stderr)
        return 2


def list_experiments() -> int:
    from emopipe.catalog import load_catalog
    from emopipe.experiments_overview import experiments_overview, overview_lines
    from emopipe.paths import db_path

    overview = experiments_overview(load_catalog(), db_path(create_dir=False))
    print("\n".join(overview_lines(overview)))
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
    from emopipe.definitions import CHECK_STEPS, defs, steps_unused_by
    from emopipe.paths import data_dir, db_path
    from emopipe.progress import show_bars
    from emopipe.run_console import step_lines

    exp = CATALOG.experiment(name)
    headline_metric = "mse" if exp.task == "regression" else "accuracy"
    job = defs.resolve_job_def("main")
    run_config = {}
    if not verbose:  # step lines and check verdicts: no Dagster engine events, no tracebacks
        lines = {"hidden_steps": sorted(steps_unused_by(exp)), "check_steps": sorted(CHECK_STEPS)}
        job, run_config = job.with_logger_defs({"step_lines": step_lines}), {"loggers": {"step_lines": {"config": lines}}}
        if sys.stderr.isatty():
            show_bars(sys.stderr)
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(partition_key=name, instance=instance, raise_on_error=False, run_id=run_id,
                                        run_config=run_config, tags={PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()})
    if not result.success:
        failures = [e for e in result.all_events if e.is_step_failure]
        mistakes = [e for e in failures if _is_user_error(e)]
        for event in mistakes or failures:
            data = event.event_specific_data
            message = data.user_failure_data.description if mistakes else _root_cause(data.error)
            print(f"emopipe: {message}" if mistakes else f"emopipe: step {event.step_key} failed: {message}", file=sys.stderr)
        if mistakes:
            sys.exit(2)
        print(f"emopipe: run {result.run_id} failed; its logs are in the UI (see below)", file=sys.stderr)
        _print_where(data_dir(), db_path(), name)
        sys.exit(1)
    print(f"\nemopipe: experiment {name!r} materialized (run {result.run_id}).")
    headline = None
    for event in result.get_asset_materialization_events():
        metadata = event.event_specific_data.materialization.metadata
        if "headline" in metadata:
            headline = metadata["headline"].value
    if headline:
        print(f"\n{headline}\n")
        print(f"Trace a number to its images:  emopipe trace {name} --metric {headline_metric} --verify\n")
        trace_experiment(name, headline_metric, verify=False, full=False)
        report = _write_run_report(result, exp)
        print(f"\nReport (one HTML file, heatmaps and lineage included): {report}")
    _print_where(data_dir(), db_path(), name)
    sys.exit(0)


def _write_run_report(result, exp):
    """The report of the model this run evaluated, written again now that explanations ran after evaluation."""
    from emopipe.core.report import write_report
    from emopipe.paths import objects_dir

    model_id = result.output_for_node("evaluation")["model_id"]
    return write_report(_database(), exp, model_id=model_id, chosen_by=f"run {result.run_id}", objects_root=objects_dir())


def _root_cause(error) -> str:
    """The innermost error of a step failure (Dagster wraps the step's own exception in its execution error),
    as "ExceptionClass: message"; the whole traceback is in the UI's run log."""
    while error.cause is not None:
        error = error.cause
    return f"{error.cls_name}: {error.message.strip()}" if error.cls_name and not error.message.startswith(error.cls_name) else error.message.strip()


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


def report_experiment(name: str, out: str | None) -> int:
    """Write the HTML report (core/report.py) of the model the latest evaluation materialization recorded in
    the project's Dagster instance, or of the newest metrics rows' model when there is none; print its path."""
    from pathlib import Path

    from emopipe.catalog import load_catalog
    from emopipe.core.report import write_report

    exp = load_catalog().experiment(name)  # an unknown name answers before Dagster loads
    os.environ.setdefault("DAGSTER_HOME", str(PROJECT_DIR))  # the instance `emopipe run` records its runs in
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("evaluation"), asset_partitions=[name]), limit=1).records
    recorded = records[0].asset_materialization.metadata.get("model_id") if records else None
    model_id = recorded.value if recorded else None
    chosen_by = f"the model the latest evaluation materialization recorded (Dagster instance {os.environ['DAGSTER_HOME']})"
    print(write_report(_database(), exp, model_id=model_id, chosen_by=chosen_by, path=Path(out) if out else None))
    return 0


def compare_experiments(names: list[str], dataset: str | None, part: str, fmt: str, paired: bool) -> int:
    """Print the comparison (core/compare.py) of the models the latest evaluation materialization of each
    experiment partition recorded in the project's Dagster instance; a partition without one gets a note."""
    from emopipe.catalog import load_catalog
    from emopipe.core.compare import CompareError, comparison, paired_comparison, partitions_to_compare, render

    catalog = load_catalog()
    if paired and len(names) != 2:
        raise CompareError(f"--paired compares two experiments (A B), got {len(names)}")
    partitions = [catalog.experiment(n).name for n in names] if paired else partitions_to_compare(catalog, names)
    models = _recorded_models(partitions)
    if paired:
        missing = [n for n in partitions if models[n] is None]
        if missing:
            raise CompareError(f"no evaluation materialization recorded for {', '.join(missing)} in the Dagster instance "
                               f"{os.environ['DAGSTER_HOME']}: run `emopipe run {missing[0]}` first")
        a, b = (catalog.experiment(n) for n in partitions)
        if "regression" in (a.task, b.task):
            raise CompareError(f"--paired compares classifiers; {a.name if a.task == 'regression' else b.name} is a regression experiment")
        table = paired_comparison(_database(), name_a=a.name, model_a=models[a.name], name_b=b.name, model_b=models[b.name],
                                  dataset=dataset or a.dataset, part=part)
    else:
        table = comparison(_database(), models, catalog.experiments, dataset=dataset, part=part)
    print(render(table, fmt), end="")
    if fmt == "csv":  # the notes would break the CSV
        for note in table.notes:
            print(f"emopipe: {note}", file=sys.stderr)
    return 0


def _recorded_models(partitions: list[str]) -> dict[str, str | None]:
    """{partition: the model_id its latest evaluation materialization recorded, or None}."""
    os.environ.setdefault("DAGSTER_HOME", str(PROJECT_DIR))  # the instance `emopipe run` records its runs in
    import dagster as dg

    models = {}
    with dg.DagsterInstance.get() as instance:
        for name in partitions:
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("evaluation"), asset_partitions=[name]), limit=1).records
            recorded = records[0].asset_materialization.metadata.get("model_id") if records else None
            models[name] = recorded.value if recorded else None
    return models


def _database():
    from emopipe.db import Database
    from emopipe.paths import db_path

    return Database(db_path())


if __name__ == "__main__":
    sys.exit(main())
