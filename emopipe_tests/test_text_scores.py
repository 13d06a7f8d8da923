"""Text detection and the text filter, with the real engines (ppocr, the default, and EasyOCR) on real photos
and synthetic images.

One default-engine reader and one scored store are shared by the module; tests that change the store use
fresh databases or new parameters, and count the reader's calls to show caching.
"""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from emopipe.catalog import TextThresholds
from emopipe.core.filtered_images import MissingTextScores, filter_images, kept_image_ids
from emopipe.core.synthetic import render, synthetic_listing
from emopipe.core.text_detection_quality import text_quality
from emopipe.core.text_engines import text_engine
from emopipe.core.text_scores import OcrOutput, decide, load_for_ocr, ocr_engine, score_params, score_text
from emopipe.db import Database
from emopipe_tests.conftest import encode
from emopipe.fingerprint import sha256_bytes
from emopipe.paths import object_path

DEFAULTS = TextThresholds()
FAST_ENGINE = "ppocr"  # the stage's caching and deciding are engine-agnostic: tested with the fast engine
ENGINE = text_engine(FAST_ENGINE)
OCR_SIZE, PRECISION = ENGINE.DEFAULT_OCR_SIZE, ENGINE.default_precision("cpu")  # what the stage uses on this CPU


class CountingReader:
    """A real engine's reader, counting readtext calls."""

    def __init__(self, reader):
        self.reader, self.calls, self.batches = reader, 0, []

    def readtext(self, pixels):
        self.calls += 1
        return self.reader.readtext(pixels)

    def readtext_batched(self, images, **kw):
        self.calls += len(images)
        self.batches.append(len(images))
        return self.reader.readtext_batched(images, **kw)


def caption(arr: np.ndarray, text: str, at_top: bool) -> np.ndarray:
    """White text on a black banner along the top or bottom edge, where a centre crop would cut it."""
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(img.size) // 14)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    y = 8 if at_top else img.height - (bottom - top) - 16
    draw.rectangle((0, y - 6, img.width, y + bottom + 6), fill="black")
    draw.text((10, y - top), text, fill="white", font=font)
    return np.asarray(img)


class Store:
    """A data dir with objects and an `images` table; truth: image_id -> has_text (None: unreadable)."""

    def __init__(self, root):
        self.root, self.objects = root, root / "objects"
        self.db = Database(root / "emopipe.duckdb")
        self.truth: dict[str, bool | None] = {}
        self.names: dict[str, str] = {}

    def add(self, dataset, name, data: bytes | None, label, has_text, *, write=True) -> str:
        image_id = sha256_bytes(data)
        if write:
            path = object_path(image_id, self.objects)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO images (image_id, dataset, source_uri, label, attributes) VALUES (?,?,?,?,?)",
                         [image_id, dataset, name, label, json.dumps({"has_text": has_text})])
        self.truth[image_id], self.names[name] = has_text, image_id
        return image_id

    def ids(self, dataset="t"):
        with self.db.connect() as conn:
            return [r[0] for r in conn.execute(
                "SELECT image_id FROM images WHERE dataset = ? ORDER BY source_uri", [dataset]).fetchall()]

    def score(self, reader, thresholds=DEFAULTS, dataset="t", engine=FAST_ENGINE, precision=None, **kw):
        return score_text(self.db, self.ids(dataset), thresholds, objects_root=self.objects, work_dir=self.root,
                          engine=engine, device="cpu", precision=precision, reader_factory=lambda: reader,
                          log=lambda _: None, **kw)

    def scores(self, params_hash):
        with self.db.connect() as conn:
            return {r[0]: r[1:] for r in conn.execute(
                "SELECT image_id, has_text, reason FROM text_scores WHERE params_hash = ?", [params_hash]).fetchall()}


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    return CountingReader(ENGINE.make_reader("cpu", tmp_path_factory.mktemp("ocr"), PRECISION, 2))


def _synthetic(has_text: bool, n: int):
    return [(uri, attrs) for uri, _, attrs in synthetic_listing(20, 0) if attrs["has_text"] == has_text][:n]


@pytest.fixture(scope="module")
def store(tmp_path_factory, reader, photos):
    """Dataset "t": text photos, captioned photos, plain photos, synthetic images, one corrupt file;
    scored once with the default thresholds."""
    s = Store(tmp_path_factory.mktemp("data"))
    jpeg = lambda arr: encode(arr, "JPEG", quality=90)
    s.add("t", "page", jpeg(photos["page"][:80]), "sadness", True)  # the heading and two lines of a scan
    s.add("t", "chelsea_caption", jpeg(caption(photos["chelsea"], "Missing you every day", at_top=False)), "sadness", True)
    s.add("t", "rocket_caption", encode(caption(photos["rocket"], "LAUNCH 2024", at_top=True), "PNG"), "joy", True)
    for name in ("astronaut", "coffee", "coins", "grass"):
        s.add("t", name, jpeg(photos[name]), "joy" if name != "grass" else "sadness", False)
    for uri, attrs in _synthetic(True, 2) + _synthetic(False, 2):
        s.add("t", uri, render(uri), "joy", attrs["has_text"])
    s.add("t", "corrupt", jpeg(photos["moon"])[:300] + b"garbage" * 10, "sadness", None)
    s.first = s.score(reader)
    s.first_calls, s.reader = reader.calls, reader
    return s


def test_first_run_reads_text_where_there_is_text(store):
    result = store.first
    assert (result.n_images, result.n_ocr_run, result.n_cached, result.n_unreadable) == (12, 11, 0, 1)
    assert store.first_calls == 11
    scores = store.scores(result.params_hash)
    assert {i: v[0] for i, v in scores.items()} == store.truth
    assert result.n_has_text == sum(t is True for t in store.truth.values()) == 5
    # The caption sits on the bottom edge: the whole image was read, not a centre crop.
    with store.db.connect() as conn:
        text = conn.execute("SELECT text FROM text_scores WHERE image_id = ? AND params_hash = ?",
                            [store.names["chelsea_caption"], result.params_hash]).fetchone()[0]
    assert "every" in text.lower()


def test_rerun_and_same_settings_elsewhere_run_no_ocr(store, reader, photos):
    calls = reader.calls
    again = store.score(reader)
    assert (again.n_ocr_run, again.n_cached, again.n_has_text, again.params_hash) == (
        0, 12, store.first.n_has_text, store.first.params_hash)
    # A second dataset sharing 3 images with the first, plus one new image: OCR on the new one only.
    shared = store.ids()[:3]
    with store.db.transaction() as conn:
        conn.execute("INSERT INTO images SELECT image_id, 'u', source_uri, label, width, height, format, n_bytes,"
                     " attributes, ingested_at FROM images WHERE dataset = 't' AND image_id IN (SELECT unnest(?))",
                     [shared])
    store.add("u", "gravel", encode(photos["gravel"]), "joy", False)
    other = store.score(reader, dataset="u")
    assert (other.n_images, other.n_ocr_run, other.n_cached) == (4, 1, 3)
    assert reader.calls == calls + 1


def test_threshold_change_redecides_from_stored_boxes(store, reader):
    calls = reader.calls
    strict = TextThresholds(min_confidence=0.999)
    result = store.score(reader, strict)
    assert reader.calls == calls and result.n_ocr_run == 0
    assert result.params_hash != store.first.params_hash
    assert result.n_has_text < store.first.n_has_text
    # the quality measure catches the bad threshold: recall falls, the defaults pass
    assert text_quality(store.db, "t", result.params_hash)["recall"] < 0.95
    good = text_quality(store.db, "t", store.first.params_hash)
    assert (good["precision"], good["recall"], good["n"]) == (1.0, 1.0, 11)  # the corrupt file has no truth


def test_corrupt_image_gets_null_and_a_reason(store):
    has_text, reason = store.scores(store.first.params_hash)[store.names["corrupt"]]
    assert has_text is None and reason.startswith("unreadable image")


def test_missing_object_is_retried_once_it_is_stored(tmp_path, reader, photos):
    s = Store(tmp_path)
    data = encode(photos["coffee"])
    image_id = s.add("t", "coffee", data, "joy", False, write=False)
    calls = reader.calls
    first = s.score(reader)
    assert (first.n_unreadable, first.n_ocr_run, reader.calls) == (1, 0, calls)
    assert s.scores(first.params_hash)[image_id][1].startswith("missing object file")
    assert text_quality(s.db, "t", first.params_hash)["n_unreadable"] == 1
    path = object_path(image_id, s.objects)
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    second = s.score(reader)
    assert (second.n_unreadable, second.n_ocr_run, reader.calls) == (0, 1, calls + 1)
    assert s.scores(first.params_hash)[image_id] == (False, None)


def test_filter_keeps_images_without_text(store):
    key, params = store.first.params_hash, store.first.params
    assert score_params(DEFAULTS, FAST_ENGINE, OCR_SIZE, "cpu", PRECISION) == (key, params)
    on = filter_images(store.db, experiment="e1", dataset="t", text_filter=True, params_hash=key, params=params)
    no_text = sorted(i for i, t in store.truth.items() if t is False and i in store.ids())
    assert kept_image_ids(store.db, on.filter_id) == no_text
    assert (on.n_input, on.n_kept, on.n_removed, on.n_unreadable) == (12, 6, 5, 1)
    assert on.removed_per_class == {"joy": 3, "sadness": 2}
    assert set(on.removed_examples) == {i for i, t in store.truth.items() if t is True and i in store.ids()}

    off = filter_images(store.db, experiment="e1", dataset="t", text_filter=False, params_hash=None, params=None)
    assert kept_image_ids(store.db, off.filter_id) == sorted(store.ids())
    assert (off.n_kept, off.n_removed, off.n_unreadable, off.removed_per_class) == (12, 0, 0, {})
    with store.db.connect() as conn:  # stored in image_id order, which splits.load_filtered reads without a sort
        assert [r[0] for r in conn.execute("SELECT image_id FROM filtered_images WHERE filter_id = ?",
                                           [off.filter_id]).fetchall()] == sorted(store.ids())

    # Content-addressed: another experiment with the same settings gets the same set, recorded for both.
    twin = filter_images(store.db, experiment="e2", dataset="t", text_filter=True, params_hash=key, params=params)
    assert twin.filter_id == on.filter_id != off.filter_id
    with store.db.connect() as conn:
        runs = conn.execute("SELECT experiment, n_kept, params->>'min_confidence' FROM filter_runs"
                            " WHERE filter_id = ? ORDER BY experiment", [on.filter_id]).fetchall()
    engine_default = str(DEFAULTS.for_engine(FAST_ENGINE).min_confidence)
    assert runs == [("e1", 6, engine_default), ("e2", 6, engine_default)]


def test_filter_refuses_images_without_scores(store):
    key, params = score_params(TextThresholds(min_chars=5), FAST_ENGINE, OCR_SIZE, "cpu", PRECISION)  # never scored
    with pytest.raises(MissingTextScores, match="12 of 12 images of dataset 't'"):
        filter_images(store.db, experiment="e", dataset="t", text_filter=True, params_hash=key, params=params)


def test_text_quality_counts(tmp_path):
    s = Store(tmp_path)
    key = "k"
    predicted = {"a": True, "b": True, "c": False, "d": False, "e": True, "f": None}
    truth = {"a": True, "b": False, "c": True, "d": False, "e": True, "f": True}
    for name in predicted:
        s.add("q", name, name.encode(), "joy", truth[name], write=False)
    s.add("q", "no_truth", b"g", "joy", None, write=False)
    with s.db.transaction() as conn:
        for name, value in predicted.items():
            conn.execute("INSERT INTO text_scores (image_id, params_hash, has_text) VALUES (?, ?, ?)",
                         [s.names[name], key, value])
        conn.execute("INSERT INTO text_scores (image_id, params_hash, has_text) VALUES (?, ?, true)",
                     [s.names["no_truth"], key])
    q = text_quality(s.db, "q", key)
    assert (q["tp"], q["fp"], q["fn"], q["tn"], q["n"], q["n_unreadable"]) == (2, 1, 1, 1, 5, 1)
    assert q["precision"] == pytest.approx(2 / 3) and q["recall"] == pytest.approx(2 / 3)


def test_decide_applies_each_threshold():
    def box(x0, y0, x1, y1, text, conf):
        return {"points": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], "text": text, "confidence": conf}

    # two overlapping 10x10 boxes on a 100x100 image: union 150 px = 1.5 %, not 2 %
    ocr = OcrOutput("x", 100, 100, (box(0, 0, 10, 10, "ab", 0.9), box(5, 0, 15, 10, "c!", 0.6), box(50, 50, 60, 60, "zz", 0.1)))
    d = decide(ocr, TextThresholds(min_confidence=0.5, min_area=0.015, min_chars=3))
    assert d.has_text and d.n_boxes == 3 and d.best_confidence == 0.9
    assert d.text_area == 0.015
    assert not decide(ocr, TextThresholds(min_confidence=0.5, min_area=0.02, min_chars=3)).has_text
    assert not decide(ocr, TextThresholds(min_confidence=0.5, min_area=0.01, min_chars=4)).has_text
    assert not decide(ocr, TextThresholds(min_confidence=0.95, min_area=0.0, min_chars=1)).has_text
    failed = decide(OcrOutput("x", error="unreadable image: truncated"), DEFAULTS)
    assert (failed.has_text, failed.reason) == (None, "unreadable image: truncated")


def test_load_for_ocr_rotates_and_scales_down(tmp_path):
    easyocr_400 = lambda width, height: text_engine("easyocr").input_long_side(width, height, 400)  # noqa: E731
    arr = np.zeros((300, 800, 3), np.uint8)
    arr[:, :100] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, exif=exif.tobytes())
    pixels = load_for_ocr(path, easyocr_400)
    assert pixels.shape == (400, 150, 3)
    assert pixels[:40].mean() > 200 and pixels[-40:].mean() < 30  # the white left band is now on top
    small = tmp_path / "small.png"
    Image.fromarray(arr[:50, :80]).save(small)
    assert load_for_ocr(small, easyocr_400).shape == (50, 80, 3)  # EasyOCR: never scaled up
    rgba = tmp_path / "alpha.png"
    Image.new("RGBA", (20, 10), (0, 0, 0, 0)).save(rgba)
    assert load_for_ocr(rgba, easyocr_400).min() == 255  # transparency on white


def test_ppocr_reads_at_512_px_with_a_short_side_of_384(tmp_path):
    """ppocr scales up as well as down: the longer side to 512, then up until the shorter side is 384 px,
    the longer side capped at 1024 (small and wide text was missed below that)."""
    ppocr_512 = lambda width, height: ENGINE.input_long_side(width, height, 512)  # noqa: E731
    for (width, height), expected in {  # (width, height): (rows, columns)
                                      (80, 50): (384, 615), (1600, 1200): (384, 512), (600, 600): (512, 512),
                                      (1200, 300): (256, 1024), (500, 375): (384, 512)}.items():
        path = tmp_path / f"{width}x{height}.jpg"
        Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(path)
        assert load_for_ocr(path, ppocr_512).shape[:2] == expected, (width, height)


def test_worker_processes_agree_with_one_reader(store, tmp_path):
    s = Store(tmp_path)
    for name in ("chelsea_caption", "coffee"):
        image_id = store.names[name]
        data = object_path(image_id, store.objects).read_bytes()
        s.add("t", name, data, "joy", store.truth[image_id])
    result = score_text(s.db, s.ids(), DEFAULTS, objects_root=s.objects, work_dir=tmp_path, workers=2,
                        engine=FAST_ENGINE, device="cpu", log=lambda _: None)
    assert (result.workers, result.n_ocr_run, result.n_has_text) == (2, 2, 1)
    assert {i: v[0] for i, v in s.scores(result.params_hash).items()} == {i: store.truth[i] for i in s.ids()}
    with s.db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM ocr_results WHERE engine = ?",
                            [ocr_engine(FAST_ENGINE, OCR_SIZE, "cpu", PRECISION)]).fetchone()[0] == 2


def test_easyocr_engine_bf16_and_fp32_decide_alike_and_engines_never_mix(store, tmp_path):
    """EasyOCR (text_engine: easyocr) with its bf16 detector (the default on CPUs with native bf16) and its
    fp32 one, beside the default engine, on the captioned, plain, scanned and synthetic images of the store:
    each engine OCRs every image itself (no boxes shared) and decides every image right."""
    s = Store(tmp_path)
    for name, image_id in store.names.items():
        if name != "corrupt" and image_id in store.ids("t"):
            s.add("t", name, object_path(image_id, store.objects).read_bytes(), "joy", store.truth[image_id])
    easyocr = text_engine("easyocr")
    results = {"ppocr": s.score(store.reader)}
    for precision in ("fp32", "bf16"):
        reader = CountingReader(easyocr.make_reader("cpu", tmp_path / precision, precision))
        results[precision] = s.score(reader, engine="easyocr", precision=precision)
        assert reader.calls == len(s.ids()) == 11
    truth = {i: (store.truth[i], None) for i in s.ids()}
    assert all(s.scores(r.params_hash) == truth for r in results.values())
    assert all(r.n_ocr_run == 11 and r.n_cached == 0 for r in results.values())
    assert results["fp32"].params["engine"] == easyocr.identity(easyocr.DEFAULT_OCR_SIZE, "cpu", "fp32")
    assert len({r.params["engine"] for r in results.values()}) == len({r.params_hash for r in results.values()}) == 3
    with s.db.connect() as conn:
        assert conn.execute("SELECT count(DISTINCT engine), count(*) FROM ocr_results").fetchone() == (3, 33)


@pytest.mark.parametrize("engine, runtime", [("ppocr", None), ("ppocr", "onnxruntime"), ("easyocr", None)])
def test_batched_padded_passes_decide_as_one_image_at_a_time(engine, runtime, reader, photos, tmp_path):
    """The GPU path's batching, run on the CPU: images of different shapes padded onto the OCR square,
    4 per detector pass, decide as readtext does one at a time, read the same captions, and are cached
    under their own engine. runtime "onnxruntime": ppocr's GPU code itself (rapidocr's onnxruntime sessions,
    here with onnxruntime's CPU provider), which must decide as the OpenVINO CPU path (both give the truth)."""
    module = text_engine(engine)
    precision = module.default_precision("cpu")
    if runtime == "onnxruntime":
        from emopipe.core.text_engines.ppocr import OpenVinoModel, PpOcrReader

        precision = "fp32"
        reader = CountingReader(PpOcrReader("cpu", 2, precision, runtime=runtime))
        sessions = reader.reader.ocr.text_det.infer, reader.reader.ocr.text_rec.session
        assert not any(isinstance(m, OpenVinoModel) for m in sessions)
        assert [m.session.get_providers()[0] for m in sessions] == ["CPUExecutionProvider"] * 2
    elif engine != FAST_ENGINE:
        reader = CountingReader(module.make_reader("cpu", tmp_path, precision))
    images = {"chelsea": "Missing you every day", "rocket": "LAUNCH 2024", "astronaut": "so sad today",
              "coffee": None, "coins": None, "grass": None, "camera": None}
    results, texts = {}, {}
    for batch_size in (1, 4):
        s = Store(tmp_path / str(batch_size))
        for name, text in images.items():
            arr = caption(photos[name], text, at_top=name == "rocket") if text else photos[name]
            s.add("t", name, encode(arr, "JPEG", quality=90), "joy", text is not None)
        reader.batches.clear()
        results[batch_size] = s.score(reader, engine=engine, precision=precision, batch_size=batch_size)
        assert {i: v[0] for i, v in s.scores(results[batch_size].params_hash).items()} == s.truth
        with s.db.connect() as conn:
            texts[batch_size] = {s.names[n]: t for n, t in conn.execute(
                "SELECT i.source_uri, t.text FROM text_scores t JOIN images i USING (image_id)").fetchall()}
            engines = [r[0] for r in conn.execute("SELECT DISTINCT engine FROM ocr_results").fetchall()]
        assert reader.batches == ([] if batch_size == 1 else [4, 3])
        assert engines == [ocr_engine(engine, module.DEFAULT_OCR_SIZE, "cpu", precision, batch_size > 1)]
    assert (results[4].batch_size, results[4].n_ocr_run) == (4, 7)
    for name, text in images.items():
        if text:
            image_id = s.names[name]
            assert text.split()[-1].lower() in texts[1][image_id].lower()
            assert text.split()[-1].lower() in texts[4][image_id].lower()
