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

CATALOG = load_catalog()

# One static partition per experiment, shared by every asset: one run = one experiment's chain.
experiment_partitions = dg.StaticPartitionsDefinition(sorted(CATALOG.experiments))

# The packed arrays of every size: a stage that reads the arrays of its experiment's image_size depends
# on all of them, as the graph is the same for every partition (each experiment uses one; the others
# are a no-op for it).
ARRAY_ASSETS = [f"images_{size}" for size in CATALOG.image_sizes()]

# Each asset's code_version: bump it when the asset's code gives another output for the same inputs,
# so Dagster shows the materializations made by the older code as stale.
CODE_VERSION = "2"


def experiment(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> ExperimentSpec:
    return CATALOG.experiment(context.partition_key)


def database(resource: DuckDBResource) -> Database:
    return Database.from_resource(resource)


def versioned_output(value, metadata: dict, version: str) -> dg.Output:
    """The asset's output with its fingerprint as Dagster data version, how every asset records what it
    produced. `data_version` is a beta parameter in Dagster 1.13: its warning is silenced for this call
    only, not for the process."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.Output(value, metadata=metadata, data_version=dg.DataVersion(version))


def experiment_check(**kwargs):
    """dg.asset_check recorded per experiment partition, so one experiment's failed check never shows as
    another's (partition-aware checks are a preview feature of Dagster 1.13: its warning is silenced here only)."""

    def decorate(fn):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dg.PreviewWarning)
            return dg.asset_check(partitions_def=experiment_partitions, blocking=True, **kwargs)(fn)

    return decorate


def png_markdown(png: bytes, alt: str) -> dg.MetadataValue:
    """A PNG shown inline in the UI: Dagster renders Markdown images with data URIs."""
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def table_metadata(header: list[str], rows: list[list]) -> dg.MetadataValue:
    """Rows shown as a table in the UI that stays data (sortable, one line per row): Dagster's table
    metadata, column types taken from the values (a column of numbers sorts as numbers)."""

    def kind(column: int) -> str:
        values = [row[column] for row in rows if row[column] is not None]
        if values and all(isinstance(v, bool) for v in values):
            return "bool"
        if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return "int"
        if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return "float"
        return "string"

    kinds = [kind(j) for j in range(len(header))]
    records = [dg.TableRecord({name: (value if kinds[j] != "string" or value is None else str(value))
                               for j, (name, value) in enumerate(zip(header, row))}) for row in rows]
    return dg.MetadataValue.table(records, schema=dg.TableSchema([dg.TableColumn(n, k) for n, k in zip(header, kinds)]))


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
