"""Why a split's part lacks a class, in words: each class kept whole in train (too few images or groups for
the parts with a share), each class whose images went along with near-duplicate groups counted as another
class, and each part a large group emptied (splits.py stores them with the split; training's error repeats them).
Read from the temp tables assign_parts builds (members, units, strata, targets, assigned)."""

from __future__ import annotations

from dataclasses import dataclass

# The parts of a split, in the order of a scheme's ratios ("70/15/15": train, val, test); splits.py splits into them.
PARTS = ("train", "val", "test")


def missing_class_messages(conn, ratios: tuple[int, int, int], counts: dict[str, dict[str, int]]) -> tuple[list[str], list[str]]:
    """(small_classes, notes) of a ratio split: each class kept whole in train, and each class that has no
    image in a part with a share, with the cause (too few images, too few near-duplicate groups, its
    groups going with another class, or a group larger than a part's target)."""
    shared_parts = [p for p, r in zip(PARTS, ratios) if r]
    missing = {label: [p for p in shared_parts if not parts[p]] for label, parts in counts.items()}
    small = conn.execute(
        """SELECT s.stratum, s.n, s.n_groups, bool_or(t.pct > 0 AND t.target = 0) AS too_few_images
           FROM strata s JOIN small USING (stratum) JOIN targets t USING (stratum) GROUP BY ALL ORDER BY 1""").fetchall()
    strata = {s for (s,) in conn.execute("SELECT stratum FROM strata").fetchall()}
    split_strata = strata - {s for s, *_ in small}
    emptied = {label: parts for label, parts in sorted(missing.items()) if parts and label in split_strata}
    absorbed = sorted(label for label, parts in missing.items() if parts and label not in strata)
    # Only near-duplicate groups (and so the members and units tables) make these: split image by image, a
    # small class is small by its image count, and every other class fills every part.
    grouped = _class_groups(conn, [s for s, _, _, too_few in small if not too_few] + absorbed)
    scheme = "/".join(map(str, ratios))
    small_classes = []
    for stratum, n, n_groups, too_few_images in small:
        outcome = f"{_where_they_went(counts[stratum])}{_missing_clause(stratum, missing[stratum])}"
        cause = (f"{n} images in {n_groups} groups, too few for {scheme} (every part with a share needs at least one)"
                 if too_few_images else f"its {sum(counts[stratum].values())} images form {grouped[stratum].described()}, "
                                        f"fewer than the {len(shared_parts)} parts with a share")
        small_classes.append(f"class {stratum!r}: {cause}, so {outcome}")
    notes = [_absorbed_message(label, counts[label], missing[label], grouped[label]) for label in absorbed]
    return small_classes, _emptied_parts(conn, emptied) + notes


def _absorbed_message(label: str, parts: dict[str, int], missing: list[str], groups: ClassGroups) -> str:
    """Why a class that is no stratum (all its images in groups of another majority) lacks a part."""
    verb = "is" if groups.n_groups == 1 else "are"
    return (f"class {label!r}: its {sum(parts.values())} images are in {groups.described()} that {verb} split as "
            f"{_names(groups.majorities)} (a group goes with its majority label, ties to the first by name), so "
            f"{_where_they_went(parts)}{_missing_clause(label, missing)}")


@dataclass(frozen=True)
class ClassGroups:
    """The near-duplicate groups holding a class's images: what a message about that class cites."""

    n_groups: int
    largest: int  # images in the largest of them, of any class
    others: list[str]  # the other classes with images in them
    majorities: list[str]  # the other classes some of them are split as (their majority label)

    def described(self) -> str:
        shared = f", shared with {_names(self.others)}" if self.others else ""
        plural = "" if self.n_groups == 1 else "s"
        return f"{self.n_groups} near-duplicate group{plural} (largest {self.largest} images{shared})"


def _class_groups(conn, labels: list[str]) -> dict[str, ClassGroups]:
    """ClassGroups of each of `labels`, from the members and units tables of assign_parts."""
    if not labels:
        return {}
    rows = conn.execute(
        """WITH held AS (
               SELECT label, gid FROM members WHERE label IN (SELECT unnest($1::VARCHAR[])) GROUP BY ALL
           ), shared AS (
               SELECT h.label, list(DISTINCT m.label ORDER BY m.label) AS others
               FROM held h JOIN members m USING (gid) WHERE m.label <> h.label GROUP BY h.label
           )
           SELECT h.label, count(*), max(u.size), coalesce(any_value(s.others), []),
                  coalesce(list(DISTINCT u.stratum ORDER BY u.stratum) FILTER (WHERE u.stratum <> h.label), [])
           FROM held h JOIN units u USING (gid) LEFT JOIN shared s USING (label) GROUP BY h.label""",
        [labels]).fetchall()
    return {label: ClassGroups(n_groups, largest, others, majorities) for label, n_groups, largest, others, majorities in rows}


def _emptied_parts(conn, missing: dict[str, list[str]]) -> list[str]:
    """The messages for classes that were split but got no image in some part: their groups are too large."""
    if not missing:
        return []
    rows = conn.execute(
        """SELECT t.stratum, t.part, t.target, s.largest FROM targets t JOIN strata s USING (stratum)
           WHERE t.stratum IN (SELECT unnest($1::VARCHAR[])) ORDER BY t.stratum, t.ord""", [list(missing)]).fetchall()
    return [
        f"class {stratum!r}: {part} got no images although its target is {target}: the class's near-duplicate "
        f"groups (largest {largest} images) are larger than that"
        for stratum, part, target, largest in rows if part in missing[stratum]
    ]


def _where_they_went(parts: dict[str, int]) -> str:
    went = [p for p in PARTS if parts.get(p)]
    return "they all went to train" if went == ["train"] else f"they went to {' and '.join(went)}"


def _missing_clause(label: str, parts: list[str]) -> str:
    """": val and test have no 'anger' image", or nothing when no part lacks the class."""
    if not parts:
        return ""
    return f": {' and '.join(parts)} {'has' if len(parts) == 1 else 'have'} no {label!r} image"


def _names(labels: list[str], shown: int = 3) -> str:
    """'a', 'b' and 'c'; past `shown` names, the count of the others."""
    quoted = [repr(label) for label in labels[:shown]]
    if len(labels) > shown:
        return f"{', '.join(quoted)} and {len(labels) - shown} more"
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"
