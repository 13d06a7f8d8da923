"""splits: stratified, seeded, leak-free train/val/test assignment of the filtered images, in DuckDB."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from emopipe.assets.common import CATALOG, CODE_VERSION, database, experiment, experiment_partitions, table_metadata, recorded_metadata, user_errors, versioned_output
from emopipe.core.split_is_sound import verify_split
from emopipe.core.splits import make_split, near_duplicate_groups


@dg.asset(
    partitions_def=experiment_partitions,
    code_version=CODE_VERSION,
    group_name="splits",
    kinds={"duckdb"},
    ins={"filtered_images": dg.AssetIn(), "images_32": dg.AssetIn()},
    description=(
        "Train/val/test parts of the filtered images (70/15/15, 80/10/10, any a/b/c, or the dataset's official "
        "split), stratified by label, deterministic for the seed, with near-duplicate groups (perceptual hash of "
        "the 32 px arrays) kept in one part. `splits` rows + a `split_runs` row; split_id = sha256 over the sorted "
        "(image_id, part) pairs."
    ),
)
def splits(context: dg.AssetExecutionContext, duckdb: DuckDBResource, filtered_images: dict, images_32: dict) -> dg.Output[dict]:
    exp = experiment(context)
    db = database(duckdb)
    with db.session(), user_errors():
        groups = near_duplicate_groups(db, filtered_images["filter_id"])
        result = make_split(db, experiment=exp.name, dataset=exp.dataset, filter_id=filtered_images["filter_id"],
                            scheme=exp.split, seed=exp.seed, groups=groups,
                            split_column=CATALOG.dataset(exp.dataset).split_column)
    for message in result.small_classes + result.notes:
        context.log.warning(message)
    parts = {p: sum(c.get(p, 0) for c in result.counts.values()) for p in ("train", "val", "test")}
    metadata = {
        "split_id": result.split_id,
        "fingerprint": result.fingerprint,
        "scheme": result.scheme,
        "seed": result.seed,
        "filter_id": filtered_images["filter_id"],
        "n_images": result.n_images,
        **{f"n_{p}": n for p, n in parts.items()},
        "near_duplicate_groups_merged": result.n_groups_merged,
        "counts": dg.MetadataValue.md(result.markdown),
        "messages": dg.MetadataValue.md("\n".join(f"- {m}" for m in result.small_classes + result.notes) or "none"),
    }
    handle = {"split_id": result.split_id, "filter_id": filtered_images["filter_id"], "dataset": exp.dataset, "scheme": exp.split}
    return versioned_output(handle, metadata, result.fingerprint)


@dg.asset_check(asset=splits, blocking=True, description=(
    "Parts disjoint, every filtered image assigned exactly once, no near-duplicate group across parts, per-class "
    "proportions within one image (or the official parts kept). Blocks training on failure."))
def split_is_sound(context: dg.AssetCheckExecutionContext, duckdb: DuckDBResource) -> dg.AssetCheckResult:
    exp = experiment(context)
    db = database(duckdb)
    handle = recorded_metadata(context, "splits")
    with db.session():
        outcomes = verify_split(db, handle["split_id"], handle["filter_id"], near_duplicate_groups(db, handle["filter_id"]),
                                exp.split, CATALOG.dataset(exp.dataset).split_column)
    failed = [o for o in outcomes if not o.passed]
    return dg.AssetCheckResult(
        passed=not failed,
        metadata={"split_id": handle["split_id"], "checks": table_metadata(["check", "passed", "details"], [[o.name, o.passed, o.details] for o in outcomes])},
        description="; ".join(f"{o.name}: {o.details}" for o in failed) or "all split checks passed",
    )

