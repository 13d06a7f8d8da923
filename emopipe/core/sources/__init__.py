"""Dataset sources: list a dataset's items (path or URL, raw label, manifest attributes) and fetch
their bytes. Validation, storage and the tables are the ingest's (core/raw_images.py).

Source kinds (DatasetSpec.source):
- synthetic: the generated demo set (core/synthetic.py), URIs synthetic://...
- folder: class-per-subfolder under `path`, or a CSV manifest `labels` (path,label[,attributes]).
- archive: a zip/tar at `url`, verified by `sha256`, extracted once under the work dir, then read
  as a folder (`path`: a subfolder inside it; `labels`: a manifest inside it).
- url_list: a CSV url,label[,attributes], local (`labels`) or at `url`.
- emoset, parquet, emotic, webemo, emotion6: the released layouts of the studies' datasets (one module each);
  parquet items are rows, URIs parquet:<file>#<row group>:<row>.

One module per source kind; items.py holds what they share (SourceItem, Fetched, the rule that keeps
paths inside their dataset), fetch.py the fetching.

Relative `path` and `labels` (url_list) are read from the folder of the catalog file that
declared the dataset; a folder dataset's manifest is relative to its `path`.
"""

from __future__ import annotations

from pathlib import Path

from emopipe.catalog import DatasetSpec
from emopipe.core.download import SourceError
from emopipe.core.sources.archive import extracted_archive
from emopipe.core.sources.emoset import emoset_items
from emopipe.core.sources.emotic import emotic_items
from emopipe.core.sources.emotion6 import emotion6_items
from emopipe.core.sources.fetch import fetch_items
from emopipe.core.sources.folder import folder_items
from emopipe.core.sources.items import (OUTSIDE_DATASET, REJECT_DETAIL, REJECT_REASON, DatasetRoot, Fetched,
                                        SourceItem)
from emopipe.core.sources.parquet import parquet_items
from emopipe.core.sources.paths import catalog_path, relative_inside
from emopipe.core.sources.url_list import url_list_items
from emopipe.core.sources.webemo import webemo_items

__all__ = ["OUTSIDE_DATASET", "REJECT_DETAIL", "REJECT_REASON", "Fetched", "SourceError", "SourceItem", "catalog_path",
           "fetch_items", "list_items"]


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
        return folder_items(catalog_path(spec.path, spec), spec.labels, f"{where}.path")
    if spec.source == "archive":
        extracted = extracted_archive(spec, Path(work_dir))
        root = extracted.joinpath(*relative_inside(spec.path or "", f"{where}.path"))
        if not root.is_dir():
            top = sorted(p.name + "/" * p.is_dir() for p in extracted.iterdir())
            raise SourceError(f"{where}.path: {spec.path!r} is not a folder inside {spec.url}; its top level holds {', '.join(top[:10])}")
        return folder_items(root, spec.labels, f"{where}.path (inside {spec.url})", DatasetRoot(extracted))
    if spec.source == "url_list":
        return url_list_items(spec, where)
    if spec.source == "emoset":
        return emoset_items(catalog_path(spec.path, spec), f"{where}.path")
    if spec.source == "parquet":
        return parquet_items(spec, Path(work_dir), where, lambda value: catalog_path(value, spec))
    if spec.source == "emotic":
        root = catalog_path(spec.path, spec)
        return emotic_items(root, root / Path(spec.labels).expanduser(), where)
    if spec.source == "webemo":
        return webemo_items(catalog_path(spec.path, spec), where)
    if spec.source == "emotion6":
        return emotion6_items(catalog_path(spec.path, spec), where)
    raise SourceError(f"{where}.source: unknown source {spec.source!r}; allowed: synthetic, folder, archive, url_list, emoset, parquet, emotic, webemo, emotion6")
