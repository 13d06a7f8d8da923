"""Splits on a real DuckDB file: proportions, determinism across processes, stability, official parts,
small classes, near-duplicate groups and the blocking checks."""

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from emopipe.core.perceptual_hashes import perceptual_hash
from emopipe.core.near_duplicates import duplicate_groups
from emopipe.core.splits import (PARTS, SplitError, assign_parts, load_filtered, make_split, parse_scheme,
                                 parts_by_rank)
from emopipe.core.split_is_sound import verify_split
from emopipe.fingerprint import sha256_bytes
from emopipe_tests.conftest import encode

DATASET = "synth"


def image_id(name: str) -> str:
    return sha256_bytes(name.encode())


def add_images(db, labels: dict[str, str], filter_id: str, attributes: dict[str, dict] | None = None) -> None:
    """images rows for the ids in `labels` (if new), and a filter run keeping exactly them."""
    attributes = attributes or {}
    rows = pa.table({"image_id": list(labels), "label": list(labels.values()),
                     "attributes": [json.dumps(attributes.get(i, {})) for i in labels]})
    with db.transaction() as conn:  # rows go in through Arrow: executemany is one statement per row
        conn.register("new_images", rows)
        conn.execute(
            """INSERT OR IGNORE INTO images (image_id, dataset, source_uri, label, attributes)
               SELECT image_id, ?, 'mem://' || image_id, label, attributes FROM new_images""",
            [DATASET],
        )
        conn.execute(
            "INSERT INTO filter_runs (filter_id, experiment, dataset, text_filter, params_hash, n_kept) VALUES (?, 'exp', ?, true, 'p0', ?)",
            [filter_id, DATASET, len(labels)],
        )
        conn.execute("INSERT INTO filtered_images SELECT ?, image_id FROM new_images", [filter_id])
        conn.unregister("new_images")


def class_sizes(sizes: dict[str, int], prefix: str = "") -> dict[str, str]:
    return {image_id(f"{prefix}{label}-{k}"): label for label, n in sizes.items() for k in range(n)}


def stored_parts(db, split_id: str) -> dict[str, str]:
    with db.connect() as conn:
        return dict(conn.execute("SELECT image_id, part FROM splits WHERE split_id = ?", [split_id]).fetchall())


def split(db, filter_id="f1", scheme="70/15/15", seed=0, **kw):
    return make_split(db, experiment="exp", dataset=DATASET, filter_id=filter_id, scheme=scheme, seed=seed, **kw)


def assert_checks_pass(db, result, filter_id="f1", groups=None):
    outcomes = verify_split(db, result.split_id, filter_id, groups, result.scheme)
    assert [o.name for o in outcomes] == ["parts_disjoint", "every_image_assigned_once", "duplicate_groups_in_one_part",
                                          "proportions" if result.ratios else "official_parts"]
    assert all(o.passed for o in outcomes), outcomes


SIZES = {"amusement": 10, "anger": 13, "awe": 50, "contentment": 101, "disgust": 333, "excitement": 997, "fear": 29}


@pytest.mark.parametrize("scheme", ["70/15/15", "80/10/10", "60/20/20"])
def test_every_class_is_within_one_image_of_its_share(db, scheme):
    labels = class_sizes(SIZES)
    add_images(db, labels, "f1")
    result = split(db, scheme=scheme)
    ratios = parse_scheme(scheme)
    parts = stored_parts(db, result.split_id)
    assert set(parts) == set(labels)
    for label, n in SIZES.items():
        counts = {p: sum(1 for i, part in parts.items() if part == p and labels[i] == label) for p in PARTS}
        assert counts == result.counts[label]
        for part, pct in zip(PARTS, ratios):
            assert abs(counts[part] - n * pct / 100) < 1, (label, part, counts)
    assert result.small_classes == [] and result.n_images == len(labels)
    assert_checks_pass(db, result)

    again = split(db, scheme=scheme)  # idempotent: same id, nothing stored twice
    assert again.split_id == result.split_id == result.fingerprint
    with db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM splits").fetchone()[0] == len(labels)
        run = conn.execute("SELECT scheme, ratios, seed, filter_params_hash, counts, fingerprint FROM split_runs").fetchall()
    assert len(run) == 1
    assert run[0][:4] == (scheme, json.dumps(list(ratios)), 0, "p0")
    assert json.loads(run[0][4]) == result.counts and run[0][5] == result.split_id


def test_same_inputs_and_seed_give_the_same_split_in_other_processes(db, data_dir):
    add_images(db, class_sizes({"a": 120, "b": 80, "c": 41}), "f1")
    here = split(db, seed=7)
    script = textwrap.dedent(f"""
        from emopipe.db import Database
        from emopipe.core.splits import make_split
        r = make_split(Database({str(db.path)!r}), experiment="exp", dataset={DATASET!r}, filter_id="f1",
                       scheme="70/15/15", seed=7)
        print(r.split_id)
    """)
    ids = []
    for hash_seed in ("1", "2"):  # different str hashing: any dependence on set/dict order would show
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        ids.append(out.stdout.strip())
    assert ids == [here.split_id, here.split_id]
    assert split(db, seed=8).split_id != here.split_id


def test_adding_images_moves_few_existing_ones(db):
    sizes = {"a": 900, "b": 600, "c": 300, "d": 200}
    old = class_sizes(sizes)
    add_images(db, old, "f1")
    before = stored_parts(db, split(db, "f1").split_id)
    added = class_sizes({"a": 40, "b": 30, "c": 20, "d": 10}, prefix="new-")
    add_images(db, {**old, **added}, "f2")
    result = split(db, "f2")
    after = stored_parts(db, result.split_id)
    moved = sum(before[i] != after[i] for i in old)
    # A fresh shuffle would move about half of the 2000; the rank-and-cut moves at most ~len(added).
    print(f"\nadded {len(added)} images to {len(old)}: {moved} existing images changed part")
    assert moved <= len(added)
    assert_checks_pass(db, result, "f2")


def test_official_scheme_follows_the_manifest(db):
    names = {"Train": 6, "train": 4, "validation": 3, "valid": 2, "VAL": 1, "test": 5}
    labels, attributes, expected = {}, {}, {}
    for raw, n in names.items():
        for k in range(n):
            i = image_id(f"{raw}-{k}")
            labels[i], attributes[i] = "x" if k % 2 else "y", {"split": raw, "votes": k}
            expected[i] = {"Train": "train", "train": "train", "test": "test"}.get(raw, "val")
    add_images(db, labels, "f1", attributes)
    result = split(db, scheme="official")
    assert stored_parts(db, result.split_id) == expected
    assert result.ratios is None and result.notes == []
    assert_checks_pass(db, result)

    # A near-duplicate group spanning train and test goes wholly to test.
    train_one = image_id("Train-0")
    test_one = image_id("test-0")
    groups = {train_one: "g", test_one: "g"}
    grouped = split(db, scheme="official", groups=groups)
    assert stored_parts(db, grouped.split_id)[train_one] == "test"
    assert "1 images moved" in grouped.notes[0]
    assert_checks_pass(db, grouped, groups=groups)


def test_official_scheme_rejects_missing_parts(db):
    labels = class_sizes({"x": 4})
    attributes = {i: {"split": "train" if k else "holdout"} for k, i in enumerate(labels)}
    add_images(db, labels, "f1", attributes)
    with pytest.raises(SplitError, match=r"1 images have no usable official part.*holdout.*split_column"):
        split(db, scheme="official")


def test_a_class_too_small_for_every_part_stays_in_train_with_a_message(db):
    labels = class_sizes({"big": 200, "tiny": 3})
    add_images(db, labels, "f1")
    result = split(db)
    assert result.counts["tiny"] == {"train": 3, "val": 0, "test": 0}
    assert len(result.small_classes) == 1
    assert "'tiny': 3 images" in result.small_classes[0] and "val and test have no 'tiny'" in result.small_classes[0]
    assert_checks_pass(db, result)


def test_a_part_emptied_by_a_large_duplicate_group_is_reported(db):
    labels = class_sizes({"big": 100, "clumpy": 10})
    add_images(db, labels, "f1")
    clumpy = sorted(i for i, label in labels.items() if label == "clumpy")
    groups = {i: clumpy[0] for i in clumpy[:8]}  # one group of 8 and two single images; targets 8/1/1
    for seed in range(20):
        result = split(db, scheme="80/10/10", seed=seed, groups=groups)
        empty = [p for p in ("val", "test") if result.counts["clumpy"][p] == 0]
        if empty:
            break
    assert empty, "no seed left a part of 'clumpy' empty"
    assert result.small_classes == []
    assert [n for n in result.notes if "'clumpy'" in n and f"{empty[0]} got no images" in n and "largest 8" in n]
    assert_checks_pass(db, result, groups=groups)


@pytest.mark.parametrize("ratios", [(70, 15, 15), (90, 10, 0), (85, 0, 15)])
def test_images_without_groups_split_as_groups_of_one_would(ratios):
    """The one-window split of images without groups gives what the members/units path gives them."""
    ids = [image_id(f"img-{k}") for k in range(900)]  # not sorted: assign_parts sorts them
    labels = ["tiny" if k < 3 else "abcd"[k % 4] for k in range(len(ids))]
    items = pa.table({"image_id": ids, "label": labels, "official": pa.nulls(len(ids), pa.string())})
    fast = assign_parts(items, None, ratios, seed=5)
    units = assign_parts(items, {i: f"group of {i}" for i in ids}, ratios, seed=5)  # named groups: the units path
    assert fast.rows.to_pylist() == units.rows.to_pylist()
    assert fast.rows["image_id"].to_pylist() == sorted(ids)
    assert (fast.counts, fast.small_classes, fast.notes, fast.n_groups_merged) == (units.counts, units.small_classes, [], 0)
    assert len(fast.small_classes) == 1 and "'tiny'" in fast.small_classes[0]


@pytest.mark.parametrize("rank_values", [2**64 - 1, 40, 3])
def test_the_cut_by_selection_equals_a_full_sort(rank_values):
    """parts_by_rank against the order it stands for, np.lexsort by (label, rank, position), with ranks
    from a range so small that ties fall on the cuts (40, 3) and one where they do not."""
    rng = np.random.default_rng(rank_values)
    codes = rng.choice(4, 3000, p=[0.5, 0.3, 0.199, 0.001]).astype(np.int8)
    ranks = rng.integers(0, rank_values, len(codes), dtype=np.uint64, endpoint=True)
    sizes = np.bincount(codes, minlength=4)
    b1, b2 = sizes * 7 // 10, sizes * 85 // 100
    b1[2] = b2[2] = sizes[2]  # a class kept whole in train
    order = np.lexsort((np.arange(len(codes)), ranks, codes))
    place = np.empty(len(codes), np.int64)
    place[order] = np.arange(len(codes)) - (np.cumsum(sizes) - sizes)[codes[order]]
    expected = (place >= b1[codes]).astype(np.int8) + (place >= b2[codes])
    assert parts_by_rank(codes, ranks, b1, b2).tolist() == expected.tolist()
    assert np.bincount(expected, minlength=3).min() > 0


def test_filtered_rows_stored_in_any_order_give_one_split(db):
    """filter_images stores a kept set in image_id order and load_filtered reads it without a sort; rows
    stored in another order are sorted first, to the same split."""
    labels = class_sizes({"a": 40, "b": 25, "c": 7})
    ids = sorted(labels)
    add_images(db, {i: labels[i] for i in ids}, "in order")
    add_images(db, {i: labels[i] for i in reversed(ids)}, "reversed")
    with db.connect() as conn:
        read = [load_filtered(conn, DATASET, f, "split") for f in ("in order", "reversed")]
    assert read[0].equals(read[1]) and read[0]["image_id"].to_pylist() == ids
    assert read[0]["label"].to_pylist() == [labels[i] for i in ids]
    in_order, reversed_ = split(db, filter_id="in order"), split(db, filter_id="reversed")
    assert (in_order.split_id, in_order.input_fingerprint) == (reversed_.split_id, reversed_.input_fingerprint)


def test_a_filter_that_keeps_other_images_or_none_is_refused(db):
    add_images(db, class_sizes({"a": 10}), "f1")
    stranger = image_id("not in the dataset")
    with db.transaction() as conn:
        conn.execute("INSERT INTO filtered_images VALUES ('f1', ?)", [stranger])
        conn.execute("INSERT INTO filter_runs (filter_id, experiment, dataset, params_hash) VALUES ('none kept', 'exp', ?, 'p')", [DATASET])
    with pytest.raises(SplitError, match=f"1 filtered images are not images of dataset 'synth' \\(e.g. {stranger}\\)"):
        split(db)
    with pytest.raises(SplitError, match="'none kept' of dataset 'synth' kept no images"):
        split(db, filter_id="none kept")


def test_zero_shares_and_bad_schemes(db):
    add_images(db, class_sizes({"a": 50, "b": 31}), "f1")
    result = split(db, scheme="90/10/0")
    assert all(c["test"] == 0 and c["val"] > 0 for c in result.counts.values()) and result.small_classes == []
    assert_checks_pass(db, result)
    for bad in ("70/20/20", "0/50/50", "70-15-15", "a/b/c"):
        with pytest.raises(SplitError, match="summing to 100"):
            split(db, scheme=bad)
    with pytest.raises(SplitError, match="no filter_runs row"):
        split(db, filter_id="nope")


def _thumb(arr: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).resize((32, 32), Image.BILINEAR))


def _reencoded(arr: np.ndarray, quality: int) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encode(arr, "JPEG", quality=quality))).convert("RGB"))


def test_near_duplicates_are_grouped_and_land_in_one_part(db, photos):
    rng = np.random.default_rng(0)
    thumbs, photo_of = [], []
    for name, arr in photos.items():
        noisy = np.clip(arr + rng.normal(0, 6, arr.shape), 0, 255).astype(np.uint8)
        brighter = np.clip(arr.astype(int) + 12, 0, 255).astype(np.uint8)
        for variant in (arr, _reencoded(arr, 50), noisy, _reencoded(noisy, 75), brighter):
            thumbs.append(_thumb(variant))
            photo_of.append(name)
    ids = [image_id(f"{name}-{k}") for k, name in enumerate(photo_of)]
    groups = duplicate_groups(ids, perceptual_hash(np.stack(thumbs)))
    for name in photos:  # each photo's copies form exactly one group, distinct photos never merge
        members = [i for i, p in zip(ids, photo_of) if p == name]
        assert {groups[i] for i in members} == {min(members)}, name

    labels = {i: ("sad" if k % 2 else "happy") for k, i in enumerate(ids)}  # mixed labels inside groups
    labels.update(class_sizes({"happy": 60, "sad": 60}, prefix="filler-"))
    add_images(db, labels, "f1")
    result = split(db, groups=groups)
    assert result.n_groups_merged == len(photos)
    parts = stored_parts(db, result.split_id)
    for name in photos:
        assert len({parts[i] for i, p in zip(ids, photo_of) if p == name}) == 1, name
    assert_checks_pass(db, result, groups=groups)

    # Without the groups the copies scatter, and the leakage check says so.
    loose = split(db)
    outcome = {o.name: o for o in verify_split(db, loose.split_id, "f1", groups, "70/15/15")}
    assert not outcome["duplicate_groups_in_one_part"].passed
    assert "span parts" in outcome["duplicate_groups_in_one_part"].details


def test_duplicate_groups_match_brute_force(db):
    rng = np.random.default_rng(3)
    base = rng.integers(0, 2**63, 2500, dtype=np.int64).astype(np.uint64) << np.uint64(1)
    sources = rng.integers(0, len(base), 500)
    flips = np.zeros(len(sources), np.uint64)
    for _ in range(5):  # up to 5 flipped bits: some copies within distance 4, some just outside
        flips |= np.uint64(1) << rng.integers(0, 64, len(sources)).astype(np.uint64)
    hashes = np.concatenate([base, base[sources] ^ flips, base[:50]])  # the last 50: exact copies
    ids = [f"img{k:05d}" for k in range(len(hashes))]
    groups = duplicate_groups(ids, hashes, max_distance=4)

    close = np.bitwise_count(hashes[:, None] ^ hashes[None, :]) <= 4
    from scipy.sparse.csgraph import connected_components
    _, component = connected_components(close, directed=False)
    expected = {}
    for i, c in zip(ids, component):
        expected.setdefault(c, []).append(i)
    assert groups == {i: min(members) for members in expected.values() for i in members}
    assert sum(1 for i, g in groups.items() if i != g) >= 50


def test_verify_split_catches_tampering(db):
    labels = class_sizes({"a": 60, "b": 40})
    add_images(db, labels, "f1")
    ids = sorted(labels)
    groups = {ids[0]: "g", ids[1]: "g"}
    result = split(db, groups=groups)
    parts = stored_parts(db, result.split_id)
    a_train = sorted(i for i in ids[2:] if labels[i] == "a" and parts[i] == "train")
    other_part = "test" if parts[ids[1]] != "test" else "train"
    tamperings = {
        "every_image_assigned_once": [("DELETE FROM splits WHERE split_id = ? AND image_id = ?", ids[5])],
        "parts_disjoint": [("UPDATE splits SET part = 'holdout' WHERE split_id = ? AND image_id = ?", ids[6])],
        "duplicate_groups_in_one_part": [(f"UPDATE splits SET part = '{other_part}' WHERE split_id = ? AND image_id = ?", ids[1])],
        "proportions": [("UPDATE splits SET part = 'test' WHERE split_id = ? AND image_id = ?", i) for i in a_train[:3]],
    }
    for k, (check, statements) in enumerate(tamperings.items()):
        copy = f"tampered-{k}"
        with db.transaction() as conn:
            conn.execute("INSERT INTO splits SELECT ?, image_id, part FROM splits WHERE split_id = ?", [copy, result.split_id])
            for sql, target in statements:
                conn.execute(sql, [copy, target])
        failed = [o.name for o in verify_split(db, copy, "f1", groups, "70/15/15") if not o.passed]
        assert check in failed, (check, failed)
    with db.transaction() as conn:  # an image that the filter did not keep
        conn.execute("INSERT INTO splits VALUES (?, 'not-filtered', 'train')", [result.split_id])
    outcome = {o.name: o for o in verify_split(db, result.split_id, "f1", groups, "70/15/15")}
    assert not outcome["every_image_assigned_once"].passed
    assert "assigned but not filtered: 1 (not-filtered)" in outcome["every_image_assigned_once"].details
