"""Dataset sources: list a dataset's items (path or URL, raw label, manifest attributes) and fetch
their bytes. Validation, storage and the tables are the ingest's (core/raw_images.py).

Source kinds (DatasetSpec.source):
- synthetic: the generated demo set (core/synthetic.py), URIs synthetic://...
- folder: class-per-subfolder under `path`, or a CSV manifest `labels` (path,label[,attributes]).
- archive: a zip/tar at `url`, verified by `sha256`, extracted once under the work dir, then read
  as a folder (`path`: a subfolder inside it; `labels`: a manifest inside it).
- url_list: a CSV url,label[,attributes], local (`labels`) or at `url`.
- emoset, parquet, emotic, webemo: the released layouts of the studies' datasets
  (core/dataset_formats.py); parquet items are rows, URIs parquet:<file>#<row group>:<row>.

Relative `path` and `labels` (url_list) are read from the folder of the catalog file that
declared the dataset; a folder dataset's manifest is relative to its `path`.
"""

from __future__ import annotations

import csv
import fcntl
import io
import math
import os
import re
import shutil
import tempfile
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import urlsplit

from emopipe.catalog import DatasetSpec
from emopipe.core.download import (
    MAX_FETCH_BYTES,
    FetchFailed,
    SourceError,
    download_file,
    extract_archive,
    fetch_bytes,
    fetch_to_file,
    is_http_url,
)
from emopipe.core.source_items import DatasetRoot, SourceItem, outside, rejection

__all__ = ["Fetched", "SourceError", "SourceItem", "fetch_items", "list_items"]

URL_LIST_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class Fetched:
    item: SourceItem
    data: bytes | None  # None when it could not be fetched, or arrived as `file`
    reason: str | None  # http_404, http_error, timeout, connection_error, ssl_error, bad_url, too_large, missing_file, unreadable_file
    detail: str | None  # names the URL/file and what happened
    file: Path | None = None  # a download, streamed to a file the consumer owns (moves into the store or deletes)


def list_items(spec: DatasetSpec, work_dir: Path) -> list[SourceItem]:
    """Every item of the dataset, in a stable order; SourceError for a dataset-level mistake.

    `work_dir` (<data_dir>/sources/<dataset>) holds downloaded and extracted archives.
    """
    where = f"{spec.origin or 'catalog'}: datasets.{spec.name}"
    if spec.source == "synthetic":
        from emopipe.core import synthetic

        listing = synthetic.synthetic_listing(spec.n_per_class, spec.seed, spec.classes or synthetic.MIKELS)
        return [SourceItem(uri, label, dict(attributes)) for uri, label, attributes in listing]
    if spec.source == "folder":
        return _folder_items(_catalog_path(spec.path, spec), spec.labels, f"{where}.path")
    if spec.source == "archive":
        extracted = _extracted_archive(spec, Path(work_dir))
        root = extracted.joinpath(*_relative_inside(spec.path or "", f"{where}.path"))
        if not root.is_dir():
            top = sorted(p.name + "/" * p.is_dir() for p in extracted.iterdir())
            raise SourceError(f"{where}.path: {spec.path!r} is not a folder inside {spec.url}; its top level holds {', '.join(top[:10])}")
        return _folder_items(root, spec.labels, f"{where}.path (inside {spec.url})", DatasetRoot(extracted))
    if spec.source == "url_list":
        return _url_list_items(spec, where)
    if spec.source in ("emoset", "parquet", "emotic", "webemo"):
        from emopipe.core import dataset_formats as formats

        if spec.source == "emoset":
            return formats.emoset_items(_catalog_path(spec.path, spec), f"{where}.path")
        if spec.source == "parquet":
            return formats.parquet_items(spec, Path(work_dir), where, lambda value: _catalog_path(value, spec))
        if spec.source == "emotic":
            root = _catalog_path(spec.path, spec)
            return formats.emotic_items(root, root / Path(spec.labels).expanduser(), where)
        return formats.webemo_items(_catalog_path(spec.path, spec), where)
    raise SourceError(f"{where}.source: unknown source {spec.source!r}; allowed: synthetic, folder, archive, url_list, emoset, parquet, emotic, webemo")


def _catalog_path(value: str, spec: DatasetSpec) -> Path:
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (Path(spec.origin).parent if spec.origin else Path.cwd()) / path
    return Path(os.path.abspath(path))


def _relative_inside(value: str, where: str) -> list[str]:
    parts = [p for p in value.replace("\\", "/").split("/") if p not in ("", ".")]
    if value.startswith("/") or ".." in parts:
        raise SourceError(f"{where}: {value!r} must be a folder inside the archive (relative, no '..')")
    return parts


# --- folder -------------------------------------------------------------------------------------


def _folder_items(root: Path, labels: str | None, where: str, boundary: DatasetRoot | None = None) -> list[SourceItem]:
    """A class-per-subfolder tree or a manifest's rows; every path must resolve inside `boundary`
    (default: root itself), the others are `outside_dataset` rejections."""
    if not root.is_dir():
        raise SourceError(f"{where}: the folder {root} does not exist" if not root.exists() else f"{where}: {root} is not a folder")
    boundary = boundary or DatasetRoot(root)
    if labels:
        manifest = Path(labels).expanduser()
        manifest = manifest if manifest.is_absolute() else root / manifest
        return _manifest_items(DatasetRoot(root), manifest, boundary)
    items = []
    for path, escapes in _walk_files(root, boundary, where):
        if escapes:
            items.append(outside(str(path), str(path)))
            continue
        parts = path.relative_to(root).parts
        # A file directly under the root has no class folder: listed unlabelled so the ingest rejects it.
        items.append(SourceItem(str(path), parts[0] if len(parts) > 1 else None, {}))
    return items


def _walk_files(root: Path, boundary: DatasetRoot, where: str) -> Iterator[tuple[Path, bool]]:
    """(path, leaves the dataset) for every non-hidden file below root, sorted, following folder links
    once (no cycles). A link, to a file or a folder, that resolves outside the boundary is yielded as
    leaving it, and a folder link of that kind is not entered: nothing outside is listed or read."""

    def unreadable(error: OSError):
        raise SourceError(f"{where}: cannot read the folder {error.filename}: {error.strerror}")

    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        entered = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            folder = Path(dirpath, name)
            if os.path.islink(folder) and not boundary.holds(folder):
                yield folder, True
            else:
                entered.append(name)
        dirnames[:] = entered
        for name in sorted(filenames):
            if not name.startswith("."):
                path = Path(dirpath, name)
                yield path, os.path.islink(path) and not boundary.holds(path)


def _manifest_items(root: DatasetRoot, manifest: Path, boundary: DatasetRoot) -> list[SourceItem]:
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SourceError(f"{manifest}: the manifest does not exist; expected a CSV with the header path,label[,more columns]") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{manifest}: cannot read the manifest: {e}") from None

    def locate(value: str) -> str:
        path = root.join(value)
        if not boundary.holds(path):
            raise OutsideDataset(path)
        return path

    return _csv_items(text, str(manifest), "path", locate)


class OutsideDataset(Exception):
    """A manifest row names a path outside the dataset (the normalized path in args[0])."""


# --- url_list -----------------------------------------------------------------------------------


def _url_list_items(spec: DatasetSpec, where: str) -> list[SourceItem]:
    if spec.labels:
        path = _catalog_path(spec.labels, spec)
        try:
            text, name = path.read_text(encoding="utf-8-sig"), str(path)
        except FileNotFoundError:
            raise SourceError(f"{where}.labels: the URL list {path} does not exist; expected a CSV with the header url,label[,more columns]") from None
        except (OSError, UnicodeDecodeError) as e:
            raise SourceError(f"{where}.labels: cannot read the URL list {path}: {e}") from None
    else:
        if not is_http_url(spec.url or ""):
            raise SourceError(f"{where}.url: {spec.url!r} is not an http(s) URL")
        try:
            data = fetch_bytes(spec.url, timeout=120.0, max_bytes=URL_LIST_MAX_BYTES)
        except FetchFailed as f:
            raise SourceError(f"{where}.url: cannot download the URL list: {f.detail}") from None
        try:
            text, name = data.decode("utf-8-sig"), spec.url
        except UnicodeDecodeError as e:
            raise SourceError(f"{spec.url}: the URL list is not UTF-8 text: {e}") from None

    def checked(value: str) -> str:
        if not is_http_url(value):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value

    return _csv_items(text, name, "url", checked)


# --- CSV manifests ------------------------------------------------------------------------------


def _csv_items(text: str, name: str, key: str, locate) -> list[SourceItem]:
    """Items from a CSV with columns `key` (turned into a URI by `locate`) and label, others as attributes.

    A row whose path leaves the dataset (locate raises OutsideDataset) and a row that repeats an
    earlier one exactly are listed as rejections (`outside_dataset`, `repeated_row`), so every row
    is accounted for; rows naming the same URI with different values are a SourceError.
    """
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in (key, "label") if c not in header]
    if missing:
        raise SourceError(
            f"{name}: the header {','.join(header) or '(empty file)'} lacks the column(s) {', '.join(missing)}; "
            f"expected a CSV with the header {key},label[,more columns]"
        )
    key_col, label_col = header.index(key), header.index("label")
    extra = [(i, h) for i, h in enumerate(header) if i not in (key_col, label_col)]
    items: dict[str, tuple[int, SourceItem]] = {}
    rejections: list[SourceItem] = []
    conflicts = []
    for row in reader:
        line = reader.line_num
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if len(cells) > len(header):
            raise SourceError(f"{name}: line {line} has {len(cells)} fields but the header has {len(header)}")
        cells += [""] * (len(header) - len(cells))
        if not cells[key_col]:
            raise SourceError(f"{name}: line {line} has an empty {key!r}")
        try:
            uri = locate(cells[key_col])
            item = SourceItem(uri, cells[label_col] or None, {h: _parse_value(cells[i]) for i, h in extra})
        except OutsideDataset as e:
            uri, item = e.args[0], outside(e.args[0], cells[key_col])
        except ValueError as e:
            raise SourceError(f"{name}: line {line}: {e}") from None
        if uri in items:
            first_line, first = items[uri]
            if first != item:
                conflicts.append(f"lines {first_line} and {line} both name {uri} with different values")
            else:
                rejections.append(rejection(f"{name}#line={line}", "repeated_row", f"{name}: line {line} repeats line {first_line} ({uri})"))
            continue
        items[uri] = (line, item)
    if conflicts:
        more = f" (and {len(conflicts) - 3} more)" if len(conflicts) > 3 else ""
        raise SourceError(f"{name}: {'; '.join(conflicts[:3])}{more}; keep one row per {key}")
    return [item for _, item in items.values()] + rejections


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _parse_value(cell: str) -> str | int | float | None:
    """Numbers as numbers, empty as None; '007' stays a string (an id, not the number 7)."""
    if cell == "":
        return None
    if not _NUMBER.fullmatch(cell):
        return cell
    if re.fullmatch(r"[-+]?\d+", cell):
        return int(cell) if str(int(cell)) == cell.lstrip("+") else cell
    value = float(cell)
    return value if math.isfinite(value) else cell


# --- archive ------------------------------------------------------------------------------------


def _extracted_archive(spec: DatasetSpec, work_dir: Path) -> Path:
    """The archive's extraction folder, downloading and extracting it the first time.

    Keyed by the sha256, so a new checksum in the catalog means a fresh download. Extraction goes
    to a temp folder renamed into place, so a folder that exists is complete.
    """
    key = spec.sha256.lower()[:16]
    extracted = work_dir / f"archive-{key}"
    if extracted.is_dir():
        return extracted
    work_dir.mkdir(parents=True, exist_ok=True)
    with _locked(work_dir / ".lock"):
        if extracted.is_dir():  # another process finished it while we waited
            return extracted
        for stale in work_dir.glob(".extracting-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        archive = work_dir / f"archive-{key}.download"
        if not archive.exists():
            download_file(spec.url, archive, spec.sha256)
        tmp = Path(tempfile.mkdtemp(dir=work_dir, prefix=".extracting-"))
        try:
            extract_archive(archive, tmp, spec.url)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        tmp.chmod(0o755)  # mkdtemp makes it private; the extraction is ordinary data
        os.rename(tmp, extracted)
        archive.unlink()  # the extraction is complete; the archive would double the disk use
    return extracted


@contextmanager
def _locked(path: Path):
    """An exclusive lock between processes (two runs must not write the same .part file)."""
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- fetching -----------------------------------------------------------------------------------


def fetch_items(
    items: Iterable[SourceItem], workers: int = 16, timeout: float = 30.0, retries: int = 3,
    max_bytes: int = MAX_FETCH_BYTES, incoming: Path | None = None,
) -> Iterator[Fetched]:
    """Yield one Fetched per item, in completion order, from `workers` threads.

    At most 2 x workers items are in flight, so memory stays bounded however long the list. URLs
    stream to files in `incoming` (default: a temp folder) and retry 5xx, 429, timeouts and dropped
    connections with exponential backoff; a failure is a Fetched with a reason, never an exception.
    """
    incoming = Path(incoming) if incoming is not None else Path(tempfile.gettempdir())
    pending: set[Future] = set()
    todo = iter(items)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch")
    try:
        while True:
            for item in todo:
                pending.add(pool.submit(_fetch_one, item, timeout, retries, max_bytes, incoming))
                if len(pending) >= 2 * workers:
                    break
            if not pending:
                return
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
    finally:
        # A consumer that stops early does not wait for downloads it no longer wants.
        pool.shutdown(wait=False, cancel_futures=True)


def _fetch_one(item: SourceItem, timeout: float, retries: int, max_bytes: int, incoming: Path) -> Fetched:
    uri = item.uri
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        try:
            return Fetched(item, None, None, None, file=fetch_to_file(uri, incoming, timeout, retries, max_bytes))
        except FetchFailed as f:
            return Fetched(item, None, f.reason, f.detail)
    if scheme == "synthetic":
        from emopipe.core import synthetic

        return Fetched(item, synthetic.render(uri), None, None)
    if scheme == "parquet":
        from emopipe.core import dataset_formats

        return dataset_formats.fetch_parquet(item)
    if scheme or not os.path.isabs(uri):
        return Fetched(item, None, "bad_url", f"{uri}: neither an absolute path nor an http(s) URL")
    try:
        size = os.stat(uri).st_size
        if size > max_bytes:
            return Fetched(item, None, "too_large", f"{uri}: {size} bytes, over the limit of {max_bytes}")
        with open(uri, "rb") as f:
            return Fetched(item, f.read(), None, None)
    except FileNotFoundError:
        return Fetched(item, None, "missing_file", f"{uri}: no such file")
    except OSError as e:
        return Fetched(item, None, "unreadable_file", f"{uri}: {e.strerror or e}")
