"""`emopipe experiments`: per experiment, its datasets, whether their data is on this machine (and where it was
looked for), model @ size, split, and its newest headline result.

It reads the catalog, the file system and the DuckDB file, which it opens read-only and never creates. It
imports neither Dagster nor torch, so it answers at once, even while a run holds the database.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import duckdb

from emopipe.catalog import Catalog, DatasetSpec, ExperimentSpec
from emopipe.core.download import is_http_url
from emopipe.core.sources.archive import extraction_folder
from emopipe.core.sources.emotion6 import GROUND_TRUTH as EMOTION6_GROUND_TRUTH
from emopipe.core.sources.parquet import download_path
from emopipe.core.sources.paths import catalog_path
from emopipe.core.sources.webemo import WEBEMO_FILES
from emopipe.db import CONNECTION_CONFIG
from emopipe.paths import sources_dir

HEADLINE_METRIC = {"classification": "accuracy", "regression": "mse"}
# The files a released layout's reader opens first in the dataset's folder (`path`).
FILES_IN_FOLDER = {"emoset": ["info.json"], "webemo": list(WEBEMO_FILES), "emotion6": [EMOTION6_GROUND_TRUTH]}
COLUMNS = ("experiment", "dataset", "data", "model @ size", "split", "last result", "looked for")
NONE = "—"


@dataclass(frozen=True)
class DataStatus:
    dataset: str
    state: str  # present, missing, ingested (N images), downloaded, not fetched, or unknown (database unread)
    where: str  # the folder, file or URL looked for


@dataclass(frozen=True)
class Headline:
    metric: str
    value: float
    model_id: str
    dataset: str


@dataclass(frozen=True)
class Recorded:
    """What the DuckDB file says: images per dataset and the headline rows; None where it could not be read."""

    state: str  # "absent", "read", "busy" or "unreadable: <why>"
    images: dict[str, int] | None
    headlines: dict[str, list[Headline]]  # experiment -> headline-metric rows of the test part, newest first


@dataclass(frozen=True)
class ExperimentRow:
    name: str
    data: list[DataStatus]  # the training dataset first, then the cross-dataset test sets
    model: str
    split: str
    result: Headline | None


@dataclass(frozen=True)
class Overview:
    rows: list[ExperimentRow]
    catalog_files: tuple[str, ...]
    db_file: Path
    db_state: str


def experiments_overview(catalog: Catalog, db_file: Path) -> Overview:
    recorded = read_recorded(db_file)
    rows = [ExperimentRow(name=name, data=[data_status(catalog.dataset(d), recorded.images) for d in exp.datasets],
                          model=f"{exp.model} @ {exp.image_size}px", split=exp.split,
                          result=headline_of(exp, recorded.headlines.get(name, [])))
            for name, exp in sorted(catalog.experiments.items())]
    return Overview(rows, catalog.files, db_file, recorded.state)


def read_recorded(db_file: Path) -> Recorded:
    """Images per dataset and each experiment's headline rows, from a read-only connection. A file held by
    a running step (DuckDB lets one process write it, and then nobody else open it) reads as "busy"."""
    if not db_file.is_file():
        return Recorded("absent", {}, {})
    try:
        with duckdb.connect(str(db_file), read_only=True, config=CONNECTION_CONFIG) as conn:
            images = dict(conn.execute("SELECT dataset, count(*) FROM images GROUP BY dataset").fetchall())
            rows = conn.execute(
                """SELECT experiment, metric, value, model_id, dataset FROM metrics
                   WHERE part = 'test' AND class IS NULL AND metric IN (SELECT unnest($1::VARCHAR[]))
                   ORDER BY created_at DESC""", [sorted(set(HEADLINE_METRIC.values()))]).fetchall()
    except duckdb.Error as e:
        if "lock" in str(e).lower():
            return Recorded("busy", None, {})
        return Recorded(f"unreadable: {str(e).splitlines()[0]}", None, {})
    headlines: dict[str, list[Headline]] = {}
    for experiment, *row in rows:
        headlines.setdefault(experiment, []).append(Headline(*row))
    return Recorded("read", images, headlines)


def headline_of(exp: ExperimentSpec, rows: list[Headline]) -> Headline | None:
    """The newest test result on the experiment's own dataset, else on a cross-dataset test set."""
    rows = [r for r in rows if r.metric == HEADLINE_METRIC[exp.task]]
    return next((r for r in rows if r.dataset == exp.dataset), rows[0] if rows else None)


def data_status(spec: DatasetSpec, images: dict[str, int] | None) -> DataStatus:
    """Whether the dataset's data can be read here. images: rows per dataset in `images`, None if unknown."""
    if spec.source == "synthetic":
        return DataStatus(spec.name, "present", f"generated ({spec.n_per_class} images per class)")
    local, remote, caches = looked_for(spec)
    absent = [path for path in local if not _exists(path)]
    if absent:
        return DataStatus(spec.name, "missing", absent[0])
    if not remote:  # a folder names its manifest too; the other kinds' files sit in the folder named first
        return DataStatus(spec.name, "present", " + ".join(local) if spec.source == "folder" else local[0])
    n_ingested = None if images is None else images.get(spec.name, 0)
    if n_ingested:
        return DataStatus(spec.name, f"ingested ({n_ingested} images)", remote[0])
    if caches and all(Path(c).exists() for c in caches):
        return DataStatus(spec.name, "downloaded", caches[0])
    if n_ingested is None:  # the database could not be read: the results line says why
        return DataStatus(spec.name, "unknown", remote[0])
    return DataStatus(spec.name, "not fetched", remote[0])


def looked_for(spec: DatasetSpec) -> tuple[list[str], list[str], list[str]]:
    """(local paths that must exist, remote data that a run fetches, the download caches of that data),
    each as the source kind's reader in emopipe/core/sources locates it."""
    work_dir = sources_dir(spec.name)
    root = catalog_path(spec.path, spec) if spec.path else None
    if spec.source == "folder":
        manifest = [root / Path(spec.labels).expanduser()] if spec.labels else []  # an absolute manifest stays as it is
        return [str(p) for p in (root, *manifest)], [], []
    if spec.source == "archive":
        return [], [spec.url], [str(extraction_folder(spec, work_dir))]
    if spec.source == "url_list":
        listing = str(catalog_path(spec.labels, spec)) if spec.labels else None
        # The image URLs in a local list are fetched by a run: the list must exist, the images are remote.
        return ([listing] if listing else []), [listing or spec.url], []
    if spec.source == "parquet":
        urls = [f for f in spec.files if is_http_url(f.location)]
        local = [str(catalog_path(f.location, spec)) for f in spec.files if f not in urls]
        return local, [f.location for f in urls], [str(download_path(f.location, f.sha256, work_dir)) for f in urls]
    # emotic's labels: Annotations.mat, a CSV or a folder of them; an absolute path stays as it is. A kind
    # not named here is looked for by its folder alone.
    inside = [spec.labels] if spec.source == "emotic" else FILES_IN_FOLDER.get(spec.source, [])
    return [str(root), *(str(root / Path(name).expanduser()) for name in inside)], [], []


def _exists(path: str) -> bool:
    """A path, or a glob pattern (parquet `files`) that matches something."""
    return bool(glob.glob(path)) if glob.has_magic(path) else Path(path).exists()


def overview_lines(overview: Overview) -> list[str]:
    """The table, its columns as wide as their widest cell, then where the results came from."""
    table = [list(COLUMNS)]
    for row in overview.rows:
        first, *evals = row.data
        table.append([row.name, first.dataset, first.state, row.model, row.split, _result_cell(row, overview.db_state),
                      first.where])
        table += [["", f"+ {d.dataset} (eval)", d.state, "", "", "", d.where] for d in evals]
    widths = [max(len(cells[i]) for cells in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip() for cells in table]
    return [f"catalog: {' + '.join(overview.catalog_files)}", *lines, _results_line(overview)]


def _result_cell(row: ExperimentRow, db_state: str) -> str:
    if db_state not in ("read", "absent"):  # the last line says why
        return "?"
    r = row.result
    if r is None:
        return NONE
    value = f"{100 * r.value:.1f} %" if r.metric == "accuracy" else f"{r.value:.4g}"
    on = "" if r.dataset == row.data[0].dataset else f" on {r.dataset}"
    return f"{r.metric} {value}{on} (model {r.model_id[:8]})"


def _results_line(overview: Overview) -> str:
    state, db_file = overview.db_state, overview.db_file
    if state == "absent":
        return f"results: none yet (no database at {db_file})"
    if state == "busy":
        return f"results: database busy ({db_file} is held by a running emopipe step); run this again when it ends"
    if state != "read":
        return f"results: {db_file} is {state}"
    return f"results: newest test-part {' / '.join(sorted(set(HEADLINE_METRIC.values())))} in {db_file}"
