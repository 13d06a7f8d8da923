"""Text detection: an OCR engine per image, and the decision `has_text` under configurable thresholds.

Engines (emopipe/core/text_engines/, the catalog's `text_engine`): `ppocr` (the default: PP-OCRv4 detector
and recognizer as ONNX, in OpenVINO on the CPU and onnxruntime on a GPU; why in its module) and `easyocr`
(CRAFT + EasyOCR's recognizer on torch, ~10x the CPU for the same recall on real photos).

Input. Each image is decoded from its ORIGINAL bytes in the object store (EXIF-transposed, RGB,
transparency flattened onto white), the whole image, its longer side scaled to the engine's
input_long_side(width, height, ocr_size) (ocr_size default: the engine's DEFAULT_OCR_SIZE; EasyOCR never
scales up, ppocr does), JPEGs shrunk in Pillow's draft mode at the smallest DCT scale still >= that size.
Not the packed arrays: 32 px erases text, and the 224 px array is a centre crop that cuts the captions and
watermarks sitting at the edges.

Two cache levels, so OCR never runs twice on an image:
- `ocr_results` (image_id, engine): the engine's raw boxes, engine = its full identity (library and version,
  model files, input size, device, precision), so engines and settings never mix.
  A decode failure of the (content-addressed) bytes is cached too; a missing object file is not,
  since ingest may store it later.
- `text_scores` (image_id, params_hash): the decision, re-derived from the stored boxes when a
  threshold changes. An unreadable image gets has_text NULL and a reason, and is re-examined on
  the next run.

Where the work runs: one GPU reader when the engine finds a GPU, batched (the engine's GPU_BATCH images per
detector pass, each padded onto one square); otherwise one reader per worker process (spawned),
as many as the cores and memory (the engine's READER_BYTES each) allow, workers x intra-op threads = cores.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from emopipe.catalog import DEFAULT_TEXT_ENGINE, TextThresholds
from emopipe.concurrency import bounded_map
from emopipe.core.text_engines import text_engine
from emopipe.db import Database
from emopipe.fingerprint import params_hash as hash_params
from emopipe.paths import object_path
from emopipe.progress import Progress
from emopipe.threads import available_cores, threads_per_worker

FLUSH_EVERY = 64  # images per write transaction, so a killed run keeps its finished work

Reader = Any  # an engine's reader: readtext(np.ndarray) -> [(corners, text, conf)], readtext_batched(images, batch_size)


@dataclass(frozen=True)
class OcrOutput:
    """One image's raw OCR result: boxes on the (width x height) OCR input, or an error."""

    image_id: str
    width: int = 0
    height: int = 0
    boxes: tuple[dict, ...] = ()
    error: str | None = None
    cacheable: bool = True  # False for a missing object file
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # CPU time of the OCR process during the engine call (all its threads)


@dataclass(frozen=True)
class Decision:
    has_text: bool | None
    n_boxes: int | None = None
    best_confidence: float | None = None
    text_area: float | None = None  # fraction of the image covered by the boxes that pass
    text: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class TextScoreResult:
    params_hash: str
    params: dict  # what params_hash hashes: engine identity (library, models, OCR size, device, precision) and thresholds
    n_images: int
    n_ocr_run: int  # images OCR'd in this call
    n_cached: int  # images whose OCR output (or decision) was already stored
    n_has_text: int
    n_unreadable: int
    seconds: float
    images_per_second: float  # OCR'd images per second of the OCR phase, reader start-up included
    cpu_seconds_per_image: float  # CPU time per OCR'd image inside the engine calls (reader start-up excluded)
    workers: int
    batch_size: int  # images per detector pass in this process
    device: str


def ocr_engine(engine: str, ocr_size: int, device: str, precision: str, batched: bool = False) -> str:
    """The ocr_results cache key: the engine's full identity (see emopipe/core/text_engines)."""
    return text_engine(engine).identity(ocr_size, device, precision, batched)


def score_params(thresholds: TextThresholds, engine: str, ocr_size: int, device: str, precision: str,
                 batched: bool = False) -> tuple[str, dict]:
    """(params_hash, params): the text_scores key of a decision (min_confidence None: the engine's)."""
    thresholds = thresholds.for_engine(engine)
    params = {"engine": ocr_engine(engine, ocr_size, device, precision, batched), "ocr_size": ocr_size,
              **thresholds.as_dict()}
    return hash_params(params), params


def load_for_ocr(path: Path, long_side: Callable[[int, int], int]) -> np.ndarray:
    """The whole image as RGB uint8, its longer side scaled to long_side(width, height)."""
    with Image.open(path) as img:
        side = long_side(*img.size)
        scale = min(1.0, side / max(img.size))
        img.draft("RGB", (max(1, round(img.width * scale)), max(1, round(img.height * scale))))  # JPEG: decode at 1/2..1/8 scale, still >= target
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
        img = img.convert("RGB")
        if max(img.size) > side:
            img.thumbnail((side, side), Image.Resampling.LANCZOS)
        elif max(img.size) < side:
            up = side / max(img.size)
            img = img.resize((max(1, round(img.width * up)), max(1, round(img.height * up))), Image.Resampling.LANCZOS)
        return np.asarray(img)


def _read(image_id: str, objects_root: Path, engine: str, ocr_size: int) -> tuple[np.ndarray | None, OcrOutput | None]:
    """(pixels, None), or (None, the error OcrOutput) when the object is missing or undecodable."""
    path = object_path(image_id, objects_root)
    if not path.is_file():
        return None, OcrOutput(image_id, error=f"missing object file {path}", cacheable=False)
    input_long_side = text_engine(engine).input_long_side
    try:
        return load_for_ocr(path, lambda width, height: input_long_side(width, height, ocr_size)), None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return None, OcrOutput(image_id, error=f"unreadable image: {type(e).__name__}: {e}")


def _ocr(reader: Reader, image_id: str, pixels: np.ndarray) -> OcrOutput:
    start, cpu_start = time.perf_counter(), time.process_time()
    found = reader.readtext(pixels)
    return _output(image_id, pixels.shape, found, time.perf_counter() - start, time.process_time() - cpu_start)


def _ocr_batch(reader: Reader, batch: list[tuple[str, np.ndarray]], ocr_size: int) -> list[OcrOutput]:
    """One detector pass over the batch: each image padded with black at the right and bottom onto one
    square (ocr_size, or the batch's longest side where the engine scales up past it; both engines pad to
    a multiple of 32 this way), so images of any shape go together and their boxes keep their coordinates."""
    side = max(ocr_size, *(max(pixels.shape[:2]) for _, pixels in batch))
    canvas = np.zeros((len(batch), side, side, 3), np.uint8)
    for n, (_, pixels) in enumerate(batch):
        canvas[n, : pixels.shape[0], : pixels.shape[1]] = pixels
    start, cpu_start = time.perf_counter(), time.process_time()
    found = reader.readtext_batched(list(canvas), batch_size=len(batch))
    seconds, cpu_seconds = (time.perf_counter() - start) / len(batch), (time.process_time() - cpu_start) / len(batch)
    return [_output(image_id, pixels.shape, image_found, seconds, cpu_seconds)
            for (image_id, pixels), image_found in zip(batch, found)]


def _output(image_id: str, shape: tuple[int, ...], found: list, seconds: float, cpu_seconds: float) -> OcrOutput:
    """A reader's [(corners, text, confidence)] as an OcrOutput; width/height are the image's own."""
    boxes = tuple(
        {"points": [[float(x), float(y)] for x, y in points], "text": text, "confidence": float(conf)}
        for points, text, conf in found
    )
    return OcrOutput(image_id, shape[1], shape[0], boxes, seconds=seconds, cpu_seconds=cpu_seconds)


def decide(ocr: OcrOutput, thresholds: TextThresholds) -> Decision:
    """has_text: the boxes at or above min_confidence hold >= min_chars ASCII letters/digits and cover
    >= min_area of the image (their union, so overlapping boxes count once). ASCII only: PP-OCR's recognizer
    also knows Chinese, and reads a stray CJK character into textures now and then."""
    if ocr.error:
        return Decision(None, reason=ocr.error)
    passing = [b for b in ocr.boxes if b["confidence"] >= thresholds.min_confidence]
    n_chars = sum(ch.isascii() and ch.isalnum() for b in passing for ch in b["text"])
    mask = Image.new("1", (ocr.width, ocr.height))
    draw = ImageDraw.Draw(mask)
    for b in passing:  # corners are pixel edges; Pillow fills the pixels whose centres (x + 0.5) lie inside
        draw.polygon([(x - 0.5, y - 0.5) for x, y in b["points"]], fill=1)
    area = float(np.asarray(mask).mean()) if passing else 0.0
    return Decision(
        has_text=bool(passing) and n_chars >= thresholds.min_chars and area >= thresholds.min_area,
        n_boxes=len(ocr.boxes),
        best_confidence=max((b["confidence"] for b in ocr.boxes), default=None),
        text_area=area,
        text=" | ".join(b["text"] for b in ocr.boxes),
    )


# --- where OCR runs -------------------------------------------------------------------------------

def _prefetched(items: list[str], load: Callable[[str], Any], depth: int) -> Iterator[Any]:
    """load(item) for each item in order, decoding up to `depth` ahead on threads (Pillow releases the GIL)."""
    with ThreadPoolExecutor(max(1, depth // 2)) as pool:
        yield from bounded_map(pool, load, items, in_flight=depth)


def _ocr_in_process(reader: Reader, engine: str, ids: list[str], objects_root: Path, ocr_size: int,
                    batch_size: int) -> Iterator[OcrOutput]:
    """OCR in this process: one image per readtext call, or batch_size images per padded pass."""
    batch: list[tuple[str, np.ndarray]] = []
    for image_id, (pixels, failed) in zip(ids, _prefetched(ids, lambda i: _read(i, objects_root, engine, ocr_size), 8)):
        if failed:
            yield failed
        elif batch_size == 1:
            yield _ocr(reader, image_id, pixels)
        else:
            batch.append((image_id, pixels))
            if len(batch) == batch_size:
                yield from _ocr_batch(reader, batch, ocr_size)
                batch = []
    if batch:
        yield from _ocr_batch(reader, batch, ocr_size)


_worker_reader: Reader = None


def _init_worker(engine: str, threads: int, work_dir: str, precision: str) -> None:
    global _worker_reader
    _worker_reader = text_engine(engine).make_reader("cpu", Path(work_dir), precision, threads)


def _worker_ocr(task: tuple[str, str, str, int]) -> OcrOutput:
    image_id, objects_root, engine, ocr_size = task
    pixels, failed = _read(image_id, Path(objects_root), engine, ocr_size)
    return failed or _ocr(_worker_reader, image_id, pixels)


def _ocr_in_workers(engine: str, ids: list[str], objects_root: Path, ocr_size: int, workers: int, work_dir: Path,
                    precision: str) -> Iterator[OcrOutput]:
    threads = threads_per_worker(workers)  # workers x threads = cores (emopipe/threads.py)
    # spawn: a forked child would inherit thread pools and any open DuckDB handle. A process pool
    # executor, not multiprocessing.Pool: a worker killed for memory fails the run instead of hanging it.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(engine, threads, str(work_dir), precision)) as pool:
        yield from bounded_map(pool, _worker_ocr, ((i, str(objects_root), engine, ocr_size) for i in ids),
                               in_flight=4 * workers, ordered=False)


def available_memory() -> int:
    """MemAvailable from /proc/meminfo, in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def default_workers(engine: str = DEFAULT_TEXT_ENGINE) -> int:
    """One CPU reader per core, as many as memory holds."""
    return max(1, min(available_cores(), available_memory() // text_engine(engine).READER_BYTES))


# --- the stage ------------------------------------------------------------------------------------

def score_text(
    db: Database,
    image_ids: Iterable[str],
    thresholds: TextThresholds,
    *,
    objects_root: Path,
    work_dir: Path,
    engine: str = DEFAULT_TEXT_ENGINE,
    ocr_size: int | None = None,
    workers: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    batch_size: int | None = None,
    log: Callable[[str], None] = print,
    reader_factory: Callable[[], Reader] | None = None,
) -> TextScoreResult:
    """Decide has_text for every image under `thresholds` (min_confidence None: the engine's), running OCR
    only where no stored output exists.

    (One function on purpose: cache lookup, OCR, storing and deciding share one engine key and one
    set of ids, and read best top to bottom.)

    engine: "ppocr" or "easyocr" (emopipe/core/text_engines). ocr_size: the engine's base longer side of
    the OCR input (default: its DEFAULT_OCR_SIZE). device: "cuda" or "cpu" (default: the engine's
    default_device()). precision: "fp32", or "bf16" on a CPU (default: the engine's
    default_precision(device)). workers: CPU reader processes (default: default_workers(engine)).
    batch_size: images per padded detector pass, in this process (default: the engine's GPU_BATCH on
    cuda; 1 on CPU, where the worker processes already keep the cores busy; part of the engine key).
    reader_factory: build the reader in this process instead (e.g. a shared or instrumented one, made
    with the same engine and precision); OCR then runs here, on one reader. work_dir holds the engine's
    scratch files.
    """
    start = time.perf_counter()
    ids = list(dict.fromkeys(image_ids))
    thresholds = thresholds.for_engine(engine)
    module = text_engine(engine)
    ocr_size = ocr_size or module.DEFAULT_OCR_SIZE
    device = device or module.default_device()
    precision = precision or module.default_precision(device)
    batch_size = batch_size or (module.GPU_BATCH if device == "cuda" else 1)
    identity = ocr_engine(engine, ocr_size, device, precision, batch_size > 1)
    key, params = score_params(thresholds, engine, ocr_size, device, precision, batch_size > 1)
    with db.connect() as conn:
        decided = {r[0] for r in conn.execute(
            "SELECT image_id FROM text_scores WHERE params_hash = $1 AND has_text IS NOT NULL"
            " AND image_id IN (SELECT unnest($2::VARCHAR[]))", [key, ids]).fetchall()}
        stored = {r[0]: r[1:] for r in conn.execute(
            "SELECT image_id, boxes, error FROM ocr_results WHERE engine = $1"
            " AND image_id IN (SELECT unnest($2::VARCHAR[]))", [identity, ids]).fetchall()}
    pending = [i for i in ids if i not in decided]
    cached = [_from_row(i, *stored[i]) for i in pending if i in stored]
    to_ocr = [i for i in pending if i not in stored]
    if cached:
        _write(db, identity, key, thresholds, cached, store_ocr=False)

    if reader_factory is not None or device == "cuda" or batch_size > 1 or not to_ocr:
        workers = 1
    else:
        workers = max(1, min(workers or default_workers(engine), len(to_ocr)))
    n_ocr_run, ocr_cpu_seconds, ocr_start = 0, 0.0, time.perf_counter()
    if to_ocr:
        log(f"text_scores: OCR on {len(to_ocr)} of {len(ids)} images ({identity}, {workers} worker(s), "
            f"up to {batch_size} image(s) per pass)")
        if engine == "easyocr" and device == "cpu" and precision == "fp32":
            log("text_scores: this CPU has no native bfloat16 (AVX512-BF16/AMX): the EasyOCR text detector runs in "
                "fp32, 2-3x slower (text_engine: ppocr is about 10x faster)")
        if workers > 1:
            outputs = _ocr_in_workers(engine, to_ocr, objects_root, ocr_size, workers, work_dir, precision)
        else:
            reader = reader_factory() if reader_factory else module.make_reader(device, work_dir, precision,
                                                                                available_cores())
            outputs = _ocr_in_process(reader, engine, to_ocr, objects_root, ocr_size, batch_size)
        batch: list[OcrOutput] = []
        with Progress("text_scores: OCR", len(to_ocr), "images", log) as progress:
            for done, out in enumerate(outputs, 1):
                batch.append(out)
                n_ocr_run += out.error is None
                ocr_cpu_seconds += out.cpu_seconds
                if len(batch) >= FLUSH_EVERY or done == len(to_ocr):
                    _write(db, identity, key, thresholds, batch, store_ocr=True)
                    batch = []
                progress.advance()
    ocr_seconds = time.perf_counter() - ocr_start

    with db.connect() as conn:
        n_has_text, n_unreadable = conn.execute(
            "SELECT count(*) FILTER (has_text), count(*) FILTER (has_text IS NULL) FROM text_scores"
            " WHERE params_hash = $1 AND image_id IN (SELECT unnest($2::VARCHAR[]))", [key, ids]).fetchone()
    return TextScoreResult(
        params_hash=key, params=params, n_images=len(ids), n_ocr_run=n_ocr_run, n_cached=len(ids) - len(to_ocr),
        n_has_text=n_has_text, n_unreadable=n_unreadable, seconds=time.perf_counter() - start,
        images_per_second=n_ocr_run / ocr_seconds if n_ocr_run else 0.0,
        cpu_seconds_per_image=ocr_cpu_seconds / n_ocr_run if n_ocr_run else 0.0, workers=workers, batch_size=batch_size,
        device=device,
    )


def _from_row(image_id: str, boxes: str | None, error: str | None) -> OcrOutput:
    if error is not None:
        return OcrOutput(image_id, error=error)
    stored = json.loads(boxes)
    return OcrOutput(image_id, stored["width"], stored["height"], tuple(stored["boxes"]))


def _write(db: Database, engine: str, key: str, thresholds: TextThresholds, outputs: list[OcrOutput], *, store_ocr: bool) -> None:
    """One transaction: the raw outputs (if new and cacheable) and the decisions."""
    decisions = [decide(o, thresholds) for o in outputs]
    ocr_rows = [o for o in outputs if store_ocr and o.cacheable]
    with db.transaction() as conn:
        if ocr_rows:
            conn.execute(
                "INSERT OR REPLACE INTO ocr_results (image_id, engine, boxes, error, seconds)"
                " SELECT unnest($1::VARCHAR[]), $2, unnest($3::VARCHAR[]), unnest($4::VARCHAR[]), unnest($5::DOUBLE[])",
                [[o.image_id for o in ocr_rows], engine,
                 [None if o.error else json.dumps({"width": o.width, "height": o.height, "boxes": list(o.boxes)})
                  for o in ocr_rows],
                 [o.error for o in ocr_rows], [o.seconds for o in ocr_rows]])
        conn.execute(
            "INSERT OR REPLACE INTO text_scores"
            " (image_id, params_hash, has_text, n_boxes, best_confidence, text_area, text, reason)"
            " SELECT unnest($1::VARCHAR[]), $2, unnest($3::BOOLEAN[]), unnest($4::INTEGER[]), unnest($5::DOUBLE[]),"
            " unnest($6::DOUBLE[]), unnest($7::VARCHAR[]), unnest($8::VARCHAR[])",
            [[o.image_id for o in outputs], key, [d.has_text for d in decisions], [d.n_boxes for d in decisions],
             [d.best_confidence for d in decisions], [d.text_area for d in decisions], [d.text for d in decisions],
             [d.reason for d in decisions]])
