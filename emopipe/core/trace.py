"""Lineage: from a benchmark number down to the raw images (`trace`), and a recomputation of every
fingerprint and hash on that chain from what is stored (`verify`).

The chain: metrics (model_id, split_id) -> models (checkpoint sha256, split_fingerprint) -> splits /
split_runs (filter_id, filter params hash, input fingerprint) -> filter_runs / filtered_images ->
images (image_id = sha256 of the stored bytes, source_uri).
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emopipe.core.evaluation import MetricRow, classification_metrics, regression_metrics
from emopipe.core.filtered_images import filter_id_of
from emopipe.db import Database
from emopipe.errors import UserError
from emopipe.fingerprint import rows_fingerprint, sha256_file
from emopipe.paths import data_dir, object_path

EXAMPLES = 3  # source URIs shown per dataset, and ids named in a set-difference problem
COUNT_METRICS = ("excluded", "confusion_count")


class TraceError(UserError):
    """The experiment (or the model or metric asked for) has nothing recorded to trace."""


@dataclass(frozen=True)
class DatasetImages:
    dataset: str
    count: int
    fingerprint: str  # rows_fingerprint of the (image_id, label) rows
    source_uris: tuple[str, ...]


@dataclass(frozen=True)
class Trace:
    experiment: str
    metrics: list[dict[str, Any]]  # dataset, part, metric, class, value, ci_low, ci_high, n
    model: dict[str, Any]  # the models row, JSON columns parsed
    split: dict[str, Any]  # the split_runs row (just split_id if there is none) plus `parts`: counts from splits
    filter: dict[str, Any] | None  # the filter_runs row
    datasets: list[DatasetImages]  # the split's dataset first, then the cross-dataset test sets


@dataclass(frozen=True)
class Problem:
    """One mismatch between what a row or file claims and what it holds."""

    where: str  # the table or file kind: checkpoint, models, splits, split_runs, filter_runs, metrics, predictions, object
    id: str
    what: str
    expected: Any  # what the lineage records (an id, a stored fingerprint or value)
    actual: Any  # what recomputing it from the stored rows or bytes gives

    def __str__(self) -> str:
        return f"{self.where} {self.id}: {self.what}: expected {self.expected}, found {self.actual}"


def _rows(conn, sql: str, params: list) -> list[dict[str, Any]]:
    cursor = conn.execute(sql, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def _one(conn, sql: str, params: list) -> dict[str, Any] | None:
    rows = _rows(conn, sql, params)
    return rows[0] if rows else None


def _parsed(row: dict[str, Any] | None, *json_columns: str) -> dict[str, Any] | None:
    if row is None:
        return None
    return {k: json.loads(v) if k in json_columns and isinstance(v, str) else v for k, v in row.items()}


def _model(conn, experiment: str, model_id: str | None) -> dict[str, Any]:
    """The models row of model_id, else of the experiment's latest evaluated (or, failing that, trained) model."""
    if model_id is None:
        latest = _one(conn, "SELECT arg_max(model_id, created_at) AS model_id FROM metrics WHERE experiment = ?", [experiment])
        model_id = latest["model_id"] if latest else None
    row = _one(conn, """SELECT * FROM models WHERE experiment = ? AND (? IS NULL OR model_id = ?)
                        ORDER BY created_at DESC LIMIT 1""", [experiment, model_id, model_id])
    if row is None:
        what = f"no model {model_id}" if model_id else "no model"
        raise TraceError(f"experiment {experiment}: {what} recorded in table models; materialize trained_model and evaluation first")
    return _parsed(row, "hyperparameters", "classes", "history", "versions")


def _split_run(conn, split_id: str, experiment: str) -> dict[str, Any] | None:
    return _parsed(_one(conn, "SELECT * FROM split_runs WHERE split_id = ? ORDER BY experiment <> ? LIMIT 1",
                        [split_id, experiment]), "ratios", "counts")


def _filter_run(conn, split_run: dict[str, Any] | None, experiment: str) -> dict[str, Any] | None:
    if not split_run or not split_run.get("filter_id"):
        return None
    return _parsed(_one(conn, "SELECT * FROM filter_runs WHERE filter_id = ? ORDER BY experiment <> ? LIMIT 1",
                        [split_run["filter_id"], experiment]), "params")


def trace(db: Database, experiment: str, metric: str | None = None, *, model_id: str | None = None) -> Trace:
    """The chain behind the experiment's numbers: metric rows (all overall ones, or every row of `metric`),
    model, split, filter and the datasets' images. Defaults to the latest evaluated model."""
    with db.connect() as conn:
        model = _model(conn, experiment, model_id)
        split = _split_run(conn, model["split_id"], experiment)
        # The split's own dataset first, the test part before the others.
        metrics = _rows(conn, """
            SELECT dataset, part, metric, class, value, ci_low, ci_high, n FROM metrics
            WHERE experiment = ? AND model_id = ? AND (CASE WHEN ? IS NULL THEN class IS NULL ELSE metric = ? END)
            ORDER BY dataset IS DISTINCT FROM ?, dataset, part <> 'test', part, metric, class""",
            [experiment, model["model_id"], metric, metric, split and split.get("dataset")])
        if metric is not None and not metrics:
            known = [r[0] for r in conn.execute("SELECT DISTINCT metric FROM metrics WHERE model_id = ? ORDER BY 1",
                                                 [model["model_id"]]).fetchall()]
            raise TraceError(f"experiment {experiment}: no metric {metric!r} for model {model['model_id'][:12]}; "
                             f"recorded: {', '.join(known) or 'none'}")
        parts = dict(conn.execute("SELECT part, count(*) FROM splits WHERE split_id = ? GROUP BY part ORDER BY part",
                                  [model["split_id"]]).fetchall())
        split = {**(split or {"split_id": model["split_id"]}), "parts": parts}
        filter_run = _filter_run(conn, split, experiment)
        names = list(dict.fromkeys([*([split["dataset"]] if split.get("dataset") else []), *(m["dataset"] for m in metrics)]))
        datasets = []
        for name in names:
            rows = conn.execute("SELECT image_id, label FROM images WHERE dataset = ?", [name]).fetchall()
            uris = conn.execute("SELECT source_uri FROM images WHERE dataset = ? ORDER BY image_id LIMIT ?",
                                [name, EXAMPLES]).fetchall()
            datasets.append(DatasetImages(name, len(rows), rows_fingerprint(rows), tuple(u[0] for u in uris)))
    return Trace(experiment, metrics, model, split, filter_run, datasets)


def _number(row: dict[str, Any]) -> str:
    value = row["value"]
    text = str(int(value)) if row["metric"] in COUNT_METRICS else f"{value:.4f}"
    if row.get("ci_low") is not None:
        text += f" [95 % CI {row['ci_low']:.4f}, {row['ci_high']:.4f}]"
    return text + f"  n={row['n']}"


def format_trace(t: Trace) -> str:
    """The chain as indented text, from the number down to the images."""
    m, s, f = t.model, t.split, t.filter
    lines = [f"experiment {t.experiment}", "  metrics"]
    for r in t.metrics:
        name = r["metric"] + (f"[{r['class']}]" if r["class"] else "")
        lines.append(f"    {r['dataset']}/{r['part']}  {name} = {_number(r)}")
    hp = json.dumps(m.get("hyperparameters"), sort_keys=True)
    lines += [
        f"  model {m['model_id']}  (sha256 of the checkpoint)",
        f"    checkpoint       {m.get('checkpoint_path')}",
        f"    architecture     {m.get('architecture')}, epochs run {m.get('epochs_run')}, best epoch {m.get('best_epoch')}",
        f"    hyperparameters  {hp}",
        f"    trained on split {m['split_id']} (split fingerprint {m.get('split_fingerprint')})",
        f"  split {s['split_id']}",
        f"    scheme {s.get('scheme')} ratios {s.get('ratios')} seed {s.get('seed')}, dataset {s.get('dataset')}",
        "    parts " + ", ".join(f"{p} {n}" for p, n in s["parts"].items()),
        f"    input fingerprint {s.get('input_fingerprint')}",
        f"    filter {s.get('filter_id')} (params hash {s.get('filter_params_hash')})",
    ]
    if f:
        lines += [
            f"  filter {f['filter_id']}  text_filter={f.get('text_filter')}",
            f"    params {json.dumps(f.get('params'), sort_keys=True)} (hash {f.get('params_hash')})",
            f"    input fingerprint {f.get('input_fingerprint')} (of the dataset's (image_id, label) rows)",
            f"    input {f.get('n_input')}, kept {f.get('n_kept')}, removed {f.get('n_removed')}, unreadable {f.get('n_unreadable')}",
        ]
    for d in t.datasets:
        lines += [f"  images {d.dataset}: {d.count} (fingerprint of (image_id, label) {d.fingerprint})"]
        lines += [f"    e.g. {uri}" for uri in d.source_uris]
    return "\n".join(lines) + "\n"


def _set_problem(where: str, id: str, what: str, ids: list[str]) -> list[Problem]:
    """At most one problem per set difference: the count and a few of the ids."""
    if not ids:
        return []
    return [Problem(where, id, what, 0, f"{len(ids)} (e.g. {', '.join(sorted(ids)[:EXAMPLES])})")]


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _recomputed(predictions: list[tuple], task: str) -> tuple[list[MetricRow], list[str]]:
    """The metric rows that predictions (image_id, label, predicted, scores) of one dataset part give,
    and the image ids whose stored `predicted` is not the argmax of their stored scores."""
    names = list(json.loads(predictions[0][3]))
    # dtype float64 turns the JSON nulls (missing targets) back into NaN.
    scores = np.array([list(json.loads(p[3]).values()) for p in predictions], dtype=np.float64)
    if task == "regression":
        targets = np.array([list(json.loads(p[1]).values()) for p in predictions], dtype=np.float64)
        return regression_metrics(targets, scores, names, resamples=0), []
    index = {c: i for i, c in enumerate(names)}
    labels = np.array([index[p[1]] for p in predictions])
    wrong_argmax = [p[0] for p, best in zip(predictions, scores.argmax(1)) if p[2] != names[best]]
    return classification_metrics(labels, scores, names, resamples=0), wrong_argmax


@dataclass(frozen=True)
class _Stored:
    """What verify reads, in one short connection, before it hashes and recomputes anything."""

    model: dict[str, Any]
    split_run: dict[str, Any] | None
    filter_run: dict[str, Any] | None
    split_rows: list[tuple[str, str]]  # (image_id, part)
    kept: list[str]  # the filter's filtered_images
    outside_filter: list[str]  # split images not among them
    dataset_rows: list[tuple[str, str]]  # (image_id, label) of the split's dataset now
    not_in_dataset: list[str]  # split images that are no image of that dataset
    metric_rows: list[dict[str, Any]]
    predictions: list[tuple]  # (dataset, part, image_id, label, predicted, scores)
    wrong_labels: list[str]  # classification predictions whose label is not the image's label
    object_ids: list[str]  # every image of the split or with a prediction

    @property
    def dataset(self) -> str | None:
        return self.split_run["dataset"] if self.split_run else None


def _read(db: Database, experiment: str, model_id: str | None) -> _Stored:
    with db.connect() as conn:
        model = _model(conn, experiment, model_id)
        mid, split_id = model["model_id"], model["split_id"]
        split_run = _split_run(conn, split_id, experiment)
        filter_run = _filter_run(conn, split_run, experiment)
        dataset = split_run["dataset"] if split_run else None
        fid = filter_run["filter_id"] if filter_run else None

        def ids(sql: str, params: list) -> list[str]:
            return [r[0] for r in conn.execute(sql, params).fetchall()]

        return _Stored(
            model=model, split_run=split_run, filter_run=filter_run,
            split_rows=conn.execute("SELECT image_id, part FROM splits WHERE split_id = ?", [split_id]).fetchall(),
            kept=ids("SELECT image_id FROM filtered_images WHERE filter_id = ?", [fid]),
            outside_filter=ids("""SELECT image_id FROM splits WHERE split_id = ? AND image_id NOT IN
                                  (SELECT image_id FROM filtered_images WHERE filter_id = ?)""", [split_id, fid]) if fid else [],
            dataset_rows=conn.execute("SELECT image_id, label FROM images WHERE dataset = ?", [dataset]).fetchall(),
            not_in_dataset=ids("""SELECT image_id FROM splits WHERE split_id = ? AND image_id NOT IN
                                  (SELECT image_id FROM images WHERE dataset = ?)""", [split_id, dataset]) if dataset else [],
            metric_rows=_rows(conn, """SELECT dataset, part, metric, class, value, n, split_id FROM metrics
                                       WHERE experiment = ? AND model_id = ?""", [experiment, mid]),
            predictions=conn.execute("""SELECT dataset, part, image_id, label, predicted, scores::VARCHAR FROM predictions
                                        WHERE model_id = ? ORDER BY dataset, part, image_id""", [mid]).fetchall(),
            wrong_labels=ids("""
                SELECT p.image_id FROM predictions p JOIN images i ON i.dataset = p.dataset AND i.image_id = p.image_id
                WHERE p.model_id = ? AND p.dataset = ? AND p.label IS DISTINCT FROM i.label
                  AND EXISTS (SELECT 1 FROM metrics m WHERE m.model_id = p.model_id AND m.dataset = p.dataset
                              AND m.part = p.part AND m.metric = 'accuracy')""", [mid, dataset]),
            object_ids=sorted(ids("""SELECT image_id FROM splits WHERE split_id = ?
                                     UNION SELECT image_id FROM predictions WHERE model_id = ?""", [split_id, mid])),
        )


def _check_checkpoint(s: _Stored) -> list[Problem]:
    mid, path = s.model["model_id"], s.model.get("checkpoint_path")
    if not path:
        return [Problem("models", mid, "checkpoint_path", "a checkpoint file", None)]
    path = Path(path) if Path(path).is_absolute() else data_dir() / path
    if not path.is_file():
        return [Problem("checkpoint", str(path), "file exists", "a file", "missing")]
    if (actual := sha256_file(path)) != mid:
        return [Problem("checkpoint", str(path), "sha256 of the checkpoint file == model_id", mid, actual)]
    return []


def _check_split(s: _Stored) -> list[Problem]:
    split_id, recorded = s.model["split_id"], s.model.get("split_fingerprint")
    fingerprint = rows_fingerprint(s.split_rows)
    problems = []
    if not s.split_rows:
        problems.append(Problem("splits", split_id, "rows of the model's split", "at least one", 0))
    elif fingerprint != split_id:
        problems.append(Problem("splits", split_id, "fingerprint of the (image_id, part) rows == split_id", split_id, fingerprint))
    if recorded and recorded != fingerprint:
        problems.append(Problem("models", s.model["model_id"], "split_fingerprint == fingerprint of the split's rows", recorded, fingerprint))
    if s.split_run is None:
        problems.append(Problem("split_runs", split_id, "a split_runs row for the model's split", "one row", None))
    elif s.split_run.get("fingerprint") and s.split_run["fingerprint"] != fingerprint:
        problems.append(Problem("split_runs", split_id, "fingerprint == fingerprint of the split's rows", s.split_run["fingerprint"], fingerprint))
    return problems + _set_problem("splits", split_id, f"split images that are no image of dataset {s.dataset}", s.not_in_dataset)


def _check_filter(s: _Stored) -> list[Problem]:
    if not (s.split_run and s.split_run.get("filter_id")):
        return []
    split_id, fid, run = s.split_run["split_id"], s.split_run["filter_id"], s.filter_run
    problems = _set_problem("splits", split_id, f"split images outside the filtered set {fid}", s.outside_filter)
    if run is None:
        return problems + [Problem("filter_runs", fid, "a filter_runs row for the split's filter", "one row", None)]
    if (actual := filter_id_of(run.get("params_hash"), s.kept)) != fid:
        problems.append(Problem("filtered_images", fid, "filter id recomputed from the params hash and kept ids", fid, actual))
    if run.get("n_kept") is not None and run["n_kept"] != len(s.kept):
        problems.append(Problem("filter_runs", fid, "n_kept == rows in filtered_images", run["n_kept"], len(s.kept)))
    now = rows_fingerprint(s.dataset_rows)
    if run.get("input_fingerprint") and run["input_fingerprint"] != now:
        problems.append(Problem("filter_runs", fid, f"input_fingerprint == the (image_id, label) rows of dataset {s.dataset} now",
                                run["input_fingerprint"], now))
    if s.split_run.get("filter_params_hash") and s.split_run["filter_params_hash"] != run.get("params_hash"):
        problems.append(Problem("split_runs", split_id, "filter_params_hash == filter_runs.params_hash",
                                s.split_run["filter_params_hash"], run.get("params_hash")))
    return problems


def _check_predictions(s: _Stored) -> list[Problem]:
    mid, split_id = s.model["model_id"], s.model["split_id"]
    problems = [Problem("metrics", f"{r['dataset']}/{r['part']}/{r['metric']}", "split_id == the model's split", split_id, r["split_id"])
                for r in s.metric_rows if r["split_id"] != split_id]
    problems += _set_problem("predictions", mid, f"labels differing from the images' labels of dataset {s.dataset}", s.wrong_labels)
    grouped: dict[tuple[str, str], list[tuple]] = defaultdict(list)
    for d, part, *prediction in s.predictions:
        grouped[(d, part)].append(tuple(prediction))
    stored: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in s.metric_rows:
        stored[(r["dataset"], r["part"])].append(r)
    split_parts: dict[str, set[str]] = defaultdict(set)
    for image_id, part in s.split_rows:
        split_parts[part].add(image_id)
    for (d, part), rows in sorted(stored.items()):
        where = f"{mid[:12]} {d}/{part}"
        if (d, part) not in grouped:
            problems.append(Problem("predictions", where, "prediction rows behind the metrics", "at least one", 0))
            continue
        task = "regression" if any(r["metric"] == "mse" for r in rows) else "classification"
        recomputed, wrong_argmax = _recomputed(grouped[(d, part)], task)
        problems += _set_problem("predictions", where, "predicted differs from the argmax of the stored scores", wrong_argmax)
        again = {(m.metric, m.class_name): m for m in recomputed}
        for r in rows:
            if r["metric"] == "excluded":  # excluded images leave no prediction row to recount them from
                continue
            m = again.get((r["metric"], r["class"]))
            name = r["metric"] + (f"[{r['class']}]" if r["class"] else "")
            if m is None:
                problems.append(Problem("metrics", f"{where} {name}", "recomputable from the predictions", "a value", None))
            elif not _same(m.value, r["value"]) or m.n != r["n"]:
                problems.append(Problem("metrics", f"{where} {name}", "value (n) == recomputed from the predictions rows",
                                        f"{r['value']} (n={r['n']})", f"{m.value} (n={m.n})"))
        if d == s.dataset and part in split_parts:
            predicted = {p[0] for p in grouped[(d, part)]}
            problems += _set_problem("predictions", where, f"{part} images of split {split_id[:12]} without a prediction",
                                     list(split_parts[part] - predicted))
            problems += _set_problem("predictions", where, f"predicted images outside the split's {part} part",
                                     list(predicted - split_parts[part]))
    return problems


def _check_objects(image_ids: list[str], root: Path | None) -> list[Problem]:
    problems = []
    for image_id in image_ids:
        file = object_path(image_id, root)
        if not file.is_file():
            problems.append(Problem("object", image_id, "stored image file", str(file), "missing"))
        elif (actual := sha256_file(file)) != image_id:
            problems.append(Problem("object", image_id, "sha256 of the stored bytes == image_id", image_id, actual))
    return problems


def verify(
    db: Database,
    experiment: str,
    *,
    model_id: str | None = None,
    full: bool = False,
    sample: int = 50,
    seed: int = 0,
    objects_root: Path | None = None,
) -> list[Problem]:
    """Recompute every fingerprint and hash on the chain of the experiment's latest (or given) model.

    Checks: checkpoint sha256 == model_id; split fingerprint from the splits rows == split_id ==
    models.split_fingerprint (== split_runs.fingerprint); filter id from filtered_images == the
    split's filter_id, and the filter's input fingerprint == the dataset's (image_id, label) rows now;
    the split's images in the filtered set and in `images`; metrics rows name the model's split;
    predictions reproduce every stored metric value and n, their `predicted` is the argmax of their
    scores, their labels are the images' labels, and the split dataset's test (val) predictions cover
    exactly that part; image objects hash to their id (a seeded sample of `sample`, or all with
    full=True). An empty list means verified.
    """
    s = _read(db, experiment, model_id)
    ids = s.object_ids if full else sorted(random.Random(seed).sample(s.object_ids, min(sample, len(s.object_ids))))
    return [*_check_checkpoint(s), *_check_split(s), *_check_filter(s), *_check_predictions(s), *_check_objects(ids, objects_root)]
