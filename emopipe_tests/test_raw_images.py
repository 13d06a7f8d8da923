"""Ingest: every input ends as an image, a rejection with its reason, or a duplicate; bytes stored once."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from emopipe.catalog import DatasetSpec
from emopipe.core.raw_images import (
    Rejected, attribute_matrix, dataset_fingerprint, ingest_dataset, inspect_image, map_label,
)
from emopipe.errors import UserError
from emopipe.fingerprint import sha256_bytes
from emopipe.paths import object_path


def bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")  # 100 Mpx, a few kB on disk
    return buf.getvalue()


def float_rgb_tiff() -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((16, 16, 3), np.float32))  # a valid TIFF Pillow cannot read
    return buf.getvalue()


@pytest.fixture
def photo_folder(tmp_path, photo_jpegs):
    root = tmp_path / "photos"
    (root / "happy").mkdir(parents=True)
    (root / "sad" / "nested").mkdir(parents=True)
    names = list(photo_jpegs)
    for name in names[:5]:
        (root / "happy" / f"{name}.jpg").write_bytes(photo_jpegs[name])
    for name in names[5:9]:
        (root / "sad" / "nested" / f"{name}.jpg").write_bytes(photo_jpegs[name])
    bad = {
        "empty.jpg": b"",
        "truncated.jpg": photo_jpegs[names[9]][: len(photo_jpegs[names[9]]) // 2],
        "notes.txt": b"just some notes, not an image\n",
        "page.jpg": b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
        "bomb.png": bomb_png(),
        "float.tif": float_rgb_tiff(),
    }
    for name, data in bad.items():
        (root / "sad" / name).write_bytes(data)
    (root / "sad" / "copy_of_first.jpg").write_bytes(photo_jpegs[names[5]])  # same label: duplicate
    (root / "sad" / "conflict.jpg").write_bytes(photo_jpegs[names[0]])  # same bytes as a happy one
    return root


def test_every_input_accounted_for(db, data_dir, photo_folder):
    spec = DatasetSpec(name="mine", source="folder", path=str(photo_folder))
    result = ingest_dataset(db, spec, objects_root=data_dir / "objects", work_dir=data_dir / "sources", log=lambda m: None)

    assert result.n_inputs == 17
    assert result.balanced
    assert (result.n_images, result.n_rejected, result.n_duplicates) == (9, 6, 2)
    assert result.rejected_by_reason == {
        "zero_bytes": 1, "truncated": 1, "not_an_image": 2, "decompression_bomb": 1, "unreadable_mode": 1,
    }
    assert result.n_label_conflicts == 1 and "conflict.jpg" in result.conflicts[0]
    with db.connect() as conn:
        images = conn.execute("SELECT image_id, label, width, height, format FROM images WHERE dataset = 'mine'").fetchall()
        rejected = dict(conn.execute("SELECT source_uri, detail FROM rejected").fetchall())
        dups = conn.execute("SELECT count(*), sum(label_conflict::INT) FROM duplicates").fetchone()
    assert len(images) == 9 and dups == (2, 1)
    assert {label for _, label, *_ in images} == {"happy", "sad"}
    for image_id, *_ in images:  # stored once, content-addressed
        assert sha256_bytes(object_path(image_id, data_dir / "objects").read_bytes()) == image_id
    html = next(d for uri, d in rejected.items() if uri.endswith("page.jpg"))
    assert "page.jpg" in html and "HTML" in html


def test_reingest_stores_nothing_new_and_follows_the_listing(db, data_dir, photo_folder, photo_jpegs):
    spec = DatasetSpec(name="mine", source="folder", path=str(photo_folder))
    kwargs = dict(objects_root=data_dir / "objects", work_dir=data_dir / "sources", log=lambda m: None)
    first = ingest_dataset(db, spec, **kwargs)
    again = ingest_dataset(db, spec, **kwargs)
    assert again.n_new == 0 and again.n_images == first.n_images and again.fingerprint == first.fingerprint

    removed = photo_folder / "happy" / "chelsea.jpg"  # no copy of it elsewhere
    removed_id = sha256_bytes(removed.read_bytes())
    removed.unlink()
    (photo_folder / "sad" / "empty.jpg").unlink()
    third = ingest_dataset(db, spec, **kwargs)
    assert third.balanced and third.n_inputs == 15
    assert third.n_dropped == 1 and third.fingerprint != first.fingerprint
    assert third.fingerprint == dataset_fingerprint(db, "mine")
    with db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM images WHERE image_id = ?", [removed_id]).fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM rejected WHERE reason = 'zero_bytes'").fetchone()[0] == 0
    assert object_path(removed_id, data_dir / "objects").exists()  # bytes kept: older splits stay verifiable


def test_a_copy_listed_first_gives_way_to_the_smaller_path_in_the_same_batch(db, data_dir, tmp_path, photo_jpegs):
    """The manifest lists z.jpg before a.jpg (same bytes, other label): the stored row must be a.jpg's,
    on every run, though both rows meet in one write batch."""
    root = tmp_path / "copies"
    root.mkdir()
    for name in ("z.jpg", "a.jpg"):
        (root / name).write_bytes(photo_jpegs["astronaut"])
    (root / "labels.csv").write_text("path,label\nz.jpg,happy\na.jpg,sad\n")
    spec = DatasetSpec(name="copies", source="folder", path=str(root), labels=str(root / "labels.csv"))
    kwargs = dict(objects_root=data_dir / "objects", work_dir=data_dir / "sources", log=lambda m: None)
    results = [ingest_dataset(db, spec, **kwargs) for _ in range(2)]
    with db.connect() as conn:
        stored = conn.execute("SELECT source_uri, label FROM images WHERE dataset = 'copies'").fetchall()
        kept = conn.execute("SELECT kept_source_uri, source_uri FROM duplicates WHERE dataset = 'copies'").fetchall()
    assert [(Path(uri).name, label) for uri, label in stored] == [("a.jpg", "sad")]
    assert [(Path(k).name, Path(d).name) for k, d in kept] == [("a.jpg", "z.jpg")]
    assert results[0].fingerprint == results[1].fingerprint == dataset_fingerprint(db, "copies")


def test_class_map_and_classes(db, data_dir, photo_folder):
    spec = DatasetSpec(name="m", source="folder", path=str(photo_folder), classes=("sadness", "others"),
                       class_map={"sad": "sadness", "*": "others"})
    assert map_label("sad", spec) == "sadness" and map_label("happy", spec) == "others"
    strict = DatasetSpec(name="s", source="folder", path=str(photo_folder), classes=("sad",))
    result = ingest_dataset(db, strict, objects_root=data_dir / "objects", work_dir=data_dir / "sources", log=lambda m: None)
    assert result.balanced and result.rejected_by_reason["unknown_label"] == 5
    with db.connect() as conn:
        detail = conn.execute("SELECT detail FROM rejected WHERE reason = 'unknown_label' LIMIT 1").fetchone()[0]
    assert "'happy'" in detail and "allowed: sad" in detail


def test_inspect_image_accepts_real_formats(photos):
    for fmt in ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"):
        buf = io.BytesIO()
        Image.fromarray(photos["coffee"]).save(buf, format=fmt)
        info = inspect_image(buf.getvalue())
        assert (info.width, info.height) == (600, 400) and info.format == fmt
    with pytest.raises(Rejected) as err:
        inspect_image(b"%PDF-1.4 not an image")
    assert err.value.reason == "not_an_image"


def test_synthetic_demo_ingests_with_ground_truth(db, data_dir):
    spec = DatasetSpec(name="demo", source="synthetic", n_per_class=3, seed=0)
    result = ingest_dataset(db, spec, objects_root=data_dir / "objects", work_dir=data_dir / "sources", log=lambda m: None)
    assert result.balanced and result.n_images == 24 and result.n_rejected == 0
    with db.connect() as conn:
        rows = conn.execute("SELECT source_uri, attributes->>'has_text' FROM images").fetchall()
    assert all(uri.startswith("synthetic://") for uri, _ in rows)
    assert {flag for _, flag in rows} <= {"true", "false"}


def test_attribute_matrix_leaves_missing_values_nan_and_names_bad_ones():
    attributes = [json.dumps({"valence": 0.5, "arousal": "7"}), json.dumps({"valence": None}), None]
    targets = attribute_matrix(["img1", "img2", "img3"], attributes, ["valence", "arousal"])
    assert targets[0].tolist() == [0.5, 7.0]
    assert np.isnan(targets[1:]).all()
    with pytest.raises(UserError, match=r"image img9 has arousal='high', not a number"):
        attribute_matrix(["img9"], [json.dumps({"arousal": "high"})], ["valence", "arousal"])
