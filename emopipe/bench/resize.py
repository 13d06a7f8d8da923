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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m emopipe.bench resize", description=__doc__)
    parser.add_argument("--n", type=int, default=400, help="number of test JPEGs (default 400)")
    parser.add_argument("--workers", type=int, default=None, help="build_arrays workers (default: all cores)")
    args = parser.parse_args(argv)

    jpegs = make_jpegs(args.n)
    with tempfile.TemporaryDirectory(prefix="emopipe-bench-resize-") as tmp:
        root = Path(tmp)
        objects, arrays = root / "objects", root / "arrays"
        ids = []
        for data in jpegs:
            image_id = sha256_bytes(data)
            path = object_path(image_id, objects)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            ids.append(image_id)
        print(f"{len(ids)} JPEGs {WIDTH}x{HEIGHT}, {sum(map(len, jpegs)) / len(jpegs) / 1024:.0f} KiB each; "
              f"{len(os.sched_getaffinity(0))} CPU(s)")

        t0 = time.perf_counter()
        plain_loop([object_path(i, objects) for i in ids])
        plain_s = time.perf_counter() - t0
        plain_rate = len(ids) / plain_s
        print(f"plain Pillow loop, 1 process, 224 crop + 32 squash: {plain_s:.2f} s, {plain_rate:.0f} images/s")

        db = Database(root / "emopipe.duckdb")
        built = {size: build_arrays(db, ids, size, objects_root=objects, arrays_root=arrays,
                                    workers=args.workers, log=_quiet) for size in (32, 224)}
        for size, r in built.items():
            print(f"build_arrays {size} {r.method}: {r.seconds:.2f} s, {r.images_per_second:.0f} images/s "
                  f"({r.n_decoded} decoded, {len(r.failed)} failed)")
        build_s = sum(r.seconds for r in built.values())
        build_rate = len(ids) / build_s
        print(f"build_arrays, both sizes: {build_s:.2f} s, {build_rate:.0f} images/s "
              f"= {build_rate / plain_rate:.2f}x the plain loop")

        t0 = time.perf_counter()
        again = [build_arrays(db, ids, size, objects_root=objects, arrays_root=arrays, log=_quiet) for size in (32, 224)]
        assert all(r.n_decoded == 0 for r in again), "a re-run decoded images the cache holds"
        print(f"re-run, all cached: {time.perf_counter() - t0:.2f} s")
    return 0
