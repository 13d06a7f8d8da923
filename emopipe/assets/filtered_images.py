"""filtered_images: the experiment's image set after the text filter (all images when it is off)."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from emopipe.assets.common import CODE_VERSION, database, experiment, experiment_partitions, table_metadata, png_markdown, require_dataset_unchanged, versioned_output
from emopipe.core.filtered_images import filter_images
from emopipe.core.preview import grid_png, thumbnails


@dg.asset(
    partitions_def=experiment_partitions,
    code_version=CODE_VERSION,
    group_name="text_filter",
    kinds={"duckdb"},
    ins={"text_scores": dg.AssetIn()},
    description=(
        "The images of the experiment's dataset that survive the text filter (has_text false), or all of them "
        "when text_filter is off; unreadable images are left out and counted. Stored as `filter_runs` + "
        "`filtered_images`, filter_id = sha256 over the OCR params hash and the sorted kept image ids."
    ),
)
def filtered_images(context: dg.AssetExecutionContext, duckdb: DuckDBResource, text_scores: dict) -> dg.Output[dict]:
    exp = experiment(context)
    db = database(duckdb)
    if text_scores["text_filter"]:
        require_dataset_unchanged(db, exp.dataset, text_scores["dataset_fingerprint"], "text_scores")
    result = filter_images(db, experiment=exp.name, dataset=exp.dataset, text_filter=text_scores["text_filter"],
                           params_hash=text_scores["params_hash"], params=text_scores["params"])
    metadata = {
        "summary": (f"kept {result.n_kept} of {result.n_input} images, removed {result.n_removed} with text"
                    + (f" and {result.n_unreadable} unreadable" if result.n_unreadable else "")
                    if text_scores["text_filter"] else f"all {result.n_kept} images kept (text_filter: false)"),
        "filter_id": result.filter_id,
        "text_filter": text_scores["text_filter"],
        "params_hash": text_scores["params_hash"] or "no-filter",
        "n_input": result.n_input,
        "n_kept": result.n_kept,
        "n_removed": result.n_removed,
        "n_unreadable": result.n_unreadable,
        "removed_per_class": table_metadata(
            ["class", "removed (text found)"], [[c, n] for c, n in sorted(result.removed_per_class.items())] or [["-", 0]]),
    }
    if result.removed_examples:
        metadata["images removed for text"] = png_markdown(grid_png(thumbnails(result.removed_examples)), "images removed for text")
    handle = {"filter_id": result.filter_id, "dataset": exp.dataset, "params_hash": text_scores["params_hash"], "n_kept": result.n_kept}
    return versioned_output(handle, metadata, result.filter_id)
