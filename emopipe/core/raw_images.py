"""Ingest: every source item ends in exactly one place: `images`, `rejected` (with a reason), or
`duplicates`. Accepted bytes are stored once, content-addressed (image_id = sha256 of the bytes).

The `images`, `rejected` and `duplicates` rows of a dataset mirror its current listing: a file that
left the listing leaves the tables (its bytes stay in the object store, so older splits remain
verifiable). Rows are committed in batches, so a killed run keeps what it stored. A re-run reads only
the files that are new or changed and downloads only the URLs it does not know (core/source_entries.py).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from emopipe.atomic import atomic_write
from emopipe.catalog import DatasetSpec
from emopipe.concurrency import bounded_map
from emopipe.core.download import remove_stale_downloads
from emopipe.core.source_entries import Outcome, SourceEntries, forget_unlisted, write_entries
from emopipe.core.sources import REJECT_DETAIL, REJECT_REASON, Fetched, SourceItem, fetch_items, list_items
from emopipe.db import Database
from emopipe.errors import UserError
from emopipe.fingerprint import sha256_bytes, sha256_file, table_fingerprint
from emopipe.paths import object_path
from emopipe.progress import Progress
from emopipe.threads import available_cores

ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
# Pillow's own warning threshold; above it a file is treated as a decompression bomb.
MAX_PIXELS = 89_478_485
# Leading bytes of formats Pillow may fail on for their pixel layout (e.g. float RGB TIFF).
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")
BATCH = 1000


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str


def inspect_image(source: bytes | Path, max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """Check that the bytes (in memory, or a file's) are a whole, decodable image; raise
    Rejected(reason, detail) if not.

    The decode runs in Pillow's draft mode (JPEGs at 1/8 scale), which still reads every byte, so
    truncation is caught at a fraction of a full decode; the full decode happens once, at resize.
    """
    if isinstance(source, Path):
        with open(source, "rb") as f:
            head = f.read(64)
    else:
        head = source[:64]
    if not head:
        raise Rejected("zero_bytes", "the file is empty")
    try:
        with warnings.catch_warnings():
            # The pixel limit is checked below, from the header, with our own message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source if isinstance(source, Path) else io.BytesIO(source), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as e:
        # Pillow refuses above twice its own limit before the size is ours to check; say ours.
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        raise Rejected("decompression_bomb", f"{pixels.group(1) if pixels else 'more'} pixels exceeds the limit of {max_pixels}") from None
    except Image.UnidentifiedImageError as e:
        if head.startswith(IMAGE_SIGNATURES):
            raise Rejected("unreadable_mode", f"an image file whose pixel layout Pillow cannot read ({e})") from None
        kind = "an HTML page" if head.lstrip().lower().startswith((b"<!doctype html", b"<html")) else "not an image"
        raise Rejected("not_an_image", f"{kind} (starts with {head[:16]!r})") from None
    except Exception as e:  # Pillow raises assorted errors on malformed headers
        raise Rejected("not_an_image", f"unreadable header: {e}") from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise Rejected("decompression_bomb", f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")
        try:
            img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            img.load()
            img.convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:
            message = str(e)
            reason = "truncated" if "truncat" in message or "broken data stream" in message or "premature end" in message.lower() else "unreadable_mode"
            raise Rejected(reason, message) from None
        return ImageInfo(width, height, img.format or "")


def store_object(data: bytes, image_id: str, objects_root: Path) -> bool:
    """Write the bytes at their content address atomically; False when they were already there."""
    target = object_path(image_id, objects_root)
    if target.exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda f: f.write(data))
    return True


def store_file(path: Path, image_id: str, objects_root: Path) -> bool:
    """Move a downloaded file (on the store's file system) to its content address; False, and the file
    removed, when the bytes were already there."""
    target = object_path(image_id, objects_root)
    if target.exists():
        path.unlink()
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)
    return True


@dataclass
class IngestResult:
    dataset: str
    n_inputs: int = 0
    n_images: int = 0  # accepted in this listing (new + already ingested)
    n_new: int = 0  # images whose bytes entered the store in this run
    n_known: int = 0  # entries unchanged since an earlier run read them (not read again; core/source_entries.py)
    n_rejected: int = 0
    n_duplicates: int = 0
    n_label_conflicts: int = 0
    n_dropped: int = 0  # rows of files that left the listing
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)  # a few "uri (label) = kept_uri (label)" lines
    fingerprint: str = ""
    seconds: float = 0.0

    @property
    def balanced(self) -> bool:
        """The accounting identity: every input is an image, a rejection or a duplicate."""
        return self.n_inputs == self.n_images + self.n_rejected + self.n_duplicates


def ingest_dataset(
    db: Database,
    spec: DatasetSpec,
    *,
    objects_root: Path,
    work_dir: Path,
    workers: int = 16,
    log: Callable[[str], None] = print,
) -> IngestResult:
    start = time.perf_counter()
    result = IngestResult(spec.name)
    items = list_items(spec, work_dir)
    result.n_inputs = len(items)
    with db.connect() as conn:
        entries = SourceEntries.load(conn, spec.name, objects_root, spec.retry_failed_urls)
        # uri -> hash of the stored (image_id, label, attributes): an int instead of three strings per image
        # (100k images: ~30 MB less); a 64-bit hash collision between a row and its changed self is ~1e-19.
        stored = {row[0]: hash(row[1:]) for row in conn.execute(
            "SELECT source_uri, image_id, label, attributes FROM images WHERE dataset = ?", [spec.name]).fetchall()}
    rejected: list[tuple] = []
    known, to_fetch = [], []
    for item in _listed_candidates(items, spec, rejected):
        outcome = entries.known(item)
        if outcome is None:
            to_fetch.append(item)
        else:
            known.append((item, outcome, False))
    result.n_known = len(known)
    kept: dict[str, tuple[str, str]] = {}  # image_id -> (source_uri, label) of the first copy
    outcomes = itertools.chain(known, _read_outcomes(to_fetch, spec, objects_root=objects_root, work_dir=work_dir,
                                                                 workers=workers, result=result, log=log))
    duplicates = _record_outcomes(db, spec, outcomes, entries, stored, kept, rejected, log)
    duplicate_rows = _duplicate_rows(spec, duplicates, kept, result)
    listed = pa.table({"source_uri": pa.array([item.uri for item in items], pa.string())})
    with db.session():
        result.n_dropped = _replace_listing_rows(db, spec.name, kept, rejected, duplicate_rows, listed)
        result.fingerprint = dataset_fingerprint(db, spec.name)
    result.n_images = len(kept)
    result.n_rejected = len(rejected)
    result.n_duplicates = len(duplicates)
    for _, _, reason, _ in rejected:
        result.rejected_by_reason[reason] = result.rejected_by_reason.get(reason, 0) + 1
    result.seconds = time.perf_counter() - start
    return result


def _listed_candidates(items: list[SourceItem], spec: DatasetSpec, rejected: list) -> list[SourceItem]:
    """The items that need an outcome; the listing's own rejections and unknown labels go to `rejected`."""
    candidates = []
    for item in items:
        reason = item.attributes.get(REJECT_REASON) if item.label is None else None
        if reason:  # the dataset's own annotations exclude it (e.g. an EMOTIC image with two people)
            rejected.append((spec.name, item.uri, reason, item.attributes.get(REJECT_DETAIL, item.uri)))
        elif map_label(item.label, spec) is None:
            allowed = f"; allowed: {', '.join(spec.classes)}" if spec.classes else ""
            rejected.append((spec.name, item.uri, "unknown_label", f"label {item.label!r} is not a class of {spec.name}{allowed}"))
        else:
            candidates.append(item)
    return candidates


def _read_outcomes(to_fetch: list[SourceItem], spec: DatasetSpec, *, objects_root: Path, work_dir: Path,
                   workers: int, result: IngestResult, log: Callable[[str], None]) -> Iterator[tuple[SourceItem, Outcome, bool]]:
    """Fetch, validate and store each item, yielding (item, outcome, True): True as in "read in this run"."""

    def accept(fetched: Fetched) -> tuple[SourceItem, Outcome, bool]:
        uri = fetched.item.uri
        try:
            if fetched.file is not None:
                image_id, info, n_bytes, new = _accept_file(fetched.file, objects_root)
            elif fetched.data is not None:
                info = inspect_image(fetched.data)
                image_id, n_bytes = sha256_bytes(fetched.data), len(fetched.data)
                new = store_object(fetched.data, image_id, objects_root)
            else:
                raise Rejected(fetched.reason or "fetch_failed", fetched.detail or "")
        except Rejected as r:
            detail = r.detail if r.detail.startswith(uri) else f"{uri}: {r.detail}"
            return fetched.item, Outcome(reason=r.reason, detail=detail, transient=fetched.transient), False
        return fetched.item, Outcome(image_id, info.width, info.height, info.format, n_bytes), new

    incoming = Path(objects_root) / ".incoming"  # downloads land here: the store's file system, so a move is a rename
    incoming.mkdir(parents=True, exist_ok=True)
    remove_stale_downloads(incoming)
    fetched_items = fetch_items(to_fetch, workers=workers, max_bytes=spec.max_image_bytes, incoming=incoming,
                                spec=spec, work_dir=work_dir)
    # Threads, one per core: Pillow and hashlib release the GIL while they decode and hash.
    with ThreadPoolExecutor(max_workers=available_cores()) as pool, \
            Progress(f"{spec.name}: reading and storing", len(to_fetch), "entries", log) as progress:
        for item, outcome, new in bounded_map(pool, accept, fetched_items, in_flight=64):
            result.n_new += new
            progress.advance()
            yield item, outcome, True


def _record_outcomes(db: Database, spec: DatasetSpec, outcomes, entries: SourceEntries, stored: dict, kept: dict,
                     rejected: list, log) -> list[tuple]:
    """Sort each outcome into `kept`, `rejected` or the duplicates, writing the `images` rows that are
    new or differ from `stored` (uri -> hash of image_id, label, attributes) and the entries read, in batches
    (a killed run keeps what it stored); returns the duplicates (uri, image_id, label)."""
    duplicates = []
    pending: dict[str, tuple] = {}  # by image_id: one statement must not upsert a key twice (DuckDB keeps the first)
    read: list[tuple[str, Outcome]] = []
    written: set[str] = set()  # image_ids whose rows earlier batches of this run wrote
    for item, outcome, was_read in outcomes:
        if was_read:
            read.append((item.uri, outcome))
        if outcome.image_id is None:
            note = "" if was_read else " (as last read; the file is unchanged, or the URL is not retried: see retry_failed_urls)"
            rejected.append((spec.name, item.uri, outcome.reason, outcome.detail + note))
            continue
        image_id, label = outcome.image_id, map_label(item.label, spec)
        attributes = json.dumps(item.attributes, sort_keys=True, default=str) if item.attributes else "{}"
        row = (image_id, spec.name, item.uri, label, outcome.width, outcome.height, outcome.format, outcome.n_bytes, attributes)
        if image_id in kept:
            # Copies arrive in download order; keeping the smallest URI makes the outcome repeatable.
            first_uri, first_label = kept[image_id]
            if item.uri > first_uri:
                duplicates.append((item.uri, image_id, label))
                continue
            duplicates.append((first_uri, image_id, first_label))
        kept[image_id] = (item.uri, label)
        # A row stored as it is needs no write, unless this run already wrote (or queued) a copy's row
        # for the same image_id that this one now replaces.
        if stored.get(item.uri) != hash((image_id, label, attributes)) or image_id in pending or image_id in written:
            pending[image_id] = row
        if len(pending) >= BATCH or len(read) >= BATCH:
            _write_batch(db, list(pending.values()), entries.rows(read))
            log(f"{spec.name}: {len(kept)} images stored, {len(rejected)} rejected so far")
            written.update(pending)
            pending, read = {}, []
    _write_batch(db, list(pending.values()), entries.rows(read))
    return duplicates


def _duplicate_rows(spec: DatasetSpec, duplicates: list[tuple], kept: dict, result: IngestResult) -> list[tuple]:
    rows = []
    for uri, image_id, label in sorted(duplicates):
        first_uri, first_label = kept[image_id]
        conflict = first_label != label
        rows.append((spec.name, uri, image_id, label, first_uri, conflict))
        if conflict:
            result.n_label_conflicts += 1
            if len(result.conflicts) < 10:
                result.conflicts.append(f"{uri} ({label}) has the same bytes as {first_uri} ({first_label}); kept the first")
    return rows


def _replace_listing_rows(db: Database, dataset: str, kept: dict, rejected: list[tuple], duplicates: list[tuple],
                          listed: pa.Table) -> int:
    """In one transaction: drop the images and source entries that left the listing, and replace the
    dataset's `rejected` and `duplicates` rows; bulk writes through Arrow. Returns the images dropped."""
    current = pa.table({"image_id": pa.array(list(kept), pa.string())})
    rejected_rows = pa.table({name: pa.array(column, pa.string()) for name, column in
                              zip(("dataset", "source_uri", "reason", "detail"), zip(*rejected) if rejected else [[]] * 4)})
    columns = ("dataset", "source_uri", "image_id", "label", "kept_source_uri", "label_conflict")
    duplicate_rows = pa.table({name: pa.array(column, pa.bool_() if name == "label_conflict" else pa.string())
                               for name, column in zip(columns, zip(*duplicates) if duplicates else [[]] * 6)})
    with db.transaction() as conn:
        conn.register("current_images", current)
        dropped = conn.execute(
            "DELETE FROM images WHERE dataset = ? AND image_id NOT IN (SELECT image_id FROM current_images)", [dataset]
        ).fetchone()[0]
        conn.execute("DELETE FROM rejected WHERE dataset = ?", [dataset])
        conn.execute("DELETE FROM duplicates WHERE dataset = ?", [dataset])
        conn.register("rejected_rows", rejected_rows)
        conn.execute("INSERT INTO rejected (dataset, source_uri, reason, detail) SELECT * FROM rejected_rows")
        conn.register("duplicate_rows", duplicate_rows)
        conn.execute(f"INSERT INTO duplicates ({', '.join(columns)}) SELECT * FROM duplicate_rows")
        forget_unlisted(conn, dataset, listed)
        for name in ("current_images", "rejected_rows", "duplicate_rows"):
            conn.unregister(name)
    return dropped


def _accept_file(path: Path, objects_root: Path) -> tuple[str, ImageInfo, int, bool]:
    """A downloaded file into the store: (image_id, info, n_bytes, new); removed, and Rejected raised,
    when it is no image."""
    try:
        info = inspect_image(path)
    except Rejected:
        path.unlink()
        raise
    image_id, n_bytes = sha256_file(path), path.stat().st_size
    return image_id, info, n_bytes, store_file(path, image_id, objects_root)


def map_label(label: str | None, spec: DatasetSpec) -> str | None:
    """The dataset's class for a raw label (class_map, '*' for all others), or None if it has none."""
    if label is None or label == "":
        return None
    mapped = spec.class_map.get(label, spec.class_map.get("*", label)) if spec.class_map else label
    if spec.classes and mapped not in spec.classes:
        return None
    return mapped


def dataset_fingerprint(db: Database, dataset: str) -> str:
    """sha256 over the sorted (image_id, label) pairs of the dataset: its Dagster data version."""
    with db.connect() as conn:
        rows = conn.sql("SELECT image_id, label FROM images WHERE dataset = $1 ORDER BY image_id",
                        params=[dataset]).to_arrow_table()
    return table_fingerprint(rows)


IMAGE_COLUMNS = ("image_id", "dataset", "source_uri", "label", "width", "height", "format", "n_bytes", "attributes")


def _write_batch(db: Database, rows: list[tuple], entry_rows: pa.Table) -> None:
    """Upsert a batch of `images` rows and the source entries read, in one transaction, each in one
    statement from an Arrow table (executemany costs ~1000x more)."""
    if not rows and not entry_rows.num_rows:
        return
    with db.transaction() as conn:
        if rows:
            types = {"width": pa.int32(), "height": pa.int32(), "n_bytes": pa.int64()}
            batch = pa.table({name: pa.array(column, types.get(name, pa.string()))
                              for name, column in zip(IMAGE_COLUMNS, zip(*rows))})
            conn.register("image_rows", batch)
            conn.execute(
                f"""INSERT INTO images ({', '.join(IMAGE_COLUMNS)}) SELECT * FROM image_rows
                   ON CONFLICT (dataset, image_id) DO UPDATE SET source_uri = excluded.source_uri,
                     label = excluded.label, attributes = excluded.attributes""")
            conn.unregister("image_rows")
        write_entries(conn, entry_rows)


def preview_sample(db: Database, dataset: str, k: int = 16) -> list[tuple[str, str]]:
    """Up to k (image_id, label) pairs spread over the labels: the first images of each, round-robin."""
    with db.connect() as conn:
        return conn.execute(
            """SELECT image_id, label FROM (
                 SELECT image_id, label, row_number() OVER (PARTITION BY label ORDER BY image_id) AS r FROM images WHERE dataset = ?)
               ORDER BY r, label LIMIT ?""",
            [dataset, k],
        ).fetchall()


def attribute_matrix(image_ids: Sequence[str], attributes: Sequence[str | dict | None], columns: Sequence[str]) -> np.ndarray:
    """(N, C) float64 of the named numeric columns of each image's `images.attributes` (JSON); NaN where an
    image lacks one (callers decide whether that is allowed). A value that is not a number is named."""
    out = np.full((len(image_ids), len(columns)), np.nan)
    for n, (image_id, raw) in enumerate(zip(image_ids, attributes)):
        values = json.loads(raw) if isinstance(raw, str) else (raw or {})
        for j, column in enumerate(columns):
            if values.get(column) is None:
                continue
            try:
                out[n, j] = float(values[column])
            except (TypeError, ValueError):
                raise UserError(f"image {image_id} has {column}={values[column]!r}, not a number; the dataset's "
                                f"manifest needs a numeric column {column!r}") from None
    return out
