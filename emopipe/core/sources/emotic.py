"""emotic (EMOTIC, rkosti/emotic README and the mat2py conversion of Tandon-A/emotic): `labels` is the
released Annotations.mat (structs train/val/test: filename, folder, image_size{n_col, n_row}, person[]
with body_bbox [x1 y1 x2 y2], annotations_categories / combined_categories, annotations_continuous /
combined_continuous {valence, arousal, dominance} on 1..10, gender, age), or the CSVs converted from it
(Folder, Filename, Image Size, BBox, Categorical_Labels, Continuous_Labels[, Gender, Age]; one row per
person; the part from the file name or a `split` column), or a folder of those CSVs. Images are
`path`/folder/filename. Only images with exactly one annotated person are kept (label "person"); the
others are listed as rejections. Attributes: box_x1, box_y1, box_x2, box_y2 (the body box divided by the
image size, in [0, 1]), valence, arousal, dominance ((v - 1) / 9, in [0, 1]), categories (';'-joined),
gender, age, split."""

from __future__ import annotations

import ast
import math
import os
from pathlib import Path

import numpy as np

from emopipe.core.download import SourceError
from emopipe.core.sources.items import PARTS, DatasetRoot, SourceItem, outside, part_from_name, rejection

EMOTIC_LABEL = "person"


def emotic_items(root: Path, annotations: Path, where: str) -> list[SourceItem]:
    """Single-person EMOTIC images with box and VAD attributes; multi-person and unusable
    annotations come back as rejections (label None, REJECT_REASON set)."""
    if not root.is_dir():
        raise SourceError(f"{where}.path: the folder {root} does not exist; expected EMOTIC's image root (ade20k/, emodb_small/, framesdb/, mscoco/)")
    if annotations.suffix.lower() == ".mat":
        persons = _emotic_mat(annotations)
    elif annotations.is_dir():
        csvs = sorted(annotations.glob("*.csv"))
        if not csvs:
            raise SourceError(f"{where}.labels: the folder {annotations} holds no .csv files")
        persons = [p for f in csvs for p in _emotic_csv(f)]
    elif annotations.suffix.lower() == ".csv":
        persons = _emotic_csv(annotations)
    else:
        raise SourceError(f"{where}.labels: {annotations} is neither Annotations.mat, a .csv nor a folder of CSVs")
    by_image: dict[str, list[dict]] = {}
    escaped: dict[str, SourceItem] = {}
    dataset_root = DatasetRoot(root)
    for person in persons:
        written = os.path.join(person["folder"], person["filename"])
        uri = dataset_root.join(written)
        if dataset_root.holds(uri):
            by_image.setdefault(uri, []).append(person)
        else:
            escaped[uri] = outside(uri, written)  # one input per image, as for the images inside
    return [_emotic_item(uri, found, annotations.name) for uri, found in by_image.items()] + list(escaped.values())


def _emotic_item(uri: str, persons: list[dict], source: str) -> SourceItem:
    if len(persons) != 1:
        return rejection(uri, "multiple_persons", f"{uri}: {len(persons)} annotated persons in {source}; only single-person images are kept")
    p = persons[0]
    width, height = p["size"]
    if not (width > 0 and height > 0) or len(p["bbox"]) != 4:
        return rejection(uri, "bad_annotation", f"{uri}: image size {p['size']} / body box {p['bbox']} in {source} are unusable")
    vad = p["vad"]
    if len(vad) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vad):
        return rejection(uri, "no_continuous_labels", f"{uri}: valence/arousal/dominance {vad} in {source} are missing")
    x1, y1, x2, y2 = p["bbox"]
    attributes = {
        "box_x1": _unit(x1 / width), "box_y1": _unit(y1 / height), "box_x2": _unit(x2 / width), "box_y2": _unit(y2 / height),
        **{k: (float(v) - 1.0) / 9.0 for k, v in zip(("valence", "arousal", "dominance"), vad)},
        "categories": ";".join(p["categories"]), "gender": p["gender"], "age": p["age"], "split": p["split"],
    }
    return SourceItem(uri, EMOTIC_LABEL, attributes)


def _unit(value: float) -> float:
    """Clipped to [0, 1]: released boxes overshoot the frame by a few pixels."""
    return min(1.0, max(0.0, float(value)))


def _emotic_mat(path: Path) -> list[dict]:
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except (OSError, ValueError, NotImplementedError) as e:
        raise SourceError(f"{path}: cannot read EMOTIC's Annotations.mat: {e}") from None
    parts = [p for p in ("train", "val", "test") if p in mat]
    if not parts:
        raise SourceError(f"{path}: holds none of the structs train, val, test (found {', '.join(k for k in mat if not k.startswith('__'))})")
    out = []
    for part in parts:
        for entry in np.atleast_1d(mat[part]):
            size = entry.image_size
            for person in np.atleast_1d(entry.person):
                out.append({
                    "folder": str(entry.folder), "filename": str(entry.filename), "split": part,
                    "size": (_number(size.n_col), _number(size.n_row)),
                    "bbox": [float(v) for v in np.atleast_1d(person.body_bbox)],
                    "vad": _mat_vad(person), "categories": _mat_categories(person),
                    "gender": _text(getattr(person, "gender", None)), "age": _text(getattr(person, "age", None)),
                })
    return out


def _mat_vad(person) -> list[float]:
    """Valence, arousal, dominance: the combined (mean) rating of val/test, the single one of train."""
    rating = getattr(person, "combined_continuous", None)
    if rating is None or isinstance(rating, np.ndarray):
        ratings = np.atleast_1d(getattr(person, "annotations_continuous", []))
        values = [[_number(getattr(r, k, None)) for k in ("valence", "arousal", "dominance")] for r in ratings]
        return [float(np.nanmean(c)) if not np.all(np.isnan(c)) else math.nan for c in np.array(values, float).T] if values else []
    return [_number(getattr(rating, k, None)) for k in ("valence", "arousal", "dominance")]


def _mat_categories(person) -> list[str]:
    combined = getattr(person, "combined_categories", None)
    if combined is not None:
        return sorted({str(c) for c in np.atleast_1d(combined)})
    found = set()
    for annotation in np.atleast_1d(getattr(person, "annotations_categories", [])):
        found.update(str(c) for c in np.atleast_1d(getattr(annotation, "categories", [])))
    return sorted(found)


def _number(value) -> float:
    try:
        return float(np.asarray(value, dtype=float).reshape(-1)[0])
    except (TypeError, ValueError, IndexError):
        return math.nan


def _text(value) -> str | None:
    if value is None or (isinstance(value, np.ndarray) and value.size == 0):
        return None
    return str(value)


def _emotic_csv(path: Path) -> list[dict]:
    import csv

    try:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read the EMOTIC CSV: {e}") from None
    need = ("Folder", "Filename", "Image Size", "BBox", "Continuous_Labels")
    header = list(rows[0]) if rows else []
    if rows and any(c not in header for c in need):
        raise SourceError(f"{path}: the header {','.join(header)} lacks {', '.join(c for c in need if c not in header)}; "
                          "expected EMOTIC's converted CSV (Folder, Filename, Image Size, BBox, Categorical_Labels, Continuous_Labels, ...)")
    part_of_file = part_from_name(path.name)
    out = []
    for n, row in enumerate(rows, start=2):
        part = PARTS.get(str(row.get("split") or "").strip().lower(), part_of_file)
        if part is None:
            raise SourceError(f"{path}: line {n}: no part; name the file train/val/test.csv or add a 'split' column")
        try:
            size, bbox, vad = (ast.literal_eval(row[c]) for c in ("Image Size", "BBox", "Continuous_Labels"))
            categories = ast.literal_eval(row["Categorical_Labels"]) if row.get("Categorical_Labels") else []
        except (ValueError, SyntaxError):
            raise SourceError(f"{path}: line {n}: Image Size, BBox, Categorical_Labels and Continuous_Labels must be Python lists") from None
        out.append({"folder": row["Folder"], "filename": row["Filename"], "split": part, "size": tuple(float(v) for v in size[:2]),
                    "bbox": [float(v) for v in bbox], "vad": [float(v) for v in vad], "categories": sorted(map(str, categories)),
                    "gender": row.get("Gender") or None, "age": row.get("Age") or None})
    return out
