"""Perceptual hashes of the 32 px arrays, computed once per image and kept in the `perceptual_hashes`
table, so that a re-run of `splits` (and its check) hashes only the new images, and hashing reads the
arrays chunk by chunk (memory stays flat however many images)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from emopipe.core.images import load_array
from emopipe.db import Database

HASH_SIZE = 32  # the thumbnails hashed: images_32 (squash), always built
CHUNK = 8192


def perceptual_hash(thumbs: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """64-bit pHash of each 32x32 RGB thumbnail (N, 32, 32, 3) uint8 -> (N,) uint64.

    The imagehash recipe: luma, 2-D DCT-II, the 8x8 lowest frequencies, one bit per coefficient
    above their median. Bits are packed row-major, first coefficient in the highest bit.
    """
    import scipy.fft  # here, not at module level: 0.13 s of every step's definitions import

    if thumbs.ndim != 4 or thumbs.shape[1:] != (32, 32, 3):
        raise ValueError(f"expected (N, 32, 32, 3) thumbnails, got shape {thumbs.shape}")
    out = np.empty(len(thumbs), dtype=np.uint64)
    luma_weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as Pillow's "L"
    for start in range(0, len(thumbs), chunk):
        gray = thumbs[start:start + chunk].astype(np.float32) @ luma_weights
        low = scipy.fft.dctn(gray, type=2, axes=(1, 2))[:, :8, :8].reshape(len(gray), 64)
        bits = low > np.median(low, axis=1, keepdims=True)
        out[start:start + chunk] = np.packbits(bits, axis=1).view(">u8").ravel()
    return out


def image_hashes(db: Database, image_ids: list[str]) -> np.ndarray:
    """(N,) uint64 pHash of each image's 32 px array, in the given order; hashes the ones without a row
    (CHUNK arrays at a time) and stores them."""
    known = _stored(db, image_ids)
    missing = [i for i in dict.fromkeys(image_ids) if i not in known]
    for start in range(0, len(missing), CHUNK):
        ids = missing[start:start + CHUNK]
        hashes = perceptual_hash(load_array(db, ids, HASH_SIZE))
        with db.transaction() as conn:
            conn.register("new_hashes", pa.table({"image_id": pa.array(ids, pa.string()), "phash": pa.array(hashes, pa.uint64())}))
            conn.execute("INSERT OR IGNORE INTO perceptual_hashes SELECT image_id, phash FROM new_hashes")
            conn.unregister("new_hashes")
        known.update(zip(ids, hashes.tolist()))
    return np.array([known[i] for i in image_ids], dtype=np.uint64)


def _stored(db: Database, image_ids: list[str]) -> dict[str, int]:
    with db.connect() as conn:
        conn.register("wanted", pa.table({"image_id": pa.array(list(set(image_ids)), pa.string())}))
        rows = conn.execute("SELECT image_id, phash FROM perceptual_hashes JOIN wanted USING (image_id)").fetchall()
        conn.unregister("wanted")
    return dict(rows)
