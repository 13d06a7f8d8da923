"""`python -m emopipe.bench ocr [--n N] [--size PX] [--workers W]`: the text_scores stage (all cores, or
the GPU) against a plain one-reader `readtext` loop, on the same synthetic demo images, in one run."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from emopipe.catalog import TextThresholds
from emopipe.core.synthetic import render, synthetic_listing
from emopipe.core.text_scores import DEFAULT_OCR_SIZE, default_workers, make_reader, score_text
from emopipe.db import Database
from emopipe.fingerprint import sha256_bytes
from emopipe.paths import object_path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m emopipe.bench ocr", description=__doc__)
    parser.add_argument("--n", type=int, default=64, help="images (default 64; with text in ~10 %%)")
    parser.add_argument("--size", type=int, default=DEFAULT_OCR_SIZE, help="OCR input size, longer side in px")
    parser.add_argument("--workers", type=int, default=None, help="CPU reader processes (default: cores, memory-capped)")
    args = parser.parse_args(argv)

    listing = synthetic_listing(100, 0)
    uris = [uri for uri, _, _ in listing[:: max(1, len(listing) // args.n)][: args.n]]
    with tempfile.TemporaryDirectory(prefix="emopipe-bench-ocr-") as tmp:
        root = Path(tmp)
        ids = []
        for uri in uris:
            data = render(uri)
            ids.append(sha256_bytes(data))
            path = object_path(ids[-1], root / "objects")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        print(f"{len(ids)} synthetic demo images, OCR input {args.size} px, {torch.get_num_threads()} torch threads")

        start = time.perf_counter()
        reader = make_reader(False, root)
        load_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for image_id in ids:
            with Image.open(object_path(image_id, root / "objects")) as img:
                img = img.convert("RGB")
                img.thumbnail((args.size, args.size), Image.Resampling.LANCZOS)
                reader.readtext(np.asarray(img))
        plain = len(ids) / (time.perf_counter() - start)
        del reader
        print(f"plain readtext loop, one reader:  {plain:6.2f} images/s  (reader start-up {load_seconds:.1f} s not counted)")

        workers = args.workers or default_workers()
        stage = _stage(root / "cpu", root / "objects", ids, args.size, "cpu", workers)
        print(f"text_scores stage, {stage.workers} CPU workers: {stage.images_per_second:6.2f} images/s  "
              f"(worker start-up counted; engine {stage.params['engine']})  ratio {stage.images_per_second / plain:.2f}x")
        if torch.cuda.is_available():
            gpu = _stage(root / "cuda", root / "objects", ids, args.size, "cuda", 1)
            print(f"text_scores stage, GPU:           {gpu.images_per_second:6.2f} images/s  "
                  f"ratio {gpu.images_per_second / plain:.2f}x")
        print(json.dumps({"n": len(ids), "size": args.size, "plain_images_per_second": round(plain, 3),
                          "stage_images_per_second": round(stage.images_per_second, 3), "workers": stage.workers,
                          "engine": stage.params["engine"]}))
    return 0


def _stage(work: Path, objects: Path, ids: list[str], size: int, device: str, workers: int):
    """score_text into a fresh database, so nothing comes from a cache."""
    work.mkdir()
    return score_text(Database(work / "emopipe.duckdb"), ids, TextThresholds(), objects_root=objects, work_dir=work,
                      ocr_size=size, workers=workers, device=device, log=lambda _: None)
