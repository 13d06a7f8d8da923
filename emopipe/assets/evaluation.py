"""evaluation: the model's metrics on the test (and val) part and on each cross-dataset test set."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from emopipe.assets.common import (
    ARRAY_ASSETS, CATALOG, CODE_VERSION, database, experiment, experiment_partitions, png_markdown, recorded_metadata, user_errors, versioned_output,
)
from emopipe.core.evaluation import (
    comparison_markdown, confusion_from_rows, confusion_png, evaluated_images, headline_markdown, write_evaluation,
)
from emopipe.core.images import load_array
from emopipe.core.raw_images import attribute_matrix
from emopipe.core.verify import verify
from emopipe.fingerprint import sha256_file
from emopipe.paths import data_dir, objects_dir


@dg.asset(
    partitions_def=experiment_partitions,
    code_version=CODE_VERSION,
    group_name="evaluation",
    kinds={"duckdb", "pytorch"},
    ins={"trained_model": dg.AssetIn()},
    deps=ARRAY_ASSETS,  # predicts from the arrays at the model's image size
    pool="gpu",  # the model runs on the GPU when there is one
    description=(
        "The exact checkpoint trained_model recorded (verified by sha256) evaluated on the split's test and val "
        "parts and on every eval_dataset (labels mapped by its class_map): accuracy, macro/weighted F1, per-class "
        "precision/recall/F1, confusion matrices, top-k, bootstrap 95 % CIs (regression: MSE, MAE, Pearson r). "
        "`metrics` rows name model_id and split_id; `predictions` keep one row per image."
    ),
)
def evaluation(context: dg.AssetExecutionContext, duckdb: DuckDBResource, trained_model: dict) -> dg.Output[dict]:
    from emopipe.core.trained_model import load_checkpoint, predict  # torch and timm: only in this step

    exp = experiment(context)
    db = database(duckdb)
    checkpoint = trained_model["checkpoint_path"]
    if sha256_file(checkpoint) != trained_model["model_id"]:
        raise dg.Failure(f"checkpoint {checkpoint} no longer hashes to model {trained_model['model_id']}: it was replaced; "
                         "materialize trained_model again")
    model, info = load_checkpoint(checkpoint)
    names = info["classes"] or info["targets"]
    split_id = trained_model["split_id"]
    jobs = [(exp.dataset, split_id, part, None) for part in ("test", "val")]
    jobs += [(e.dataset, None, "test", e.class_map) for e in exp.eval_datasets]
    rows = []
    with user_errors():  # a class_map or target the dataset cannot satisfy
        for dataset, part_of, part, class_map in jobs:
            images = evaluated_images(db, dataset, part_of, part)
            if not images:
                context.log.warning(f"{dataset}/{part}: no images to evaluate")
                continue
            ids = [i for i, _, _ in images]
            scores = predict(model, info, load_array(db, ids, info["image_size"]))
            if exp.task == "regression":
                # A target an image lacks is NaN and left out of that target's metrics: a cross-dataset set
                # may not carry every target (training refuses such an image).
                labels = attribute_matrix(ids, [a for _, _, a in images], names)
            else:
                labels = [label for _, label, _ in images]
            rows += write_evaluation(db, experiment=exp.name, model_id=trained_model["model_id"], split_id=split_id, dataset=dataset,
                                     part=part, image_ids=ids, labels=labels, scores=scores, classes=names, task=exp.task,
                                     class_map=class_map)
            context.log.info(f"{dataset}/{part}: evaluated {len(ids)} images")
    headline = headline_markdown(rows, exp.reference, reference_dataset=exp.dataset)
    metadata = {
        "model_id": trained_model["model_id"],
        "split_id": split_id,
        "headline": dg.MetadataValue.md(headline),
        "all_experiments": dg.MetadataValue.md(comparison_markdown(db, CATALOG.experiments)),
    }
    for r in rows:
        if r.class_name is None and r.metric in ("accuracy", "macro_f1", "mse") and r.part == "test":
            metadata[f"{r.dataset}/test/{r.metric}"] = round(r.value, 4)
    if exp.task == "classification":
        for dataset in dict.fromkeys(d for d, *_ in jobs):
            part_rows = [r for r in rows if r.dataset == dataset and r.part == "test"]
            if part_rows:
                png = confusion_png(confusion_from_rows(part_rows, names), names,
                                    data_dir() / "reports" / f"{exp.name}-{trained_model['model_id'][:12]}-{dataset}-confusion.png")
                metadata[f"{dataset}/test/confusion_matrix"] = png_markdown(png.read_bytes(), f"{dataset} confusion matrix")
    handle = {"model_id": trained_model["model_id"], "split_id": split_id, "headline": headline}
    return versioned_output(handle, metadata, trained_model["model_id"])


@dg.asset_check(asset=evaluation, blocking=True, description=(
    "Recomputes the chain under the numbers: checkpoint sha256 = model_id, split fingerprint from the splits rows, "
    "the filter set, metrics from the predictions rows, and a sample of image files against their sha256."))
def lineage_verified(context: dg.AssetCheckExecutionContext, duckdb: DuckDBResource) -> dg.AssetCheckResult:
    exp = experiment(context)
    model_id = recorded_metadata(context, "evaluation")["model_id"]
    report = verify(database(duckdb), exp.name, model_id=model_id, objects_root=objects_dir())
    problems = report.problems
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={"model_id": model_id, "image_files_hashed": report.files_hashed, "image_files": report.files_total,
                  "problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems) or "none")},
        description=f"{len(problems)} mismatch(es): {problems[0]}" if problems else "every hash and fingerprint recomputed matches",
    )
