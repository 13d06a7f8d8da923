"""Why a split part lacks a class, said by the split (SplitResult, split_runs.notes) and by training's error.

The reported case, built for real: a folder of flat-colour images per class. Every flat image has the same
perceptual hash, so the near-duplicate grouping makes one group of all of them and the whole set goes to train.
"""

import json

import duckdb
import numpy as np
import pytest
from PIL import Image

from emopipe.catalog import DatasetSpec, ExperimentSpec
from emopipe.core.filtered_images import filter_images
from emopipe.core.images import build_arrays
from emopipe.core.raw_images import ingest_dataset
from emopipe.core.split_is_sound import verify_split
from emopipe.core.near_duplicates import near_duplicate_groups
from emopipe.core.splits import make_split
from emopipe.core.trained_model import TrainingError, load_training_data
from emopipe.db import Database

CLASSES = ("anger", "fear", "joy")
PER_CLASS = 40


def flat_colour_folder(root):
    """40 PNGs per class, each one flat colour (a different shade each, so no two files are the same bytes)."""
    for k, label in enumerate(CLASSES):
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            Image.fromarray(np.full((48, 48, 3), (80 * k, 5 * i, 120), np.uint8)).save(folder / f"{i}.png")
    return root


def test_flat_colour_classes_say_why_val_and_test_are_empty(db, data_dir, tmp_path):
    spec = DatasetSpec(name="flat", source="folder", path=str(flat_colour_folder(tmp_path / "flat")))
    ingest_dataset(db, spec, objects_root=data_dir / "objects", work_dir=data_dir / "sources" / "flat", log=lambda _: None)
    with db.connect() as conn:
        ids = [i for (i,) in conn.execute("SELECT image_id FROM images").fetchall()]
    assert len(ids) == len(CLASSES) * PER_CLASS
    build_arrays(db, ids, 32, objects_root=data_dir / "objects", arrays_root=data_dir / "arrays", workers=1, log=lambda _: None)
    kept = filter_images(db, experiment="flat_probe", dataset="flat", text_filter=False, params_hash=None, params=None)
    groups = near_duplicate_groups(db, kept.filter_id)
    assert len(set(groups.values())) == 1  # the grouping joins every image

    result = make_split(db, experiment="flat_probe", dataset="flat", filter_id=kept.filter_id, scheme="70/15/15",
                        seed=0, groups=groups)
    assert all(result.counts[c] == {"train": PER_CLASS, "val": 0, "test": 0} for c in CLASSES)
    messages = result.small_classes + result.notes
    for label in CLASSES:
        [said] = [m for m in messages if m.startswith(f"class {label!r}:")]
        assert f"its {PER_CLASS} images" in said and "1 near-duplicate group (largest 120 images" in said
        assert said.endswith(f"so they all went to train: val and test have no {label!r} image")
    # 'anger' (first by name of a three-way tie) is the group's label: its class has 1 group for 3 parts;
    # the other two classes went with that group.
    assert "fewer than the 3 parts with a share" in result.small_classes[0] and "'anger'" in result.small_classes[0]
    assert all("split as 'anger'" in n for n in result.notes) and len(result.notes) == 2
    with db.connect() as conn:
        [(stored,)] = conn.execute("SELECT notes FROM split_runs WHERE split_id = ?", [result.split_id]).fetchall()
    assert stored == json.dumps(messages)

    proportions = verify_split(db, result.split_id, kept.filter_id, groups, "70/15/15")[-1]
    assert proportions.passed and "1 classes (2 more only in groups split as another class" in proportions.details

    with pytest.raises(TrainingError) as raised:
        load_training_data(db, result.split_id, ExperimentSpec(name="flat_probe", dataset="flat", image_size=32))
    error = str(raised.value)
    assert "has no val images (experiment 'flat_probe')" in error and "\n" not in error
    assert all(m in error for m in messages)
    assert error.endswith("or set experiments.flat_probe.split (now 70/15/15) to a scheme they can fill")


OLD_SPLIT_RUNS = """CREATE TABLE split_runs (
    split_id VARCHAR NOT NULL, experiment VARCHAR NOT NULL, dataset VARCHAR NOT NULL,
    scheme VARCHAR, ratios JSON, seed INTEGER, filter_id VARCHAR, filter_params_hash VARCHAR,
    input_fingerprint VARCHAR, counts JSON, fingerprint VARCHAR,
    created_at TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (split_id, experiment)
)"""


@pytest.mark.parametrize("ratios, expected", [
    ("[70, 15, 15]", "the split was stored before emopipe recorded why; materialize splits again to see the cause"),
    ("[85, 0, 15]", "its scheme 85/0/15 gives val no share; set experiments.e.split to a scheme that does (e.g. 70/15/15)"),
])
def test_a_database_from_before_the_notes_gets_the_column_and_a_plain_cause(data_dir, ratios, expected):
    path = data_dir / "emopipe.duckdb"
    with duckdb.connect(str(path)) as conn:  # the split_runs table as emopipe made it before split_runs.notes
        conn.execute(OLD_SPLIT_RUNS)
        scheme = "/".join(map(str, json.loads(ratios)))
        conn.execute("INSERT INTO split_runs (split_id, experiment, dataset, scheme, ratios) VALUES ('s', 'e', 'd', ?, ?)",
                     [scheme, ratios])
    db = Database(path)
    with db.transaction() as conn:
        assert conn.execute("SELECT notes FROM split_runs").fetchall() == [(None,)]
        conn.execute("INSERT INTO images (image_id, dataset, source_uri, label) VALUES ('i1', 'd', 'u1', 'x')")
        conn.execute("INSERT INTO splits VALUES ('s', 'i1', 'train')")
    with pytest.raises(TrainingError, match="has no val images") as raised:
        load_training_data(db, "s", ExperimentSpec(name="e", dataset="d", image_size=32))
    assert str(raised.value).endswith(f"(experiment 'e'): {expected}")
