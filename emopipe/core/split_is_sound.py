"""split_is_sound (the blocking check on `splits`): a stored split checked against its filtered set, in
DuckDB: parts valid and disjoint, every kept image assigned exactly once, no near-duplicate group across
parts, and per-class proportions within tolerance (ratio schemes) or the manifest's parts kept (official)."""

from __future__ import annotations

from typing import NamedTuple


from emopipe.core.splits import OFFICIAL_UNIT_PARTS, PARTS, load_filtered, parse_scheme, stage_units
from emopipe.db import Database, scratch


class CheckOutcome(NamedTuple):
    name: str
    passed: bool
    details: str


def verify_split(
    db: Database,
    split_id: str,
    filter_id: str,
    groups: dict[str, str] | None,
    scheme: str,
    split_column: str = "split",
) -> list[CheckOutcome]:
    """The blocking checks on a stored split: parts valid and disjoint, every filtered image assigned
    exactly once, no near-duplicate group across parts, and per-class proportions within tolerance
    (ratio schemes) or the manifest's parts kept (official)."""
    ratios = parse_scheme(scheme)
    with db.connect() as conn:
        datasets = [d for (d,) in conn.execute("SELECT DISTINCT dataset FROM filter_runs WHERE filter_id = ?", [filter_id]).fetchall()]
        if not datasets:
            return [CheckOutcome("filter_known", False, f"filter {filter_id!r} has no filter_runs row")]
        items = load_filtered(conn, datasets[0], filter_id, split_column)
        stored = conn.sql("SELECT image_id, part FROM splits WHERE split_id = ?", params=[split_id]).to_arrow_table()
    with scratch() as conn:
        stage_units(conn, items, groups, ratios)
        conn.register("stored", stored)
        outcomes = [_check_parts(conn), _check_coverage(conn), _check_groups(conn)]
        outcomes.append(_check_official_parts(conn) if ratios is None else _check_proportions(conn))
    return outcomes


def _examples(values) -> str:
    return ", ".join(str(v) for v in values[:5]) + (" ..." if len(values) > 5 else "")


def _check_parts(conn) -> CheckOutcome:
    bad_parts, two_parts = conn.execute(
        f"""SELECT list(DISTINCT part) FILTER (WHERE part NOT IN {PARTS}),
                   (SELECT list(image_id) FROM (SELECT image_id FROM stored GROUP BY image_id HAVING count(DISTINCT part) > 1))
            FROM stored"""
    ).fetchall()[0]
    bad_parts, two_parts = bad_parts or [], two_parts or []
    ok = not bad_parts and not two_parts
    details = "every row is train, val or test and no image is in two parts" if ok else (
        f"unknown parts: {bad_parts}; images in two parts: {len(two_parts)} ({_examples(two_parts)})")
    return CheckOutcome("parts_disjoint", ok, details)


def _check_coverage(conn) -> CheckOutcome:
    missing, extra, repeated, n_stored = conn.execute(
        """SELECT (SELECT list(image_id) FROM members ANTI JOIN stored USING (image_id)),
                  (SELECT list(DISTINCT image_id) FROM stored ANTI JOIN members USING (image_id)),
                  (SELECT list(image_id) FROM (SELECT image_id FROM stored GROUP BY image_id HAVING count(*) > 1)),
                  (SELECT count(*) FROM stored)"""
    ).fetchall()[0]
    missing, extra, repeated = missing or [], extra or [], repeated or []
    ok = not (missing or extra or repeated)
    details = f"{n_stored} rows, one per filtered image" if ok else (
        f"filtered but unassigned: {len(missing)} ({_examples(missing)}); assigned but not filtered: {len(extra)} "
        f"({_examples(extra)}); assigned more than once: {len(repeated)} ({_examples(repeated)})")
    return CheckOutcome("every_image_assigned_once", ok, details)


def _check_groups(conn) -> CheckOutcome:
    spanning = conn.execute(
        """SELECT u.key, list(DISTINCT s.part ORDER BY s.part) FROM members m JOIN units u USING (gid)
           JOIN stored s USING (image_id) WHERE u.size > 1
           GROUP BY u.key HAVING count(DISTINCT s.part) > 1 ORDER BY u.key"""
    ).fetchall()
    n_groups = conn.execute("SELECT count(*) FROM units WHERE size > 1").fetchall()[0][0]
    details = f"{n_groups} near-duplicate groups, each in one part" if not spanning else (
        f"{len(spanning)} of {n_groups} near-duplicate groups span parts: "
        + _examples([f"{key} in {parts}" for key, parts in spanning]))
    return CheckOutcome("duplicate_groups_in_one_part", not spanning, details)


def _check_proportions(conn) -> CheckOutcome:
    """Per stratum and part, |count - largest-remainder target| <= 2*floor(largest group/2) (0 for
    singletons: each boundary moves by at most half a group); small strata must be wholly in train."""
    off = conn.execute(
        """WITH actual AS (
               SELECT u.stratum, s.part, count(*) AS n FROM stored s JOIN members m USING (image_id)
               JOIN units u USING (gid) GROUP BY ALL)
           SELECT t.stratum, t.part, coalesce(a.n, 0) AS n,
                  CASE WHEN sm.stratum IS NULL THEN t.target WHEN t.ord = 0 THEN st.n ELSE 0 END AS expected,
                  CASE WHEN sm.stratum IS NULL THEN 2 * (st.largest // 2) ELSE 0 END AS tolerance
           FROM targets t JOIN strata st USING (stratum) LEFT JOIN actual a USING (stratum, part)
           LEFT JOIN small sm USING (stratum)
           WHERE abs(coalesce(a.n, 0) - expected) > tolerance ORDER BY ALL"""
    ).fetchall()
    n_strata, n_classes = conn.execute(
        "SELECT count(*), (SELECT count(DISTINCT label) FROM members) FROM strata").fetchall()[0]
    # A class whose every image sits in groups of another majority class is no stratum: say so, or the count
    # of classes reads as if the class had vanished.
    absorbed = (f" ({n_classes - n_strata} more only in groups split as another class: see the split's notes)"
                if n_classes > n_strata else "")
    details = f"{n_strata} classes{absorbed}, every part within tolerance of its target" if not off else (
        f"{len(off)} class/part counts off target: "
        + _examples([f"{s}/{p}: {n} (target {e} +- {tol})" for s, p, n, e, tol in off]))
    return CheckOutcome("proportions", not off, details)


def _check_official_parts(conn) -> CheckOutcome:
    wrong = conn.execute(
        f"""WITH expected AS ({OFFICIAL_UNIT_PARTS})
            SELECT m.image_id, s.part, e.part FROM members m JOIN expected e USING (gid)
            JOIN stored s USING (image_id) WHERE s.part IS DISTINCT FROM e.part ORDER BY 1"""
    ).fetchall()
    details = "every image is in its manifest part (or its near-duplicate group's)" if not wrong else (
        f"{len(wrong)} images not in their official part: " + _examples([f"{i} in {p}, expected {e}" for i, p, e in wrong]))
    return CheckOutcome("official_parts", not wrong, details)
