"""What every asset module shares: the catalog, the experiment partitions, and metadata helpers."""

import base64
import warnings
from contextlib import contextmanager

import dagster as dg
from dagster_duckdb import DuckDBResource

from emopipe.catalog import ExperimentSpec, load_catalog
from emopipe.core.raw_images import dataset_fingerprint
from emopipe.db import Database
from emopipe.errors import UserError

# Data versions on Output are how every asset records its fingerprint; they are beta in Dagster 1.13.
warnings.filterwarnings("ignore", category=dg.BetaWarning)

CATALOG = load_catalog()

# One static partition per experiment, shared by every asset: one run = one experiment's chain.
experiment_partitions = dg.StaticPartitionsDefinition(sorted(CATALOG.experiments))


def experiment(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> ExperimentSpec:
    return CATALOG.experiment(context.partition_key)


def database(resource: DuckDBResource) -> Database:
    return Database.from_resource(resource)


def png_markdown(png: bytes, alt: str) -> dg.MetadataValue:
    """A PNG shown inline in the UI: Dagster renders Markdown images with data URIs."""
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# Marks a Failure that is a user mistake: `emopipe run` prints its message as one line, no traceback.
USER_ERROR = "emopipe/user_error"


@contextmanager
def user_errors():
    """Turn a user mistake into a Dagster Failure: its message shown as is, no retries."""
    try:
        yield
    except UserError as e:
        raise dg.Failure(description=str(e), allow_retries=False, metadata={USER_ERROR: True}) from None


def require_dataset_unchanged(db: Database, dataset: str, recorded: str, since: str) -> None:
    """Fail when the dataset's rows differ from what the upstream materialization recorded."""
    if dataset_fingerprint(db, dataset) != recorded:
        raise dg.Failure(f"dataset {dataset!r} changed since {since} was materialized; materialize raw_images and what follows again")


def recorded_metadata(context: dg.AssetCheckExecutionContext, asset: str) -> dict:
    """The metadata of the asset's last materialization of this partition, as Dagster recorded it:
    a check verifies exactly what the materialization produced, never whatever is newest in DuckDB."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[context.partition_key]), limit=1
    ).records
    if not records:
        raise dg.Failure(f"{asset} has no materialization for partition {context.partition_key!r} yet")
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}
