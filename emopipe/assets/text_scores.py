"""text_scores: OCR (the experiment's text_engine) on every image of its dataset, and has_text under its thresholds."""

import math

import dagster as dg
from dagster_duckdb import DuckDBResource

from emopipe.assets.common import (
    CATALOG, CODE_VERSION, database, experiment, experiment_check, experiment_partitions, table_metadata, recorded_metadata, user_errors, versioned_output,
)
from emopipe.core.text_detection_quality import text_quality
from emopipe.paths import data_dir, objects_dir

MIN_PRECISION = MIN_RECALL = 0.95


@dg.asset(
    partitions_def=experiment_partitions,
    code_version=CODE_VERSION,
    group_name="text_filter",
    kinds={"openvino", "easyocr", "duckdb"},
    # OCR reads the original bytes, not the arrays: 32 px erases text, the 224 crop cuts edge captions.
    ins={"raw_images": dg.AssetIn()},
    # With a GPU, OCR runs there: one GPU step at a time (on a CPU-only machine the pool also keeps
    # OCR from competing with a training step for the cores).
    pool="gpu",
    description=(
        "OCR (text_engine: ppocr by default, PP-OCRv4 in OpenVINO, or easyocr; offline weights) on each image "
        "of the experiment's dataset, read from the original bytes with the longer side scaled to the OCR size: "
        "boxes, text, best confidence, text area, and has_text under the thresholds (text_thresholds), in DuckDB "
        "`text_scores`. Raw OCR output is cached per (image_id, engine identity), so no image is OCR'd twice and "
        "engines never mix; changing a threshold only re-decides."
    ),
)
def text_scores(context: dg.AssetExecutionContext, duckdb: DuckDBResource, raw_images: dict) -> dg.Output[dict]:
    exp = experiment(context)
    if not exp.text_filter:
        context.log.info(f"{exp.name} sets text_filter: false; no OCR needed")
        return versioned_output({"dataset": exp.dataset, "text_filter": False, "params_hash": None, "params": None},
                                {"text_filter": False}, "no-filter")
    from emopipe.core.text_scores import score_text  # the OCR libraries load only in the step that OCRs

    db = database(duckdb)
    thresholds = CATALOG.thresholds(exp)
    with db.connect() as conn:
        ids = [r[0] for r in conn.execute("SELECT image_id FROM images WHERE dataset = ? ORDER BY image_id", [exp.dataset]).fetchall()]
    with user_errors():
        result = score_text(db, ids, thresholds, objects_root=objects_dir(), work_dir=data_dir(),
                            engine=CATALOG.text_engine(exp), log=context.log.info)
    params_hash, params = result.params_hash, result.params
    metadata = {
        "summary": f"{result.n_images} images, {result.n_has_text} with text ({result.n_ocr_run} OCR'd now, "
                   f"{result.n_cached} from the cache" + (f", {result.n_unreadable} unreadable)" if result.n_unreadable else ")"),
        "params_hash": params_hash,
        "params": params,
        "n_images": result.n_images,
        "n_ocr_run": result.n_ocr_run,
        "cache_hits": result.n_cached,
        "n_has_text": result.n_has_text,
        "n_unreadable": result.n_unreadable,
        "device": result.device,
        "workers": result.workers,
        "batch_size": result.batch_size,
        "images_per_second": round(result.images_per_second, 2),
        "cpu_seconds_per_image": round(result.cpu_seconds_per_image, 4),
        "seconds": round(result.seconds, 1),
    }
    handle = {"dataset": exp.dataset, "text_filter": True, "params_hash": params_hash, "params": params,
              "dataset_fingerprint": raw_images[exp.dataset]["fingerprint"]}
    version = f"{params_hash}-{raw_images[exp.dataset]['fingerprint'][:16]}"
    return versioned_output(handle, metadata, version)


@experiment_check(asset=text_scores, description=(
    f"Precision and recall of has_text against the dataset's ground truth (images.attributes.has_text, "
    f"e.g. the synthetic demo's rendered text): both must be at least {MIN_PRECISION}."))
def text_detection_quality(context: dg.AssetCheckExecutionContext, duckdb: DuckDBResource) -> dg.AssetCheckResult:
    exp = experiment(context)
    if not exp.text_filter:
        return dg.AssetCheckResult(passed=True, metadata={"measured": False}, description="text_filter is off")
    # The decisions this partition's materialization made (its engine depends on the machine's device
    # and precision), not whatever this process would compute.
    params_hash = recorded_metadata(context, "text_scores")["params_hash"]
    q = text_quality(database(duckdb), exp.dataset, params_hash)
    if q["n"] == 0:
        return dg.AssetCheckResult(passed=True, metadata={"measured": False},
                                   description=f"dataset {exp.dataset!r} carries no has_text ground truth: nothing to measure")
    passed = q["precision"] >= MIN_PRECISION and q["recall"] >= MIN_RECALL
    values = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in q.items()}
    return dg.AssetCheckResult(
        passed=bool(passed),
        metadata={**{k: v for k, v in values.items() if v is not None}, "measured": True,
                  "confusion": table_metadata(["decision", "truth: text", "truth: no text"], [
                      ["predicted text", q["tp"], q["fp"]], ["predicted no text", q["fn"], q["tn"]]])},
        description=f"precision {q['precision']:.3f}, recall {q['recall']:.3f} (need >= {MIN_PRECISION})",
    )
