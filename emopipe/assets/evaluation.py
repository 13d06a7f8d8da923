"""evaluation: the model's metrics on the test (and val) part and on each cross-dataset test set."""

from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from emopipe.assets.common import (
    ARRAY_ASSETS, CATALOG, CODE_VERSION, database, experiment, experiment_check, experiment_partitions, png_markdown, recorded_metadata, table_metadata, user_errors, versioned_output,
)
from emopipe.core.evaluation import evaluated_images, evaluation_inputs_key, model_outputs, stored_evaluation, write_evaluation
from emopipe.core.evaluation_views import confusion_from_rows, confusion_png, headline_markdown
from emopipe.core.calibration import reliability_png, stored_bins
from emopipe.core.compare import comparison
from emopipe.core.error_browser import class_errors, write_error_pngs
from emopipe.core.images import load_array
from emopipe.core.leakage import overlapping_images
from emopipe.core.report import write_report
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
        "parts and on every eval_dataset (labels mapped by its class_map; its copies and near-duplicates of the split's "
        "train/val images left out and counted as `excluded_overlap`): accuracy, macro/weighted F1, per-class "
        "precision/recall/F1, confusion matrices, top-k, bootstrap 95 % CIs (regression: MSE, MAE, Pearson r; soft labels "
        "also KL divergence, Bhattacharyya coefficient, cosine similarity and top-1 against the distribution's argmax). "
        "`metrics` rows name model_id and split_id; `predictions` keep one row per image."
    ),
)
def evaluation(context: dg.AssetExecutionContext, duckdb: DuckDBResource, trained_model: dict) -> dg.Output[dict]:
    exp = experiment(context)
    db = database(duckdb)
    model_id = trained_model["model_id"]
    checkpoint = trained_model["checkpoint_path"]
    if sha256_file(checkpoint) != model_id:
        raise dg.Failure(f"checkpoint {checkpoint} no longer hashes to model {model_id}: it was replaced; "
                         "materialize trained_model again")
    names = model_outputs(db, model_id)
    split_id = trained_model["split_id"]
    jobs = [(exp.dataset, split_id, part, None) for part in ("test", "val")]
    jobs += [(e.dataset, None, "test", e.class_map) for e in exp.eval_datasets]
    rows, reused, loaded, overlaps = [], [], None, {}
    with user_errors():  # a class_map or target the dataset cannot satisfy
        for dataset, part_of, part, class_map in jobs:
            images = evaluated_images(db, dataset, part_of, part)
            overlap = {}
            if part_of is None:  # a cross-dataset set: what the model saw in training is no test of it
                overlap = overlapping_images(db, [i for i, _, _ in images], split_id)
                images = [image for image in images if image[0] not in overlap]
                if overlap:
                    context.log.warning(f"{dataset}/{part}: {len(overlap)} images left out: copies or near-duplicates "
                                        f"of the train/val images of split {split_id[:12]}")
                overlaps[dataset] = len(overlap)
            if not images:
                context.log.warning(f"{dataset}/{part}: no images to evaluate")
                continue
            key = evaluation_inputs_key(split_id=split_id, images=images, task=exp.task, class_map=class_map, excluded=list(overlap))
            stored = stored_evaluation(db, experiment=exp.name, model_id=model_id, dataset=dataset, part=part, inputs_key=key)
            if stored is not None:
                rows += stored
                reused.append(f"{dataset}/{part}")
                continue
            if loaded is None:
                from emopipe.core.trained_model import load_checkpoint, predict  # torch and timm: only when predicting

                loaded = load_checkpoint(checkpoint)
            model, info = loaded
            ids = [i for i, _, _ in images]
            scores = predict(model, info, load_array(db, ids, info["image_size"]))
            if exp.task == "regression":
                # A target an image lacks is NaN and left out of that target's metrics: a cross-dataset set
                # may not carry every target (training refuses such an image).
                labels = attribute_matrix(ids, [a for _, _, a in images], names)
            else:
                labels = [label for _, label, _ in images]
            # Soft labels: the annotated distributions (NaN rows where an image has none) for the distribution metrics.
            distributions = (attribute_matrix(ids, [a for _, _, a in images], exp.soft_labels)
                             if exp.task == "classification" and exp.soft_labels else None)
            rows += write_evaluation(db, experiment=exp.name, model_id=model_id, split_id=split_id, dataset=dataset,
                                     part=part, image_ids=ids, labels=labels, scores=scores, classes=names, task=exp.task,
                                     class_map=class_map, inputs_key=key, excluded_overlap=len(overlap),
                                     distributions=distributions)
            context.log.info(f"{dataset}/{part}: evaluated {len(ids)} images")
    if reused:
        context.log.info(f"reused the stored metrics of {', '.join(reused)}: same model, split, images and metrics code")
    headline = headline_markdown(rows, exp.reference, reference_dataset=exp.dataset)
    metadata = {
        "summary": _summary(rows, exp.dataset, reused),
        "reused": ", ".join(reused) or "none: every part evaluated now",  # text: the UI shows a list as JSON
        "model_id": trained_model["model_id"],
        "split_id": split_id,
        "headline": dg.MetadataValue.md(headline),
        "all_experiments": _rounded_table(comparison(db, _evaluated_models(context, exp.name, model_id), CATALOG.experiments)),
    }
    for r in rows:
        if r.class_name is None and r.metric in ("accuracy", "macro_f1", "mse") and r.part == "test":
            metadata[f"{r.dataset}/test/{r.metric}"] = round(r.value, 4)
    for dataset, n in overlaps.items():  # 0 too: the UI shows that the guard ran
        metadata[f"{dataset}/test/excluded_overlap"] = n
    if exp.task == "classification":
        for dataset in dict.fromkeys(d for d, *_ in jobs):
            metadata.update(_test_part_views(db, exp.name, model_id, dataset, [r for r in rows if r.dataset == dataset and r.part == "test"], names))
    # The shareable page (core/report.py); `emopipe run` writes it again after the heatmaps, at the same path.
    report = write_report(db, exp, model_id=model_id, chosen_by="this evaluation materialization", objects_root=objects_dir())
    metadata["report (HTML)"] = dg.MetadataValue.path(str(report))
    handle = {"model_id": trained_model["model_id"], "split_id": split_id, "headline": headline, "report": str(report)}
    return versioned_output(handle, metadata, trained_model["model_id"])


def _test_part_views(db, experiment: str, model_id: str, dataset: str, part_rows: list, names: list[str]) -> dict:
    """The test part's pictures and per-class table: confusion matrix, reliability diagram, the errors to look at
    per class (PNGs under data/reports/, shown one click away in the UI), and per-class metrics as a table."""
    if not part_rows:
        return {}
    stem = data_dir() / "reports" / f"{experiment}-{model_id[:12]}-{dataset}"
    views = {}
    confusion = confusion_png(confusion_from_rows(part_rows, names), names, f"{stem}-confusion.png")
    views[f"confusion matrix: {dataset} test"] = png_markdown(confusion.read_bytes(), f"{dataset} confusion matrix")
    by_metric = {(r.metric, r.class_name): r for r in part_rows}
    bins = stored_bins(part_rows)
    if bins:
        ece = by_metric[("ece", None)]
        reliability = reliability_png(bins, ece.value, f"{dataset} test", f"{stem}-reliability.png")
        views[f"ECE: {dataset} test"] = round(ece.value, 4)
        views[f"reliability diagram: {dataset} test"] = png_markdown(reliability.read_bytes(), f"{dataset} reliability diagram")
    per_class = [[name, by_metric[("precision", name)].n, *(round(by_metric[(m, name)].value, 4) for m in ("precision", "recall", "f1"))]
                 for name in names if ("precision", name) in by_metric]
    views[f"per class: {dataset} test"] = table_metadata(["class", "n", "precision", "recall", "F1"], per_class)
    errors = class_errors(db, model_id=model_id, dataset=dataset, part="test")
    for label, path in write_error_pngs(errors, Path(f"{stem}-errors"), objects_dir()).items():
        views[f"errors to look at: {dataset} test, {label}"] = png_markdown(
            path.read_bytes(), f"{label}: most confident mistakes, then least confident correct predictions")
    return views


def _evaluated_models(context: dg.AssetExecutionContext, current: str, model_id: str) -> dict[str, str | None]:
    """{partition: the model its latest evaluation materialization recorded (None: none yet)}, this partition's
    being the model evaluated now: the comparison shows recorded models, never the newest metrics rows."""
    models = {}
    for name in sorted(CATALOG.experiments):
        records = [] if name == current else context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("evaluation"), asset_partitions=[name]), limit=1).records
        recorded = records[0].asset_materialization.metadata.get("model_id") if records else None
        models[name] = model_id if name == current else recorded and recorded.value
    return models


def _rounded_table(table) -> dg.MetadataValue:
    """A compare table for the UI: numbers to 4 decimals, as `emopipe compare` prints them (they still sort)."""
    header, rows = table.header_and_rows()
    return table_metadata(header, [[round(v, 4) if isinstance(v, float) else v for v in row] for row in rows])


def _summary(rows, dataset: str, reused: list[str]) -> str:
    """E.g. "test accuracy 0.914 [0.857, 0.962], 104 images; reused": the headline in words for the run's console."""
    headline = [r for r in rows if r.dataset == dataset and r.part == "test" and r.class_name is None
                and r.metric in ("accuracy", "mse")]
    text = ", ".join(f"test {r.metric} {r.value:.3f}" + (f" [{r.ci_low:.3f}, {r.ci_high:.3f}]" if r.ci_low is not None else "")
                     + (f" on {r.n} images" if r.n else "") for r in headline) or "nothing evaluated"
    return text + ("; stored metrics reused" if reused else "")


@experiment_check(asset=evaluation, description=(
    "Recomputes the chain under the numbers: checkpoint sha256 = model_id, split fingerprint from the splits rows, "
    "the filter set, metrics from the predictions rows, and a sample of image files against their sha256."))
def lineage_verified(context: dg.AssetCheckExecutionContext, duckdb: DuckDBResource) -> dg.AssetCheckResult:
    exp = experiment(context)
    model_id = recorded_metadata(context, "evaluation")["model_id"]
    report = verify(database(duckdb), exp.name, model_id=model_id, objects_root=objects_dir())
    problems = report.problems
    return dg.AssetCheckResult(
        passed=not problems,
        # Text, not numbers: a count of files hashed plotted over time says nothing.
        metadata={"model_id": model_id, "image files hashed": f"{report.files_hashed} of {report.files_total}",
                  "problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems)) if problems else "none"},
        description=f"{len(problems)} mismatch(es): {problems[0]}" if problems else "every hash and fingerprint recomputed matches",
    )
