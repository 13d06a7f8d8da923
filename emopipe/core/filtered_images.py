"""The text filter: which of a dataset's images an experiment keeps.

With the filter on, an image is kept when its text_scores row (for the given params_hash) says
has_text = false; images with text are removed, unreadable ones (has_text NULL) are left out and
counted. With it off, every image is kept. The kept set is content-addressed: filter_id = sha256
over the params_hash (or "no-filter") and the sorted kept image_ids, so two experiments that
keep the same images under the same settings share one set of `filtered_images` rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import pyarrow as pa

from emopipe.db import Database
from emopipe.fingerprint import table_fingerprint

N_EXAMPLES = 8


class MissingTextScores(RuntimeError):
    """The text filter needs a decision for every image: text_scores has not run on them."""


@dataclass(frozen=True)
class FilterResult:
    filter_id: str
    n_input: int
    n_kept: int
    n_removed: int  # has_text = true
    n_unreadable: int  # has_text NULL: left out, neither kept nor counted as text
    removed_per_class: dict[str, int] = field(default_factory=dict)
    removed_examples: list[str] = field(default_factory=list)  # a few removed image_ids, for a preview
    input_fingerprint: str = ""


def filter_id_of(params_hash: str | None, kept: list[str]) -> str:
    h = hashlib.sha256(f"{params_hash or 'no-filter'}\n".encode())
    for image_id in sorted(kept):
        h.update(f"{image_id}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class FilterDecisions:
    """What the stored text_scores decide for a dataset's images now (read only)."""

    n_input: int
    n_unscored: int  # images without a text_scores row for the params_hash
    n_removed: int
    n_unreadable: int
    example_unscored: str | None
    kept: list[str]  # sorted


# Each image of the dataset with its decision; with the filter off, no row joins (key is NULL).
_SCORED = """
    SELECT i.image_id, i.label, s.has_text, s.image_id IS NOT NULL AS has_row
    FROM images i LEFT JOIN text_scores s ON s.image_id = i.image_id AND s.params_hash = $2
    WHERE i.dataset = $1"""


def decide(conn, dataset: str, text_filter: bool, params_hash: str | None) -> FilterDecisions:
    """The kept set and the counts, from the `images` and `text_scores` rows on `conn`. Shared by
    filter_images and the lineage verification, so both apply the one rule."""
    key = params_hash if text_filter else None
    n_input, n_unscored, n_removed, n_unreadable, example = conn.execute(
        f"SELECT count(*), count(*) FILTER (NOT has_row), count(*) FILTER (has_text),"
        f" count(*) FILTER (has_row AND has_text IS NULL), min(image_id) FILTER (NOT has_row)"
        f" FROM ({_SCORED})", [dataset, key]).fetchone()
    kept = [r[0] for r in conn.execute(
        f"SELECT image_id FROM ({_SCORED}) WHERE (NOT $3 OR has_text = false) ORDER BY image_id",
        [dataset, key, text_filter]).fetchall()]
    return FilterDecisions(n_input, n_unscored, n_removed, n_unreadable, example, kept)


def filter_images(
    db: Database, *, experiment: str, dataset: str, text_filter: bool,
    params_hash: str | None, params: dict | None,
) -> FilterResult:
    """Decide the kept set of `dataset` for `experiment` and store it (filter_runs + filtered_images)."""
    if text_filter and not params_hash:
        raise ValueError("text_filter is on but no params_hash names the text_scores decisions to use")
    key = params_hash if text_filter else None
    args = [dataset, key]
    with db.transaction() as conn:
        decided = decide(conn, dataset, text_filter, key)
        if text_filter and decided.n_unscored:
            raise MissingTextScores(
                f"{decided.n_unscored} of {decided.n_input} images of dataset {dataset!r} have no text_scores row for "
                f"params_hash {key} (e.g. {decided.example_unscored}): run text_scores first")
        kept = decided.kept
        per_class = dict(conn.execute(
            f"SELECT label, count(*) FROM ({_SCORED}) WHERE has_text GROUP BY label ORDER BY label", args).fetchall())
        examples = [r[0] for r in conn.execute(
            f"SELECT image_id FROM ({_SCORED}) WHERE has_text ORDER BY image_id LIMIT {N_EXAMPLES}", args).fetchall()]
        input_fingerprint = table_fingerprint(conn.sql(
            "SELECT image_id, label FROM images WHERE dataset = $1 ORDER BY image_id", params=[dataset]).to_arrow_table())
        filter_id = filter_id_of(key, kept)
        result = FilterResult(
            filter_id=filter_id, n_input=decided.n_input, n_kept=len(kept), n_removed=decided.n_removed,
            n_unreadable=decided.n_unreadable, removed_per_class=per_class, removed_examples=examples,
            input_fingerprint=input_fingerprint,
        )
        conn.execute(
            "INSERT OR REPLACE INTO filter_runs (filter_id, experiment, dataset, text_filter, params_hash, params,"
            " input_fingerprint, n_input, n_kept, n_removed, n_unreadable) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11)",
            [filter_id, experiment, dataset, text_filter, key, json.dumps(params) if text_filter and params else None,
             result.input_fingerprint, result.n_input, result.n_kept, result.n_removed, result.n_unreadable])
        stored = conn.execute("SELECT count(*) FROM filtered_images WHERE filter_id = ?", [filter_id]).fetchall()[0][0]
        if kept and not stored:  # a filter_id names its kept set: rows stored under it are these already
            # In image_id order (`kept` is sorted; a plain INSERT keeps that order, INSERT OR IGNORE does not),
            # which splits.load_filtered then reads without a sort.
            conn.register("kept_images", pa.table({"image_id": pa.array(kept, pa.string())}))
            conn.execute("INSERT INTO filtered_images (filter_id, image_id) SELECT ?, image_id FROM kept_images", [filter_id])
            conn.unregister("kept_images")
    return result


def kept_image_ids(db: Database, filter_id: str) -> list[str]:
    """The kept set of a filter run, sorted."""
    with db.connect() as conn:
        return [r[0] for r in conn.execute(
            "SELECT image_id FROM filtered_images WHERE filter_id = $1 ORDER BY image_id", [filter_id]).fetchall()]
