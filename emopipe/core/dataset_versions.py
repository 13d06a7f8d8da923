"""Cheap versions of the datasets that can change behind emopipe's back (folder, emotion6, url_list), and the
experiments a change affects. The new-data sensor (emopipe/automation.py) compares them tick by tick.

A folder's version comes from its listing (path, label, attributes, size, mtime of every item), so
checking costs one directory walk and a stat per file, never reading the images. A url_list's
version is the sha256 of its CSV; the images behind the URLs are not fetched to check them.
Synthetic datasets never change; an archive is pinned by the sha256 in the catalog.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from emopipe.catalog import Catalog, DatasetSpec
from emopipe.core.download import FetchFailed, SourceError, fetch_bytes, is_http_url
from emopipe.core.sources import catalog_path, list_items
from emopipe.errors import UserError
from emopipe.fingerprint import rows_fingerprint, sha256_bytes, sha256_file

# emotion6: its folder plus ground_truth.txt, versioned by its listing as a folder is (ratings are attributes).
OBSERVED_SOURCES = ("folder", "url_list", "emotion6")


def observed_datasets(catalog: Catalog) -> list[str]:
    """The folder and url_list datasets that some experiment trains or evaluates on, sorted."""
    used = {name for exp in catalog.experiments.values() for name in exp.datasets}
    return sorted(n for n in used if catalog.dataset(n).source in OBSERVED_SOURCES)


def dataset_version(spec: DatasetSpec, timeout: float = 20.0) -> str:
    """The dataset's current version; SourceError when it cannot be read (folder gone, URL down)."""
    if spec.source in ("folder", "emotion6"):
        # A folder listing never touches the work dir (only archives are downloaded there).
        items = list_items(spec, work_dir=Path("."))
        return rows_fingerprint((i.uri, i.label, json.dumps(i.attributes, sort_keys=True), *_size_mtime(i.uri)) for i in items)
    if spec.source == "url_list":
        where = f"{spec.origin or 'catalog'}: datasets.{spec.name}"
        if spec.labels:
            path = catalog_path(spec.labels, spec)  # resolved exactly as the ingest resolves it
            try:
                return sha256_file(path)
            except OSError as e:
                raise SourceError(f"{where}.labels: cannot read the URL list {path}: {e.strerror or e}") from None
        if not is_http_url(spec.url or ""):
            raise SourceError(f"{where}.url: {spec.url!r} is not an http(s) URL")
        try:
            return sha256_bytes(fetch_bytes(spec.url, timeout=timeout, retries=1, max_bytes=1 << 30))
        except FetchFailed as f:
            raise SourceError(f"{where}.url: cannot download the URL list: {f.detail}") from None
    raise ValueError(f"{spec.name}: {spec.source} datasets are not observed; observed sources: {', '.join(OBSERVED_SOURCES)}")


def _size_mtime(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:  # a manifest row naming a missing file: the ingest rejects it, the version notes it
        return -1, -1
    return st.st_size, st.st_mtime_ns


def affected_experiments(catalog: Catalog, datasets: Iterable[str]) -> list[str]:
    """Experiments that train or evaluate on any of `datasets`, sorted."""
    changed = set(datasets)
    return sorted(name for name, exp in catalog.experiments.items() if changed & set(exp.datasets))


@dataclass(frozen=True)
class Observation:
    """One look at the observed datasets, compared with the previous look (the sensor's cursor)."""

    cursor: str  # JSON {"versions": {dataset: version}, "changes": n}: n counts the looks that found a change
    changed: dict[str, list[str]]  # experiment -> its datasets that changed since the previous look
    run_keys: dict[str, str]  # experiment -> a key unique to this change (stable if the look is repeated)
    recorded: list[str] = field(default_factory=list)  # datasets seen for the first time: recorded, no run
    errors: dict[str, str] = field(default_factory=dict)  # known dataset -> why it could not be read (version kept)
    unavailable: list[str] = field(default_factory=list)  # never read yet (e.g. a seed dataset not downloaded)


def observe(catalog: Catalog, cursor: str | None, timeout: float = 20.0) -> Observation:
    """Version every observed dataset and say which experiments must run again.

    A dataset seen for the first time (the very first look, or a dataset new in the catalog) is only
    recorded: its experiments may never have run, and a daemon start must not retrain everything.
    A dataset that cannot be read keeps its previous version, so it counts as changed only once it
    can be read again and differs.
    """
    state = json.loads(cursor) if cursor else {"versions": {}, "changes": 0}
    previous: dict[str, str] = state["versions"]
    versions, errors, unavailable, recorded, changed_sets = {}, {}, [], [], []
    for name in observed_datasets(catalog):
        try:
            versions[name] = dataset_version(catalog.dataset(name), timeout)
        except UserError as e:
            if name in previous:
                errors[name], versions[name] = str(e), previous[name]
            else:
                unavailable.append(name)
            continue
        if name not in previous:
            recorded.append(name)
        elif previous[name] != versions[name]:
            changed_sets.append(name)
    changes = state["changes"] + bool(changed_sets)
    changed, run_keys = {}, {}
    for exp in affected_experiments(catalog, changed_sets):
        changed[exp] = [d for d in catalog.experiments[exp].datasets if d in changed_sets]
        # The change count makes the key unique even when a dataset returns to an earlier version;
        # a look repeated from the same cursor (a daemon restart mid-tick) gives the same key.
        digest = rows_fingerprint((d, versions[d]) for d in changed[exp])[:16]
        run_keys[exp] = f"{exp}:change-{changes}:{digest}"
    new_cursor = json.dumps({"versions": versions, "changes": changes}, sort_keys=True)
    return Observation(new_cursor, changed, run_keys, recorded, errors, unavailable)
