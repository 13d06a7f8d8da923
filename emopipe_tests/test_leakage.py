"""The cross-dataset leakage guard (core/leakage.py) and the official-split leakage report: real photos
ingested by the real ingest, real 32 px arrays and pHashes, a real split on DuckDB, and the whole chain
of conftest's `wiring_leakage` experiment materialized in this process."""

import csv
import io
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pytest
from dagster_duckdb import DuckDBResource
from PIL import Image

from emopipe.catalog import DatasetSpec
from emopipe.core.evaluation import MetricRow
from emopipe.core.evaluation_views import headline_markdown
from emopipe.core.filtered_images import filter_images
from emopipe.core.images import build_arrays
from emopipe.core.leakage import COPY, NEAR_DUPLICATE, overlapping_images
from emopipe.core.raw_images import ingest_dataset
from emopipe.core.split_is_sound import verify_split
from emopipe.core.near_duplicates import near_any, near_duplicate_groups
from emopipe.core.splits import make_split, official_overlap
from emopipe.core.synthetic import render, synthetic_listing
from emopipe.db import CONNECTION_CONFIG
from emopipe.fingerprint import sha256_bytes
from emopipe_tests.conftest import encode

TRAINED = ["astronaut", "chelsea", "coffee", "rocket", "camera", "moon", "clock", "hubble_deep_field"]
UNRELATED = ["grass", "gravel", "immunohistochemistry", "page"]


def reencoded(data: bytes, quality: int = 70, scale: float = 0.92) -> bytes:
    """The same photo as another file: resized a little and saved again as JPEG at another quality."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    return encode(np.asarray(image), "JPEG", quality=quality)


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    """files: 'label/name.ext' -> bytes, as a class-per-subfolder dataset."""
    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return root


def ingest(db, data_dir, spec: DatasetSpec) -> None:
    result = ingest_dataset(db, spec, objects_root=data_dir / "objects", work_dir=data_dir / "sources", log=lambda _: None)
    assert result.balanced and result.n_images
    with db.connect() as conn:
        ids = [r[0] for r in conn.execute("SELECT image_id FROM images WHERE dataset = ?", [spec.name]).fetchall()]
    build_arrays(db, ids, 32, objects_root=data_dir / "objects", arrays_root=data_dir / "arrays", workers=1, log=lambda _: None)


def split_of(db, dataset: str, scheme: str, split_column: str = "split"):
    fid = filter_images(db, experiment="exp", dataset=dataset, text_filter=False, params_hash=None, params=None).filter_id
    groups = near_duplicate_groups(db, fid)
    return make_split(db, experiment="exp", dataset=dataset, filter_id=fid, scheme=scheme, seed=0, groups=groups,
                      split_column=split_column), fid, groups


def test_near_any_matches_equal_and_close_hashes_only():
    reference = np.array([0, 0xFFFF_0000_0000_0000], np.uint64)
    query = np.array([0, 0b1111, 0b11111, 0xFFFF_0000_0000_000F, 0x00FF_00FF_00FF_00FF], np.uint64)
    assert near_any(query, reference, 4).tolist() == [True, True, False, True, False]
    assert near_any(query, reference, 0).tolist() == [True, False, False, False, False]
    assert near_any(query[:0], reference).tolist() == [] and near_any(query, reference[:0]).tolist() == [False] * 5


def test_copies_of_train_and_val_images_are_found_and_unrelated_ones_are_not(db, data_dir, tmp_path, photo_jpegs):
    # Training set: 8 photos in two classes of 4; 50/25/25 gives each class 2 train, 1 val, 1 test.
    train_files = {f"{'ab'[i % 2]}/{name}.jpg": photo_jpegs[name] for i, name in enumerate(TRAINED)}
    ingest(db, data_dir, DatasetSpec(name="trained", source="folder", path=str(write_folder(tmp_path / "trained", train_files))))
    split, _, _ = split_of(db, "trained", "50/25/25")
    with db.connect() as conn:
        part_of = dict(conn.execute("SELECT image_id, part FROM splits WHERE split_id = ?", [split.split_id]).fetchall())
    # Eval set: byte-identical copies of half the photos, re-encoded copies of the other half, unrelated photos.
    copies = {name: photo_jpegs[name] if i % 2 else reencoded(photo_jpegs[name]) for i, name in enumerate(TRAINED)}
    eval_files = {f"a/copy_{name}.jpg": data for name, data in copies.items()}
    eval_files |= {f"b/{name}.jpg": photo_jpegs[name] for name in UNRELATED}
    ingest(db, data_dir, DatasetSpec(name="other", source="folder", path=str(write_folder(tmp_path / "other", eval_files))))
    with db.connect() as conn:
        eval_ids = [r[0] for r in conn.execute("SELECT image_id FROM images WHERE dataset = 'other'").fetchall()]

    found = overlapping_images(db, eval_ids, split.split_id)

    original = {sha256_bytes(data): sha256_bytes(photo_jpegs[name]) for name, data in copies.items()}
    seen = {copy for copy, source in original.items() if part_of[source] in ("train", "val")}
    assert len(seen) == 6 and found.keys() == seen  # the two copies of test images stay in the evaluation
    assert {found[i] for i in seen if i in part_of} == {COPY}  # byte-identical: the training image itself
    assert {found[i] for i in seen if i not in part_of} == {NEAR_DUPLICATE}
    assert not found.keys() & {sha256_bytes(photo_jpegs[name]) for name in UNRELATED}
    assert overlapping_images(db, eval_ids, split.split_id, max_distance=0).keys() <= found.keys()


def test_headline_notes_the_images_left_out():
    rows = [MetricRow("accuracy", 0.5, n=10, dataset="emotion6", part="test"),
            MetricRow("excluded_overlap", 12.0, n=12, dataset="emotion6", part="test")]
    assert headline_markdown(rows).endswith(
        "\n\nemotion6 (test): 12 images excluded: copies or near-duplicates of training images\n")


def test_official_split_reports_held_out_images_copied_into_train(db, data_dir, tmp_path, photo_jpegs):
    parts = dict(zip(TRAINED + UNRELATED[:2], ["train"] * 6 + ["val", "val", "test", "test"]))
    files = {f"{name}.jpg": photo_jpegs[name] for name in parts}
    files["copy_of_gravel.jpg"] = reencoded(photo_jpegs["gravel"])  # a test image, again in train
    root = write_folder(tmp_path / "official", files)
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows([[f"{name}.jpg", "ab"[i % 2], part] for i, (name, part) in enumerate(parts.items())])
        writer.writerow(["copy_of_gravel.jpg", "b", "train"])
    ingest(db, data_dir, DatasetSpec(name="official", source="folder", path=str(root), labels=str(root / "labels.csv")))
    split, fid, groups = split_of(db, "official", "official")

    assert official_overlap(db, dataset="official", filter_id=fid, groups=groups) == {"val": 0, "test": 1}
    with db.connect() as conn:
        moved = conn.execute("SELECT part FROM splits WHERE split_id = ? AND image_id = ?",
                             [split.split_id, sha256_bytes(files["copy_of_gravel.jpg"])]).fetchall()
    assert moved == [("test",)]  # the split itself keeps the copy out of train
    assert all(o.passed for o in verify_split(db, split.split_id, fid, groups, "official"))


# --- through Dagster: the wiring_leakage experiment of conftest's catalog -------------------------------


@pytest.fixture(scope="module")
def leakage_chain(tmp_path_factory, photos):
    """(the result of materializing wiring_leakage's whole chain, the DuckDB file, {copy id: original id},
    the unrelated ids), with wiring_copies holding copies of wiring's synthetic images and unrelated photos."""
    from emopipe.assets.common import CATALOG

    if "wiring_leakage" not in CATALOG.experiments:
        pytest.skip("EMOPIPE_CATALOG was set from outside: conftest's wiring_leakage experiment is not in it")
    spec = CATALOG.dataset("wiring_copies")
    folder = Path(spec.origin).parent / spec.path
    wiring = CATALOG.dataset("wiring")
    originals = [(label, render(uri)) for uri, label, _ in synthetic_listing(wiring.n_per_class, wiring.seed)]
    files, source = {}, {}
    for i, (label, data) in enumerate(originals[::2]):  # every other training image, alternately as the same bytes
        copy = data if i % 2 else reencoded(data, quality=80, scale=0.95)
        files[f"{label}/copy_{i}.jpg"] = copy
        source[sha256_bytes(copy)] = sha256_bytes(data)
    unrelated = {f"{label}/{name}.jpg": encode(photos[name], "JPEG", quality=90) for label, name in zip(("awe", "fear"), UNRELATED)}
    write_folder(folder, files | unrelated)

    root = tmp_path_factory.mktemp("leakage")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMOPIPE_DATA_DIR", str(root / "data"))
        from emopipe.definitions import ASSETS, CHECKS

        resources = {"duckdb": DuckDBResource(database=str(root / "data" / "emopipe.duckdb"), connection_config=CONNECTION_CONFIG),
                     "io_manager": dg.FilesystemIOManager(base_dir=str(root / "io"))}
        result = dg.materialize([*ASSETS, *CHECKS], partition_key="wiring_leakage", resources=resources,
                                instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
        yield result, root / "data" / "emopipe.duckdb", source, {sha256_bytes(d) for d in unrelated.values()}


def query(db_file, sql, params=None):
    with duckdb.connect(str(db_file), read_only=True) as conn:
        return conn.execute(sql, params or []).fetchall()


def test_evaluation_leaves_out_the_copies_of_training_images(leakage_chain):
    result, db_file, source, unrelated = leakage_chain
    assert result.success, [e.event_specific_data.error.message for e in result.all_events if e.is_step_failure]
    checks = {e.event_specific_data.check_name: e.event_specific_data.passed for e in result.all_events
              if e.event_type_value == "ASSET_CHECK_EVALUATION"}
    assert checks["lineage_verified"] and checks["split_is_sound"]  # verify agrees with what was left out
    part_of = dict(query(db_file, "SELECT image_id, part FROM splits"))
    seen = {copy for copy, original in source.items() if part_of[original] in ("train", "val")}
    assert 0 < len(seen) < len(source)  # some copies are of test images: those are fair to evaluate

    predicted = {i for (i,) in query(db_file, "SELECT image_id FROM predictions WHERE dataset = 'wiring_copies'")}
    assert predicted == (source.keys() - seen) | unrelated
    [(value, n)] = query(db_file, "SELECT value, n FROM metrics WHERE dataset = 'wiring_copies' AND metric = 'excluded_overlap'")
    assert (value, n) == (len(seen), len(seen))

    metadata = next(e.event_specific_data.materialization.metadata for e in result.get_asset_materialization_events()
                    if e.asset_key.to_user_string() == "evaluation")
    assert metadata["wiring_copies/test/excluded_overlap"].value == len(seen)
    assert (f"wiring_copies (test): {len(seen)} images excluded: copies or near-duplicates of training images"
            in metadata["headline"].value)


def test_trace_shows_the_images_left_out(leakage_chain):
    from emopipe.core.trace import format_trace, trace
    from emopipe.db import Database

    result, db_file, _, _ = leakage_chain
    assert result.success
    [(n,)] = query(db_file, "SELECT value::BIGINT FROM metrics WHERE metric = 'excluded_overlap'")
    text = format_trace(trace(Database(db_file), "wiring_leakage", "accuracy"))
    images_section = text[text.index("  images wiring_copies"):]
    assert f"    test evaluation: {n} images excluded, copies or near-duplicates of the split's train/val images" in images_section
    assert f"wiring_copies/test  excluded_overlap = {n}  n={n}" in format_trace(trace(Database(db_file), "wiring_leakage"))


def test_verify_catches_a_copy_evaluated_or_a_count_deleted(leakage_chain, tmp_path):
    import shutil

    from emopipe.core.verify import verify
    from emopipe.db import Database

    result, db_file, source, _ = leakage_chain
    assert result.success
    objects = db_file.parent / "objects"
    copy = tmp_path / "copy.duckdb"
    shutil.copy(db_file, copy)
    assert verify(Database(copy), "wiring_leakage", objects_root=objects).problems == []
    part_of = dict(query(copy, "SELECT image_id, part FROM splits"))
    leaked = min(c for c, original in source.items() if part_of[original] == "train")
    with duckdb.connect(str(copy)) as conn:
        conn.execute("INSERT INTO predictions SELECT model_id, dataset, ?, part, label, predicted, scores FROM predictions "
                     "WHERE dataset = 'wiring_copies' LIMIT 1", [leaked])
    problems = [str(p) for p in verify(Database(copy), "wiring_leakage", objects_root=objects).problems]
    assert any("predicted images that copy train/val images" in p and leaked in p for p in problems), problems

    shutil.copy(db_file, copy)
    with duckdb.connect(str(copy)) as conn:
        conn.execute("DELETE FROM metrics WHERE metric = 'excluded_overlap'")
    problems = [str(p) for p in verify(Database(copy), "wiring_leakage", objects_root=objects).problems]
    assert problems and all("excluded_overlap" in p for p in problems), problems
