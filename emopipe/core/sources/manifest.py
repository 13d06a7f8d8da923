"""CSV manifests (a folder's `labels`, a url_list): one item per row, the other columns kept as
attributes with numbers parsed, and every row accounted for."""

from __future__ import annotations

import csv
import io
import math
import re

from emopipe.core.download import SourceError
from emopipe.core.sources.items import SourceItem, outside, rejection


class OutsideDataset(Exception):
    """A manifest row names a path outside the dataset (the normalized path in args[0])."""


def csv_items(text: str, name: str, key: str, locate) -> list[SourceItem]:
    """Items from a CSV with columns `key` (turned into a URI by `locate`) and label, others as attributes.

    A row whose path leaves the dataset (locate raises OutsideDataset) and a row that repeats an
    earlier one exactly are listed as rejections (`outside_dataset`, `repeated_row`), so every row
    is accounted for; rows naming the same URI with different values are a SourceError.
    """
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in (key, "label") if c not in header]
    if missing:
        raise SourceError(
            f"{name}: the header {','.join(header) or '(empty file)'} lacks the column(s) {', '.join(missing)}; "
            f"expected a CSV with the header {key},label[,more columns]"
        )
    key_col, label_col = header.index(key), header.index("label")
    extra = [(i, h) for i, h in enumerate(header) if i not in (key_col, label_col)]
    items: dict[str, tuple[int, SourceItem]] = {}
    rejections: list[SourceItem] = []
    conflicts = []
    for row in reader:
        line = reader.line_num
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if len(cells) > len(header):
            raise SourceError(f"{name}: line {line} has {len(cells)} fields but the header has {len(header)}")
        cells += [""] * (len(header) - len(cells))
        if not cells[key_col]:
            raise SourceError(f"{name}: line {line} has an empty {key!r}")
        try:
            uri = locate(cells[key_col])
            item = SourceItem(uri, cells[label_col] or None, {h: parse_value(cells[i]) for i, h in extra})
        except OutsideDataset as e:
            uri, item = e.args[0], outside(e.args[0], cells[key_col])
        except ValueError as e:
            raise SourceError(f"{name}: line {line}: {e}") from None
        if uri in items:
            first_line, first = items[uri]
            if first != item:
                conflicts.append(f"lines {first_line} and {line} both name {uri} with different values")
            else:
                rejections.append(rejection(f"{name}#line={line}", "repeated_row", f"{name}: line {line} repeats line {first_line} ({uri})"))
            continue
        items[uri] = (line, item)
    if conflicts:
        more = f" (and {len(conflicts) - 3} more)" if len(conflicts) > 3 else ""
        raise SourceError(f"{name}: {'; '.join(conflicts[:3])}{more}; keep one row per {key}")
    return [item for _, item in items.values()] + rejections


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse_value(cell: str) -> str | int | float | None:
    """Numbers as numbers, empty as None; '007' stays a string (an id, not the number 7)."""
    if cell == "":
        return None
    if not _NUMBER.fullmatch(cell):
        return cell
    if re.fullmatch(r"[-+]?\d+", cell):
        return int(cell) if str(int(cell)) == cell.lstrip("+") else cell
    value = float(cell)
    return value if math.isfinite(value) else cell
