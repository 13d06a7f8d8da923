"""Train/val/test splits of a filtered image set, computed in DuckDB SQL (near-duplicate groups: core/near_duplicates.py;
the messages about classes a part lacks: core/split_notes.py).

How a ratio split ("70/15/15", any "a/b/c" summing to 100) is made:

- Units. Near-duplicate images (same photo re-encoded, resized, slightly edited) are grouped
  (`near_duplicates.duplicate_groups`), and a group is the unit that gets a part, so no photo leaks across parts.
  A group is stratified under its majority label (ties: the alphabetically first label). An image
  with no label counts as the class "(no label)".
- Targets. Per class, each part's target is its share of the class's images, rounded by largest
  remainder (ties: train, then val, then test), so it is within one image of the exact share.
- Order and cut. Within a class, groups are ranked by the first 64 bits of
  md5("<seed>:<smallest image_id of the group>"), ties by that image_id (md5 of a string is the same
  in every DuckDB version and on every machine; DuckDB's `hash()` is not guaranteed to be), and cut where the cumulative image count crosses the targets (a group goes
  to the part its midpoint falls in). With singleton groups the counts equal the targets exactly;
  with larger groups a part is off by at most the largest group's size.
- Stability. The rank of an image depends only on the seed and its own group key, so adding m
  images only inserts them into the order and moves the two cut points a little: an existing image
  changes part only when it sits between an old and a new cut point, about m in the worst case and
  usually far fewer (measured in emopipe_tests/test_splits.py). No state from an earlier split is
  needed, so the split stays a pure function of (filtered set, labels, groups, scheme, seed).
- Small classes. A class whose targets leave a part with a nonzero share empty (e.g. 4 images at
  70/15/15), or with fewer groups than parts to fill, is kept whole in train (its images still
  teach the model), and `SplitResult.small_classes` says so: val/test then lack that class.
  `SplitResult.notes` says why any other class has no image in a part with a share (its groups are
  split as another class, or one is larger than the part's target). Both are stored with the split
  (`split_runs.notes`), so a step that finds a part empty can say why.
- Zero shares. "a/b/c" must sum to 100 with a > 0; b or c may be 0 ("90/10/0": no test part, e.g.
  when only cross-dataset test sets are used; "85/0/15": no validation part, so no early stopping).

"official" takes each image's part from its manifest attribute (`images.attributes ->> split_column`,
train/val/test, case-insensitive; validation/valid mean val). A near-duplicate group spanning parts
goes wholly to its most held-out part (test, then val, then train): the official test images all stay
in test, and train loses the copies of them. Images with a missing or unknown value are an error.

The split_id is the fingerprint: sha256 over the sorted (image_id, part) rows. The same inputs give the
same split_id, and re-running stores nothing twice.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from emopipe.core.near_duplicates import near_duplicate_groups
from emopipe.core.split_notes import PARTS, missing_class_messages
from emopipe.db import Database, scratch
from emopipe.errors import UserError
from emopipe.fingerprint import strictly_increasing, table_fingerprint

NO_LABEL = "(no label)"
OFFICIAL_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


class SplitError(UserError):
    """A split cannot be made from what was asked (scheme, filter, dataset, official parts)."""


def parse_scheme(scheme: str) -> tuple[int, int, int] | None:
    """(train, val, test) percentages of "a/b/c" (sum 100, train > 0), or None for "official"."""
    if scheme == "official":
        return None
    m = re.fullmatch(r"(\d+)/(\d+)/(\d+)", scheme.strip())
    ratios = tuple(int(g) for g in m.groups()) if m else None
    if ratios is None or sum(ratios) != 100 or ratios[0] == 0:
        raise SplitError(
            f"split scheme {scheme!r}: expected 'official' or 'a/b/c' percentages summing to 100 with "
            "a > 0 (train/val/test, e.g. 70/15/15 or 80/10/10; val or test may be 0)"
        )
    return ratios


# ---------------------------------------------------------------------------------------------
# The split

@dataclass
class SplitResult:
    split_id: str
    fingerprint: str  # == split_id; also the Dagster data version
    scheme: str
    ratios: tuple[int, int, int] | None
    seed: int
    input_fingerprint: str
    counts: dict[str, dict[str, int]]  # image label -> part -> images
    n_images: int
    n_groups_merged: int  # near-duplicate groups of 2+ filtered images
    small_classes: list[str] = field(default_factory=list)  # one message per class kept in train
    notes: list[str] = field(default_factory=list)  # other things a reader should know, e.g. why a part lacks a class


@dataclass
class Assignment:
    """What assign_parts computed: one row per image (image_id, label, key, official, part), sorted by
    image_id so that the fingerprints need not sort."""

    rows: pa.Table
    counts: dict[str, dict[str, int]]
    n_groups_merged: int
    small_classes: list[str]
    notes: list[str]


def make_split(
    db: Database,
    *,
    experiment: str,
    dataset: str,
    filter_id: str,
    scheme: str,
    seed: int,
    groups: dict[str, str] | None = None,
    split_column: str = "split",
) -> SplitResult:
    """Split the images kept by `filter_id` and store them in `splits` + a `split_runs` row (one transaction)."""
    ratios = parse_scheme(scheme)
    with db.connect() as conn:
        filter_params_hash = _filter_params_hash(conn, dataset, filter_id)
        items = load_filtered(conn, dataset, filter_id, split_column)
    done = assign_parts(items, groups, ratios, seed)
    rows = done.rows
    split_rows = rows.select(["image_id", "part"])
    inputs = rows.select(["image_id", "label", "key"] + (["official"] if ratios is None else []))
    # The input fingerprint on a second thread while the split's is taken and the rows are written (Arrow,
    # hashlib and DuckDB let go of the GIL): 1M images, ~0.15 s less.
    with ThreadPoolExecutor(1) as pool:
        pending_input = pool.submit(table_fingerprint, inputs)
        split_id = table_fingerprint(split_rows)
        with db.transaction() as conn:
            _store_rows(conn, split_id, split_rows)
            input_fingerprint = pending_input.result()
            # Keyed by (split_id, experiment): a re-run replaces its row instead of adding one.
            conn.execute(
                """INSERT OR REPLACE INTO split_runs (split_id, experiment, dataset, scheme, ratios, seed, filter_id,
                       filter_params_hash, input_fingerprint, counts, fingerprint, notes)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [split_id, experiment, dataset, scheme, json.dumps(ratios and list(ratios)), seed, filter_id,
                 filter_params_hash, input_fingerprint, json.dumps(done.counts, sort_keys=True), split_id,
                 json.dumps(done.small_classes + done.notes)],
            )
    return SplitResult(
        split_id=split_id, fingerprint=split_id, scheme=scheme, ratios=ratios, seed=seed,
        input_fingerprint=input_fingerprint, counts=done.counts, n_images=rows.num_rows,
        n_groups_merged=done.n_groups_merged, small_classes=done.small_classes, notes=done.notes,
    )


def _store_rows(conn, split_id: str, rows: pa.Table) -> None:
    """The (image_id, part) rows under split_id, unless they are stored already (same id, same rows)."""
    if conn.execute("SELECT count(*) FROM splits WHERE split_id = ?", [split_id]).fetchall()[0][0]:
        return
    # The rows come in DuckDB's 122,880-row batches, one row group each. (Other batch sizes leave part-filled
    # row groups that the checkpoint at close rewrites: 1M rows in 131,072-row batches, 0.6 s more.)
    conn.register("new_split_rows", rows)
    conn.execute("INSERT INTO splits SELECT ?, image_id, part FROM new_split_rows", [split_id])
    conn.unregister("new_split_rows")


def recomputed_split_id(db: Database, *, dataset: str, filter_id: str, scheme: str, seed: int,
                        split_column: str = "split") -> str:
    """The split id that `make_split` gives for these settings on the stored rows now (nothing written):
    what a stored split_runs row's scheme, seed and filter are checked against."""
    with db.connect() as conn:
        items = load_filtered(conn, dataset, filter_id, split_column)
    rows = assign_parts(items, near_duplicate_groups(db, filter_id), parse_scheme(scheme), seed).rows
    return table_fingerprint(rows.select(["image_id", "part"]))


def empty_part_cause(conn, split_id: str, experiment: str, part: str) -> str:
    """Why the stored split `split_id` has no `part` image, and what to do, from its split_runs row
    (the experiment's own row first: a split shared by experiments has one row each)."""
    row = conn.execute("SELECT scheme, ratios, notes FROM split_runs WHERE split_id = ? ORDER BY experiment <> ? LIMIT 1",
                       [split_id, experiment]).fetchone()
    if row is None:
        return "materialize splits for it first"
    scheme, ratios, notes = row[0], json.loads(row[1] or "null"), json.loads(row[2] or "null")
    key = f"experiments.{experiment}.split"
    if ratios and not ratios[PARTS.index(part)]:
        return f"its scheme {scheme} gives {part} no share; set {key} to a scheme that does (e.g. 70/15/15)"
    if notes is None:
        return "the split was stored before emopipe recorded why; materialize splits again to see the cause"
    if not notes:
        return f"its scheme {scheme} put no image there; set {key} to a scheme that does (e.g. 70/15/15)"
    shown = "; ".join(notes[:3]) + (f" (and {len(notes) - 3} more in split_runs.notes)" if len(notes) > 3 else "")
    return (f"{shown}. Add images of these classes that are not near-duplicates of each other, or set {key} "
            f"(now {scheme}) to a scheme they can fill")


def assign_parts(
    items: pa.Table, groups: dict[str, str] | None, ratios: tuple[int, int, int] | None, seed: int
) -> Assignment:
    """The split itself, in an in-memory DuckDB: items has image_id, label, official (raw manifest value)."""
    by_id = _sorted_by_unique_id(items) if ratios is not None and not _joins_images(groups) else None
    if by_id is not None:
        return _assign_single_images(by_id, ratios, seed)
    with scratch() as conn:
        stage_units(conn, items, groups, ratios)
        if ratios is None:
            _check_official(conn)
            conn.execute(f"CREATE TEMP TABLE unit_parts AS {OFFICIAL_UNIT_PARTS}")
        else:
            conn.execute(f"CREATE TEMP TABLE unit_parts AS {_RATIO_UNIT_PARTS}", [str(seed)])
        conn.execute("CREATE TEMP TABLE assigned AS SELECT m.*, p.key, p.part FROM members m JOIN unit_parts p USING (gid)")
        # Sorted here (in parallel), so that the fingerprints need not sort.
        rows = conn.sql("SELECT image_id, label, key, official, part FROM assigned ORDER BY image_id").to_arrow_table()
        n_merged = conn.execute("SELECT count(*) FROM units WHERE size > 1").fetchall()[0][0]
        counts = _part_counts(conn)
        small, notes = ([], _official_notes(conn)) if ratios is None else missing_class_messages(conn, ratios, counts)
        return Assignment(rows, counts, n_merged, small, notes)


def _joins_images(groups: dict[str, str] | None) -> bool:
    """Whether `groups` may put two images in one unit: it maps some image to a key other than its own."""
    return any(image != key for image, key in (groups or {}).items())


def _sorted_by_unique_id(items: pa.Table) -> pa.Table | None:
    """items sorted by image_id (as load_filtered returns them, or sorted here), or None where an image_id
    repeats (its rows then form one unit)."""
    if not strictly_increasing(items["image_id"]):
        items = items.take(pc.sort_indices(items["image_id"]))
    return items if strictly_increasing(items["image_id"]) else None


def _assign_single_images(items: pa.Table, ratios: tuple[int, int, int], seed: int) -> Assignment:
    """assign_parts where every image is its own unit (key = image_id, stratum = label, size 1) and items
    are sorted by image_id. Each part then gets exactly its target, so no part is emptied by a large group.

    The targets and the md5 ranks come from DuckDB (the ranks computed in parallel), the cut is numpy
    (`parts_by_rank`): DuckDB's window over (label, rank) plus the sort back into image_id order cost ~0.35 s
    of the split's ~0.6 s at 1M images, the numpy cut 0.03 s. Ties in rank go by position, which is the
    image_id order, as in the SQL of grouped splits."""
    with scratch() as conn:
        conn.register("items", items)
        _stage_parts(conn, ratios)
        conn.execute(_SINGLE_IMAGE_STRATA + _TARGETS_SQL)
        # _MD5_RANK, computed faster: md5_number's low 64 bits are the digest's first 8 bytes in little-endian
        # order, so swapping their bytes gives the big-endian number of its first 16 hex digits (1M images:
        # 0.36 CPU-s instead of 0.65; the assignment is checked identical by `python -m emopipe.bench splits`).
        # A projection of the registered table keeps its row order (DuckDB preserves insertion order).
        ranks = conn.sql("SELECT (md5_number($1 || ':' || image_id) & 18446744073709551615::UHUGEINT)::UBIGINT AS low"
                         " FROM items", params=[str(seed)]).to_arrow_table()["low"].to_numpy().byteswap()
        encoded = pc.dictionary_encode(items["label"]).combine_chunks()
        labels = encoded.dictionary.to_pylist()
        cuts = {stratum: (b1, b2, small) for stratum, b1, b2, small in conn.execute(
            f"WITH {_BOUNDS} SELECT stratum, b1, b2, s.stratum IS NOT NULL FROM bounds LEFT JOIN small s USING (stratum)").fetchall()}
        b1, b2, small = (np.array([cuts[label][k] for label in labels]) for k in range(3))
        codes = encoded.indices.to_numpy()
        part = parts_by_rank(codes, ranks, np.where(small, len(codes), b1), np.where(small, len(codes), b2))
        rows = pa.table({"image_id": items["image_id"], "label": items["label"], "key": items["image_id"],
                         "official": items["official"], "part": pc.take(pa.array(PARTS), pa.array(part))})
        per_label = np.bincount(codes.astype(np.int64) * len(PARTS) + part, minlength=len(labels) * len(PARTS))
        counts = {label: dict(zip(PARTS, map(int, per_label[k * len(PARTS):(k + 1) * len(PARTS)])))
                  for k, label in sorted(enumerate(labels), key=lambda kv: kv[1])}
        small_classes, notes = missing_class_messages(conn, ratios, counts)
        return Assignment(rows, counts, 0, small_classes, notes)


def parts_by_rank(codes: np.ndarray, ranks: np.ndarray, b1: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """Each row's part (0 train, 1 val, 2 test): within its label (code k), the rows ordered by rank, ties
    by position, are train below place b1[k], val below b2[k], test from there.

    Only the rows on either side of the two cuts matter, not the order within a part, so each label takes
    two O(n) selections (np.partition) instead of a sort: 1M rows, 0.03 s instead of 0.12 s. Where a rank
    at a cut ties with one below it, that label is ordered in full (a stable sort keeps ties by position)."""
    # Stable, so positions stay ascending within a label; numpy sorts 16-bit integers by radix (1M rows: 0.008 s,
    # 0.026 s as int32).
    by_label = np.argsort(codes.astype(np.uint16) if len(b1) <= 1 << 16 else codes, kind="stable")
    sizes = np.bincount(codes, minlength=len(b1))
    part = np.zeros(len(codes), np.int8)
    for label, end in enumerate(np.cumsum(sizes)):
        members = by_label[end - sizes[label]:end]
        label_ranks = ranks[members]
        cuts = [bound for bound in (b1[label], b2[label]) if bound < len(members)]
        above = [label_ranks >= np.partition(label_ranks, bound)[bound] for bound in cuts]
        if any(len(members) - int(a.sum()) != bound for a, bound in zip(above, cuts)):
            place = np.empty(len(members), np.int64)
            place[np.argsort(label_ranks, kind="stable")] = np.arange(len(members))
            above = [place >= bound for bound in cuts]
        part[members] = np.count_nonzero(above, axis=0) if above else 0
    return part


def _part_counts(conn) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for label, part, n in conn.execute("SELECT label, part, count(*) FROM assigned GROUP BY ALL ORDER BY ALL").fetchall():
        counts.setdefault(label, dict.fromkeys(PARTS, 0))[part] = n
    return counts


def _filter_params_hash(conn, dataset: str, filter_id: str) -> str | None:
    runs = conn.execute("SELECT DISTINCT dataset, params_hash FROM filter_runs WHERE filter_id = ?", [filter_id]).fetchall()
    if not runs:
        raise SplitError(f"filter {filter_id!r} has no filter_runs row: materialize filtered_images for {dataset!r} first")
    if any(d != dataset for d, _ in runs):
        raise SplitError(f"filter {filter_id!r} belongs to dataset {runs[0][0]!r}, not {dataset!r}")
    return runs[0][1]


def load_filtered(conn, dataset: str, filter_id: str, split_column: str) -> pa.Table:
    """The images `filter_id` keeps, sorted by image_id (assign_parts and the fingerprints need not sort), with
    their label (NO_LABEL where none) and `official`, the manifest's `split_column` value.

    filter_images stores a filter's rows in image_id order, so a plain scan (insertion order) gives them
    sorted, and only the labels are joined: each joined row carries its image's position and is put back
    there. 1M images: 0.36 s and 0.55 CPU-s instead of 0.49 s and 0.87 for the join sorted by ORDER BY
    (AMD EPYC, 2 cores). Rows stored in another order are sorted by DuckDB first."""
    query = "SELECT image_id FROM filtered_images WHERE filter_id = ?"
    ids = conn.sql(query, params=[filter_id]).to_arrow_table()["image_id"]
    if not strictly_increasing(ids):
        ids = conn.sql(query + " ORDER BY image_id", params=[filter_id]).to_arrow_table()["image_id"]
    if len(ids) == 0:
        raise SplitError(f"filter {filter_id!r} of dataset {dataset!r} kept no images: nothing to split")
    conn.register("kept_ids", pa.table({"image_id": ids, "position": np.arange(len(ids))}))
    try:
        found = conn.sql(
            """SELECT k.position, coalesce(i.label, ?) AS label, i.attributes ->> ('$."' || ? || '"') AS official
               FROM kept_ids k JOIN images i ON i.image_id = k.image_id AND i.dataset = ?""",
            params=[NO_LABEL, split_column, dataset],
        ).to_arrow_table()
    finally:
        conn.unregister("kept_ids")
    positions = found["position"].to_numpy()
    if found.num_rows < len(ids):
        unknown = np.ones(len(ids), bool)
        unknown[positions] = False
        raise SplitError(
            f"filter {filter_id!r}: {int(unknown.sum())} filtered images are not images of dataset {dataset!r} "
            f"(e.g. {ids.filter(pa.array(unknown))[0]}); the filter and the dataset do not match"
        )
    row_of = np.empty(len(ids), np.int64)
    row_of[positions] = np.arange(len(ids))
    labelled = found.select(["label", "official"]).take(row_of)
    return pa.table({"image_id": ids, "label": labelled["label"], "official": labelled["official"]})


# Members: one row per filtered image with its group id; units: one row per group (the thing that is
# assigned), its key for ranking (smallest member image_id, whatever the caller named the group),
# its size and its stratum (majority label, ties to the first label).
_UNITS_SQL = """
CREATE TEMP TABLE members AS
    SELECT i.image_id, i.label, i.official, coalesce(g.gid, i.image_id) AS gid
    FROM items i LEFT JOIN group_map g USING (image_id);
CREATE TEMP TABLE units AS
    SELECT gid, min(image_id) AS key, count(*) AS size, min(label) AS stratum, min(label) <> max(label) AS mixed
    FROM members GROUP BY gid;
-- Only groups with mixed labels need a vote (most units are single images).
UPDATE units SET stratum = votes.label FROM (
    SELECT gid, label FROM members WHERE gid IN (SELECT gid FROM units WHERE mixed) GROUP BY gid, label
    QUALIFY row_number() OVER (PARTITION BY gid ORDER BY count(*) DESC, label) = 1
) AS votes WHERE units.gid = votes.gid;
CREATE TEMP TABLE strata AS
    SELECT stratum, sum(size) AS n, count(*) AS n_groups, max(size) AS largest FROM units GROUP BY stratum;
"""

# Per stratum of `strata`: the parts' targets, and whether the stratum is too small to split.
_TARGETS_SQL = """
-- Largest-remainder targets per stratum and part (ties: train, val, test). A part with a 0 % share
-- has remainder 0 and so never gets a seat.
CREATE TEMP TABLE targets AS
    SELECT stratum, part, ord, pct,
           n * pct // 100 + CASE WHEN row_number() OVER (PARTITION BY stratum ORDER BY (n * pct) % 100 DESC, ord)
                                      <= n - sum(n * pct // 100) OVER (PARTITION BY stratum) THEN 1 ELSE 0 END AS target
    FROM strata, parts;
-- Small strata cannot put an image in every part with a share: they stay whole in train.
CREATE TEMP TABLE small AS
    SELECT s.stratum FROM strata s JOIN targets t USING (stratum)
    GROUP BY s.stratum, s.n_groups
    HAVING bool_or(t.pct > 0 AND t.target = 0) OR s.n_groups < count(*) FILTER (WHERE t.pct > 0);
"""

# A unit's rank within its stratum: the first 64 bits of md5(seed:key) ($1: the seed); ties go by key.
_MD5_RANK = "('0x' || md5($1 || ':' || key)[:16])::UBIGINT"

# The cumulative targets where a stratum is cut: train below b1, val below b2.
_BOUNDS = """bounds AS (
    SELECT stratum, sum(target) FILTER (WHERE ord = 0) AS b1, sum(target) FILTER (WHERE ord <= 1) AS b2
    FROM targets GROUP BY stratum
)"""

# Rank groups within their stratum and cut at the cumulative targets; a group goes to the part its
# midpoint (start + size/2, doubled to stay in integers) falls in.
_RATIO_UNIT_PARTS = f"""
WITH {_BOUNDS}, placed AS (
    SELECT gid, key, stratum, size,
           sum(size) OVER (PARTITION BY stratum ORDER BY {_MD5_RANK}, key ROWS UNBOUNDED PRECEDING) - size AS start
    FROM units
)
SELECT p.gid, p.key, p.stratum, CASE WHEN s.stratum IS NOT NULL THEN 'train'
                   WHEN 2 * start + size < 2 * b1 THEN 'train'
                   WHEN 2 * start + size < 2 * b2 THEN 'val'
                   ELSE 'test' END AS part
FROM placed p JOIN bounds b USING (stratum) LEFT JOIN small s USING (stratum)
"""

# The strata of single images (each its own unit: key = image_id, stratum = label).
_SINGLE_IMAGE_STRATA = """
CREATE TEMP TABLE strata AS
    SELECT label AS stratum, count(*) AS n, count(*) AS n_groups, 1 AS largest FROM items GROUP BY label;
"""

_OFFICIAL_PART = "CASE lower(trim(official)) " + " ".join(
    f"WHEN '{raw}' THEN '{part}'" for raw, part in OFFICIAL_NAMES.items()) + " END"

# A group spanning official parts goes wholly to its most held-out part: test, then val, then train.
OFFICIAL_UNIT_PARTS = f"""
SELECT gid, min(image_id) AS key, ['train', 'val', 'test'][max(list_position(['train', 'val', 'test'], {_OFFICIAL_PART}))] AS part
FROM members GROUP BY gid
"""


def stage_units(conn, items: pa.Table, groups: dict[str, str] | None, ratios: tuple[int, int, int] | None) -> None:
    group_map = pa.table({"image_id": pa.array(list(groups or {}), pa.string()),
                          "gid": pa.array(list((groups or {}).values()), pa.string())})
    conn.register("items", items)
    conn.register("group_map", group_map)
    _stage_parts(conn, ratios)
    conn.execute(_UNITS_SQL + _TARGETS_SQL)


def _stage_parts(conn, ratios: tuple[int, int, int] | None) -> None:
    conn.execute("CREATE TEMP TABLE parts (part VARCHAR, ord INTEGER, pct INTEGER)")
    conn.executemany("INSERT INTO parts VALUES (?, ?, ?)",
                     [(p, i, r) for i, (p, r) in enumerate(zip(PARTS, ratios or (0, 0, 0)))])


def _check_official(conn) -> None:
    bad = conn.execute(
        f"SELECT count(*), list(DISTINCT coalesce(official, '<missing>'))[:5], min(image_id) FROM members WHERE {_OFFICIAL_PART} IS NULL"
    ).fetchall()[0]
    if bad[0]:
        raise SplitError(
            f"official split: {bad[0]} images have no usable official part (values {bad[1]}, e.g. image {bad[2]}); "
            f"allowed: train, val, test (validation/valid mean val). Check the dataset's split_column."
        )


def official_overlap(db: Database, *, dataset: str, filter_id: str, groups: dict[str, str] | None,
                     split_column: str = "split") -> dict[str, int]:
    """{'val': n, 'test': n}: how many images of the dataset's OFFICIAL val and test parts are in a
    near-duplicate group (`groups`) with an image its manifest puts in train, i.e. the leakage of the
    manifest's own split (make_split undoes it: such a group goes wholly to its held-out part). A
    byte-identical copy is one image (raw_images keeps the first and counts the other in `duplicates`),
    so only re-encoded, resized or edited copies can be counted here."""
    with db.connect() as conn:
        items = load_filtered(conn, dataset, filter_id, split_column)
    with scratch() as conn:
        stage_units(conn, items, groups, None)
        found = conn.execute(f"""
            WITH official AS (SELECT image_id, gid, {_OFFICIAL_PART} AS part FROM members),
                 trained AS (SELECT DISTINCT gid FROM official WHERE part = 'train')
            SELECT part, count(*) FROM official JOIN trained USING (gid) WHERE part IN ('val', 'test') GROUP BY part
        """).fetchall()
    return {"val": 0, "test": 0} | dict(found)


def _official_notes(conn) -> list[str]:
    moved = conn.execute(
        f"SELECT count(*) FROM assigned WHERE {_OFFICIAL_PART} <> part"
    ).fetchall()[0][0]
    if not moved:
        return []
    return [f"{moved} images moved from their official part so that each near-duplicate group is in one part "
            f"(a group spanning parts goes to test, else val)"]
