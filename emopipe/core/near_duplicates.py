"""Near-duplicate images by perceptual hash: groups of images a few bits apart (what a split keeps in one part),
and whether an image is close to any of a reference set (what evaluation leaves out of a cross-dataset test set,
core/leakage.py). Candidates come from band LSH in DuckDB, so no pair of all the images is compared."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from emopipe.core.filtered_images import kept_image_ids
from emopipe.core.perceptual_hashes import image_hashes
from emopipe.db import Database, scratch

# Hashes at most this many bits apart are near-duplicates: what the split groups, and what evaluation
# leaves out of a cross-dataset test set (core/leakage.py).
NEAR_DUPLICATE_DISTANCE = 4


def duplicate_groups(image_ids: list[str], hashes: np.ndarray, max_distance: int = NEAR_DUPLICATE_DISTANCE) -> dict[str, str]:
    """image_id -> group key (the smallest image_id of its group), for every given image.

    Images whose hashes differ in at most `max_distance` bits are linked, and linked images form
    a group (connected components, so chains A~B~C group A with C). Candidates come from band LSH:
    the 64 bits are cut into max_distance+1 bands, and two hashes within the distance agree on at
    least one whole band (pigeonhole), so an equi-join per band finds every close pair without
    comparing all pairs. Identical hashes are collapsed first, so exact duplicates cost nothing.
    Cost grows quickly with max_distance (narrower bands, fuller buckets): keep it small (<= 8).
    """
    # Here, not at module level: scipy.sparse.csgraph is 0.08 s of every step's definitions import.
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(image_ids) != len(hashes):
        raise ValueError(f"{len(image_ids)} image ids but {len(hashes)} hashes")
    if not 0 <= max_distance < 64:
        raise ValueError(f"max_distance must be in 0..63, got {max_distance}")
    ids = np.asarray(image_ids, dtype=object)
    unique, which = np.unique(np.asarray(hashes, dtype=np.uint64), return_inverse=True)
    pairs = _close_pairs(unique, max_distance) if max_distance else np.empty((0, 2), np.int64)
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(len(unique),) * 2)
    _, component_of_hash = connected_components(graph, directed=False)
    component = component_of_hash[which]
    order = np.argsort(ids.astype(str), kind="stable")
    components_sorted, first = np.unique(component[order], return_index=True)
    smallest = np.empty(component.max() + 1 if len(component) else 0, dtype=object)
    smallest[components_sorted] = ids[order[first]]
    return dict(zip(image_ids, smallest[component].tolist()))


def near_any(query: np.ndarray, reference: np.ndarray, max_distance: int = NEAR_DUPLICATE_DISTANCE) -> np.ndarray:
    """(len(query),) bool: whether each query hash is within `max_distance` bits of some reference hash
    (an equal hash included), by the same band LSH as duplicate_groups. Direct matches only: a query image
    is not flagged through a chain of other query images."""
    if not 0 <= max_distance < 64:
        raise ValueError(f"max_distance must be in 0..63, got {max_distance}")
    both = np.concatenate([np.asarray(query, np.uint64), np.asarray(reference, np.uint64)])
    unique, which = np.unique(both, return_inverse=True)
    is_reference = np.zeros(len(unique), bool)
    is_reference[which[len(query):]] = True
    near = is_reference.copy()
    if max_distance and len(unique) > 1:
        i, j = _close_pairs(unique, max_distance).T
        np.logical_or.at(near, i, is_reference[j])
        np.logical_or.at(near, j, is_reference[i])
    return near[which[:len(query)]]


def _close_pairs(unique: np.ndarray, max_distance: int) -> np.ndarray:
    """Index pairs (i < j) of distinct hashes within max_distance bits, by a band equi-join in DuckDB."""
    n_bands = max_distance + 1
    edges = np.linspace(0, 64, n_bands + 1).astype(int)
    bands = pa.table({
        "band": list(range(n_bands)),
        "shift": [int(lo) for lo in edges[:-1]],
        "mask": pa.array([(1 << int(hi - lo)) - 1 for lo, hi in zip(edges[:-1], edges[1:])], pa.uint64()),
    })
    hashes = pa.table({"idx": np.arange(len(unique), dtype=np.int64), "h": unique})
    with scratch() as conn:
        conn.register("hashes", hashes)
        conn.register("bands", bands)
        result = conn.execute(
            """
            WITH keyed AS (
                SELECT idx, h, band, (h >> shift) & mask AS v FROM hashes, bands
            )
            SELECT DISTINCT a.idx AS i, b.idx AS j
            FROM keyed a JOIN keyed b ON a.band = b.band AND a.v = b.v AND a.idx < b.idx
            WHERE bit_count(xor(a.h, b.h)) <= ?
            """,
            [max_distance],
        ).fetchnumpy()
    return np.stack([result["i"], result["j"]], axis=1).astype(np.int64) if len(result["i"]) else np.empty((0, 2), np.int64)


def near_duplicate_groups(db: Database, filter_id: str) -> dict[str, str]:
    """Groups of near-identical images among the kept ones, by perceptual hash of their 32 px arrays
    (each image hashed once, then read from `perceptual_hashes`)."""
    ids = kept_image_ids(db, filter_id)
    return duplicate_groups(ids, image_hashes(db, ids)) if ids else {}
