"""trained_model: a model trained on the split's train part, early-stopped on val, checkpoint named by sha256."""

import dataclasses
from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from emopipe.assets.common import (
    ARRAY_ASSETS, CATALOG, CODE_VERSION, database, experiment, experiment_partitions, table_metadata, png_markdown, user_errors, versioned_output,
)
from emopipe.paths import data_dir

@dg.asset(
    partitions_def=experiment_partitions,
    code_version=CODE_VERSION,
    group_name="training",
    kinds={"pytorch", "timm"},
    ins={"splits": dg.AssetIn(), "tuned_hyperparams": dg.AssetIn()},
    deps=ARRAY_ASSETS,  # trains from the arrays at the experiment's image_size
    # One training at a time per GPU: the `gpu` pool's limit is set in dagster.yaml.
    pool="gpu",
    description=(
        "A timm model (or linear probe on a frozen pretrained backbone) trained on the split's train part from the "
        "packed uint8 arrays (augmentation and normalization on the device, bf16 autocast on CUDA), early-stopped "
        "on val. Checkpointed every epoch (a killed run resumes); the best epoch is saved as data/models/<sha256>.pt "
        "with a `models` row naming the split."
    ),
)
def trained_model(context: dg.AssetExecutionContext, duckdb: DuckDBResource, splits: dict, tuned_hyperparams: dict) -> dg.Output[dict]:
    # torch and timm: only in the steps that train
    from emopipe.core.trained_model import adopt_tuned_weights, record_model, train_model
    from emopipe.core.trained_model.distributed import train_distributed, world_size

    exp = experiment(context)
    tuned = tuned_hyperparams.get("best_checkpoint")
    if tuned_hyperparams["best_config"]:
        # The tuned values become part of the spec: of the run key, the checkpoint and the models row.
        exp = dataclasses.replace(exp, **tuned_hyperparams["best_config"])
    db = database(duckdb)
    with user_errors():
        data = training_data(db, exp, splits["split_id"])
        if tuned:  # the model PBT found is the model: its best trial's weights, not a retraining
            context.log.info(f"taking the best PBT trial's weights ({tuned_hyperparams['best_config']})")
            result = adopt_tuned_weights(exp, data, weights=Path(tuned), history=tuned_hyperparams["best_history"],
                                         split_id=splits["split_id"], work_dir=data_dir() / "models", log=context.log.info)
        else:
            train = train_distributed if world_size(exp) > 1 else train_model  # gpus x nodes > 1: several processes
            result = train(exp, data, split_id=splits["split_id"], work_dir=data_dir() / "models", log=context.log.info)
    # A split's id is its fingerprint (sha256 over its sorted (image_id, part) rows).
    record_model(db, result, exp, splits["split_id"], split_fingerprint=splits["split_id"])
    history = [[h["epoch"], *(_rounded(h.get(k)) for k in ("train_loss", "train_metric", "val_loss", "val_metric"))]
               for h in result.history]
    metadata = {
        "summary": f"model {result.model_id[:12]}: best epoch {result.best_epoch} of {result.epochs_run}, val {result.metric} "
                   f"{result.best_val:.4f} ({len(data.train_ids)} train / {len(data.val_ids)} val images, {result.device})",
        "model_id": result.model_id,
        "checkpoint": dg.MetadataValue.path(str(result.checkpoint_path)),
        "split_id": splits["split_id"],
        "architecture": exp.model,
        "mode": exp.mode,
        "pretrained": exp.pretrained,
        f"best_val_{result.metric}": round(result.best_val, 4),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "resumed_from_epoch": result.resumed_from_epoch,
        "device": result.device,
        "images_per_second": round(result.images_per_second, 1),
        "wall_seconds": round(result.wall_seconds, 1),
        "n_train": len(data.train_ids),
        "n_val": len(data.val_ids),
        "history": table_metadata(["epoch", "train loss", f"train {result.metric}", "val loss", f"val {result.metric}"], history),
        "learning curve": png_markdown(result.curve_png.read_bytes(), "learning curves"),
    }
    handle = {"model_id": result.model_id, "checkpoint_path": str(result.checkpoint_path), "split_id": splits["split_id"]}
    return versioned_output(handle, metadata, result.model_id)


def training_data(db, exp, split_id: str):
    """The split's train/val arrays and targets, in the dataset's declared class order when it has one."""
    from emopipe.core.trained_model import load_training_data
    classes = CATALOG.dataset(exp.dataset).classes
    return load_training_data(db, split_id, exp, classes=list(classes) if classes else None)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
