"""raw_images: every source item of the experiment's datasets stored, rejected or counted as a duplicate."""

import json

import dagster as dg
from dagster_duckdb import DuckDBResource

from emopipe.assets.common import CATALOG, CODE_VERSION, database, experiment, experiment_partitions, table_metadata, png_markdown, user_errors, versioned_output
from emopipe.core.preview import grid_png, thumbnails
from emopipe.core.raw_images import ingest_dataset, preview_sample
from emopipe.fingerprint import rows_fingerprint
from emopipe.paths import objects_dir, sources_dir


@dg.asset(
    partitions_def=experiment_partitions,
    code_version=CODE_VERSION,
    group_name="ingest",
    kinds={"duckdb", "python"},
    description=(
        "Every image of the experiment's datasets (training set and cross-dataset test sets), stored once "
        "under data/objects by sha256 of its bytes, with `images`, `rejected` and `duplicates` rows in DuckDB. "
        "Inputs = images + rejected + duplicates."
    ),
)
def raw_images(context: dg.AssetExecutionContext, duckdb: DuckDBResource) -> dg.Output[dict]:
    exp = experiment(context)
    db = database(duckdb)
    handle, rows, metadata = {}, [], {}
    for name in exp.datasets:
        spec = CATALOG.dataset(name)
        with user_errors():
            result = ingest_dataset(db, spec, objects_root=objects_dir(), work_dir=sources_dir(name), log=context.log.info)
        if not result.balanced:
            raise dg.Failure(f"{name}: accounting does not balance: {result}")
        if result.n_images == 0:
            raise dg.Failure(
                f"dataset {name!r} ({spec.source}, from {spec.origin}) produced no images: "
                f"{result.n_inputs} inputs, rejected by reason {result.rejected_by_reason}"
            )
        handle[name] = {"fingerprint": result.fingerprint, "n_images": result.n_images}
        rows.append([name, spec.source, result.n_inputs, result.n_known, result.n_images, result.n_new, result.n_rejected, result.n_duplicates,
                     result.n_label_conflicts, json.dumps(result.rejected_by_reason), result.fingerprint[:16]])
        if result.conflicts:
            context.log.warning(f"{name}: {result.n_label_conflicts} label conflicts, e.g. " + "; ".join(result.conflicts[:3]))
        metadata[f"{name}/throughput_inputs_per_s"] = round(result.n_inputs / max(result.seconds, 1e-9), 1)
    sample = preview_sample(db, exp.dataset, k=16)
    metadata.update({
        "accounting": table_metadata(
            ["dataset", "source", "inputs", "unchanged (not read)", "images", "new bytes stored", "rejected", "duplicates", "label conflicts", "rejected by reason", "fingerprint"], rows),
        "summary": "; ".join(f"{r[0]}: {r[4]} images ({r[5]} new), {r[6]} rejected, {r[7]} duplicates" for r in rows),
        "n_images": sum(h["n_images"] for h in handle.values()),
        "fingerprint": rows_fingerprint((n, h["fingerprint"]) for n, h in handle.items()),
        "sample images": png_markdown(grid_png(thumbnails([i for i, _ in sample]), [label for _, label in sample]), f"{exp.dataset} sample"),
    })
    return versioned_output(handle, metadata, metadata["fingerprint"])
