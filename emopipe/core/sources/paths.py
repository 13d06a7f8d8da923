"""Where a dataset's files are: catalog paths resolved from the catalog file's folder, folders inside an
archive, and the lock two processes take before writing the same download."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from emopipe.catalog import DatasetSpec
from emopipe.core.download import SourceError


def catalog_path(value: str, spec: DatasetSpec) -> Path:
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (Path(spec.origin).parent if spec.origin else Path.cwd()) / path
    return Path(os.path.abspath(path))


def relative_inside(value: str, where: str) -> list[str]:
    parts = [p for p in value.replace("\\", "/").split("/") if p not in ("", ".")]
    if value.startswith("/") or ".." in parts:
        raise SourceError(f"{where}: {value!r} must be a folder inside the archive (relative, no '..')")
    return parts


@contextmanager
def locked(path: Path):
    """An exclusive lock between processes (two runs must not write the same .part file)."""
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
