"""images_32, images_224 (and images_<S> for any other size an experiment asks for): packed uint8 arrays."""

import dagster as dg
from dagster_duckdb import DuckDBResource

from emopipe.assets.common import CATALOG, CODE_VERSION, database, experiment, experiment_partitions, png_markdown, require_dataset_unchanged, versioned_output
from emopipe.core.images import array_fingerprint, build_arrays, load_array, method_for
from emopipe.core.preview import grid_png
from emopipe.paths import data_dir, objects_dir

# 32 px feeds the near-duplicate hashes of `splits`; every experiment also needs its own size.
ALWAYS_BUILT = (32,)


def dataset_image_ids(db, raw_images: dict) -> list[str]:
    """The image ids behind the upstream materialization, refusing a dataset that changed since."""
    with db.session(), db.connect() as conn:
        for name, recorded in raw_images.items():
            require_dataset_unchanged(db, name, recorded["fingerprint"], "raw_images")
        rows = conn.execute(
            "SELECT DISTINCT image_id FROM images WHERE dataset IN (SELECT unnest(?)) ORDER BY image_id", [list(raw_images)]
        ).fetchall()
    return [r[0] for r in rows]


def images_asset(size: int) -> dg.AssetsDefinition:
    method = method_for(size)
    how = "whole image squashed to" if method == "squash" else "shorter side to"
    how_end = "" if method == "squash" else ", centre crop"

    @dg.asset(
        name=f"images_{size}",
        partitions_def=experiment_partitions,
    code_version=CODE_VERSION,
        group_name="images",
        kinds={"numpy"},
        ins={"raw_images": dg.AssetIn()},
        description=(
            f"Every image decoded once (EXIF-rotated, RGB), {how} {size} px{how_end}; packed uint8 arrays "
            f"(N x {size} x {size} x 3, memory-mappable) under data/arrays, indexed by image_id in the `resized` "
            "table. Cached by (image_id, size, method): only new images are decoded."
        ),
    )
    def _asset(context: dg.AssetExecutionContext, duckdb: DuckDBResource, raw_images: dict) -> dg.Output[dict]:
        exp = experiment(context)
        if size not in (*ALWAYS_BUILT, exp.image_size):
            context.log.info(f"{exp.name} trains at {exp.image_size} px: nothing to build at {size} px")
            return versioned_output({"size": size, "method": method, "n_images": 0},
                                    {"used_by_experiment": False, "n_images": 0}, "unused")
        db = database(duckdb)
        image_ids = dataset_image_ids(db, raw_images)
        result = build_arrays(db, image_ids, size, objects_root=objects_dir(), arrays_root=data_dir() / "arrays", log=context.log.info)
        if result.failed:
            context.log.warning(f"{len(result.failed)} images could not be decoded: " + "; ".join(f"{k[:12]}: {v}" for k, v in list(result.failed.items())[:5]))
        built = [i for i in image_ids if i not in result.failed]
        with db.session():
            fingerprint = array_fingerprint(db, built, size)
            sample = load_array(db, built[:16], size) if built else []
        metadata = {
            "summary": f"{len(built)} images at {size} px ({result.n_decoded} decoded, {result.n_cached} cached"
                       + (f", {len(result.failed)} undecodable)" if result.failed else ")"),
            "used_by_experiment": True,
            "size": size,
            "method": method,
            "n_images": len(built),
            "n_decoded": result.n_decoded,
            "cache_hits": result.n_cached,
            "n_failed": len(result.failed),
            "images_per_second": round(result.images_per_second, 1),
            "seconds": round(result.seconds, 2),
            "fingerprint": fingerprint,
        }
        if len(sample):
            metadata[f"sample at {size} px"] = png_markdown(grid_png(list(sample)), f"first images at {size} px")
        return versioned_output({"size": size, "method": method, "n_images": len(built), "fingerprint": fingerprint},
                                metadata, fingerprint)

    return _asset


image_assets = [images_asset(size) for size in CATALOG.image_sizes()]
