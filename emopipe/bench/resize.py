"""`python -m emopipe.bench resize [--n N] [--workers W]`: build_arrays (32 squash + 224 crop, all
cores, draft decoding, shards + index) against a plain single-process Pillow loop doing the same two
sizes, on N distinct 500×375 JPEGs (the typical FI/EmoSet size) cut from scikit-image's photos."""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from emopipe.core.images import build_arrays
from emopipe.db import Database
from emopipe.fingerprint import sha256_bytes
from emopipe.paths import object_path

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "camera", "coins",
          "moon", "grass", "gravel", "brick", "clock"]
WIDTH, HEIGHT = 500, 375


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """n distinct 500×375 JPEGs (quality 90): random crops of upscaled skimage photos."""
    from skimage import data  # a test extra: the photos ship in its wheel

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]
    out: dict[str, bytes] = {}
    while len(out) < n:
        photo = photos[len(out) % len(photos)]
        scale = max(WIDTH / photo.width, HEIGHT / photo.height) * rng.uniform(1.0, 1.6)
        big = photo.resize((round(photo.width * scale) + 1, round(photo.height * scale) + 1), Image.BICUBIC)
        x, y = rng.integers(0, big.width - WIDTH + 1), rng.integers(0, big.height - HEIGHT + 1)
        crop = big.crop((x, y, x + WIDTH, y + HEIGHT))
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        out.setdefault(sha256_bytes(buf.getvalue()), buf.getvalue())
    return list(out.values())


def plain_loop(paths: list[Path]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The reference: what one writes without this module (one process, full-size decode)."""
    arrays = []
    for path in paths:
        with Image.open(path) as im:
            rgb = ImageOps.exif_transpose(im).convert("RGB")
        scale = 224 / min(rgb.size)
        big = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.BICUBIC)
        left, top = (big.width - 224) // 2, (big.height - 224) // 2
        crop224 = np.asarray(big.crop((left, top, left + 224, top + 224)))
        squash32 = np.asarray(rgb.resize((32, 32), Image.BICUBIC))
        arrays.append((crop224, squash32))
    return arrays


def _quiet(message: str) -> None:
    """build_arrays' per-chunk log would drown the figures."""


def _build_both(root: Path, objects: Path, ids: list[str], workers: int | None) -> dict:
    """build_arrays at 32 and 224 into a fresh database and arrays folder under root."""
    db = Database(root / "emopipe.duckdb")
    return {size: build_arrays(db, ids, size, objects_root=objects, arrays_root=root / "arrays",
                               workers=workers, log=_quiet) for size in (32, 224)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m emopipe.bench resize", description=__doc__)
    parser.add_argument("--n", type=int, default=400, help="number of test JPEGs (default 400)")
    parser.add_argument("--workers", type=int, default=None, help="build_arrays workers (default: all cores)")
    args = parser.parse_args(argv)

    jpegs = make_jpegs(args.n)
    with tempfile.TemporaryDirectory(prefix="emopipe-bench-resize-") as tmp:
        root = Path(tmp)
        objects = root / "objects"
        ids = []
        for data in jpegs:
            image_id = sha256_bytes(data)
            path = object_path(image_id, objects)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            ids.append(image_id)
        n = len(ids)
        print(f"{n} JPEGs {WIDTH}x{HEIGHT}, {sum(map(len, jpegs)) / n / 1024:.0f} KiB each; "
              f"{len(os.sched_getaffinity(0))} CPU(s), load average {os.getloadavg()[0]:.1f}")

        wall, cpu = time.perf_counter(), time.process_time()
        plain_loop([object_path(i, objects) for i in ids])
        plain_s, plain_cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"(a) plain Pillow loop, 1 process, 224 crop + 32 squash: {plain_s:.2f} s, {n / plain_s:.0f} images/s, "
              f"{plain_cpu / n * 1000:.2f} CPU-ms per image")

        # One worker decodes in this process, so process_time counts all of its work: the CPU cost
        # per image, which (unlike wall time) does not depend on what else runs on the machine.
        cpu = time.process_time()
        _build_both(root / "one_worker", objects, ids, workers=1)
        one_cpu = time.process_time() - cpu
        print(f"    build_arrays, 1 worker, both sizes: {one_cpu / n * 1000:.2f} CPU-ms per image "
              f"= {plain_cpu / one_cpu:.2f}x less work than (a)")

        built = _build_both(root / "all_workers", objects, ids, workers=args.workers)
        for size, r in built.items():
            print(f"(b) build_arrays {size} {r.method}: {r.seconds:.2f} s, {r.images_per_second:.0f} images/s "
                  f"({r.n_decoded} decoded, {len(r.failed)} failed)")
        build_s = sum(r.seconds for r in built.values())
        print(f"(b) build_arrays, both sizes, {args.workers or 'all'} workers: {build_s:.2f} s, "
              f"{n / build_s:.0f} images/s = {plain_s / build_s:.2f}x the plain loop")

        wall = time.perf_counter()
        again = _build_both(root / "all_workers", objects, ids, workers=args.workers)
        assert all(r.n_decoded == 0 for r in again.values()), "a re-run decoded images the cache holds"
        print(f"    re-run, all cached: {time.perf_counter() - wall:.2f} s")
    return 0
