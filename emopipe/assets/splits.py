"""splits: stratified, seeded, leak-free train/val/test assignment of the filtered images, in DuckDB."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from emopipe.assets.common import CATALOG, CODE_VERSION, database, experiment, experiment_check, experiment_partitions, table_metadata, recorded_metadata, user_errors, versioned_output
from emopipe.core.split_is_sound import verify_split
from emopipe.core.near_duplicates import near_duplicate_groups
from emopipe.core.splits import make_split, official_overlap


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
                            scheme=exp.split, seed=exp.seed_of_split, groups=groups,
                            split_column=CATALOG.dataset(exp.dataset).split_column)
    for message in result.small_classes + result.notes:
        context.log.warning(message)
    parts = {p: sum(c.get(p, 0) for c in result.counts.values()) for p in ("train", "val", "test")}
    metadata = {
        "summary": f"{result.scheme}: " + " / ".join(f"{n} {p}" for p, n in parts.items())
                   + f" images (split {result.split_id[:12]})"
                   + (f"; {len(result.small_classes + result.notes)} warning(s) above" if result.small_classes + result.notes else ""),
        "split_id": result.split_id,
        "fingerprint": result.fingerprint,
        "scheme": result.scheme,
        "seed": result.seed,
        "filter_id": filtered_images["filter_id"],
        "n_images": result.n_images,
        **{f"n_{p}": n for p, n in parts.items()},
        "near_duplicate_groups_merged": result.n_groups_merged,
        "counts": table_metadata(["class", "train", "val", "test", "images"],
                                 [[label, *(c.get(p, 0) for p in ("train", "val", "test")), sum(c.values())]
                                  for label, c in sorted(result.counts.items())]),
        "messages": dg.MetadataValue.md("\n".join(f"- {m}" for m in result.small_classes + result.notes) or "none"),
    }
    handle = {"split_id": result.split_id, "filter_id": filtered_images["filter_id"], "dataset": exp.dataset, "scheme": exp.split}
    return versioned_output(handle, metadata, result.fingerprint)


@experiment_check(asset=splits, description=(
    "Parts disjoint, every filtered image assigned exactly once, no near-duplicate group across parts, per-class "
    "proportions within one image (or the official parts kept). Blocks training on failure."))
def split_is_sound(context: dg.AssetCheckExecutionContext, duckdb: DuckDBResource) -> dg.AssetCheckResult:
    exp = experiment(context)
    db = database(duckdb)
    handle = recorded_metadata(context, "splits")
    split_column = CATALOG.dataset(exp.dataset).split_column
    with db.session():
        groups = near_duplicate_groups(db, handle["filter_id"])
        outcomes = verify_split(db, handle["split_id"], handle["filter_id"], groups, exp.split, split_column)
        # The manifest's own parts may leak; the split moves such groups out of train, so this informs, not fails.
        leaked = official_overlap(db, dataset=exp.dataset, filter_id=handle["filter_id"], groups=groups,
                                  split_column=split_column) if exp.split == "official" else None
    failed = [o for o in outcomes if not o.passed]
    metadata = {"split_id": handle["split_id"], "checks": table_metadata(["check", "passed", "details"], [[o.name, o.passed, o.details] for o in outcomes])}
    description = "; ".join(f"{o.name}: {o.details}" for o in failed) or "all split checks passed"
    if leaked is not None:
        metadata.update({f"official {part} images with a near-duplicate in official train": n for part, n in leaked.items()})
        if any(leaked.values()):
            description += (f"; warning: in the dataset's official split {leaked['test']} test and {leaked['val']} val images "
                            "have a copy or near-duplicate in official train (this split moved those train images out)")
    return dg.AssetCheckResult(passed=not failed, metadata=metadata, description=description)

