"""Content fingerprints: sha256 of files, and of sorted rows (the Dagster data versions)."""

import hashlib
import json
from pathlib import Path
from typing import Iterable


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def rows_fingerprint(rows: Iterable[tuple]) -> str:
    """sha256 over the sorted rows, one tab-joined line each (None written as empty)."""
    h = hashlib.sha256()
    for row in sorted(tuple("" if v is None else str(v) for v in r) for r in rows):
        h.update(("\t".join(row) + "\n").encode())
    return h.hexdigest()


def params_hash(params: dict) -> str:
    """Short stable hash of a parameter dict (keys sorted), used in cache keys."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]
