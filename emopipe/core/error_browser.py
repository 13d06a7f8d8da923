"""The errors to look at: per true class, the test images the model got wrong with the most confidence and
the ones it got right with the least, read from the stored `predictions` rows (what FiftyOne's error
browsing shows), as thumbnail grids captioned with the true label, the prediction and its score."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from emopipe.atomic import atomic_write
from emopipe.core.preview import grid_png, thumbnails
from emopipe.db import Database
from emopipe.fingerprint import sha256_bytes

EXAMPLES_PER_KIND = 6  # mistakes, and correct predictions, shown per class


@dataclass(frozen=True)
class Example:
    image_id: str
    label: str
    predicted: str
    score: float  # the predicted class's score


@dataclass(frozen=True)
class ClassErrors:
    label: str
    confident_mistakes: list[Example]  # wrong, highest score first
    unsure_correct: list[Example]  # right, lowest score first


def class_errors(db: Database, *, model_id: str, dataset: str, part: str, per_kind: int = EXAMPLES_PER_KIND) -> list[ClassErrors]:
    """Per true label (sorted), the examples from the model's predictions of that dataset part."""
    with db.connect() as conn:
        rows = conn.execute("SELECT image_id, label, predicted, scores FROM predictions WHERE model_id = ? AND dataset = ? "
                            "AND part = ? ORDER BY image_id", [model_id, dataset, part]).fetchall()
    by_label: dict[str, list[Example]] = {}
    for image_id, label, predicted, scores in rows:
        by_label.setdefault(label, []).append(Example(image_id, label, predicted, float(json.loads(scores)[predicted])))
    out = []
    for label, examples in sorted(by_label.items()):
        wrong = sorted((e for e in examples if e.predicted != e.label), key=lambda e: (-e.score, e.image_id))
        right = sorted((e for e in examples if e.predicted == e.label), key=lambda e: (e.score, e.image_id))
        out.append(ClassErrors(label, wrong[:per_kind], right[:per_kind]))
    return out


def errors_png(errors: ClassErrors, objects_root: Path | None = None) -> bytes | None:
    """One class's grid: its confident mistakes, then its unsure correct predictions (None when it has neither)."""
    shown = errors.confident_mistakes + errors.unsure_correct
    if not shown:
        return None
    captions = [f"{'WRONG' if e.predicted != e.label else 'right'} {e.score:.2f}\ntrue {e.label}\npred {e.predicted}" for e in shown]
    return grid_png(thumbnails([e.image_id for e in shown], objects_root, tile=120), captions, tile=120, columns=EXAMPLES_PER_KIND)


def safe_file_name(label: str) -> str:
    """A label as a file name that stays in its folder: other characters than letters, digits, '-' and '_'
    become '_', and a short hash keeps labels that differ only there apart."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", label)[:60]
    return cleaned if cleaned == label else f"{cleaned}-{sha256_bytes(label.encode())[:8]}"


def write_error_pngs(errors: list[ClassErrors], folder: Path, objects_root: Path | None = None) -> dict[str, Path]:
    """label -> PNG written under folder (<label>.png), for each class with something to show."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for e in errors:
        png = errors_png(e, objects_root)
        if png is not None:
            path = folder / f"{safe_file_name(e.label)}.png"
            atomic_write(path, lambda f, data=png: f.write(data))
            written[e.label] = path
    return written
