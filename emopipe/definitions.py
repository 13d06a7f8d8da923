"""The Dagster code location: `defs`, loaded by workspace.yaml and `-m emopipe.definitions`."""

from emopipe.threads import prefer_passive_waiting

prefer_passive_waiting()  # before any step imports torch: its OpenMP threads then sleep instead of spinning

import dagster as dg
from dagster_duckdb import DuckDBResource

from emopipe.catalog import CatalogError

try:
    from emopipe.assets.common import CATALOG
except CatalogError as e:
    # Re-raised here with a fresh traceback: the user sees the message and this line, not our internals.
    raise CatalogError(str(e)) from None

from emopipe.assets.evaluation import evaluation, lineage_verified
from emopipe.assets.explanations import explanations
from emopipe.assets.filtered_images import filtered_images
from emopipe.assets.images import ALWAYS_BUILT, image_assets
from emopipe.assets.raw_images import raw_images
from emopipe.assets.splits import split_is_sound, splits
from emopipe.assets.text_scores import text_detection_quality, text_scores
from emopipe.assets.trained_model import trained_model
from emopipe.assets.tuned_hyperparams import tuned_hyperparams
from emopipe.automation import build_data_sensor, build_schedules
from emopipe.dead_runs import dead_runs
from emopipe.db import CONNECTION_CONFIG
from emopipe.paths import data_dir, db_path

ASSETS = [raw_images, *image_assets, text_scores, filtered_images, splits, tuned_hyperparams, trained_model, evaluation, explanations]
CHECKS = [text_detection_quality, split_is_sound, lineage_verified]
# The step keys Dagster gives the checks: "<asset>_<check>".
CHECK_STEPS = {f"{key.asset_key.to_user_string()}_{key.name}" for check in CHECKS for key in check.check_keys}

def steps_unused_by(exp) -> set[str]:
    """The steps (asset and check keys) of the main job that do nothing for this experiment, which
    `emopipe run` does not list: arrays at other sizes, OCR without the text filter, tuning without
    `tune`, heatmaps where none are asked for."""
    unused = {f"images_{size}" for size in CATALOG.image_sizes() if size not in (*ALWAYS_BUILT, exp.image_size)}
    if not exp.text_filter:
        unused.add("text_scores")
    if exp.tune is None:
        unused.add("tuned_hyperparams")
    if exp.task != "classification" or exp.explain_per_class == 0:
        unused.add("explanations")
    return unused


# The whole chain for one experiment partition (the partitions come from the assets).
main_job = dg.define_asset_job("main", selection=dg.AssetSelection.assets(*ASSETS) | dg.AssetSelection.checks(*CHECKS))

defs = dg.Definitions(
    assets=ASSETS,
    asset_checks=CHECKS,
    jobs=[main_job],
    schedules=build_schedules(CATALOG),
    sensors=[build_data_sensor(CATALOG), dead_runs],
    resources={
        "duckdb": DuckDBResource(database=str(db_path()), connection_config=CONNECTION_CONFIG),
        # Asset outputs are small handles (ids and fingerprints); the data itself lives in DuckDB and data/.
        "io_manager": dg.FilesystemIOManager(base_dir=str(data_dir() / "dagster_io")),
    },
)
