"""Verification of a traced chain: everything `trace` prints is recomputed from what is stored, and
each disagreement is a Problem.

- the checkpoint file hashes to model_id, and the `models` row repeats the record stored inside it
  (architecture, hyperparameters, epochs run, best epoch, history, classes, split);
- the split: its rows hash to split_id (= models.split_fingerprint = split_runs.fingerprint), the
  split_runs counts are its rows', and scheme, seed and filter give the same split again;
- the filter: the params hash is the hash of its params, its kept set and counts are what the stored
  text_scores decide, filter_id is the hash of that set, its input is the dataset's rows now;
- the numbers: every metric row, its value, n and bootstrap CI (the bootstrap is seeded), recomputed
  from the predictions rows (a soft-label model's distribution metrics also from the images' soft-label
  attributes), and the exact set of rows those predictions imply (a missing or extra row is a mismatch);
  predictions cover exactly the split's parts and carry the images' labels;
- a cross-dataset test set: its copies and near-duplicates of the split's train/val images, found
  again (core/leakage.py), have no prediction and are counted in its `excluded_overlap` row;
- image files hash to their id: all of them, or a fresh random sample on each call.
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

from emopipe.core.evaluation import MetricRow, classification_metrics, distribution_metrics, regression_metrics
from emopipe.core.filtered_images import decide, filter_id_of
from emopipe.core.raw_images import attribute_matrix
from emopipe.core.leakage import overlapping_images
from emopipe.core.splits import SplitError, parse_scheme, recomputed_split_id
from emopipe.core.trace import EXAMPLES, filter_run_row, model_row, rows_as_dicts, split_run_row
from emopipe.db import Database
from emopipe.fingerprint import params_hash, rows_fingerprint, sha256_file
from emopipe.paths import data_dir, object_path

# The models columns that repeat the checkpoint's own record (column -> key in the checkpoint's info).
MODEL_RECORD = {"architecture": "architecture", "hyperparameters": "hyperparameters", "epochs_run": "epochs_run",
                "best_epoch": "best_epoch", "history": "history", "split_id": "split_id"}


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


@dataclass(frozen=True)
class Verification:
    problems: list[Problem]  # empty: verified
    files_hashed: int
    files_total: int  # image files on the chain (split and predictions)


def _set_problem(where: str, id: str, what: str, ids) -> list[Problem]:
    """At most one problem per set difference: the count and a few of the ids."""
    ids = sorted(ids)
    if not ids:
        return []
    return [Problem(where, id, what, 0, f"{len(ids)} (e.g. {', '.join(map(str, ids[:EXAMPLES]))})")]


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


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
    dataset_sizes: dict[str, int]  # images per dataset with predictions: what an eval dataset's test part holds
    not_in_dataset: list[str]  # split images that are no image of that dataset
    decided: Any  # FilterDecisions of the stored text_scores, or None without a filter run
    metric_rows: list[dict[str, Any]]
    predictions: list[tuple]  # (dataset, part, image_id, label, predicted, scores)
    wrong_labels: list[str]  # classification predictions whose label is not the image's label
    soft_labels: list[str]  # the model's soft-label columns: its distribution metrics are recomputed from them
    prediction_attributes: dict[tuple[str, str], str | None]  # (dataset, image_id) -> images.attributes; soft labels only
    object_ids: list[str]  # every image of the split or with a prediction

    @property
    def dataset(self) -> str | None:
        return self.split_run["dataset"] if self.split_run else None


def _read(db: Database, experiment: str, model_id: str | None) -> _Stored:
    with db.connect() as conn:
        model = model_row(conn, experiment, model_id)
        mid, split_id = model["model_id"], model["split_id"]
        split_run = split_run_row(conn, split_id, experiment)
        filter_run = filter_run_row(conn, split_run, experiment)
        dataset = split_run["dataset"] if split_run else None
        fid = filter_run["filter_id"] if filter_run else None
        soft_labels = list((model.get("hyperparameters") or {}).get("soft_labels") or [])

        def ids(sql: str, params: list) -> list[str]:
            return [r[0] for r in conn.execute(sql, params).fetchall()]

        return _Stored(
            model=model, split_run=split_run, filter_run=filter_run,
            split_rows=conn.execute("SELECT image_id, part FROM splits WHERE split_id = ?", [split_id]).fetchall(),
            kept=ids("SELECT image_id FROM filtered_images WHERE filter_id = ?", [fid]),
            outside_filter=ids("""SELECT image_id FROM splits WHERE split_id = ? AND image_id NOT IN
                                  (SELECT image_id FROM filtered_images WHERE filter_id = ?)""", [split_id, fid]) if fid else [],
            dataset_rows=conn.execute("SELECT image_id, label FROM images WHERE dataset = ?", [dataset]).fetchall(),
            dataset_sizes=dict(conn.execute("""SELECT dataset, count(*) FROM images WHERE dataset IN
                                               (SELECT dataset FROM predictions WHERE model_id = ?) GROUP BY dataset""",
                                            [mid]).fetchall()),
            not_in_dataset=ids("""SELECT image_id FROM splits WHERE split_id = ? AND image_id NOT IN
                                  (SELECT image_id FROM images WHERE dataset = ?)""", [split_id, dataset]) if dataset else [],
            decided=decide(conn, dataset, bool(filter_run["text_filter"]), filter_run["params_hash"]) if filter_run else None,
            metric_rows=rows_as_dicts(conn, """SELECT dataset, part, metric, class, value, ci_low, ci_high, n, split_id
                                               FROM metrics WHERE experiment = ? AND model_id = ?""", [experiment, mid]),
            predictions=conn.execute("""SELECT dataset, part, image_id, label, predicted, scores::VARCHAR FROM predictions
                                        WHERE model_id = ? ORDER BY dataset, part, image_id""", [mid]).fetchall(),
            wrong_labels=ids("""
                SELECT p.image_id FROM predictions p JOIN images i ON i.dataset = p.dataset AND i.image_id = p.image_id
                WHERE p.model_id = ? AND p.dataset = ? AND p.label IS DISTINCT FROM i.label
                  AND EXISTS (SELECT 1 FROM metrics m WHERE m.model_id = p.model_id AND m.dataset = p.dataset
                              AND m.part = p.part AND m.metric = 'accuracy')""", [mid, dataset]),
            soft_labels=soft_labels,
            prediction_attributes={(d, i): a for d, i, a in conn.execute(
                """SELECT p.dataset, p.image_id, i.attributes FROM predictions p
                   JOIN images i ON i.dataset = p.dataset AND i.image_id = p.image_id WHERE p.model_id = ?""", [mid]).fetchall()}
            if soft_labels else {},
            object_ids=sorted(ids("""SELECT image_id FROM splits WHERE split_id = ?
                                     UNION SELECT image_id FROM predictions WHERE model_id = ?""", [split_id, mid])),
        )


def _checkpoint_path(s: _Stored) -> Path:
    path = Path(s.model["checkpoint_path"])
    return path if path.is_absolute() else data_dir() / path


def _check_checkpoint(s: _Stored) -> list[Problem]:
    mid = s.model["model_id"]
    if not s.model.get("checkpoint_path"):
        return [Problem("models", mid, "checkpoint_path", "a checkpoint file", None)]
    path = _checkpoint_path(s)
    if not path.is_file():
        return [Problem("checkpoint", str(path), "file exists", "a file", "missing")]
    if (actual := sha256_file(path)) != mid:
        return [Problem("checkpoint", str(path), "sha256 of the checkpoint file == model_id", mid, actual)]
    return _check_model_record(s, path)


def _check_model_record(s: _Stored, path: Path) -> list[Problem]:
    """The models row against the record inside the (hash-verified) checkpoint it names."""
    from emopipe.core.trained_model import checkpoint_info  # torch: only when a checkpoint is read

    info = checkpoint_info(path)
    recorded = {**{column: info.get(key) for column, key in MODEL_RECORD.items()},
                "classes": info.get("classes") or info.get("targets"),
                "experiment": (info.get("experiment") or {}).get("name")}
    return [Problem("models", s.model["model_id"], f"{column} == the checkpoint's own record", value, s.model.get(column))
            for column, value in recorded.items() if _plain(s.model.get(column)) != _plain(value)]


def _plain(value):
    """JSON-equal values compare equal (a tuple and a list, 1 and 1.0)."""
    return json.loads(json.dumps(value, sort_keys=True))


def _check_split(db: Database, s: _Stored) -> list[Problem]:
    split_id, recorded = s.model["split_id"], s.model.get("split_fingerprint")
    fingerprint = rows_fingerprint(s.split_rows)
    problems = []
    if not s.split_rows:
        return [Problem("splits", split_id, "rows of the model's split", "at least one", 0)]
    if fingerprint != split_id:
        problems.append(Problem("splits", split_id, "fingerprint of the (image_id, part) rows == split_id", split_id, fingerprint))
    if recorded and recorded != fingerprint:
        problems.append(Problem("models", s.model["model_id"], "split_fingerprint == fingerprint of the split's rows", recorded, fingerprint))
    run = s.split_run
    if run is None:
        return problems + [Problem("split_runs", split_id, "a split_runs row for the model's split", "one row", None)]
    if run.get("fingerprint") and run["fingerprint"] != fingerprint:
        problems.append(Problem("split_runs", split_id, "fingerprint == fingerprint of the split's rows", run["fingerprint"], fingerprint))
    counts: dict[str, int] = defaultdict(int)
    for _, part in s.split_rows:
        counts[part] += 1
    recorded_counts: dict[str, int] = defaultdict(int)
    for per_part in (run.get("counts") or {}).values():
        for part, n in per_part.items():
            recorded_counts[part] += n
    if {p: n for p, n in recorded_counts.items() if n} != dict(counts):
        problems.append(Problem("split_runs", split_id, "counts == the split's rows per part", dict(recorded_counts), dict(counts)))
    ratios = parse_scheme(run["scheme"])
    if (list(ratios) if ratios else None) != run.get("ratios"):
        problems.append(Problem("split_runs", split_id, f"ratios == those of scheme {run['scheme']}", run.get("ratios"), ratios))
    elif not problems and s.outside_filter == [] and run.get("filter_id"):
        try:
            again = recomputed_split_id(db, dataset=run["dataset"], filter_id=run["filter_id"], scheme=run["scheme"], seed=run["seed"])
        except SplitError as e:
            again = f"no split ({e})"
        if again != split_id:
            problems.append(Problem("split_runs", split_id, f"split made again with scheme {run['scheme']}, seed {run['seed']} "
                                    f"and filter {run['filter_id'][:12]} == split_id", split_id, again))
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
    if run.get("text_filter") and run.get("params") is not None and params_hash(run["params"]) != run.get("params_hash"):
        problems.append(Problem("filter_runs", fid, "params_hash == the hash of params", run.get("params_hash"), params_hash(run["params"])))
    if run.get("n_kept") is not None and run["n_kept"] != len(s.kept):
        problems.append(Problem("filter_runs", fid, "n_kept == rows in filtered_images", run["n_kept"], len(s.kept)))
    d = s.decided
    if d.kept != sorted(s.kept):
        problems += _set_problem("filtered_images", fid, "kept images the stored text_scores would not keep", set(s.kept) - set(d.kept))
        problems += _set_problem("filtered_images", fid, "images the stored text_scores keep but the filter lacks", set(d.kept) - set(s.kept))
    for column, value in (("n_input", d.n_input), ("n_kept", len(d.kept)), ("n_removed", d.n_removed), ("n_unreadable", d.n_unreadable)):
        if run.get(column) is not None and run[column] != value:
            problems.append(Problem("filter_runs", fid, f"{column} == recomputed from the images and text_scores rows", run[column], value))
    now = rows_fingerprint(s.dataset_rows)
    if run.get("input_fingerprint") and run["input_fingerprint"] != now:
        problems.append(Problem("filter_runs", fid, f"input_fingerprint == the (image_id, label) rows of dataset {s.dataset} now",
                                run["input_fingerprint"], now))
    if s.split_run.get("filter_params_hash") and s.split_run["filter_params_hash"] != run.get("params_hash"):
        problems.append(Problem("split_runs", split_id, "filter_params_hash == filter_runs.params_hash",
                                s.split_run["filter_params_hash"], run.get("params_hash")))
    return problems


def _recomputed(predictions: list[tuple], task: str, distributions: np.ndarray | None = None) -> tuple[list[MetricRow], list[str]]:
    """The metric rows (with their seeded bootstrap CIs) that predictions (image_id, label, predicted,
    scores) of one dataset part give, with the images' annotated `distributions` (soft labels) if any, and
    the image ids whose stored `predicted` is not the argmax of their stored scores. Predictions are
    sorted by image_id, as write_evaluation ordered them."""
    names = list(json.loads(predictions[0][3]))
    # dtype float64 turns the JSON nulls (missing targets) back into NaN.
    scores = np.array([list(json.loads(p[3]).values()) for p in predictions], dtype=np.float64)
    if task == "regression":
        targets = np.array([list(json.loads(p[1]).values()) for p in predictions], dtype=np.float64)
        return regression_metrics(targets, scores, names), []
    index = {c: i for i, c in enumerate(names)}
    labels = np.array([index[p[1]] for p in predictions])
    wrong_argmax = [p[0] for p, best in zip(predictions, scores.argmax(1)) if p[2] != names[best]]
    rows = classification_metrics(labels, scores, names)
    if distributions is not None:
        rows += distribution_metrics(distributions, scores)
    return rows, wrong_argmax


def _expected_parts(s: _Stored, overlaps: dict[str, dict[str, str]]) -> dict[tuple[str, str], int]:
    """(dataset, part) -> images that evaluation had to evaluate: the split's test and val parts, and each
    dataset that has predictions (a cross-dataset test set) as a whole, less its copies of training images."""
    parts: dict[tuple[str, str], int] = defaultdict(int)
    for _, part in s.split_rows:
        if part in ("test", "val"):
            parts[(s.dataset, part)] += 1
    for d, part, *_ in s.predictions:
        if d != s.dataset:
            parts[(d, part)] = s.dataset_sizes.get(d, 0) - len(overlaps.get(d, {}))
    return dict(parts)


def _overlaps(db: Database, s: _Stored) -> dict[str, dict[str, str]]:
    """Per cross-dataset test set with predictions: its images that copy the model's train/val images,
    found again from the images, splits and perceptual_hashes rows."""
    eval_sets = sorted({d for d, *_ in s.predictions} - {s.dataset})
    with db.connect() as conn:
        ids = {d: [r[0] for r in conn.execute("SELECT image_id FROM images WHERE dataset = ? ORDER BY image_id", [d]).fetchall()]
               for d in eval_sets}
    return {d: overlapping_images(db, ids[d], s.model["split_id"]) for d in eval_sets}


def _check_part(where: str, rows: list[dict], predictions: list[tuple], n_evaluated: int | None,
                n_overlap: int = 0, distributions: np.ndarray | None = None) -> list[Problem]:
    task = "regression" if predictions[0][1].startswith("{") else "classification"  # regression labels are JSON targets
    recomputed, wrong_argmax = _recomputed(predictions, task, distributions if task == "classification" else None)
    problems = _set_problem("predictions", where, "predicted differs from the argmax of the stored scores", wrong_argmax)
    expected = {(m.metric, m.class_name): m for m in recomputed}
    excluded = (n_evaluated or 0) - len(predictions) if task == "classification" and n_evaluated is not None else 0
    if excluded > 0:
        expected[("excluded", None)] = MetricRow("excluded", float(excluded), n=excluded)
    if n_overlap > 0:
        expected[("excluded_overlap", None)] = MetricRow("excluded_overlap", float(n_overlap), n=n_overlap)
    stored = {(r["metric"], r["class"]): r for r in rows}
    name = lambda key: key[0] + (f"[{key[1]}]" if key[1] else "")  # noqa: E731
    problems += _set_problem("metrics", where, "metric rows the predictions imply but the table lacks", map(name, expected.keys() - stored.keys()))
    problems += _set_problem("metrics", where, "metric rows the predictions do not imply", map(name, stored.keys() - expected.keys()))
    for key in sorted(expected.keys() & stored.keys(), key=str):
        m, r = expected[key], stored[key]
        if not (_same(m.value, r["value"]) and m.n == r["n"] and _same(m.ci_low, r["ci_low"]) and _same(m.ci_high, r["ci_high"])):
            problems.append(Problem("metrics", f"{where} {name(key)}", "value (n) [CI] == recomputed from the predictions rows",
                                    f"{r['value']} (n={r['n']}) [{r['ci_low']}, {r['ci_high']}]",
                                    f"{m.value} (n={m.n}) [{m.ci_low}, {m.ci_high}]"))
    return problems


def _check_predictions(s: _Stored, overlaps: dict[str, dict[str, str]]) -> list[Problem]:
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
    expected_parts = _expected_parts(s, overlaps)
    for d, part in sorted(set(stored) | set(grouped) | set(expected_parts)):
        where = f"{mid[:12]} {d}/{part}"
        if (d, part) not in grouped:
            problems.append(Problem("predictions", where, "prediction rows behind the metrics", "at least one", 0))
            continue
        overlap = overlaps.get(d, {}) if d != s.dataset else {}
        predicted_images = grouped[(d, part)]
        predicted_ids = [p[0] for p in predicted_images]
        distributions = (attribute_matrix(predicted_ids, [s.prediction_attributes.get((d, i)) for i in predicted_ids], s.soft_labels)
                         if s.soft_labels else None)
        problems += _check_part(where, stored.get((d, part), []), predicted_images, expected_parts.get((d, part)), len(overlap),
                                distributions)
        problems += _set_problem("predictions", where, f"predicted images that copy train/val images of split {split_id[:12]}",
                                 {p[0] for p in grouped[(d, part)]} & overlap.keys())
        if d == s.dataset and part in split_parts:
            predicted = {p[0] for p in grouped[(d, part)]}
            problems += _set_problem("predictions", where, f"{part} images of split {split_id[:12]} without a prediction",
                                     split_parts[part] - predicted)
            problems += _set_problem("predictions", where, f"predicted images outside the split's {part} part",
                                     predicted - split_parts[part])
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
    objects_root: Path | None = None,
) -> Verification:
    """Recompute every number, fingerprint and hash on the chain of the experiment's latest (or given)
    model (see the module docstring). Image files: all with full=True, else `sample` of them drawn
    afresh on each call (all of a set that small), so a tampered file cannot hide outside a fixed sample."""
    s = _read(db, experiment, model_id)
    if len(s.object_ids) <= sample or full:
        ids = s.object_ids
    else:
        ids = sorted(random.SystemRandom().sample(s.object_ids, sample))
    problems = [*_check_checkpoint(s), *_check_split(db, s), *_check_filter(s), *_check_predictions(s, _overlaps(db, s)),
                *_check_objects(ids, objects_root)]
    return Verification(problems, len(ids), len(s.object_ids))

