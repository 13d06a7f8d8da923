"""`emopipe`: run an experiment's whole chain, and trace or verify the numbers it produced.

    emopipe run [EXPERIMENT]                 the main job for one experiment partition (default: demo)
    emopipe trace EXPERIMENT [--metric M] [--verify] [--full]
    emopipe experiments                      list the catalog's experiments
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
    trace = sub.add_parser("trace", help="print the chain from a metric down to the raw images")
    trace.add_argument("experiment")
    trace.add_argument("--metric", help="e.g. accuracy, macro_f1 (default: all headline metrics)")
    trace.add_argument("--verify", action="store_true", help="recompute every fingerprint and hash; exit 1 on a mismatch")
    trace.add_argument("--full", action="store_true", help="with --verify: hash every image file, not a sample")
    sub.add_parser("experiments", help="list the experiments of the catalog (built-in + EMOPIPE_CATALOG)")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return run_experiment(args.experiment)
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


def run_experiment(name: str) -> int:
    # Run history goes to the project's Dagster instance, so `dagster dev` shows this run.
    os.environ.setdefault("DAGSTER_HOME", str(PROJECT_DIR))
    import dagster as dg

    from emopipe.assets.common import CATALOG
    from emopipe.definitions import defs
    from emopipe.paths import data_dir, db_path

    headline_metric = "mse" if CATALOG.experiment(name).task == "regression" else "accuracy"  # also: unknown name -> clear error
    job = defs.resolve_job_def("main")
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(partition_key=name, instance=instance, raise_on_error=False)
    if not result.success:
        for event in result.all_events:
            if event.is_step_failure:
                print(f"emopipe: step {event.step_key} failed: {event.event_specific_data.error.message.strip()}", file=sys.stderr)
        print(f"emopipe: run {result.run_id} failed; its logs are in the UI (see below)", file=sys.stderr)
        _print_where(data_dir(), db_path(), name)
        return 1
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
    return 0


SUMMARY_KEYS = ("n_images", "n_kept", "n_removed", "n_train", "n_val", "n_test", "split_id", "model_id", "best_epoch", "device", "fingerprint")


def _short(value) -> str:
    text = str(value)
    return text[:16] if len(text) == 64 else text


def _print_where(data, db, name: str) -> None:
    print(f"\nResults: {data} (DuckDB: {db})")
    print(f"UI:      DAGSTER_HOME=$PWD dagster dev   (then open http://127.0.0.1:3000, asset partition {name!r})")


def trace_experiment(name: str, metric: str | None, verify: bool, full: bool) -> int:
    from emopipe.core.trace import format_trace, trace, verify as verify_lineage
    from emopipe.paths import objects_dir

    db = _database()
    print(format_trace(trace(db, name, metric)))
    if not verify:
        return 0
    problems = verify_lineage(db, name, full=full, objects_root=objects_dir())
    if problems:
        print(f"\nVERIFY FAILED: {len(problems)} mismatch(es)", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print("\nverified: every fingerprint and hash recomputed from the stored data matches" + (" (all image files)" if full else " (a sample of image files; --full for all)"))
    return 0


def _database():
    from emopipe.db import Database
    from emopipe.paths import db_path

    return Database(db_path())


if __name__ == "__main__":
    sys.exit(main())
