"""The cross-dataset leakage guard: images of a cross-dataset test set (an experiment's `eval_datasets`)
that the model has seen, as the same bytes or as a near-duplicate of one of its split's train or val
images, are left out of that evaluation and counted (`excluded_overlap` metrics row).

Exact copies are a join on image_id (the sha256 of the bytes) with the split's rows; near-duplicates
are perceptual hashes of the 32 px arrays within the split's own distance (splits.NEAR_DUPLICATE_DISTANCE),
matched by the band LSH of core/splits.py. The split's own test and val parts need no guard: the split
keeps near-duplicate groups in one part.
"""

from __future__ import annotations

from typing import Sequence

import pyarrow as pa

from emopipe.core.perceptual_hashes import image_hashes
from emopipe.core.near_duplicates import NEAR_DUPLICATE_DISTANCE, near_any
from emopipe.db import Database

COPY = "copy"  # the same bytes as a train or val image
NEAR_DUPLICATE = "near_duplicate"  # a pHash within the split's distance of a train or val image's
SEEN_PARTS = ("train", "val")  # what the model was trained and early-stopped on


def overlapping_images(db: Database, eval_ids: Sequence[str], split_id: str,
                       max_distance: int = NEAR_DUPLICATE_DISTANCE) -> dict[str, str]:
    """image_id -> COPY or NEAR_DUPLICATE for each of `eval_ids` that copies a train or val image of
    `split_id`; the others are absent. Hashes come from (and new ones go to) `perceptual_hashes`, so the
    eval images need their 32 px arrays (images_32 builds them for every dataset of an experiment)."""
    with db.connect() as conn:
        seen = [r[0] for r in conn.execute("SELECT image_id FROM splits WHERE split_id = ? AND list_contains(?, part) "
                                            "ORDER BY image_id", [split_id, list(SEEN_PARTS)]).fetchall()]
        conn.register("evaluated", pa.table({"image_id": pa.array(list(dict.fromkeys(eval_ids)), pa.string())}))
        copied = conn.execute(
            """SELECT e.image_id, s.image_id IS NOT NULL FROM evaluated e LEFT JOIN (
                   SELECT DISTINCT image_id FROM splits WHERE split_id = ? AND list_contains(?, part)
               ) s ON s.image_id = e.image_id ORDER BY e.image_id""", [split_id, list(SEEN_PARTS)]).fetchall()
        conn.unregister("evaluated")
    copies = [image_id for image_id, is_copy in copied if is_copy]
    rest = [image_id for image_id, is_copy in copied if not is_copy]
    found = dict.fromkeys(copies, COPY)
    if rest and seen:
        near = near_any(image_hashes(db, rest), image_hashes(db, seen), max_distance)
        found.update((image_id, NEAR_DUPLICATE) for image_id, hit in zip(rest, near.tolist()) if hit)
    return found

