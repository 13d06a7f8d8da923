"""The DuckDB database: schema (the contract tables plus their bookkeeping) and short-lived connections.

DuckDB lets one process hold the file read-write at a time, and Dagster runs steps (and whole runs)
in parallel processes. So no stage keeps a connection while it computes: it connects, reads or
writes inside one transaction, and disconnects. Opening retries while another process holds the
lock, so two runs at once wait for each other instead of failing.
"""

from __future__ import annotations

import os
import random
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import duckdb

# Keep python_enable_replacements off: otherwise a missing table is looked up among Python
# variables and reported as a confusing object error.
CONNECTION_CONFIG = {"python_enable_replacements": False}

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    image_id VARCHAR NOT NULL,          -- sha256 of the file's bytes
    dataset VARCHAR NOT NULL,
    source_uri VARCHAR NOT NULL,        -- path or URL the bytes came from (first seen)
    label VARCHAR,                      -- after the dataset's class_map
    width INTEGER, height INTEGER, format VARCHAR, n_bytes BIGINT,
    attributes JSON,                    -- extra manifest columns (valence, vote shares, official split...)
    ingested_at TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (dataset, image_id)
);
CREATE TABLE IF NOT EXISTS rejected (
    dataset VARCHAR NOT NULL, source_uri VARCHAR NOT NULL, reason VARCHAR NOT NULL, detail VARCHAR,
    rejected_at TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (dataset, source_uri)
);
CREATE TABLE IF NOT EXISTS duplicates (
    dataset VARCHAR NOT NULL, source_uri VARCHAR NOT NULL, image_id VARCHAR NOT NULL, label VARCHAR,
    kept_source_uri VARCHAR, label_conflict BOOLEAN,
    PRIMARY KEY (dataset, source_uri)
);
CREATE TABLE IF NOT EXISTS source_entries (  -- what each entry was when last read (core/source_entries.py)
    dataset VARCHAR NOT NULL, source_uri VARCHAR NOT NULL,
    size BIGINT, mtime_ns BIGINT,       -- a local file's stat before it was read; NULL for a URL
    image_id VARCHAR, width INTEGER, height INTEGER, format VARCHAR, n_bytes BIGINT,  -- an image ...
    reason VARCHAR, detail VARCHAR,     -- ... or why it was rejected
    read_at TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (dataset, source_uri)
);
CREATE TABLE IF NOT EXISTS resized (
    image_id VARCHAR NOT NULL, size INTEGER NOT NULL, method VARCHAR NOT NULL,
    shard VARCHAR NOT NULL, row INTEGER NOT NULL,     -- row of the packed uint8 array in shard
    PRIMARY KEY (image_id, size, method)
);
CREATE TABLE IF NOT EXISTS perceptual_hashes (  -- 64-bit pHash of each image's 32 px array (core/perceptual_hashes.py)
    image_id VARCHAR NOT NULL PRIMARY KEY, phash UBIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS ocr_results (
    image_id VARCHAR NOT NULL, engine VARCHAR NOT NULL,   -- engine: EasyOCR version + input size
    boxes JSON, error VARCHAR, seconds DOUBLE,
    PRIMARY KEY (image_id, engine)
);
CREATE TABLE IF NOT EXISTS text_scores (
    image_id VARCHAR NOT NULL, params_hash VARCHAR NOT NULL,
    has_text BOOLEAN,                   -- NULL: the image could not be read (see reason)
    n_boxes INTEGER, best_confidence DOUBLE, text_area DOUBLE, text VARCHAR, reason VARCHAR,
    PRIMARY KEY (image_id, params_hash)
);
CREATE TABLE IF NOT EXISTS filter_runs (
    filter_id VARCHAR NOT NULL, experiment VARCHAR NOT NULL, dataset VARCHAR NOT NULL,
    text_filter BOOLEAN, params_hash VARCHAR, params JSON, input_fingerprint VARCHAR,
    n_input INTEGER, n_kept INTEGER, n_removed INTEGER, n_unreadable INTEGER,
    created_at TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (filter_id, experiment)
);
CREATE TABLE IF NOT EXISTS filtered_images (
    filter_id VARCHAR NOT NULL, image_id VARCHAR NOT NULL,
    PRIMARY KEY (filter_id, image_id)
);
-- No primary key: its index made writing a 1M-image split ~4 s instead of ~0.3 s. make_split writes a
-- split_id's rows once (it checks first), and split_is_sound checks one row per image.
-- image_id uncompressed: a sha256 in hex is 4 bits of entropy per character, so DuckDB's string compression
-- (dict_fsst) only halves it (1M rows: 34 instead of 65 MB) and cost 0.27 of the write's 0.35 s; uncompressed the
-- write took 0.20 s and reading the rows back no longer (measured on 1M rows, AMD EPYC, 2 cores). Files made
-- before keep their compression.
CREATE TABLE IF NOT EXISTS splits (
    split_id VARCHAR NOT NULL, image_id VARCHAR NOT NULL USING COMPRESSION uncompressed, part VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS split_runs (
    split_id VARCHAR NOT NULL, experiment VARCHAR NOT NULL, dataset VARCHAR NOT NULL,
    scheme VARCHAR, ratios JSON, seed INTEGER, filter_id VARCHAR, filter_params_hash VARCHAR,
    input_fingerprint VARCHAR, counts JSON, fingerprint VARCHAR,
    created_at TIMESTAMP DEFAULT current_timestamp,
    notes JSON,                         -- why a class has no image in a part (core/splits.py); NULL: made before
    PRIMARY KEY (split_id, experiment)
);
-- Database files made before split_runs.notes existed get the column (last, as in a new file).
ALTER TABLE split_runs ADD COLUMN IF NOT EXISTS notes JSON;
CREATE TABLE IF NOT EXISTS models (
    model_id VARCHAR NOT NULL,          -- sha256 of the checkpoint file
    experiment VARCHAR NOT NULL, split_id VARCHAR NOT NULL, split_fingerprint VARCHAR,
    architecture VARCHAR, hyperparameters JSON, classes JSON, epochs_run INTEGER, best_epoch INTEGER,
    history JSON, device VARCHAR, versions JSON, code_version VARCHAR,
    wall_seconds DOUBLE, images_per_second DOUBLE, checkpoint_path VARCHAR,
    created_at TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (model_id, experiment)
);
CREATE TABLE IF NOT EXISTS metrics (
    experiment VARCHAR NOT NULL, model_id VARCHAR NOT NULL, split_id VARCHAR NOT NULL,
    dataset VARCHAR NOT NULL, part VARCHAR NOT NULL, metric VARCHAR NOT NULL, class VARCHAR,
    value DOUBLE, ci_low DOUBLE, ci_high DOUBLE, n INTEGER,
    created_at TIMESTAMP DEFAULT current_timestamp
);
CREATE TABLE IF NOT EXISTS evaluation_inputs (  -- what each stored evaluation was computed from (core/evaluation.py)
    experiment VARCHAR NOT NULL, model_id VARCHAR NOT NULL, dataset VARCHAR NOT NULL, part VARCHAR NOT NULL,
    inputs_key VARCHAR NOT NULL, PRIMARY KEY (experiment, model_id, dataset, part)
);
CREATE TABLE IF NOT EXISTS predictions (
    model_id VARCHAR NOT NULL, dataset VARCHAR NOT NULL, image_id VARCHAR NOT NULL, part VARCHAR,
    label VARCHAR, predicted VARCHAR, scores JSON
);
"""

LOCK_WAIT_SECONDS = 600.0
_SCHEMA_READY: set[tuple[str, int]] = set()  # (database file, inode) whose schema this process created


class Database:
    """Opens short transactions on the emopipe DuckDB file, creating the schema on first use."""

    def __init__(self, path: str | Path, factory: Callable[[], ContextManager] | None = None):
        self.path = Path(path)
        self._factory = factory or self._open
        self._held: tuple[int, duckdb.DuckDBPyConnection] | None = None  # (thread, connection) of a session

    @classmethod
    def from_resource(cls, resource) -> "Database":
        """Wrap a dagster_duckdb.DuckDBResource (which already backs off briefly on the lock)."""
        return cls(resource.database, lambda: _retrying(resource.get_connection))

    @contextmanager
    def _open(self) -> Iterator[duckdb.DuckDBPyConnection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _retrying(lambda: _plain_connection(self.path)) as conn:
            yield conn

    @contextmanager
    def session(self) -> Iterator[None]:
        """Within it, this thread's connect() and transaction() calls share one connection: opening one
        costs ~13 ms of CPU, a dozen per step. For short runs of queries only: while it is open, other
        processes wait for the file."""
        if self._held is not None:
            yield
            return
        with self.connect() as conn:
            self._held = (threading.get_ident(), conn)
            try:
                yield
            finally:
                self._held = None

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        held = self._held
        if held is not None and held[0] == threading.get_ident():
            yield held[1]
            return
        with self._factory() as conn:
            # The DDL once per database file and process (it cost ~0.1 s a connection); a file made anew
            # at the same path (another inode) gets it again.
            key = (os.path.realpath(self.path), os.stat(self.path).st_ino)
            if key not in _SCHEMA_READY:
                conn.execute(SCHEMA)
                _SCHEMA_READY.add(key)
            yield conn

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """All writes inside commit together, or none do."""
        with self.connect() as conn:
            conn.begin()
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()


_SCRATCH: list[duckdb.DuckDBPyConnection] = []
_SCRATCH_LOCK = threading.Lock()


@contextmanager
def scratch() -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB connection for set logic on Arrow tables (temp tables and registered views
    are its own), closed afterwards. A cursor of one process-wide in-memory database: opening a fresh
    database costs ~12 ms of CPU, a cursor next to nothing."""
    with _SCRATCH_LOCK:
        if not _SCRATCH:
            _SCRATCH.append(duckdb.connect(":memory:", config=CONNECTION_CONFIG))
        conn = _SCRATCH[0].cursor()
    try:
        yield conn
    finally:
        conn.close()


@contextmanager
def _plain_connection(path: Path):
    conn = duckdb.connect(str(path), config=CONNECTION_CONFIG)
    try:
        yield conn
    finally:
        conn.close()


def _retrying(open_cm: Callable[[], ContextManager]):
    """Enter open_cm(), waiting with jittered backoff while another process holds the file lock."""
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    delay = 0.05
    while True:
        cm = open_cm()
        try:
            return _Entered(cm, cm.__enter__())
        except (duckdb.IOException, duckdb.ConnectionException) as e:
            if "lock" not in str(e).lower() or time.monotonic() > deadline:
                raise
        time.sleep(delay * (1 + random.random()))
        delay = min(delay * 2, 2.0)


class _Entered:
    """An already-entered context manager, so the retry loop can hand it back to a `with`."""

    def __init__(self, cm, value):
        self.cm, self.value = cm, value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)
