"""text_detection_quality (the blocking check on `text_scores`): has_text against the ground truth an
image carries (images.attributes ->> 'has_text'). DuckDB only, so the check loads no OCR model."""

from __future__ import annotations

from emopipe.db import Database


def text_quality(db: Database, dataset: str, params_hash: str) -> dict:
    """Precision and recall of has_text against the ground truth in images.attributes->>'has_text'.

    Images without ground truth are left out; unreadable ones (has_text NULL) are counted apart.
    precision/recall are NaN when undefined (nothing predicted / nothing to find).
    """
    with db.connect() as conn:
        tp, fp, fn, tn, n_unreadable = conn.execute(
            """
            WITH scored AS (
                SELECT s.has_text AS predicted, TRY_CAST(i.attributes->>'has_text' AS BOOLEAN) AS truth
                FROM images i JOIN text_scores s ON s.image_id = i.image_id AND s.params_hash = $2
                WHERE i.dataset = $1)
            SELECT count(*) FILTER (predicted AND truth), count(*) FILTER (predicted AND NOT truth),
                   count(*) FILTER (NOT predicted AND truth), count(*) FILTER (NOT predicted AND NOT truth),
                   count(*) FILTER (predicted IS NULL AND truth IS NOT NULL)
            FROM scored WHERE truth IS NOT NULL
            """, [dataset, params_hash]).fetchone()
    return {
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn, "n": tp + fp + fn + tn, "n_unreadable": n_unreadable,
    }
