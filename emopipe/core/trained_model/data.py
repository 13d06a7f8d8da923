"""The training data: the split's train and val parts as packed uint8 arrays, their targets, and the
checks that refuse inputs training cannot work with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from emopipe.catalog import ExperimentSpec
from emopipe.core.raw_images import attribute_matrix
from emopipe.core.splits import empty_part_cause
from emopipe.db import Database
from emopipe.errors import UserError
from emopipe.fingerprint import rows_fingerprint

Log = Callable[[str], None]


class TrainingError(UserError):
    """Training inputs that cannot work: no images in a part, a label outside the classes, a missing
    regression target or vote share."""


@dataclass
class TrainingData:
    """The train and val parts as packed uint8 arrays (N, S, S, 3) plus targets:
    classification: y int64 (N,) class indices, or float32 (N, C) class probabilities (soft labels);
    regression: y float32 (N, T), one column per target."""

    classes: list[str] | None
    targets: list[str] | None
    train_ids: list[str]
    val_ids: list[str]
    x_train: np.ndarray
    x_val: np.ndarray
    y_train: np.ndarray
    y_val: np.ndarray

    @property
    def num_outputs(self) -> int:
        return len(self.classes) if self.classes is not None else len(self.targets)

    def fingerprint(self) -> str:
        """Over (part, image_id, target) rows; the pixels follow from the ids (content addresses)."""
        rows = [("train", i, json.dumps(np.asarray(y).tolist())) for i, y in zip(self.train_ids, self.y_train)]
        rows += [("val", i, json.dumps(np.asarray(y).tolist())) for i, y in zip(self.val_ids, self.y_val)]
        return rows_fingerprint(rows + [("classes", json.dumps(self.classes), json.dumps(self.targets))])


def load_training_data(db: Database, split_id: str, experiment: ExperimentSpec, *,
                       classes: list[str] | None = None, arrays_root: Path | None = None) -> TrainingData:
    """The split's train and val images (splits ⋈ images), their targets, and their arrays at the
    experiment's image size. classes: the dataset's class order (default: its labels, sorted)."""
    from emopipe.core.images import load_array

    with db.connect() as conn:
        rows = conn.execute(
            "SELECT s.part, s.image_id, i.label, i.attributes FROM splits s "
            "JOIN images i ON i.image_id = s.image_id AND i.dataset = ? "
            "WHERE s.split_id = ? AND s.part IN ('train', 'val') ORDER BY s.part, s.image_id",
            [experiment.dataset, split_id]).fetchall()
        if classes is None and experiment.task == "classification":
            classes = [r[0] for r in conn.execute(
                "SELECT DISTINCT i.label FROM splits s JOIN images i ON i.image_id = s.image_id AND i.dataset = ? "
                "WHERE s.split_id = ? AND i.label IS NOT NULL ORDER BY 1", [experiment.dataset, split_id]).fetchall()]
        parts = {p: [r for r in rows if r[0] == p] for p in ("train", "val")}
        for part, part_rows in parts.items():
            if not part_rows:
                cause = empty_part_cause(conn, split_id, experiment.name, part)
                raise TrainingError(f"split {split_id} of dataset {experiment.dataset!r} has no {part} images "
                                    f"(experiment {experiment.name!r}): {cause}")
    ys = {p: _targets(part_rows, experiment, classes) for p, part_rows in parts.items()}
    ids = {p: [r[1] for r in part_rows] for p, part_rows in parts.items()}
    return TrainingData(
        classes=list(classes) if experiment.task == "classification" else None,
        targets=list(experiment.targets) if experiment.task == "regression" else None,
        train_ids=ids["train"], val_ids=ids["val"],
        x_train=load_array(db, ids["train"], experiment.image_size, arrays_root=arrays_root),
        x_val=load_array(db, ids["val"], experiment.image_size, arrays_root=arrays_root),
        y_train=ys["train"], y_val=ys["val"])


def _targets(rows: list[tuple], experiment: ExperimentSpec, classes: list[str] | None) -> np.ndarray:
    if experiment.task == "regression":
        return _attribute_matrix(rows, experiment.targets, experiment, "targets")
    if experiment.soft_labels:
        if len(experiment.soft_labels) != len(classes):
            raise TrainingError(
                f"experiment {experiment.name!r}: soft_labels names {len(experiment.soft_labels)} vote-share "
                f"columns but the dataset has {len(classes)} classes ({', '.join(classes)}); give one per class, in that order")
        shares = _attribute_matrix(rows, experiment.soft_labels, experiment, "soft_labels")
        totals = shares.sum(1, keepdims=True)
        if (totals <= 0).any():
            bad = rows[int(np.argmax(totals[:, 0] <= 0))][1]
            raise TrainingError(f"experiment {experiment.name!r}: image {bad} has no positive vote share in {list(experiment.soft_labels)}")
        return (shares / totals).astype(np.float32)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({r[2] for r in rows if r[2] not in index}, key=str)
    if unknown:
        raise TrainingError(f"experiment {experiment.name!r}: label(s) {unknown[:5]} are not among the classes "
                            f"{list(classes)} (fix the dataset's classes / class_map in the catalog)")
    return np.array([index[r[2]] for r in rows], dtype=np.int64)


def _attribute_matrix(rows: list[tuple], columns: tuple[str, ...], experiment: ExperimentSpec, key: str) -> np.ndarray:
    """The columns for every training row; unlike evaluation, a missing value is an error here."""
    try:
        out = attribute_matrix([r[1] for r in rows], [r[3] for r in rows], columns)
    except UserError as e:
        raise TrainingError(f"experiment {experiment.name!r} ({key}): {e}") from None
    if np.isnan(out).any():
        n, j = np.argwhere(np.isnan(out))[0]
        raise TrainingError(f"experiment {experiment.name!r} ({key}): image {rows[n][1]} has no {columns[j]}; "
                            f"the dataset's manifest needs a numeric column {columns[j]!r} for every image")
    return out.astype(np.float32)


def check_data(exp: ExperimentSpec, data: TrainingData) -> None:
    for part, x, y, ids in (("train", data.x_train, data.y_train, data.train_ids), ("val", data.x_val, data.y_val, data.val_ids)):
        if len(ids) < (2 if part == "train" else 1):
            raise TrainingError(f"experiment {exp.name!r}: {len(ids)} {part} image(s) is too few to train on")
        if x.dtype != np.uint8 or x.shape != (len(ids), exp.image_size, exp.image_size, 3) or len(y) != len(ids):
            raise ValueError(f"{part}: expected uint8 images ({len(ids)}, {exp.image_size}, {exp.image_size}, 3) "
                             f"and {len(ids)} targets, got {x.dtype} {x.shape} and {len(y)}")
    if (exp.task == "classification") != (data.classes is not None):
        raise ValueError(f"task {exp.task} needs {'classes' if exp.task == 'classification' else 'targets'} in TrainingData")
