"""Decode each image once per size into packed uint8 arrays (the core of `images_32` / `images_224`).

Pixels: EXIF orientation applied, RGB (alpha composited on white), resized to S×S by `method_for(S)`:
"squash" (whole image to S×S, the FI study's 32 px) for S <= 64, "crop" (shorter side to S, centre
crop, ViT input) above. Storage: shards `<arrays_root>/<S>_<method>/<hash>.npy` (N×S×S×3 uint8,
memory-mappable), indexed by the `resized` table (image_id, size, method, shard, row), `shard` being
relative to arrays_root. The cache key is (image_id, size, method): a re-run decodes only the images
without a row.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import multiprocessing.pool
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from emopipe.db import Database
from emopipe.errors import UserError
from emopipe.fingerprint import table_fingerprint
from emopipe.paths import data_dir, object_path
from emopipe.threads import available_cores

METHODS = ("squash", "crop")
SQUASH_MAX_SIZE = 64
# Bicubic with a reducing gap of 3: Pillow first box-reduces by an integer factor while keeping >= 3x
# the target, then convolves; Pillow's docs: at 3 "indistinguishable from fair resampling in most cases".
RESAMPLE = Image.Resampling.BICUBIC
REDUCING_GAP = 3.0
# JPEGs are decoded at 1/2, 1/4 or 1/8 scale (DCT scaling, Image.draft) only while both sides keep
# at least this multiple of the target, so the final resize still averages real pixels.
DRAFT_MARGIN = 2
ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
IN_PROCESS_MAX = 256  # at most this many missing images are decoded without a process pool


class MissingArraysError(UserError):
    """Asked for arrays that were never built (or whose shard file is gone)."""


def method_for(size: int) -> str:
    """"squash" for small inputs (the FI study's 32 px), "crop" for ViT-style inputs."""
    if size < 1:
        raise ValueError(f"image size must be a positive number of pixels, got {size}")
    return "squash" if size <= SQUASH_MAX_SIZE else "crop"


def decode_resize(data: bytes, size: int, method: str) -> np.ndarray:
    """Image file bytes -> (size, size, 3) uint8 RGB, EXIF-rotated, resized by `method`."""
    if method not in METHODS:
        raise ValueError(f"resize method must be one of {METHODS}, got {method!r}")
    img = Image.open(io.BytesIO(data))
    img.draft(None, (DRAFT_MARGIN * size, DRAFT_MARGIN * size))  # a no-op for formats other than JPEG
    ImageOps.exif_transpose(img, in_place=True)
    rgb = _to_rgb(img)
    w, h = rgb.size
    if method == "squash":
        box = (0.0, 0.0, float(w), float(h))
    else:
        # Resizing the centred square straight to S×S equals "shorter side to S, then centre crop",
        # without resampling the pixels that the crop throws away.
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    out = rgb.resize((size, size), RESAMPLE, box=box, reducing_gap=REDUCING_GAP)
    return np.asarray(out, dtype=np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I"):
        # 16/32-bit grayscale: Pillow's own conversion clips at 255; keep the top 8 of 16 bits instead.
        gray = (np.clip(np.asarray(img), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        # Transparent pixels often hold arbitrary colour (black, or leftovers); show them as a viewer
        # would, on white.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


@dataclass
class ResizeResult:
    size: int
    method: str
    n_images: int  # distinct ids asked for
    n_cached: int  # already in `resized`
    n_decoded: int  # decoded and written by this run
    failed: dict[str, str] = field(default_factory=dict)  # image_id -> reason (not indexed)
    seconds: float = 0.0
    images_per_second: float = 0.0  # n_decoded / seconds


def build_arrays(
    db: Database,
    image_ids: list[str],
    size: int,
    *,
    objects_root: Path,
    arrays_root: Path,
    workers: int | None = None,
    chunk_size: int = 1024,
    log: Callable[[str], None] = print,
) -> ResizeResult:
    """Decode every id not yet in `resized` at (size, method_for(size)), chunk by chunk.

    Each chunk becomes one shard: workers read the bytes from the object store and write their rows
    straight into the shard's temp file, so no pixels pass through pipes or this process; then the
    file is fsynced and renamed, and its index rows are inserted in one transaction. Memory does not
    grow with the dataset, and a killed run loses at most the chunks in flight. A failed image leaves
    its row in the shard unused (zeros) and unindexed.
    """
    start = time.perf_counter()
    method = method_for(size)
    ids = list(dict.fromkeys(image_ids))
    missing = _not_built(db, ids, size, method, Path(arrays_root))
    # One single-threaded Pillow decoder per core: workers x threads = cores (emopipe/threads.py). A
    # few images decode in this process: starting the pool costs more than they take (a re-run's new 1 %).
    workers = workers or (1 if len(missing) <= IN_PROCESS_MAX else available_cores())
    workers = max(1, min(workers, len(missing) or 1))
    chunks = [missing[i : i + chunk_size] for i in range(0, len(missing), chunk_size)]
    result = ResizeResult(size, method, len(ids), len(ids) - len(missing), 0)
    label = f"images_{size} ({method})"
    log(f"{label}: {result.n_cached} of {len(ids)} cached; decoding {len(missing)} "
        f"in {len(chunks)} chunk(s) of <= {chunk_size} with {workers} worker(s)")
    decode = partial(_decode_into, objects_root=str(objects_root), size=size, method=method)
    shard_dir = Path(arrays_root) / f"{size}_{method}"
    shard_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _pool(workers) as pool:
            shards = _filled_shards(pool, decode, chunks, shard_dir, size, workers)
            for n, (shard, outcomes) in enumerate(shards, 1):
                reasons = dict(outcomes)  # waits for the whole chunk
                rows = [(image_id, row) for row, image_id in enumerate(shard.image_ids) if reasons[image_id] is None]
                result.failed.update((i, r) for i, r in reasons.items() if r is not None)
                if rows:
                    path = shard.commit()
                    _index(db, rows, size, method, f"{shard_dir.name}/{path.name}")
                result.n_decoded += len(rows)
                rate = result.n_decoded / (time.perf_counter() - start)
                log(f"{label}: chunk {n}/{len(chunks)}: {len(rows)} written, "
                    f"{len(shard.image_ids) - len(rows)} failed ({rate:.0f} images/s so far)")
    finally:
        for tmp in shard_dir.glob(f".*.{os.getpid()}.tmp"):  # chunks this run did not commit
            tmp.unlink(missing_ok=True)
    for image_id, reason in list(result.failed.items())[:10]:
        log(f"{label}: could not decode {image_id}: {reason}")
    result.seconds = time.perf_counter() - start
    result.images_per_second = result.n_decoded / result.seconds if result.seconds else 0.0
    return result


def _not_built(db: Database, ids: list[str], size: int, method: str, arrays_root: Path) -> list[str]:
    """The ids (in the given order) without an index row whose shard file exists.

    Rows pointing at a shard file that is gone (a deleted arrays folder) are dropped, so those
    images are rebuilt instead of failing later in load_array.
    """
    with db.connect() as conn:
        rows = conn.execute(
            "SELECT image_id, shard FROM resized WHERE size = ? AND method = ? "
            "AND image_id IN (SELECT unnest(?::VARCHAR[]))", [size, method, ids]).fetchall()
    lost = sorted(shard for shard in {shard for _, shard in rows} if not (arrays_root / shard).is_file())
    if lost:
        with db.transaction() as conn:
            conn.execute("DELETE FROM resized WHERE size = ? AND method = ? "
                         "AND shard IN (SELECT unnest(?::VARCHAR[]))", [size, method, lost])
    built = {image_id for image_id, shard in rows if shard not in lost}
    return [i for i in ids if i not in built]


class _Shard:
    """One chunk's .npy file: a temp file the workers fill row by row, then renamed into place."""

    def __init__(self, shard_dir: Path, image_ids: list[str], size: int):
        self.image_ids = image_ids
        # Named by its chunk, so a re-run of the same chunk (after a kill) rewrites the same name.
        digest = hashlib.sha256(f"{shard_dir.name}\n{chr(10).join(image_ids)}".encode()).hexdigest()[:24]
        self.path = shard_dir / f"{digest}.npy"
        self.tmp = shard_dir / f".{digest}.{os.getpid()}.tmp"
        header = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.uint8, shape=(len(image_ids), size, size, 3))
        self.offset, self.row_bytes = header.offset, size * size * 3
        del header  # the file now has its .npy header and full (sparse) length

    def tasks(self) -> list[tuple[str, str, int]]:
        """(image_id, temp file, byte offset of its row) for each image."""
        return [(image_id, str(self.tmp), self.offset + row * self.row_bytes)
                for row, image_id in enumerate(self.image_ids)]

    def commit(self) -> Path:
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())  # flushes the workers' writes too: fsync is per file, not per writer
        os.replace(self.tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)  # make the rename durable before indexing it
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return self.path


def _decode_into(task: tuple[str, str, int], *, objects_root: str, size: int, method: str) -> tuple[str, str | None]:
    """Worker: decode one image into its shard row; (image_id, None) or (image_id, failure reason)."""
    image_id, shard_tmp, offset = task
    path = object_path(image_id, Path(objects_root))
    try:
        data = path.read_bytes()
    except OSError as e:
        return image_id, f"object file unreadable: {path}: {e.strerror or e}"
    try:
        pixels = decode_resize(data, size, method)
    except Exception as e:  # any decoder error is a per-image failure, never the run's
        return image_id, f"cannot decode: {type(e).__name__}: {e}"
    fd = os.open(shard_tmp, os.O_WRONLY)
    try:
        if os.pwrite(fd, pixels.data, offset) != pixels.nbytes:
            raise OSError(f"short write to {shard_tmp}")
    finally:
        os.close(fd)
    return image_id, None


@contextmanager
def _pool(workers: int) -> Iterator[multiprocessing.pool.Pool | None]:
    """A process pool, or None to decode in this process when one worker is asked for."""
    if workers == 1:
        yield None
        return
    # forkserver, not fork: the caller (a Dagster step) may run threads, and forking those is unsafe.
    # Preloading this module in the server lets each worker start as a cheap fork with it imported.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    pool = context.Pool(workers)
    try:
        yield pool
    finally:
        pool.terminate()  # every result was consumed, or the run is failing anyway
        pool.join()


def _filled_shards(pool, decode, chunks: list[list[str]], shard_dir: Path, size: int,
                   workers: int) -> Iterator[tuple[_Shard, Iterable[tuple[str, str | None]]]]:
    """Per chunk, its shard and an iterator of (image_id, failure or None); consume each before the next.

    The pool gets chunk k+1 as soon as chunk k is handed out, so workers keep decoding while chunk k
    is fsynced and indexed.
    """
    if pool is None:
        for chunk in chunks:
            shard = _Shard(shard_dir, chunk, size)
            yield shard, map(decode, shard.tasks())
        return

    def submit(chunk: list[str]):
        shard = _Shard(shard_dir, chunk, size)
        chunksize = max(1, min(16, len(chunk) // (4 * workers)))
        return shard, pool.imap_unordered(decode, shard.tasks(), chunksize=chunksize)

    pending = submit(chunks[0]) if chunks else None
    for i in range(len(chunks)):
        current = pending
        if i + 1 < len(chunks):
            pending = submit(chunks[i + 1])
        yield current


def _index(db: Database, rows: list[tuple[str, int]], size: int, method: str, shard: str) -> None:
    # OR IGNORE: a concurrent run (another experiment) may have indexed the same image meanwhile;
    # its row is equally valid, and this shard's copy stays unreferenced.
    with db.transaction() as conn:
        conn.execute(
            "INSERT OR IGNORE INTO resized (image_id, size, method, shard, row) "
            "SELECT unnest(?::VARCHAR[]), ?, ?, ?, unnest(?::INTEGER[])",
            [[image_id for image_id, _ in rows], size, method, shard, [row for _, row in rows]])


def default_arrays_root() -> Path:
    return data_dir() / "arrays"


def _locate(db: Database, image_ids: list[str], size: int) -> dict[str, tuple[str, int]]:
    """image_id -> (shard, row) for every id, or MissingArraysError naming the ones not built."""
    method = method_for(size)
    with db.connect() as conn:
        rows = conn.execute(
            "SELECT image_id, shard, row FROM resized WHERE size = ? AND method = ? "
            "AND image_id IN (SELECT unnest(?::VARCHAR[]))", [size, method, list(set(image_ids))]).fetchall()
    where = {image_id: (shard, row) for image_id, shard, row in rows}
    missing = [i for i in dict.fromkeys(image_ids) if i not in where]
    if missing:
        raise MissingArraysError(
            f"{len(missing)} image(s) have no {size}px ({method}) array, e.g. {', '.join(missing[:5])}; "
            f"materialize images_{size} for them first (or they failed to decode: see its log)")
    return where


def load_array(db: Database, image_ids: list[str], size: int, *, arrays_root: Path | None = None) -> np.ndarray:
    """(len(image_ids), S, S, 3) uint8, in the given order (repeats allowed)."""
    root = Path(arrays_root) if arrays_root is not None else default_arrays_root()
    where = _locate(db, image_ids, size)
    out = np.empty((len(image_ids), size, size, 3), np.uint8)
    by_shard: dict[str, tuple[list[int], list[int]]] = {}
    for position, image_id in enumerate(image_ids):
        shard, row = where[image_id]
        positions, rows = by_shard.setdefault(shard, ([], []))
        positions.append(position)
        rows.append(row)
    for shard, (positions, rows) in by_shard.items():
        path = root / shard
        if not path.is_file():
            raise MissingArraysError(f"array shard {path} is missing; re-materialize images_{size} to rebuild it")
        pixels = np.load(path, mmap_mode="r")
        order = np.argsort(rows)  # read the memory map front to back
        out[np.asarray(positions)[order]] = pixels[np.asarray(rows)[order]]
    return out


def array_fingerprint(db: Database, image_ids: list[str], size: int) -> str:
    """sha256 over the sorted (image_id, size, method) of the built arrays.

    Not over the pixels: they are a pure function of (image bytes, size, method) under this module's
    decoder, and image_id is the sha256 of the bytes, so the keys identify the content without reading
    gigabytes; and unlike (shard, row) they stay the same when the same pixels are rebuilt or re-chunked.
    Raises MissingArraysError if an id was never built.
    """
    method = method_for(size)
    ids = sorted(_locate(db, image_ids, size))
    return table_fingerprint(pa.table({"image_id": pa.array(ids, pa.string()), "size": pa.array([size] * len(ids), pa.int64()),
                                       "method": pa.array([method] * len(ids), pa.string())}))

