"""The released layouts of the studies' datasets, read as source items (see core/sources.py).

Each reader follows the dataset's own release (the layouts are quoted from its readme/loader):

- emoset (EmoSet-118K, github.com/JingyuanYY/EmoSet README "File Structure"): `path` holds
  info.json (label2idx per attribute; `emotion` gives the 8 classes), train.json / val.json /
  test.json (lists of [emotion, image_id, "image/<emotion>/<id>.jpg", "annotation/<emotion>/<id>.json"]),
  image/ and annotation/. The official part becomes the attribute `split`; the annotation JSON's
  scalar attributes (brightness, colorfulness, scene, facial_expression, human_action) and its
  `object` list (joined with ';') are kept as attributes.
- parquet (the form Hugging Face mirrors use, e.g. datasets/Woleek/EmoSet-118K): local files or
  http(s) URLs, read one row group at a time. `image_column` holds the bytes (the `datasets` Image
  struct {bytes, path}, or plain binary); `label_column` an int (class names from `classes`, else
  from the file's Hugging Face schema metadata) or a string. Other scalar columns are attributes.
  A file's part is its `split` column, else taken from its name as Hugging Face does
  (train/validation/test as a folder or a file-name prefix). URIs: parquet:<file>#<row group>:<row>.
- emotic (EMOTIC, rkosti/emotic README and the mat2py conversion of Tandon-A/emotic): `labels` is
  the released Annotations.mat (structs train/val/test: filename, folder, image_size{n_col, n_row},
  person[] with body_bbox [x1 y1 x2 y2], annotations_categories / combined_categories,
  annotations_continuous / combined_continuous {valence, arousal, dominance} on 1..10, gender, age),
  or the CSVs converted from it (Folder, Filename, Image Size, BBox, Categorical_Labels,
  Continuous_Labels[, Gender, Age]; one row per person; the part from the file name or a `split`
  column), or a folder of those CSVs. Images are `path`/folder/filename. Only images with exactly one
  annotated person are kept (label "person"); the others are listed as rejections (see REJECT_REASON).
  Attributes: box_x1, box_y1, box_x2, box_y2 (the body box divided by the image size, in [0, 1]),
  valence, arousal, dominance ((v - 1) / 9, in [0, 1]), categories (';'-joined), gender, age, split.
- webemo (WEBEmo, Panda et al. ECCV 2018; release files train25.txt / test25.txt: "<url> <index>"
  per line, the index into the 25 fine classes in alphabetical order): `path` is the folder holding
  them. Label: the fine class; attributes emotion7, polarity (the 25 -> 7 -> 2 hierarchy) and split.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import math
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from emopipe.catalog import DatasetSpec
from emopipe.core import download
from emopipe.core.download import SourceError, is_http_url
from emopipe.core.source_items import DatasetRoot, SourceItem, outside, rejection
from emopipe.core.sources import Fetched
from emopipe.fingerprint import sha256_file


PARTS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


# --- EmoSet ---------------------------------------------------------------------------------------

EMOSET_SCALARS = ("brightness", "colorfulness", "scene", "facial_expression", "human_action")


def emoset_items(root: Path, where: str) -> list[SourceItem]:
    """EmoSet-118K's official parts from train/val/test.json, labels checked against info.json."""
    if not root.is_dir():
        raise SourceError(f"{where}: the folder {root} does not exist; expected EmoSet-118K's data_root (info.json, train.json, image/...)")
    info = _read_json(root / "info.json", "EmoSet's info.json (label2idx per attribute)")
    try:
        emotions = set(info["emotion"]["label2idx"])
    except (KeyError, TypeError):
        raise SourceError(f"{root / 'info.json'}: no emotion.label2idx mapping") from None
    rows, escaped = [], []
    dataset_root = DatasetRoot(root)
    for part in ("train", "val", "test"):
        entries = _read_json(root / f"{part}.json", f"EmoSet's {part} list [[emotion, id, image path, annotation path], ...]")
        for n, entry in enumerate(entries):
            # The release has [emotion, id, image, annotation]; some re-packs drop the id.
            if not isinstance(entry, list) or len(entry) not in (3, 4) or not all(isinstance(x, str) for x in entry):
                raise SourceError(f"{root / f'{part}.json'}: entry {n} is {entry!r}; expected [emotion, id, image path, annotation path]")
            emotion, image, annotation = entry[0], entry[-2], entry[-1]
            if emotion not in emotions:
                raise SourceError(f"{root / f'{part}.json'}: entry {n} has emotion {emotion!r}, not in info.json ({', '.join(sorted(emotions))})")
            name = entry[1] if len(entry) == 4 else Path(image).stem
            uri, annotation_path = dataset_root.join(image), dataset_root.join(annotation)
            if not dataset_root.holds(uri):
                escaped.append(outside(uri, image))
                continue
            # An annotation outside the dataset is not read: the image keeps only its label and part.
            rows.append((uri, emotion, part, name, annotation_path if dataset_root.holds(annotation_path) else None))
    with ThreadPoolExecutor(max_workers=8) as pool:
        annotations = list(pool.map(_emoset_annotation, (r[4] for r in rows)))
    items, seen = [], set()
    for (uri, emotion, part, name, _), extra in zip(rows, annotations):
        if uri in seen:
            raise SourceError(f"{root}: {uri} is listed twice in train/val/test.json")
        seen.add(uri)
        items.append(SourceItem(uri, emotion, {"split": part, "emoset_id": name, **extra}))
    return items + list({r.uri: r for r in escaped}.values())


def _emoset_annotation(path: str | None) -> dict:
    """The annotation's scalar attributes; a missing or unreadable file only loses them."""
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    out = {k: data[k] for k in EMOSET_SCALARS if isinstance(data.get(k), (str, int, float))}
    if isinstance(data.get("object"), list):
        out["object"] = ";".join(map(str, data["object"]))
    return out


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{path}: does not exist; expected {what}") from None
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: cannot read {what}: {e}") from None


# --- Parquet --------------------------------------------------------------------------------------

PARQUET_ROW_GROUPS_CACHED = 4
_parquet_local: dict[str, tuple[Path, str]] = {}  # a listed file's location (path or URL) -> (local file, image column)
_parquet_lock = threading.Lock()


def parquet_items(spec: DatasetSpec, work_dir: Path, where: str, resolve: Callable[[str], Path]) -> list[SourceItem]:
    """One item per row of each of spec.files, reading the non-image columns only. `resolve` turns
    a local path into an absolute one (relative to the catalog file); it may hold a glob pattern."""
    import pyarrow.parquet as pq

    items = []
    for location, sha256 in _parquet_locations(spec, resolve, where):
        local = _parquet_file(location, sha256, work_dir, where)
        try:
            pf = pq.ParquetFile(local)
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError on a damaged file
            raise SourceError(f"{where}.files: {location}: not a readable Parquet file: {e}") from None
        schema = pf.schema_arrow
        for column in (spec.image_column, spec.label_column):
            if column not in schema.names:
                raise SourceError(f"{where}: {location} has no column {column!r}; its columns: {', '.join(schema.names)} "
                                  "(set image_column / label_column in the catalog)")
        names = _label_names(spec, schema, location, where)
        kept = [f.name for f in schema if f.name not in (spec.image_column, spec.label_column) and _is_scalar(f.type)]
        part = None if "split" in kept else _part_from_name(location)
        with _parquet_lock:
            _parquet_local[location] = (local, spec.image_column)
        for group in range(pf.num_row_groups):
            table = pf.read_row_group(group, columns=[spec.label_column, *kept])
            labels = table.column(spec.label_column).to_pylist()
            extras = {c: table.column(c).to_pylist() for c in kept}
            for row, raw in enumerate(labels):
                label = _label_value(raw, names, location, where)
                attributes = {c: _scalar(v[row]) for c, v in extras.items()}
                if part is not None:
                    attributes["split"] = part
                items.append(SourceItem(f"parquet:{location}#{group}:{row}", label, attributes))
    return items


def _parquet_locations(spec: DatasetSpec, resolve: Callable[[str], Path], where: str) -> list[tuple[str, str | None]]:
    out = []
    for f in spec.files:
        if is_http_url(f.location):
            out.append((f.location, f.sha256))
            continue
        local = str(resolve(f.location))
        if glob.has_magic(local):  # e.g. ~/datasets/EmoSet-118K-parquet/default/*/*.parquet
            matches = sorted(glob.glob(local))
            if not matches:
                raise SourceError(f"{where}.files: no file matches {local}")
            out += [(m, f.sha256) for m in matches]
        else:
            out.append((local, f.sha256))
    return out


def _parquet_file(location: str, sha256: str | None, work_dir: Path, where: str) -> Path:
    if not is_http_url(location):
        path = Path(location)
        if not path.is_file():
            raise SourceError(f"{where}.files: {location} does not exist")
        if sha256 and sha256_file(path) != sha256.lower():
            raise SourceError(f"{where}.files: {location}: sha256 mismatch (expected {sha256.lower()})")
        return path
    key = (sha256 or hashlib.sha256(location.encode()).hexdigest()).lower()[:16]
    dest = Path(work_dir) / f"parquet-{key}.parquet"
    if dest.exists():
        return dest
    from emopipe.core.sources import _locked

    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest.parent / ".lock"):
        if not dest.exists():
            if sha256:
                download.download_file(location, dest, sha256)
            else:
                _download_unverified(location, dest)
    return dest


def _download_unverified(url: str, dest: Path, retries: int = 5) -> None:
    """download.download_file without the checksum (sha256 is optional for Parquet files): the
    images inside are content-addressed anyway. Resumes a .part like download_file."""
    part = dest.with_name(dest.name + ".part")
    failures = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        try:
            download._download_to_part(url, part, offset, 60.0)
            break
        except download.NETWORK_ERRORS as e:
            failure = download._failure(url, e)
            if part.exists() and part.stat().st_size > offset:
                failures = 0
            if not failure.retryable or failures >= retries:
                raise SourceError(f"{url}: download failed: {failure.detail}") from None
            download._sleep_before_retry(failure, failures)
            failures += 1
    os.replace(part, dest)


def _label_names(spec: DatasetSpec, schema, location: str, where: str) -> list[str] | None:
    """Class names for an int label column: the Hugging Face ClassLabel names stored in the file's
    schema metadata (they define what the integers mean), else the catalog's `classes` in order."""
    import pyarrow as pa

    if not pa.types.is_integer(schema.field(spec.label_column).type):
        return None
    try:
        info = json.loads((schema.metadata or {})[b"huggingface"])
        names = info["info"]["features"][spec.label_column]["names"]
        if isinstance(names, list) and names:
            return [str(n) for n in names]
    except (KeyError, TypeError, ValueError):
        pass
    if spec.classes:
        return list(spec.classes)
    raise SourceError(f"{where}: {location}: the label column {spec.label_column!r} holds integers and the file names no classes; "
                      "give the class names in order as 'classes' in the catalog")


def _label_value(raw, names: list[str] | None, location: str, where: str) -> str | None:
    if raw is None:
        return None
    if names is None:
        return str(raw)
    if not 0 <= raw < len(names):
        raise SourceError(f"{where}: {location}: label index {raw} is outside the {len(names)} classes {names}")
    return names[raw]


def _is_scalar(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_boolean(arrow_type) \
        or pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _scalar(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _part_from_name(location: str) -> str | None:
    """train/val/test from a file-name prefix (`train-00000-of-00001.parquet`, `train25.txt`) or the
    name of the file's folder (`default/validation/0000.parquet`), as Hugging Face assigns splits."""
    *_, folder, name = ["", *re.split(r"[/\\]", location.split("?")[0])]
    found = re.match(r"(train|validation|valid|val|test)([-_.\d]|$)", name.lower())
    word = found.group(1) if found else folder.lower()
    return PARTS.get(word)


class _RowGroupCache:
    """The image column of the last few row groups read; items arrive in listing order, so the
    fetch threads share each row group, and memory stays bounded by PARQUET_ROW_GROUPS_CACHED."""

    def __init__(self, size: int):
        self.size, self.groups, self.loading, self.lock = size, OrderedDict(), {}, threading.Lock()

    def get(self, local: Path, group: int, column: str) -> list:
        key = (str(local), group, column)
        with self.lock:
            if key in self.groups:
                self.groups.move_to_end(key)
                return self.groups[key]
            event = self.loading.get(key)
            loader = event is None
            if loader:
                event = self.loading[key] = threading.Event()
        if not loader:
            event.wait()
            return self.get(local, group, column)
        try:
            values = _read_images(local, group, column)
            with self.lock:
                self.groups[key] = values
                while len(self.groups) > self.size:
                    self.groups.popitem(last=False)
            return values
        finally:
            with self.lock:
                del self.loading[key]
            event.set()


def _read_images(local: Path, group: int, column: str) -> list:
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = pq.ParquetFile(local).read_row_group(group, columns=[column]).column(0).combine_chunks()
    if pa.types.is_struct(values.type):
        return list(zip(values.field("bytes").to_pylist(), values.field("path").to_pylist()
                        if values.type.get_field_index("path") >= 0 else [None] * len(values)))
    return [(v, None) for v in values.to_pylist()]


_row_groups = _RowGroupCache(PARQUET_ROW_GROUPS_CACHED)


def fetch_parquet(item: SourceItem) -> Fetched:
    """The image bytes of a parquet:<file>#<group>:<row> item (its file listed by parquet_items)."""
    location, _, position = item.uri.removeprefix("parquet:").rpartition("#")
    with _parquet_lock:
        local, column = _parquet_local.get(location, (None, None))
    if local is None:
        return Fetched(item, None, "missing_file", f"{item.uri}: {location} was not listed in this process; list the dataset first")
    try:
        group, row = map(int, position.split(":"))
    except ValueError:
        return Fetched(item, None, "bad_url", f"{item.uri}: expected parquet:<file>#<row group>:<row>")
    try:
        data, path = _row_groups.get(local, group, column)[row]
    except IndexError:
        return Fetched(item, None, "bad_url", f"{item.uri}: no such row in {location}")
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        return Fetched(item, None, "unreadable_file", f"{item.uri}: {e}")
    if data is None:
        return Fetched(item, None, "missing_file", f"{item.uri}: the row holds no image bytes (path {path!r})")
    return Fetched(item, bytes(data), None, None)


# --- EMOTIC ---------------------------------------------------------------------------------------

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
    part_of_file = _part_from_name(path.name)
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


# --- WEBEmo ---------------------------------------------------------------------------------------

# (fine class, its 7-class parent, polarity) in release index order: train25.txt's label i is row i.
WEBEMO_HIERARCHY = (
    ("affection", "love", "positive"), ("cheerfullness", "joy", "positive"), ("confusion", "confusion", "negative"),
    ("contentment", "joy", "positive"), ("disappointment", "sadness", "negative"), ("disgust", "anger", "negative"),
    ("enthrallment", "joy", "positive"), ("envy", "anger", "negative"), ("exasperation", "anger", "negative"),
    ("gratitude", "love", "positive"), ("horror", "fear", "negative"), ("irritabilty", "anger", "negative"),
    ("lust", "love", "positive"), ("neglect", "sadness", "negative"), ("nervousness", "fear", "negative"),
    ("optimism", "joy", "positive"), ("pride", "joy", "positive"), ("rage", "anger", "negative"),
    ("relief", "joy", "positive"), ("sadness", "sadness", "negative"), ("shame", "sadness", "negative"),
    ("suffering", "sadness", "negative"), ("surprise", "surprise", "positive"), ("sympathy", "sadness", "negative"),
    ("zest", "joy", "positive"),
)
WEBEMO_FILES = ("train25.txt", "test25.txt")


def webemo_class_map(parent: str, other: str = "others") -> dict[str, str]:
    """A class_map from the 25 fine labels: those under the 7-class `parent` -> parent, the rest -> other."""
    parents = {p for _, p, _ in WEBEMO_HIERARCHY}
    if parent not in parents:
        raise ValueError(f"{parent!r} is not a WEBEmo 7-class emotion; known: {', '.join(sorted(parents))}")
    return {**{fine: parent for fine, p, _ in WEBEMO_HIERARCHY if p == parent}, "*": other}


def webemo_items(root: Path, where: str) -> list[SourceItem]:
    """The image URLs of train25.txt / test25.txt with their fine label and its parents."""
    if not root.is_dir():
        raise SourceError(f"{where}.path: the folder {root} does not exist; expected the WEBEmo release files {', '.join(WEBEMO_FILES)}")
    items: dict[str, SourceItem] = {}
    for name in WEBEMO_FILES:
        path = root / name
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise SourceError(f"{path}: does not exist; the WEBEmo release has {' and '.join(WEBEMO_FILES)} ('<url> <label index>' per line)") from None
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2 or not fields[1].isdigit() or int(fields[1]) >= len(WEBEMO_HIERARCHY) or not is_http_url(fields[0]):
                raise SourceError(f"{path}: line {n}: expected '<http(s) url> <label index 0..{len(WEBEMO_HIERARCHY) - 1}>', got {line.strip()!r}")
            fine, parent, polarity = WEBEMO_HIERARCHY[int(fields[1])]
            item = SourceItem(fields[0], fine, {"emotion7": parent, "polarity": polarity, "split": _part_from_name(name)})
            if items.setdefault(fields[0], item) != item:
                raise SourceError(f"{path}: line {n}: {fields[0]} is listed again with another label or part")
    return list(items.values())
