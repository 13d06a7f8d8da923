"""tuned_hyperparams: population-based training (Ray Tune) of lr, weight_decay and batch_size, when the
experiment sets `tune`; trained_model takes its best trial's final weights (the model PBT found) and values."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from emopipe.assets.common import (
    ARRAY_ASSETS, CODE_VERSION, database, experiment, experiment_partitions, table_metadata, user_errors, versioned_output,
)
from emopipe.assets.trained_model import training_data
from emopipe.paths import data_dir


@dg.asset(
    partitions_def=experiment_partitions,
    code_version=CODE_VERSION,
    group_name="training",
    kinds={"ray", "pytorch"},
    ins={"splits": dg.AssetIn()},
    deps=ARRAY_ASSETS,  # trials train from the arrays at the experiment's image_size
    pool="gpu",
    description=(
        "Population-based training (Ray Tune PBT) over the split's train/val parts: a population of trials whose "
        "bottom quantile copies a top trial's weights and perturbs lr, weight_decay and batch_size every "
        "perturbation_interval epochs. Only for experiments with `tune`; others pass their catalog values through."
    ),
)
def tuned_hyperparams(context: dg.AssetExecutionContext, duckdb: DuckDBResource, splits: dict) -> dg.Output[dict]:
    exp = experiment(context)
    if exp.tune is None:
        return versioned_output({"best_config": None}, {"tuned": False}, "not-tuned")
    # Ray is an optional extra (`pip install -e '.[tune]'`): imported only by experiments that tune.
    from emopipe.core.tuned_hyperparams import tune_hyperparameters

    with user_errors():
        data = training_data(database(duckdb), exp, splits["split_id"])
        result = tune_hyperparameters(exp, data, work_dir=data_dir() / "tune", log=context.log.info)
    trials = [[t["trial_id"], t["config"]["lr"], t["config"]["weight_decay"], t["config"]["batch_size"], round(t["val_metric"], 4)]
              for t in result.trials]
    metadata = {
        "summary": f"PBT over {len(result.trials)} trials: best val {result.metric} {result.best_val:.4f} with {result.best_config}",
        "tuned": True,
        "best_config": result.best_config,
        f"best_val_{result.metric}": round(result.best_val, 4),
        "perturbations": result.perturbations,
        "trials": table_metadata(["trial", "lr (final)", "weight_decay", "batch_size", f"val {result.metric}"], trials),
    }
    version = "-".join(f"{k}={v}" for k, v in sorted(result.best_config.items()))
    best = next(t for t in result.trials if t["trial_id"] == result.best_trial)
    handle = {"best_config": result.best_config, "best_checkpoint": result.best_checkpoint, "best_history": best["history"]}
    return versioned_output(handle, metadata, version)
