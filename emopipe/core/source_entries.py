"""What each source entry was when the ingest last read it, so that a re-run reads only what changed.

A local file is known by (path, size, mtime_ns): while both are the same it is not opened again, and
its last outcome (an image with its sha256 and header facts, or a rejection with its reason) stands.
A file rewritten under the same path changes size or mtime, is read again, and gets its new image_id
(the old one leaves the dataset unless another entry still has those bytes). This is the rule make
and rsync use; a file rewritten with the same size within one mtime tick is not noticed.

A URL is known by the URL itself: an image is not downloaded again while its bytes are in the store.
A URL that failed for good (404, 403 and other HTTP errors, not an image, too large...) is not
retried on every run: the dataset key `retry_failed_urls: true` asks for it. A failure that was the
network's or a busy server's (timeout, dropped connection, 5xx or 429 after the download's own
retries) is not remembered, so the next run tries that URL again.

A synthetic image is a pure function of its URI and the generator's code: it is known by the URI and
synthetic.RENDER_VERSION (kept in the mtime_ns column), so the demo's re-run renders nothing.

Parquet rows are pinned by their file's sha256 and always read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa

from emopipe.core.download import is_http_url
from emopipe.core.sources import SourceItem
from emopipe.core.synthetic import RENDER_VERSION, SCHEME as SYNTHETIC_SCHEME

ENTRY_COLUMNS = ("dataset", "source_uri", "size", "mtime_ns", "image_id", "width", "height", "format",
                 "n_bytes", "reason", "detail")
_TYPES = {"size": pa.int64(), "mtime_ns": pa.int64(), "width": pa.int32(), "height": pa.int32(), "n_bytes": pa.int64()}


class Outcome(NamedTuple):
    """What one entry turned out to be: an image (image_id and header facts) or a rejection. A named
    tuple: 100k of them are made from rows at each ingest, 3x faster than a frozen dataclass."""

    image_id: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    n_bytes: int | None = None
    reason: str | None = None
    detail: str | None = None
    transient: bool = False  # a failure to try again on the next run (not stored)


STORED = ("image_id", "width", "height", "format", "n_bytes", "reason", "detail")


class SourceEntries:
    """The dataset's entries as last read, and the entries read in this run (to be written)."""

    def __init__(self, dataset: str, last: dict[str, tuple], objects_root: Path, retry_failed_urls: bool):
        self.dataset = dataset
        self.last = last  # uri -> (size, mtime_ns, Outcome)
        self.objects_root = Path(objects_root)
        self.retry_failed_urls = retry_failed_urls
        self.stats: dict[str, tuple[int, int]] = {}  # uri -> (size, mtime_ns) taken before it was read
        self._stored_ids: set[str] | None = None  # the object store's content, listed when first needed

    @classmethod
    def load(cls, conn, dataset: str, objects_root: Path, retry_failed_urls: bool = False) -> "SourceEntries":
        fields = ", ".join(STORED)
        formats: dict[str, str] = {}  # one str object per format, not one per row
        result = conn.execute(f"SELECT source_uri, size, mtime_ns, {fields} FROM source_entries WHERE dataset = ?", [dataset])
        last = {row[0]: (row[1], row[2], Outcome(row[3], row[4], row[5], formats.setdefault(row[6], row[6]), *row[7:]))
                for rows in iter(lambda: result.fetchmany(10_000), []) for row in rows}  # chunks: no list of every row
        # Databases from before this table: a URL that is an image is known from its `images` row.
        for uri, *facts in conn.execute(
                """SELECT source_uri, image_id, width, height, format, n_bytes FROM images
                   WHERE dataset = ? AND regexp_matches(source_uri, '^https?://')""", [dataset]).fetchall():
            last.setdefault(uri, (None, None, Outcome(*facts)))
        return cls(dataset, last, objects_root, retry_failed_urls)

    def known(self, item: SourceItem) -> Outcome | None:
        """The entry's outcome from the last read if it still holds (nothing to read), else None."""
        uri = item.uri
        if not os.path.isabs(uri):  # checked first: urlsplit per local path cost more than its stat
            if uri.startswith(SYNTHETIC_SCHEME):
                return self._known_synthetic(uri)
            return self._known_url(uri) if is_http_url(uri) else None
        try:
            st = os.stat(uri)
        except OSError:
            return None  # gone or unreadable: the fetch says which
        size, mtime_ns, outcome = self.last.get(uri, (None, None, None))
        if outcome is not None and (size, mtime_ns) == (st.st_size, st.st_mtime_ns) and self._still_stored(outcome):
            return outcome
        self.stats[uri] = (st.st_size, st.st_mtime_ns)  # kept for the entries to be read only
        return None

    def _known_synthetic(self, uri: str) -> Outcome | None:
        _, version, outcome = self.last.get(uri, (None, None, None))
        if outcome is not None and version == RENDER_VERSION and self._still_stored(outcome):
            return outcome
        self.stats[uri] = (None, RENDER_VERSION)
        return None

    def _known_url(self, uri: str) -> Outcome | None:
        _, _, outcome = self.last.get(uri, (None, None, None))
        if outcome is None:
            return None
        if outcome.reason is not None and self.retry_failed_urls:
            return None
        return outcome if self._still_stored(outcome) else None

    def _still_stored(self, outcome: Outcome) -> bool:
        if outcome.image_id is None:
            return True
        if self._stored_ids is None:
            # One listing of the store instead of a stat per entry (10k entries: 10 ms, not 150 ms).
            self._stored_ids = {name for folder in _subfolders(self.objects_root) for name in os.listdir(folder)}
        return outcome.image_id in self._stored_ids

    def rows(self, read: list[tuple[str, Outcome]]) -> pa.Table:
        """`source_entries` rows for entries read in this run, as an Arrow table."""
        values = []
        for uri, o in read:
            if o.transient:
                continue
            size, mtime_ns = self.stats.get(uri, (None, None))
            values.append((self.dataset, uri, size, mtime_ns, o.image_id, o.width, o.height, o.format, o.n_bytes,
                           o.reason, o.detail))
        columns = zip(*values) if values else [[]] * len(ENTRY_COLUMNS)
        return pa.table({name: pa.array(column, _TYPES.get(name, pa.string())) for name, column in zip(ENTRY_COLUMNS, columns)})


def _subfolders(objects_root: Path) -> list[str]:
    """The object store's <id[:2]> folders (see emopipe.paths.object_path)."""
    try:
        return [entry.path for entry in os.scandir(objects_root) if entry.is_dir() and len(entry.name) == 2]
    except FileNotFoundError:
        return []


def write_entries(conn, rows: pa.Table) -> None:
    """Upsert the rows (one statement from Arrow) inside the caller's transaction."""
    if not rows.num_rows:
        return
    conn.register("entry_rows", rows)
    conn.execute(f"INSERT OR REPLACE INTO source_entries ({', '.join(ENTRY_COLUMNS)}) SELECT * FROM entry_rows")
    conn.unregister("entry_rows")


def forget_unlisted(conn, dataset: str, listed: pa.Table) -> None:
    """Drop the entries of files and URLs that left the listing (`listed` has a source_uri column)."""
    conn.register("listed_uris", listed)
    conn.execute("DELETE FROM source_entries WHERE dataset = ? AND source_uri NOT IN (SELECT source_uri FROM listed_uris)",
                 [dataset])
    conn.unregister("listed_uris")
