"""url_list: a CSV url,label[,attributes], local (`labels`) or downloaded from `url`."""

from __future__ import annotations

from emopipe.catalog import DatasetSpec
from emopipe.core.download import FetchFailed, SourceError, fetch_bytes, is_http_url
from emopipe.core.sources.items import SourceItem
from emopipe.core.sources.manifest import csv_items
from emopipe.core.sources.paths import catalog_path

URL_LIST_MAX_BYTES = 1 << 30


def url_list_items(spec: DatasetSpec, where: str) -> list[SourceItem]:
    if spec.labels:
        path = catalog_path(spec.labels, spec)
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

    return csv_items(text, name, "url", checked)
