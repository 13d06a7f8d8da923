"""`python -m emopipe.bench ocr [--quality] [--n N] [--device cpu|cuda] [--workers W]` (needs scikit-image, in
the test extra): the text_scores stage with every engine on the same real photos, in one run: recall and
false-positive rate on the captioned-photo set (emopipe/bench/captioned_photos.py: clean crops of real photos
and the same crops with text), CPU seconds per image inside the engine calls, images/s on all cores (worker
start-up counted), reader start-up and RSS.

The reference is EasyOCR with an fp32 detector, the text filter before ppocr (the default engine now);
each engine runs with this CPU's default precision (bf16 where the CPU has it) and, where that differs, in
fp32 as on CPUs without native bf16. Each engine decides with its own default min_confidence
(emopipe.catalog.ENGINE_MIN_CONFIDENCE). Without --quality, the first N images (clean and captioned
alternate); with it, the whole set. --device cuda runs ppocr batched on the GPU as well (onnxruntime-gpu
needed).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from emopipe.bench.captioned_photos import captioned_photos
from emopipe.catalog import DEFAULT_TEXT_ENGINE, TextThresholds
from emopipe.core.text_detection_quality import text_quality
from emopipe.core.text_engines import text_engine
from emopipe.core.text_scores import default_workers, score_text
from emopipe.db import Database
from emopipe.fingerprint import sha256_bytes
from emopipe.paths import object_path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m emopipe.bench ocr", description=__doc__)
    parser.add_argument("--quality", action="store_true", help="the whole captioned-photo set (~240 images)")
    parser.add_argument("--n", type=int, default=64, help="images without --quality (default 64)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: also ppocr on the GPU")
    parser.add_argument("--workers", type=int, default=None, help="CPU reader processes (default: cores, memory-capped)")
    args = parser.parse_args(argv)

    photos = captioned_photos()
    photos = photos if args.quality else photos[: args.n]
    runs = [(DEFAULT_TEXT_ENGINE, "cpu", None)]
    fast_default = text_engine(DEFAULT_TEXT_ENGINE).default_precision("cpu")
    runs += [(DEFAULT_TEXT_ENGINE, "cpu", "fp32")] if fast_default != "fp32" else []  # as on a CPU without bf16
    easyocr_default = text_engine("easyocr").default_precision("cpu")
    runs += [("easyocr", "cpu", easyocr_default)] if easyocr_default != "fp32" else []
    runs += [("easyocr", "cpu", "fp32")]
    runs += [(DEFAULT_TEXT_ENGINE, "cuda", None)] if args.device == "cuda" else []
    with tempfile.TemporaryDirectory(prefix="emopipe-bench-ocr-") as tmp:
        root = Path(tmp)
        db = Database(root / "emopipe.duckdb")
        for n, photo in enumerate(photos):
            image_id = sha256_bytes(photo.jpeg)
            path = object_path(image_id, root / "objects")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(photo.jpeg)
            with db.transaction() as conn:
                conn.execute("INSERT INTO images (image_id, dataset, source_uri, label, attributes) VALUES (?, 'bench', ?, 'x', ?)",
                             [image_id, photo.name, json.dumps({"has_text": photo.has_text})])
        n_text = sum(p.has_text for p in photos)
        print(f"{len(photos)} real photos ({n_text} with text, {len(photos) - n_text} clean), {default_workers()} CPU workers")
        print(f"{'engine':<58} {'recall':>6} {'FP':>6} {'CPU-s/img':>9} {'img/s':>7} {'load s':>6} {'RSS MB':>6}")
        rows = []
        for engine, device, precision in runs:
            load = _load_seconds(engine, device, precision, root)
            workers = 1 if device == "cuda" else (args.workers or default_workers(engine))
            result = score_text(db, [sha256_bytes(p.jpeg) for p in photos], TextThresholds(), objects_root=root / "objects",
                                work_dir=root, engine=engine, device=device, precision=precision, workers=workers,
                                log=lambda _: None)
            quality = text_quality(db, "bench", result.params_hash)
            # ru_maxrss of children: the largest reader process so far (engines run smallest first)
            rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if device == "cpu" else float("nan")
            rows.append({"engine": result.params["engine"], "device": device, "recall": quality["recall"],
                         "false_positive_rate": quality["fp"] / max(1, quality["fp"] + quality["tn"]),
                         "cpu_seconds_per_image": result.cpu_seconds_per_image, "images_per_second": result.images_per_second,
                         "workers": result.workers, "load_seconds": load, "worker_rss_mb": rss})
            r = rows[-1]
            print(f"{r['engine'][:58]:<58} {r['recall']:6.3f} {r['false_positive_rate']:6.3f} {r['cpu_seconds_per_image']:9.4f} "
                  f"{r['images_per_second']:7.2f} {load:6.2f} {rss:6.0f}")
            print(f"    wrong: {', '.join(_wrong(db, result.params_hash)) or 'none'}")
        reference = next(r for r in rows if r["engine"].startswith("easyocr") and r["engine"].endswith("-cpu-fp32"))
        default = rows[0]
        print(f"CPU per image: {DEFAULT_TEXT_ENGINE} {default['cpu_seconds_per_image']:.4f} s vs EasyOCR fp32 "
              f"{reference['cpu_seconds_per_image']:.4f} s = {reference['cpu_seconds_per_image'] / default['cpu_seconds_per_image']:.1f}x less")
        print(json.dumps({"n": len(photos), "n_with_text": n_text, "runs": rows}))
    return 0


def _wrong(db: Database, params_hash: str) -> list[str]:
    """The photos decided against their truth: missed captions, then clean photos flagged (with what was read)."""
    with db.connect() as conn:
        return [f"{name} ({'missed' if truth else 'read ' + repr(text)})" for name, truth, text in conn.execute(
            "SELECT i.source_uri, (i.attributes->>'has_text')::BOOLEAN AS truth, s.text FROM images i"
            " JOIN text_scores s USING (image_id) WHERE s.params_hash = ? AND s.has_text IS DISTINCT FROM truth"
            " ORDER BY NOT truth, i.source_uri", [params_hash]).fetchall()]


def _load_seconds(engine: str, device: str, precision: str | None, root: Path) -> float:
    """Wall seconds to build one reader in this process, libraries imported (as a worker does at start-up)."""
    module = text_engine(engine)
    start = time.perf_counter()
    module.make_reader(device, root, precision or module.default_precision(device), 1)
    return time.perf_counter() - start
