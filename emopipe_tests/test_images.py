"""core.images: decoding (EXIF, colour modes, geometry) and the packed-array cache (shards, index, resume)."""

import io

import numpy as np
import pytest
from PIL import Image

from emopipe.core.images import (MissingArraysError, array_fingerprint, build_arrays, decode_resize,
                                 load_array, method_for)
from emopipe.fingerprint import sha256_bytes
from emopipe.paths import object_path
from conftest import encode

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def store(objects_root, data: bytes) -> str:
    image_id = sha256_bytes(data)
    path = object_path(image_id, objects_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return image_id


@pytest.fixture
def roots(data_dir):
    return {"objects_root": data_dir / "objects", "arrays_root": data_dir / "arrays"}


def small_photos(photos, n: int, seed: int = 0) -> list[bytes]:
    """n distinct small JPEGs (90×60 crops of real photos)."""
    rng = np.random.default_rng(seed)
    names = sorted(photos)
    out = []
    for i in range(n):
        arr = photos[names[i % len(names)]]
        y, x = rng.integers(0, arr.shape[0] - 60), rng.integers(0, arr.shape[1] - 90)
        out.append(encode(arr[y:y + 60, x:x + 90], "JPEG", quality=90))
    assert len(set(out)) == n
    return out


def indexed(db, size):
    with db.connect() as conn:
        return conn.execute("SELECT image_id, method, shard, row FROM resized WHERE size = ?", [size]).fetchall()


def test_method_for_switches_from_squash_to_crop_above_64():
    assert [method_for(s) for s in (32, 64, 65, 150, 224)] == ["squash", "squash", "crop", "crop", "crop"]
    with pytest.raises(ValueError):
        method_for(0)


@pytest.mark.parametrize("size", [32, 224])  # 32: a 400×200 JPEG is decoded in draft mode (1/2 scale)
def test_exif_orientation_6_is_applied(size):
    stored = np.zeros((200, 400, 3), np.uint8)  # as stored: top half red, bottom half blue
    stored[:100] = RED
    stored[100:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    rotated = decode_resize(encode(stored, "JPEG", quality=95, exif=exif), size, method_for(size))
    upright = decode_resize(encode(stored, "JPEG", quality=95), size, method_for(size))
    half = size // 2
    # Displayed: the stored top (red) is on the right, the bottom (blue) on the left.
    assert rotated[:, half + 2:].mean((0, 1)) == pytest.approx(RED, abs=12)
    assert rotated[:, :half - 2].mean((0, 1)) == pytest.approx(BLUE, abs=12)
    assert upright[:half - 2].mean((0, 1)) == pytest.approx(RED, abs=12)


@pytest.mark.parametrize("size", [32, 150])
def test_draft_decoding_keeps_quality(photo_jpegs, size):
    """The shortcuts (JPEG draft at >= 2x, reducing gap) stay within 2 grey levels of a full-size resize."""
    method = method_for(size)
    for name, data in photo_jpegs.items():
        full = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = full.size
        side = min(w, h) if method == "crop" else None
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2) if side else (0, 0, w, h)
        reference = np.asarray(full.resize((size, size), Image.Resampling.BICUBIC, box=box), dtype=int)
        error = np.abs(decode_resize(data, size, method).astype(int) - reference).mean()
        assert error < 2.0, f"{name}: mean error {error:.2f} grey levels"


def _png_16bit_gray(value: int) -> bytes:
    img = Image.fromarray(np.full((20, 30), value, np.uint16))
    assert img.mode == "I;16"
    return encode(np.asarray(img), "PNG")


def _palette(transparent_index: int | None) -> bytes:
    img = Image.new("P", (30, 20))
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.paste(1, (15, 0, 30, 20))  # left half index 0 (red), right half index 1 (green)
    buf = io.BytesIO()
    img.save(buf, "PNG", **({} if transparent_index is None else {"transparency": transparent_index}))
    return buf.getvalue()


def _rgba_half_transparent(mode: str) -> bytes:
    arr = np.zeros((20, 30, 4), np.uint8)  # right half: alpha 0 over black pixels
    arr[:, :15] = (200, 30, 30, 255)
    img = Image.fromarray(arr, "RGBA")
    return encode(np.asarray(img.convert(mode)), "PNG")


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (200, 60, 40)).convert("CMYK").save(buf, "JPEG", quality=95)
    return buf.getvalue()


# input bytes, expected (left half colour, right half colour) after decoding
COLOUR_CASES = {
    "grayscale": (lambda: encode(np.full((20, 30), 100, np.uint8), "JPEG", quality=95), (100,) * 3, (100,) * 3),
    "palette": (lambda: _palette(None), RED, GREEN),
    "palette with a transparent index": (lambda: _palette(0), (255, 255, 255), GREEN),
    "RGBA on white": (lambda: _rgba_half_transparent("RGBA"), (200, 30, 30), (255, 255, 255)),
    "LA on white": (lambda: _rgba_half_transparent("LA"), (81,) * 3, (255,) * 3),
    "CMYK JPEG": (_cmyk_jpeg, (200, 60, 40), (200, 60, 40)),
    "16-bit grayscale": (lambda: _png_16bit_gray(40000), (40000 >> 8,) * 3, (40000 >> 8,) * 3),
}


@pytest.mark.parametrize("case", COLOUR_CASES)
def test_colour_modes_become_rgb(case):
    make, left, right = COLOUR_CASES[case]
    out = decode_resize(make(), 16, "squash")
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[:, :6].mean((0, 1)) == pytest.approx(left, abs=6)
    assert out[:, 10:].mean((0, 1)) == pytest.approx(right, abs=6)


def test_squash_keeps_the_whole_image_and_crop_keeps_the_middle():
    wide = np.zeros((100, 200, 3), np.uint8)  # 2:1; left quarter red, middle half green, right quarter blue
    wide[:, :50] = RED
    wide[:, 50:150] = GREEN
    wide[:, 150:] = BLUE
    data = encode(wide, "PNG")
    squash = decode_resize(data, 32, "squash").astype(int)
    assert squash[:, :6].mean((0, 1)) == pytest.approx(RED, abs=3)
    assert squash[:, 10:22].mean((0, 1)) == pytest.approx(GREEN, abs=3)
    assert squash[:, 26:].mean((0, 1)) == pytest.approx(BLUE, abs=3)
    crop = decode_resize(data, 96, "crop").astype(int)
    assert crop.shape == (96, 96, 3)
    assert crop[:, 2:-2].mean((0, 1)) == pytest.approx(GREEN, abs=3)
    assert crop[:, 2:-2, [0, 2]].max() < 40  # no red or blue band inside the crop
    tall = decode_resize(encode(np.ascontiguousarray(wide.transpose(1, 0, 2)), "PNG"), 96, "crop")
    assert tall[2:-2].mean((0, 1)) == pytest.approx(GREEN, abs=3)


def test_chunks_become_shards_and_load_array_returns_the_decoded_pixels(db, roots, photos):
    jpegs = small_photos(photos, 10)
    ids = [store(roots["objects_root"], data) for data in jpegs]
    result = build_arrays(db, ids, 32, **roots, workers=2, chunk_size=4, log=lambda _: None)
    assert (result.n_images, result.n_cached, result.n_decoded, result.failed) == (10, 0, 10, {})
    rows = indexed(db, 32)
    assert {r[0] for r in rows} == set(ids) and {r[1] for r in rows} == {"squash"}
    shards = {r[2] for r in rows}
    assert len(shards) == 3
    files = sorted((roots["arrays_root"] / "32_squash").iterdir())
    assert [f"32_squash/{f.name}" for f in files] == sorted(shards)  # no temp files left behind
    assert sorted(len(np.load(f, mmap_mode="r")) for f in files) == [2, 4, 4]

    order = [ids[3], ids[7], ids[0], ids[9], ids[7], ids[1]]  # any order, repeats allowed
    expected = np.stack([decode_resize(jpegs[ids.index(i)], 32, "squash") for i in order])
    loaded = load_array(db, order, 32, arrays_root=roots["arrays_root"])
    assert loaded.dtype == np.uint8 and loaded.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(loaded, expected)


def test_rebuild_decodes_only_new_images(db, roots, photos):
    ids = [store(roots["objects_root"], data) for data in small_photos(photos, 20)]
    first = build_arrays(db, ids[:10], 96, **roots, workers=1, log=lambda _: None)
    assert (first.method, first.n_cached, first.n_decoded) == ("crop", 0, 10)
    second = build_arrays(db, ids, 96, **roots, workers=1, log=lambda _: None)
    assert (second.n_images, second.n_cached, second.n_decoded) == (20, 10, 10)
    third = build_arrays(db, ids, 96, **roots, workers=1, log=lambda _: None)
    assert (third.n_cached, third.n_decoded) == (20, 0)
    other_size = build_arrays(db, ids[:3], 48, **roots, workers=1, log=lambda _: None)
    assert other_size.n_decoded == 3  # the cache key includes the size
    assert len(indexed(db, 96)) == 20


def test_a_killed_run_resumes_after_its_last_written_chunk(db, roots, photos):
    ids = [store(roots["objects_root"], data) for data in small_photos(photos, 10)]

    def die_after_first_chunk(message):
        if "chunk 1/" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_arrays(db, ids, 32, **roots, workers=1, chunk_size=4, log=die_after_first_chunk)
    assert {r[0] for r in indexed(db, 32)} == set(ids[:4])
    assert not list((roots["arrays_root"] / "32_squash").glob(".*.tmp"))  # the uncommitted chunk is cleaned up
    resumed = build_arrays(db, ids, 32, **roots, workers=1, chunk_size=4, log=lambda _: None)
    assert (resumed.n_cached, resumed.n_decoded) == (4, 6)


def test_a_deleted_shard_is_rebuilt(db, roots, photos):
    ids = [store(roots["objects_root"], data) for data in small_photos(photos, 6)]
    build_arrays(db, ids, 32, **roots, workers=1, chunk_size=4, log=lambda _: None)
    lost = next(r[2] for r in indexed(db, 32) if r[0] == ids[0])
    (roots["arrays_root"] / lost).unlink()
    with pytest.raises(MissingArraysError, match="missing"):
        load_array(db, ids, 32, arrays_root=roots["arrays_root"])
    again = build_arrays(db, ids, 32, **roots, workers=1, chunk_size=4, log=lambda _: None)
    assert (again.n_cached, again.n_decoded) == (2, 4)
    assert load_array(db, ids, 32, arrays_root=roots["arrays_root"]).shape == (6, 32, 32, 3)


def test_undecodable_images_are_recorded_and_skipped(db, roots, photos):
    good = [store(roots["objects_root"], data) for data in small_photos(photos, 3)]
    corrupt = store(roots["objects_root"], b"\xff\xd8\xff\xe0 not really a JPEG")
    absent = "0" * 64
    log = []
    result = build_arrays(db, [good[0], corrupt, good[1], absent, good[2]], 32, **roots, workers=2,
                          log=log.append)
    assert result.n_decoded == 3 and set(result.failed) == {corrupt, absent}
    assert result.failed[corrupt].startswith("cannot decode")
    assert result.failed[absent].startswith("object file unreadable")
    assert any(corrupt in line for line in log)
    rows = indexed(db, 32)
    assert {r[0] for r in rows} == set(good)
    assert sorted(r[3] for r in rows) == [0, 2, 4]  # the failed images' rows stay unused
    np.testing.assert_array_equal(load_array(db, good, 32, arrays_root=roots["arrays_root"]),
                                  np.stack([decode_resize(d, 32, "squash") for d in small_photos(photos, 3)]))
    with pytest.raises(MissingArraysError, match=corrupt):
        load_array(db, [good[0], corrupt], 32, arrays_root=roots["arrays_root"])


def test_fingerprint_follows_the_set_of_built_images(db, roots, photos):
    ids = [store(roots["objects_root"], data) for data in small_photos(photos, 5)]
    build_arrays(db, ids, 32, **roots, workers=1, log=lambda _: None)
    assert array_fingerprint(db, ids, 32) == array_fingerprint(db, ids[::-1], 32)
    assert array_fingerprint(db, ids[:4], 32) != array_fingerprint(db, ids, 32)
    with pytest.raises(MissingArraysError):
        array_fingerprint(db, ids, 224)

