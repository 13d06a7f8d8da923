"""folder: class-per-subfolder under `path`, or a CSV manifest `labels` (path,label[,attributes]); every
path must resolve inside the dataset's folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from emopipe.core.download import SourceError
from emopipe.core.sources.items import DatasetRoot, SourceItem, outside, read_listing
from emopipe.core.sources.manifest import OutsideDataset, csv_items


def folder_items(root: Path, labels: str | None, where: str, boundary: DatasetRoot | None = None) -> list[SourceItem]:
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
    prefix = len(os.path.join(str(root), ""))
    for path, escapes in _walk_files(root, boundary, where):
        if escapes:
            items.append(outside(path, path))
            continue
        parts = path[prefix:].split(os.sep)
        # A file directly under the root has no class folder: listed unlabelled so the ingest rejects it.
        items.append(SourceItem(path, parts[0] if len(parts) > 1 else None, {}))
    return items


def _walk_files(root: Path, boundary: DatasetRoot, where: str) -> Iterator[tuple[str, bool]]:
    """(path, leaves the dataset) for every non-hidden file below root, sorted, following folder links
    once (no cycles). A link, to a file or a folder, that resolves outside the boundary is yielded as
    leaving it, and a folder link of that kind is not entered: nothing outside is listed or read.
    Paths are strings: a Path per file cost more than the walk itself at 100k files."""

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
            folder = os.path.join(dirpath, name)
            if os.path.islink(folder) and not boundary.holds(folder):
                yield folder, True
            else:
                entered.append(name)
        dirnames[:] = entered
        for name in sorted(filenames):
            if not name.startswith("."):
                path = os.path.join(dirpath, name)
                yield path, os.path.islink(path) and not boundary.holds(path)


def _manifest_items(root: DatasetRoot, manifest: Path, boundary: DatasetRoot) -> list[SourceItem]:
    text = read_listing(manifest, "the manifest does not exist; expected a CSV with the header path,label[,more columns]", "the manifest")

    def locate(value: str) -> str:
        path = root.join(value)
        if not boundary.holds(path):
            raise OutsideDataset(path)
        return path

    return csv_items(text, str(manifest), "path", locate)
