"""emotion6 (Emotion6, Peng et al., CVPR 2015; release: images/<emotion>/<n>.jpg and ground_truth.txt, tab-separated,
one row per image: its path under images/, valence and arousal on the 1-9 scale and the share of the raters who
chose each of the 7 categories, neutral included): `path` is the folder holding both. Label: the image's folder (the
annotated category); attributes valence, arousal (1-9, as released) and prob_anger ... prob_neutral."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

from emopipe.core.download import SourceError
from emopipe.core.sources.items import DatasetRoot, SourceItem, outside, read_listing, rejection

EMOTION6_CATEGORIES = ("anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral")
EMOTION6_HEADER = ("[image_filename]", "[valence]", "[arousal]", *(f"[prob. {c}]" for c in EMOTION6_CATEGORIES))
EMOTION6_PROBABILITIES = tuple(f"prob_{c}" for c in EMOTION6_CATEGORIES)
EMOTION6_RATING_RANGE = (1.0, 9.0)  # the SAM scale of the release's valence and arousal
PROBABILITY_SUM_TOLERANCE = 1e-3  # the release writes the shares with 6 significant digits
GROUND_TRUTH = "ground_truth.txt"


def emotion6_items(root: Path, where: str) -> list[SourceItem]:
    """One item per ground_truth.txt row (images/<path>, label = its folder, ratings as attributes).

    A row whose path leaves images/ is an `outside_dataset` rejection and an exact repeat of an earlier
    row a `repeated_row` one; a wrong header, a bad value or two rows giving one image different values
    stop the listing (SourceError naming file, line and column). A listed image that is missing on disk
    becomes a `missing_file` rejection when the ingest reads it.
    """
    if not root.is_dir():
        raise SourceError(f"{where}.path: the folder {root} does not exist; expected the Emotion6 folder holding images/ and {GROUND_TRUTH}")
    path = root / GROUND_TRUTH
    text = read_listing(path, f"does not exist; the Emotion6 release has {GROUND_TRUTH} beside images/", f"Emotion6's {GROUND_TRUTH}")
    reader = csv.reader(io.StringIO(text), delimiter="\t")
    _check_header(path, [cell.strip() for cell in next(reader, [])])
    images = DatasetRoot(root / "images")
    items: dict[str, tuple[int, SourceItem]] = {}
    rejections = []
    for cells in reader:
        line = reader.line_num
        cells = [cell.strip() for cell in cells]
        while cells and not cells[-1]:  # a trailing tab is no column
            cells.pop()
        if not cells:
            continue
        item = _row_item(path, line, cells, images)
        if item.uri in items:
            first_line, first = items[item.uri]
            if first != item:
                raise SourceError(f"{path}: lines {first_line} and {line} both list {cells[0]} with different values; keep one row per image")
            rejections.append(rejection(f"{path}#line={line}", "repeated_row", f"{path}: line {line} repeats line {first_line} ({item.uri})"))
            continue
        items[item.uri] = (line, item)
    return [item for _, item in items.values()] + rejections


def _check_header(path: Path, header: list[str]) -> None:
    expected = "\t".join(EMOTION6_HEADER)
    for n, (found, wanted) in enumerate(zip(header, EMOTION6_HEADER), start=1):
        if found != wanted:
            raise SourceError(f"{path}: line 1: column {n} is {found!r}, expected {wanted!r}; the Emotion6 header is {expected!r}")
    if len(header) != len(EMOTION6_HEADER):
        raise SourceError(f"{path}: line 1: {len(header)} columns, expected the {len(EMOTION6_HEADER)} of the Emotion6 header {expected!r}")


def _row_item(path: Path, line: int, cells: list[str], images: DatasetRoot) -> SourceItem:
    if len(cells) != len(EMOTION6_HEADER):
        raise SourceError(f"{path}: line {line}: {len(cells)} tab-separated fields, expected {len(EMOTION6_HEADER)} ({', '.join(EMOTION6_HEADER)})")
    written = cells[0]
    uri = images.join(written)
    if not images.holds(uri):
        return outside(uri, written)
    folder, *name = os.path.relpath(uri, images.root).split(os.sep)
    if not name:
        raise SourceError(f"{path}: line {line}: [image_filename] {written!r} names no category folder; expected <emotion>/<file> under images/")
    values = [_number(path, line, column, cell) for column, cell in zip(EMOTION6_HEADER[1:], cells[1:])]
    low, high = EMOTION6_RATING_RANGE
    for column, value in zip(EMOTION6_HEADER[1:3], values[:2]):
        if not low <= value <= high:
            raise SourceError(f"{path}: line {line}: {column} is {value:g}, outside the rating scale {low:g}..{high:g}")
    shares = values[2:]
    for column, value in zip(EMOTION6_HEADER[3:], shares):
        if not 0.0 <= value <= 1.0:
            raise SourceError(f"{path}: line {line}: {column} is {value:g}, not a probability in [0, 1]")
    # math.fsum: the exact sum of the written values, so the tolerance alone decides.
    if abs(math.fsum(shares) - 1.0) > PROBABILITY_SUM_TOLERANCE:
        raise SourceError(f"{path}: line {line}: the 7 probabilities ({', '.join(EMOTION6_HEADER[3:])}) sum to "
                          f"{math.fsum(shares):.6g}, not 1 (tolerance {PROBABILITY_SUM_TOLERANCE:g})")
    attributes = {"valence": values[0], "arousal": values[1], **dict(zip(EMOTION6_PROBABILITIES, shares))}
    return SourceItem(uri, folder, attributes)


def _number(path: Path, line: int, column: str, cell: str) -> float:
    try:
        return float(cell)
    except ValueError:
        raise SourceError(f"{path}: line {line}: {column} is {cell!r}, not a number") from None
