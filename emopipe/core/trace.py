"""Lineage: from a benchmark number down to the raw images (`trace`); core/verify.py recomputes every
number, fingerprint and hash on that chain from what is stored.

The chain: metrics (model_id, split_id) -> models (checkpoint sha256, split_fingerprint) -> splits /
split_runs (filter_id, filter params hash, input fingerprint) -> filter_runs / filtered_images ->
images (image_id = sha256 of the stored bytes, source_uri).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from emopipe.db import Database
from emopipe.errors import UserError
from emopipe.fingerprint import rows_fingerprint

EXAMPLES = 3  # source URIs shown per dataset, and ids named in a set-difference problem
COUNT_METRICS = ("excluded", "excluded_overlap", "confusion_count")


class TraceError(UserError):
    """The experiment (or the model or metric asked for) has nothing recorded to trace."""


@dataclass(frozen=True)
class DatasetImages:
    dataset: str
    count: int
    fingerprint: str  # rows_fingerprint of the (image_id, label) rows
    source_uris: tuple[str, ...]
    # part -> images left out of its evaluation as copies of the model's train/val images (core/leakage.py)
    excluded_overlap: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Trace:
    experiment: str
    metrics: list[dict[str, Any]]  # dataset, part, metric, class, value, ci_low, ci_high, n
    model: dict[str, Any]  # the models row, JSON columns parsed
    split: dict[str, Any]  # the split_runs row (just split_id if there is none) plus `parts`: counts from splits
    filter: dict[str, Any] | None  # the filter_runs row
    datasets: list[DatasetImages]  # the split's dataset first, then the cross-dataset test sets


def rows_as_dicts(conn, sql: str, params: list) -> list[dict[str, Any]]:
    cursor = conn.execute(sql, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def _one(conn, sql: str, params: list) -> dict[str, Any] | None:
    rows = rows_as_dicts(conn, sql, params)
    return rows[0] if rows else None


def _parsed(row: dict[str, Any] | None, *json_columns: str) -> dict[str, Any] | None:
    if row is None:
        return None
    return {k: json.loads(v) if k in json_columns and isinstance(v, str) else v for k, v in row.items()}


def model_row(conn, experiment: str, model_id: str | None) -> dict[str, Any]:
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


def split_run_row(conn, split_id: str, experiment: str) -> dict[str, Any] | None:
    return _parsed(_one(conn, "SELECT * FROM split_runs WHERE split_id = ? ORDER BY experiment <> ? LIMIT 1",
                        [split_id, experiment]), "ratios", "counts")


def filter_run_row(conn, split_run: dict[str, Any] | None, experiment: str) -> dict[str, Any] | None:
    if not split_run or not split_run.get("filter_id"):
        return None
    return _parsed(_one(conn, "SELECT * FROM filter_runs WHERE filter_id = ? ORDER BY experiment <> ? LIMIT 1",
                        [split_run["filter_id"], experiment]), "params")


def trace(db: Database, experiment: str, metric: str | None = None, *, model_id: str | None = None) -> Trace:
    """The chain behind the experiment's numbers: metric rows (all overall ones, or every row of `metric`),
    model, split, filter and the datasets' images. Defaults to the latest evaluated model."""
    with db.connect() as conn:
        model = model_row(conn, experiment, model_id)
        split = split_run_row(conn, model["split_id"], experiment)
        # The split's own dataset first, the test part before the others.
        metrics = rows_as_dicts(conn, """
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
        filter_run = filter_run_row(conn, split, experiment)
        names = list(dict.fromkeys([*([split["dataset"]] if split.get("dataset") else []), *(m["dataset"] for m in metrics)]))
        datasets = []
        for name in names:
            rows = conn.execute("SELECT image_id, label FROM images WHERE dataset = ?", [name]).fetchall()
            uris = conn.execute("SELECT source_uri FROM images WHERE dataset = ? ORDER BY image_id LIMIT ?",
                                [name, EXAMPLES]).fetchall()
            overlap = dict(conn.execute("SELECT part, value::BIGINT FROM metrics WHERE experiment = ? AND model_id = ? AND dataset = ? "
                                        "AND metric = 'excluded_overlap' ORDER BY part", [experiment, model["model_id"], name]).fetchall())
            datasets.append(DatasetImages(name, len(rows), rows_fingerprint(rows), tuple(u[0] for u in uris), overlap))
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
        lines += [f"    {part} evaluation: {n} images excluded, copies or near-duplicates of the split's train/val images"
                  for part, n in d.excluded_overlap.items()]
    return "\n".join(lines) + "\n"
