"""What a dataset source lists and fetches: items (a path or URL, a raw label, attributes), rejections
the listing already knows about, fetched bytes, and the rule that keeps a dataset's paths inside it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from emopipe.core.download import SourceError

# Attributes of an item the listing already rejects (label None): the ingest stores a `rejected` row.
REJECT_REASON = "reject_reason"
REJECT_DETAIL = "reject_detail"
OUTSIDE_DATASET = "outside_dataset"


@dataclass(frozen=True, slots=True)  # slots: a listing holds one per file, 100k+ of them
class SourceItem:
    uri: str  # absolute local path or URL, unique within a listing
    label: str | None  # the raw label; the ingest applies class_map
    attributes: dict = field(default_factory=dict)  # extra manifest columns (numbers parsed)


def rejection(uri: str, reason: str, detail: str) -> SourceItem:
    return SourceItem(uri, None, {REJECT_REASON: reason, REJECT_DETAIL: detail})


def outside(uri: str, written: str) -> SourceItem:
    """A path that leaves its dataset: rejected with the path as written, never opened."""
    return rejection(uri, OUTSIDE_DATASET, written)


@dataclass(frozen=True)
class Fetched:
    item: SourceItem
    data: bytes | None  # None when it could not be fetched, or arrived as `file`
    reason: str | None  # http_404, http_error, timeout, connection_error, ssl_error, bad_url, too_large, missing_file, unreadable_file
    detail: str | None  # names the URL/file and what happened
    file: Path | None = None  # a download, streamed to a file the consumer owns (moves into the store or deletes)
    transient: bool = False  # the failure was the network's or a busy server's (timeout, 5xx, 429): try again later


class DatasetRoot:
    """The folder a dataset's paths must stay in, symlinks resolved.

    A manifest row, a JSON entry or a symlink can name any file on the machine; a downloaded
    archive could use that to make the ingest read (and store, and quote) local files. So every
    local path a source yields is resolved with os.path.realpath (which follows every link) and
    must lie under the resolved root; links that stay inside keep working.
    """

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.real = os.path.realpath(root)

    def holds(self, path: str | Path) -> bool:
        real = os.path.realpath(path)
        return real == self.real or real.startswith(os.path.join(self.real, ""))

    def join(self, written: str) -> str:
        """The absolute, normalized path of `written` (relative to the root, or absolute)."""
        return os.path.normpath(os.path.join(self.root, os.path.expanduser(written)))


PARTS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def read_listing(path: Path, missing: str, what: str) -> str:
    """A listing file's text (a BOM dropped); SourceError naming the file when it is missing ("<path>: <missing>")
    or unreadable ("<path>: cannot read <what>: ...")."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SourceError(f"{path}: {missing}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read {what}: {e}") from None


def part_from_name(location: str) -> str | None:
    """train/val/test from a file-name prefix (`train-00000-of-00001.parquet`, `train25.txt`) or the
    name of the file's folder (`default/validation/0000.parquet`), as Hugging Face assigns splits."""
    *_, folder, name = ["", *re.split(r"[/\\]", location.split("?")[0])]
    found = re.match(r"(train|validation|valid|val|test)([-_.\d]|$)", name.lower())
    word = found.group(1) if found else folder.lower()
    return PARTS.get(word)
