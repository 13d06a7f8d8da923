"""Evaluation: metrics from predictions, stored as `metrics` and `predictions` rows, shown as tables and plots.

Pure functions first (`classification_metrics`, `regression_metrics`, `bootstrap_ci`), then the
writer (`write_evaluation`: one transaction, idempotent). The views (`headline_markdown`, `confusion_png`) are
in core/evaluation_views.py, side-by-side comparisons in core/compare.py.

Plain numpy, not scikit-learn: it is not installed, and every metric here is a few lines over a
confusion matrix, which also lets the bootstrap compute all resamples at once (a batched bincount).
Conventions follow scikit-learn's `zero_division=0`: a class never predicted has precision 0, a class
with no true samples recall 0, and F1 is 0 where precision + recall is 0 (never NaN). Macro averages
run over the classes present in the labels or the predictions (scikit-learn's default).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from emopipe.core.calibration import calibration_bins, expected_calibration_error, probabilities
from emopipe.db import Database
from emopipe.errors import UserError
from emopipe.fingerprint import params_hash, rows_fingerprint

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95
TOP_K = (2, 3, 5)  # reported where k < number of classes (top-k over all classes is always 1)
# Resampled indices are drawn in chunks of about this many elements (8 bytes each), bounding memory.
_CHUNK_ELEMENTS = 4_000_000
# Bump when a metric's definition changes: stored evaluations made by the older code are then recomputed.
METRICS_VERSION = 3  # 3: distribution metrics for soft-label experiments


class EvaluationError(UserError):
    """Nothing left to evaluate, or a class map that names classes the model does not have."""


@dataclass(frozen=True)
class MetricRow:
    """One number: `class_name` None for overall metrics; dataset/part filled by write_evaluation."""

    metric: str
    value: float
    class_name: str | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n: int | None = None
    dataset: str | None = None
    part: str | None = None


# ---------------------------------------------------------------------------------------------
# Pure metrics


def bootstrap_ci(
    statistic: Callable[[np.ndarray], np.ndarray],
    n: int,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = CI_LEVEL,
) -> tuple[float, float]:
    """Percentile bootstrap interval. `statistic` maps a (B, n) array of resampled row indices to B values."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    values = np.concatenate([
        statistic(rng.integers(0, n, size=(min(chunk, resamples - start), n)))
        for start in range(0, resamples, chunk)
    ])
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts (n_classes, n_classes): rows are true classes, columns predicted ones."""
    return confusion_batch(np.asarray(labels)[None], np.asarray(predicted)[None], n_classes)[0]


def row_normalized(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its total (recall on the diagonal); rows without samples stay 0."""
    totals = matrix.sum(1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)


def confusion_batch(labels: np.ndarray, predicted: np.ndarray, c: int) -> np.ndarray:
    """(B, N) labels and predictions -> (B, C, C) confusion matrices in one bincount."""
    b = labels.shape[0]
    codes = (np.arange(b)[:, None] * c + labels) * c + predicted
    return np.bincount(codes.ravel(), minlength=b * c * c).reshape(b, c, c)


def _f1_per_class(cm: np.ndarray) -> np.ndarray:
    """F1 = 2 TP / (true + predicted count): equal to 2PR/(P+R), and 0 where that is 0/0."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    denominator = cm.sum(-1) + cm.sum(-2)
    return np.divide(2 * tp, denominator, out=np.zeros(tp.shape), where=denominator > 0)


def macro_f1_score(cm: np.ndarray) -> np.ndarray:
    """Mean F1 over the classes present in labels or predictions; works on (C, C) or (B, C, C)."""
    present = (cm.sum(-1) + cm.sum(-2)) > 0
    return (_f1_per_class(cm) * present).sum(-1) / present.sum(-1)


def classification_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    classes: Sequence[str],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> list[MetricRow]:
    """Accuracy, macro/weighted F1, top-k, per-class precision/recall/F1, calibration (ECE with a CI, and
    per confidence bin `calibration_confidence` / `calibration_accuracy` rows, class "<low>-<high>"; see
    core/calibration.py) and the confusion matrix.

    labels: (N,) class indices; scores: (N, C) probabilities or logits (argmax = prediction).
    Accuracy and macro-F1 carry bootstrap CIs (none when resamples is 0). Confusion cells are rows
    `confusion_count` / `confusion_rate` (row-normalized) with class "<true>-><predicted>".
    """
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(scores)
    n, c = scores.shape
    if n == 0 or len(labels) != n or c != len(classes):
        raise ValueError(f"need N > 0 labels for scores of shape (N, {len(classes)}); got {len(labels)} and {scores.shape}")
    predicted = scores.argmax(1)
    cm = confusion_matrix(labels, predicted, c)
    correct = labels == predicted
    support, predicted_count, tp = cm.sum(1), cm.sum(0), np.diagonal(cm)
    precision = np.divide(tp, predicted_count, out=np.zeros(c), where=predicted_count > 0)
    recall = np.divide(tp, support, out=np.zeros(c), where=support > 0)
    f1 = _f1_per_class(cm)

    def ci(statistic) -> tuple[float | None, float | None]:
        return bootstrap_ci(statistic, n, resamples=resamples, seed=seed) if resamples > 0 else (None, None)

    rows = [
        MetricRow("accuracy", float(correct.mean()), None, *ci(lambda idx: correct[idx].mean(1)), n=n),
        MetricRow("macro_f1", float(macro_f1_score(cm)), None,
                  *ci(lambda idx: macro_f1_score(confusion_batch(labels[idx], predicted[idx], c))), n=n),
        MetricRow("weighted_f1", float((f1 * support).sum() / n), n=n),
    ]
    # Stable sort: among tied scores the lower class index ranks first, as argmax does.
    ranking = np.argsort(-scores, axis=1, kind="stable")
    for k in TOP_K:
        if k < c:
            hits = (ranking[:, :k] == labels[:, None]).any(1)
            rows.append(MetricRow(f"top{k}_accuracy", float(hits.mean()), n=n))
    for i, name in enumerate(classes):
        rows += [MetricRow(metric, float(values[i]), name, n=int(support[i]))
                 for metric, values in (("precision", precision), ("recall", recall), ("f1", f1))]
    confidence = probabilities(scores).max(1)
    rows.append(MetricRow("ece", float(expected_calibration_error(confidence, correct)[0]), None,
                          *ci(lambda idx: expected_calibration_error(confidence, correct, index=idx)), n=n))
    rows += [row for b in calibration_bins(confidence, correct) for row in (
        MetricRow("calibration_confidence", b.confidence, f"{b.low:.3f}-{b.high:.3f}", n=b.n),
        MetricRow("calibration_accuracy", b.accuracy, f"{b.low:.3f}-{b.high:.3f}", n=b.n))]
    rates = row_normalized(cm)
    for i, true in enumerate(classes):
        for j, pred in enumerate(classes):
            rows.append(MetricRow("confusion_count", float(cm[i, j]), f"{true}->{pred}", n=int(support[i])))
            rows.append(MetricRow("confusion_rate", float(rates[i, j]), f"{true}->{pred}", n=int(support[i])))
    return rows


def pearson_r(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation over the pairs where both are finite; NaN (no warning) when undefined."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    both = np.isfinite(x) & np.isfinite(y)
    if both.sum() < 2:
        return float("nan")
    dx, dy = x[both] - x[both].mean(), y[both] - y[both].mean()
    denominator = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return float((dx * dy).sum() / denominator) if denominator > 0 else float("nan")


def regression_metrics(
    targets: np.ndarray,
    preds: np.ndarray,
    names: Sequence[str],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> list[MetricRow]:
    """MSE and MAE overall (with bootstrap CIs), and MSE, MAE, Pearson r per target (class = target name).

    targets, preds: (N, T). A NaN (a missing annotation) drops that one value, not the sample.
    """
    t = np.asarray(targets, dtype=np.float64).reshape(len(targets), -1)
    p = np.asarray(preds, dtype=np.float64).reshape(len(preds), -1)
    if t.shape != p.shape or t.shape[1] != len(names) or len(t) == 0:
        raise ValueError(f"targets {t.shape} and preds {p.shape} must both be (N > 0, {len(names)})")
    finite = np.isfinite(t) & np.isfinite(p)
    error = np.where(finite, p - t, 0.0)
    errors = {"mse": error**2, "mae": np.abs(error)}
    per_sample, per_target = finite.sum(1), finite.sum(0)
    if not per_sample.any():
        raise ValueError("no finite (target, prediction) pair to evaluate")
    rows = []
    for metric, err in errors.items():
        sample_sum = err.sum(1)
        ci = (bootstrap_ci(lambda idx: sample_sum[idx].sum(1) / per_sample[idx].sum(1), len(t), resamples=resamples, seed=seed)
              if resamples > 0 else (None, None))
        rows.append(MetricRow(metric, float(sample_sum.sum() / per_sample.sum()), None, *ci, n=int((per_sample > 0).sum())))
    target_means = {m: np.divide(e.sum(0), per_target, out=np.full(len(names), np.nan), where=per_target > 0)
                    for m, e in errors.items()}
    for j, name in enumerate(names):
        rows += [MetricRow(m, float(target_means[m][j]), name, n=int(per_target[j])) for m in errors]
        rows.append(MetricRow("pearson_r", pearson_r(t[:, j], p[:, j]), name, n=int(per_target[j])))
    for group, columns in target_groups(names).items():
        count = per_target[columns].sum()
        rows += [MetricRow(m, float(e[:, columns].sum() / count) if count else float("nan"), group,
                           n=int((finite[:, columns].any(1)).sum())) for m, e in errors.items()]
    return rows


VAD = ("valence", "arousal", "dominance")


def target_groups(names: Sequence[str]) -> dict[str, list[int]]:
    """Targets reported together as well as one by one, as the EMOTIC study did: the body box
    (box_*) and valence/arousal/dominance ("vad"), each when it has at least two columns."""
    groups = {"box": [j for j, n in enumerate(names) if n.startswith("box_")],
              "vad": [j for j, n in enumerate(names) if n in VAD]}
    return {g: cols for g, cols in groups.items() if len(cols) >= 2 and g not in names}


# Predicted probabilities are clipped to at least this inside KL's log: a class the model all but rules
# out while raters chose it costs log(p / 1e-8) ≈ 18 nats, not infinity.
KL_EPSILON = 1e-8
DISTRIBUTION_METRICS = ("kl_divergence", "bhattacharyya", "cosine_similarity", "top1_argmax")


def distribution_metrics(
    true: np.ndarray,
    predicted: np.ndarray,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> list[MetricRow]:
    """Means over images, with bootstrap CIs, of how well predicted class distributions match annotated ones:

    - kl_divergence: KL(true ‖ predicted) = Σ p log(p / max(q, KL_EPSILON)), in nats (0 = identical; a term
      with p = 0 is 0, scipy.special.rel_entr);
    - bhattacharyya: the Bhattacharyya coefficient Σ sqrt(p q) (1 = identical, 0 = disjoint);
    - cosine_similarity: p·q / (|p| |q|);
    - top1_argmax: the predicted class (argmax of q) is the true distribution's most chosen class; where
      classes tie for it, any of them counts. This can differ from `accuracy`, which is against the label.

    true: (N, C) non-negative shares (or vote counts), normalized per row; a row with a NaN or no positive
    share (an image without a distribution) is left out, and n counts the rows used (no rows: no metrics).
    predicted: (N, C) probabilities, or logits (turned into probabilities by a softmax).
    """
    from scipy.special import rel_entr

    p = np.asarray(true, dtype=np.float64)
    q = probabilities(predicted)
    if p.shape != q.shape:
        raise ValueError(f"true {p.shape} and predicted {q.shape} distributions must have the same shape (N, C)")
    totals = p.sum(1)
    usable = np.isfinite(totals) & (totals > 0)
    p, q = p[usable] / totals[usable, None], q[usable]
    n = len(p)
    if n == 0:
        return []
    per_image = {
        "kl_divergence": rel_entr(p, np.maximum(q, KL_EPSILON)).sum(1),
        "bhattacharyya": np.sqrt(p * q).sum(1),
        "cosine_similarity": (p * q).sum(1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(q, axis=1)),
        "top1_argmax": (p[np.arange(n), q.argmax(1)] == p.max(1)).astype(np.float64),
    }
    rows = []
    for metric, values in per_image.items():
        ci = (bootstrap_ci(lambda idx: values[idx].mean(1), n, resamples=resamples, seed=seed)
              if resamples > 0 else (None, None))
        rows.append(MetricRow(metric, float(values.mean()), None, *ci, n=n))
    return rows


def map_labels(labels: Sequence[str | None], classes: Sequence[str], class_map: Mapping[str, str] | None = None) -> np.ndarray:
    """Class index per label, -1 where the label maps to no class (excluded from the evaluation).

    class_map maps a dataset's labels to the model's classes; '*' maps every other label. Without a
    map, labels are taken as class names. Raises EvaluationError if the map targets an unknown class.
    """
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({v for v in (class_map or {}).values()} - set(index))
    if unknown:
        raise EvaluationError(f"class_map maps to {unknown}, which the model does not predict; its classes: {list(classes)}")
    if class_map:
        fallback = class_map.get("*")
        labels = [None if label is None else class_map.get(label, fallback) for label in labels]
    return np.array([index.get(label, -1) if label is not None else -1 for label in labels], dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Stored rows


def evaluated_images(db: Database, dataset: str, split_id: str | None, part: str) -> list[tuple[str, str | None, str | None]]:
    """(image_id, label, attributes) of a split part, or of the whole dataset when split_id is None."""
    with db.connect() as conn:
        if split_id is None:
            return conn.execute("SELECT image_id, label, attributes FROM images WHERE dataset = ? ORDER BY image_id", [dataset]).fetchall()
        return conn.execute(
            "SELECT i.image_id, i.label, i.attributes FROM splits s JOIN images i ON i.image_id = s.image_id AND i.dataset = ? "
            "WHERE s.split_id = ? AND s.part = ? ORDER BY i.image_id", [dataset, split_id, part]).fetchall()


def evaluation_inputs_key(*, split_id: str | None, images: Sequence[tuple], task: str,
                          class_map: Mapping[str, str] | None, resamples: int = BOOTSTRAP_RESAMPLES,
                          seed: int = BOOTSTRAP_SEED, excluded: Sequence[str] = ()) -> str:
    """What one (model, dataset, part) evaluation depends on besides the model: the split, the evaluated
    images with their labels and attributes (evaluated_images' rows), the images left out as copies of
    training images (`excluded`, core/leakage.py), the task, the class map, the bootstrap and the metrics
    code. Equal keys give equal rows, so a stored evaluation is reused."""
    # `excluded` enters only when there is one, so the keys of evaluations without any stay what they were.
    left_out = {"excluded": rows_fingerprint((i,) for i in excluded)} if excluded else {}
    return params_hash({"split_id": split_id, "images": rows_fingerprint(images), "task": task,
                        "class_map": dict(class_map or {}), "resamples": resamples, "seed": seed,
                        "metrics_version": METRICS_VERSION, **left_out})


def stored_evaluation(db: Database, *, experiment: str, model_id: str, dataset: str, part: str,
                      inputs_key: str) -> list[MetricRow] | None:
    """The metric rows stored for this evaluation when they were computed from the same inputs, else None."""
    with db.connect() as conn:
        stored = conn.execute("SELECT inputs_key FROM evaluation_inputs WHERE experiment = ? AND model_id = ? AND dataset = ? "
                              "AND part = ?", [experiment, model_id, dataset, part]).fetchall()
        if not stored or stored[0][0] != inputs_key:
            return None
        rows = conn.execute("SELECT metric, value, class, ci_low, ci_high, n FROM metrics WHERE experiment = ? AND model_id = ? "
                            "AND dataset = ? AND part = ? ORDER BY rowid", [experiment, model_id, dataset, part]).fetchall()
    return [MetricRow(metric, value, class_name, low, high, n, dataset, part) for metric, value, class_name, low, high, n in rows] or None


def model_outputs(db: Database, model_id: str) -> list[str]:
    """The class names (classification) or target names (regression) of a stored model, in output order."""
    with db.connect() as conn:
        found = conn.execute("SELECT classes FROM models WHERE model_id = ? LIMIT 1", [model_id]).fetchall()
    if not found:
        raise EvaluationError(f"model {model_id} has no models row: materialize trained_model again")
    return json.loads(found[0][0])


def write_evaluation(
    db: Database,
    *,
    experiment: str,
    model_id: str,
    split_id: str,
    dataset: str,
    part: str,
    image_ids: Sequence[str],
    labels: Sequence[str | None] | np.ndarray,
    scores: np.ndarray,
    classes: Sequence[str],
    task: str = "classification",
    class_map: Mapping[str, str] | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    inputs_key: str | None = None,
    excluded_overlap: int = 0,
    distributions: np.ndarray | None = None,
) -> list[MetricRow]:
    """Compute the metrics of one (dataset, part) and store them with one predictions row per image.

    classification: labels are the dataset's label strings (mapped by class_map, see map_labels;
    unmapped images are excluded and counted in an `excluded` row), scores (N, C) over `classes`.
    regression: labels are (N, T) targets, scores (N, T) outputs, classes the target names.
    excluded_overlap: images the caller left out as copies of the model's train/val images
    (core/leakage.py), stored as an `excluded_overlap` row when nonzero.
    distributions: (N, C) annotated class distributions over `classes` (soft labels), aligned with image_ids
    (classification only; NaN rows for images without one): adds distribution_metrics over the evaluated images.
    Replaces earlier rows of the same (experiment, model_id, dataset, part) in one transaction, and records
    `inputs_key` (evaluation_inputs_key) so that stored_evaluation can reuse them.
    """
    if len(set(image_ids)) != len(image_ids) or len(labels) != len(image_ids) or len(scores) != len(image_ids):
        raise ValueError("image_ids must be unique and as many as labels and scores")
    if distributions is not None and task != "classification":
        raise ValueError("distributions are class distributions: classification only")
    # Sorted by image_id, so the stored rows and the bootstrap CIs depend on the set, not its order.
    order = sorted(range(len(image_ids)), key=image_ids.__getitem__)
    ids = [image_ids[i] for i in order]
    # float64 of what the model gave: the JSON stored below round-trips exactly these values, so
    # trace.verify recomputes the very same numbers from the predictions rows.
    values = np.asarray(scores, dtype=np.float64)[order]
    if task == "classification":
        try:
            label_index = map_labels([labels[i] for i in order], classes, class_map)
        except EvaluationError as e:
            raise EvaluationError(f"experiment {experiment}, dataset {dataset}: {e}") from None
        keep = label_index >= 0
        if not keep.any():
            raise EvaluationError(f"experiment {experiment}: no image of dataset {dataset} ({part}) has a label among "
                                  f"{list(classes)}; declare a class_map for it in eval_datasets")
        rows = classification_metrics(label_index[keep], values[keep], classes, resamples=resamples, seed=seed)
        if distributions is not None:
            true = np.asarray(distributions, dtype=np.float64)
            if true.shape != values.shape:
                raise ValueError(f"distributions {true.shape} must be (N, C) like scores {values.shape}")
            rows += distribution_metrics(true[order][keep], values[keep], resamples=resamples, seed=seed)
        excluded = int((~keep).sum())
        if excluded:
            rows.append(MetricRow("excluded", float(excluded), n=excluded))
        ids = [i for i, k in zip(ids, keep) if k]
        label_text = [classes[i] for i in label_index[keep]]
        predicted_text = [classes[i] for i in values[keep].argmax(1)]
        score_json = [_json_object(classes, row) for row in values[keep]]
    elif task == "regression":
        targets = np.asarray(labels, dtype=np.float64)[order]
        rows = regression_metrics(targets, values, classes, resamples=resamples, seed=seed)
        label_text = [_json_object(classes, row) for row in targets]
        predicted_text = score_json = [_json_object(classes, row) for row in values]
    else:
        raise ValueError(f"task must be classification or regression, not {task!r}")
    if excluded_overlap:
        rows.append(MetricRow("excluded_overlap", float(excluded_overlap), n=excluded_overlap))
    rows = [replace(r, dataset=dataset, part=part) for r in rows]

    _replace_rows(db, rows, experiment=experiment, model_id=model_id, split_id=split_id, dataset=dataset, part=part,
                  image_ids=ids, labels=label_text, predicted=predicted_text, scores=score_json, inputs_key=inputs_key)
    return rows


def _replace_rows(db: Database, rows: list[MetricRow], *, experiment: str, model_id: str, split_id: str, dataset: str,
                  part: str, image_ids: list[str], labels: list[str], predicted: list[str], scores: list[str],
                  inputs_key: str | None) -> None:
    """The (experiment, model, dataset, part)'s metrics and predictions rows, replaced in one transaction
    from Arrow tables."""
    metric_table = pa.table({
        "experiment": [experiment] * len(rows), "model_id": [model_id] * len(rows), "split_id": [split_id] * len(rows),
        "dataset": [dataset] * len(rows), "part": [part] * len(rows),
        "metric": [r.metric for r in rows], "class": [r.class_name for r in rows],
        "value": pa.array([r.value for r in rows], pa.float64()), "ci_low": pa.array([r.ci_low for r in rows], pa.float64()),
        "ci_high": pa.array([r.ci_high for r in rows], pa.float64()), "n": pa.array([r.n for r in rows], pa.int64()),
    })
    prediction_table = pa.table({
        "model_id": [model_id] * len(image_ids), "dataset": [dataset] * len(image_ids), "image_id": image_ids, "part": [part] * len(image_ids),
        "label": labels, "predicted": predicted, "scores": scores,
    })
    with db.transaction() as conn:
        conn.execute("DELETE FROM metrics WHERE experiment = ? AND model_id = ? AND dataset = ? AND part = ?",
                     [experiment, model_id, dataset, part])
        conn.execute("DELETE FROM predictions WHERE model_id = ? AND dataset = ? AND part = ?", [model_id, dataset, part])
        conn.execute("DELETE FROM evaluation_inputs WHERE experiment = ? AND model_id = ? AND dataset = ? AND part = ?",
                     [experiment, model_id, dataset, part])
        if inputs_key is not None:
            conn.execute("INSERT INTO evaluation_inputs VALUES (?, ?, ?, ?, ?)", [experiment, model_id, dataset, part, inputs_key])
        for name, table, columns in (
            ("metrics", metric_table, "experiment, model_id, split_id, dataset, part, metric, class, value, ci_low, ci_high, n"),
            ("predictions", prediction_table, "model_id, dataset, image_id, part, label, predicted, scores"),
        ):
            conn.register("incoming", table)
            conn.execute(f"INSERT INTO {name} ({columns}) SELECT {columns} FROM incoming")
            conn.unregister("incoming")


def _json_object(names: Sequence[str], values: np.ndarray) -> str:
    """{name: value} in the given order; NaN (a missing target) as null, since JSON has no NaN."""
    return json.dumps({k: v if math.isfinite(v) else None for k, v in zip(names, values.tolist())})
