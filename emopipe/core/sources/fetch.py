"""Fetching the listed items' bytes: many at once from a thread pool, with a bounded number in flight;
a failure is a Fetched with a reason, never an exception."""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import urlsplit

from emopipe.catalog import DatasetSpec
from emopipe.concurrency import bounded_map
from emopipe.core.download import MAX_FETCH_BYTES, FetchFailed, fetch_to_file
from emopipe.core.sources.items import Fetched, SourceItem
from emopipe.core.sources.parquet import ParquetReader


def fetch_items(
    items: Iterable[SourceItem], workers: int = 16, timeout: float = 30.0, retries: int = 3,
    max_bytes: int = MAX_FETCH_BYTES, incoming: Path | None = None, spec: DatasetSpec | None = None,
    work_dir: Path | None = None,
) -> Iterator[Fetched]:
    """Yield one Fetched per item, in completion order, from `workers` threads.

    At most 2 x workers items are in flight, so memory stays bounded however long the list. URLs
    stream to files in `incoming` (default: a temp folder) and retry 5xx, 429, timeouts and dropped
    connections with exponential backoff; a failure is a Fetched with a reason, never an exception.
    Parquet rows are read through the dataset's `spec` and `work_dir` (where the listing put them).
    """
    incoming = Path(incoming) if incoming is not None else Path(tempfile.gettempdir())
    parquet = ParquetReader(spec, work_dir) if spec is not None and spec.source == "parquet" else None
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch")
    try:
        yield from bounded_map(pool, lambda item: _fetch_one(item, timeout, retries, max_bytes, incoming, parquet),
                               items, in_flight=2 * workers, ordered=False)
    finally:
        # A consumer that stops early does not wait for downloads it no longer wants.
        pool.shutdown(wait=False, cancel_futures=True)


def _fetch_one(item: SourceItem, timeout: float, retries: int, max_bytes: int, incoming: Path, parquet) -> Fetched:
    uri = item.uri
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        try:
            return Fetched(item, None, None, None, file=fetch_to_file(uri, incoming, timeout, retries, max_bytes))
        except FetchFailed as f:
            return Fetched(item, None, f.reason, f.detail, transient=f.retryable)
    if scheme == "synthetic":
        from emopipe.core import synthetic

        return Fetched(item, synthetic.render(uri), None, None)
    if scheme == "parquet":
        if parquet is None:
            return Fetched(item, None, "bad_url", f"{uri}: a parquet row is fetched with its dataset's spec")
        return parquet.fetch(item)
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
