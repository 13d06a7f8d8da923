"""Automation: scheduled retraining (catalog key `retrain`) and the `new_data` sensor that re-runs the
experiments whose folder or url_list dataset changed. Both launch the `main` job (the whole chain)
for one experiment partition; the Dagster daemon (`dagster dev` starts one) evaluates them.
"""

from __future__ import annotations

import re

import dagster as dg

from emopipe.catalog import Catalog, CatalogError
from emopipe.core.dataset_versions import observe, observed_datasets

JOB = "main"
# Often enough to notice new files within minutes; a folder check is one directory walk.
SENSOR_INTERVAL_S = 60


def schedule_name(experiment: str) -> str:
    """Dagster names allow letters, digits and '_' only; experiment names may also hold '-' and '.'."""
    return "retrain_" + re.sub(r"[^A-Za-z0-9_]", "_", experiment)


def build_schedules(catalog: Catalog) -> list[dg.ScheduleDefinition]:
    """One RUNNING schedule per experiment with a `retrain` cron string (UTC), launching its partition
    of `main`. RUNNING because writing `retrain` in the catalog is the opt-in; the UI can stop it."""
    schedules, owners = [], {}
    for name, exp in sorted(catalog.experiments.items()):
        if exp.retrain is None:
            continue
        sched = schedule_name(name)
        if sched in owners:
            raise CatalogError(f"{exp.origin}: experiments.{name}.retrain: its schedule name {sched} is also "
                               f"experiment {owners[sched]!r}'s; rename one of them")
        owners[sched] = name
        schedules.append(_retrain_schedule(name, exp.retrain, sched, exp.origin))
    return schedules


def _retrain_schedule(experiment: str, cron: str, name: str, origin: str) -> dg.ScheduleDefinition:
    def retrain(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        at = context.scheduled_execution_time.isoformat()
        return dg.RunRequest(partition_key=experiment, run_key=f"{experiment}:{at}",
                             tags={"emopipe/trigger": "retrain", "emopipe/scheduled_for": at})

    try:
        return dg.ScheduleDefinition(
            name=name,
            cron_schedule=cron,
            job_name=JOB,
            execution_fn=retrain,
            execution_timezone="UTC",
            default_status=dg.DefaultScheduleStatus.RUNNING,
            description=f"Retrain experiment {experiment!r} ({cron}, UTC): the whole chain for its partition.",
        )
    except dg.DagsterInvalidDefinitionError:
        raise CatalogError(f"{origin}: experiments.{experiment}.retrain: {cron!r} is not a valid cron string; "
                           'e.g. "0 3 * * 1" (Mondays 03:00 UTC)') from None


def build_data_sensor(catalog: Catalog) -> dg.SensorDefinition:
    """The `new_data` sensor: versions every folder/url_list dataset (see core/dataset_versions.py) and
    requests one run per affected experiment when one changed. Its first tick only records the
    versions, so starting the daemon never retrains everything."""
    watched = observed_datasets(catalog)

    @dg.sensor(
        name="new_data",
        job_name=JOB,
        minimum_interval_seconds=SENSOR_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Re-runs the experiments whose folder or url_list dataset changed: "
                    + (", ".join(watched) if watched else "none in the catalog"),
    )
    def new_data(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        seen = observe(catalog, context.cursor)
        for dataset, error in seen.errors.items():
            context.log.warning(f"{dataset}: could not be checked, its last version is kept: {error}")
        requests = [
            dg.RunRequest(partition_key=exp, run_key=seen.run_keys[exp],
                          tags={"emopipe/trigger": "new_data", "emopipe/changed_datasets": ",".join(datasets)})
            for exp, datasets in seen.changed.items()
        ]
        if requests:
            return dg.SensorResult(run_requests=requests, cursor=seen.cursor)
        if not watched:
            reason = "no folder or url_list dataset in the catalog"
        elif seen.recorded:
            reason = f"recorded the first version of {', '.join(seen.recorded)}; a later change starts runs"
        else:
            reason = "no dataset changed"
        if seen.unavailable:
            # Named, not warned about: a seed dataset nobody downloaded would otherwise warn every minute.
            reason += f"; not readable yet: {', '.join(seen.unavailable)}"
        return dg.SensorResult(skip_reason=reason, cursor=seen.cursor)

    return new_data
