"""parquet (the form Hugging Face mirrors use, e.g. datasets/Woleek/EmoSet-118K): local files or http(s)
URLs, read one row group at a time. `image_column` holds the bytes (the `datasets` Image struct
{bytes, path}, or plain binary); `label_column` an int (class names from `classes`, else from the
file's Hugging Face schema metadata) or a string. Other scalar columns are attributes. A file's part is
its `split` column, else taken from its name as Hugging Face does (train/validation/test as a folder or
a file-name prefix). URIs: parquet:<file>#<row group>:<row>."""

from __future__ import annotations

import glob
import hashlib
import json
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from emopipe.catalog import DatasetSpec
from emopipe.core.download import SourceError, download_file, is_http_url
from emopipe.core.sources.items import Fetched, SourceItem, part_from_name
from emopipe.core.sources.paths import locked
from emopipe.fingerprint import sha256_file

PARQUET_ROW_GROUPS_CACHED = 4


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
        part = None if "split" in kept else part_from_name(location)
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
    dest = download_path(location, sha256, work_dir)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with locked(dest.parent / ".lock"):
        if not dest.exists():
            # The checksum is optional for Parquet files: the images inside are content-addressed anyway.
            download_file(location, dest, sha256)
    return dest


def download_path(location: str, sha256: str | None, work_dir: Path) -> Path:
    """Where a Parquet file at an http(s) URL is kept once downloaded (its checksum, else its URL, names it)."""
    key = (sha256 or hashlib.sha256(location.encode()).hexdigest()).lower()[:16]
    return Path(work_dir) / f"parquet-{key}.parquet"


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


class _RowGroupCache:
    """The image column of the last few row groups read."""

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


class ParquetReader:
    """Reads the image bytes of a dataset's parquet:<file>#<group>:<row> items. Made from the dataset's
    spec, so fetching needs nothing the listing kept in memory: a local file is its own location, a
    downloaded one lies where the listing put it; the last few row groups read are shared by the fetch
    threads (items arrive in listing order) and memory stays bounded by PARQUET_ROW_GROUPS_CACHED."""

    def __init__(self, spec: DatasetSpec, work_dir: Path):
        self.spec, self.work_dir = spec, Path(work_dir)
        self.row_groups = _RowGroupCache(PARQUET_ROW_GROUPS_CACHED)
        self.checksums = {f.location: f.sha256 for f in spec.files}

    def local_file(self, location: str) -> Path:
        return download_path(location, self.checksums.get(location), self.work_dir) if is_http_url(location) else Path(location)

    def fetch(self, item: SourceItem) -> Fetched:
        location, _, position = item.uri.removeprefix("parquet:").rpartition("#")
        local = self.local_file(location)
        if not local.is_file():
            return Fetched(item, None, "missing_file", f"{item.uri}: {local} does not exist; list the dataset first")
        try:
            group, row = map(int, position.split(":"))
        except ValueError:
            return Fetched(item, None, "bad_url", f"{item.uri}: expected parquet:<file>#<row group>:<row>")
        try:
            data, path = self.row_groups.get(local, group, self.spec.image_column)[row]
        except IndexError:
            return Fetched(item, None, "bad_url", f"{item.uri}: no such row in {location}")
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            return Fetched(item, None, "unreadable_file", f"{item.uri}: {e}")
        if data is None:
            return Fetched(item, None, "missing_file", f"{item.uri}: the row holds no image bytes (path {path!r})")
        return Fetched(item, bytes(data), None, None)
