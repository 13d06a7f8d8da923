"""A small, consistent lineage in a tmp DuckDB and object store; verify() passes on it and names each tampering."""

import json
from dataclasses import dataclass

import numpy as np
import pytest

from emopipe.core.evaluation import write_evaluation
from emopipe.core.filtered_images import filter_images
from emopipe.core.splits import make_split
from emopipe.core.images import build_arrays
from emopipe.core.trace import TraceError, format_trace, trace
from emopipe.core.trained_model import CHECKPOINT_FORMAT
from emopipe.core.verify import verify
from emopipe.fingerprint import params_hash, rows_fingerprint, sha256_bytes
from emopipe.paths import objects_dir, object_path
from emopipe_tests.conftest import encode

CLASSES = ["amusement", "fear", "sadness"]
EXPERIMENT = "toy_probe"


@dataclass
class Lineage:
    image_ids: list[str]
    split_id: str
    filter_id: str
    model_id: str
    checkpoint: object
    parts: dict[str, list[str]]
    uris: dict[str, str]


def _store(db, dataset: str, blobs: list[bytes], labels: list[str]) -> list[str]:
    """Write the bytes content-addressed under objects/ and their `images` rows."""
    ids = []
    with db.transaction() as conn:
        for i, (blob, label) in enumerate(zip(blobs, labels)):
            image_id = sha256_bytes(blob)
            path = object_path(image_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
            conn.execute("INSERT INTO images (image_id, dataset, source_uri, label, width, height, format, n_bytes) "
                         "VALUES (?, ?, ?, ?, 16, 16, 'PNG', ?)", [image_id, dataset, f"/src/{dataset}/{i:02d}.png", label, len(blob)])
            ids.append(image_id)
    return ids


def write_checkpoint(path, **record) -> str:
    """A checkpoint file with emopipe's record inside (no weights: verify reads the record, never the
    network); returns its sha256, the model id."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "info": json.dumps({"format": CHECKPOINT_FORMAT, **record}, sort_keys=True)}, path)
    return sha256_bytes(path.read_bytes())


@pytest.fixture
def lineage(db, data_dir, photos):
    """Images -> text filter -> split (the real writers of those stages) -> model row -> evaluation."""
    # 15 distinct small PNGs cut from a real photo, 5 per class
    blobs = [encode(np.ascontiguousarray(photos["astronaut"][20 * i:20 * i + 16, 40:56])) for i in range(15)]
    ids = _store(db, "toy", blobs, [CLASSES[i % 3] for i in range(15)])
    labels = {image_id: CLASSES[i % 3] for i, image_id in enumerate(ids)}
    with db.connect() as conn:
        uris = dict(conn.execute("SELECT image_id, source_uri FROM images").fetchall())

    # the text filter removes the first image (its text_scores row says it shows text)
    params = {"min_confidence": 0.4, "min_area": 0.001, "min_chars": 2}
    with db.transaction() as conn:
        conn.executemany("INSERT INTO text_scores (image_id, params_hash, has_text) VALUES (?, ?, ?)",
                         [(i, params_hash(params), n == 0) for n, i in enumerate(ids)])
    fid = filter_images(db, experiment=EXPERIMENT, dataset="toy", text_filter=True,
                        params_hash=params_hash(params), params=params).filter_id
    # the 32 px arrays the split's near-duplicate groups come from (verify makes the split again)
    build_arrays(db, ids, 32, objects_root=objects_dir(), arrays_root=data_dir / "arrays", workers=1, log=lambda _: None)
    split = make_split(db, experiment=EXPERIMENT, dataset="toy", filter_id=fid, scheme="40/30/30", seed=0)
    with db.connect() as conn:
        parts = {p: [r[0] for r in conn.execute("SELECT image_id FROM splits WHERE split_id = ? AND part = ? ORDER BY image_id",
                                                 [split.split_id, p]).fetchall()] for p in ("train", "val", "test")}
    # a checkpoint file; its sha256 is the model id
    checkpoint = data_dir / "models" / "toy.ckpt"
    model_id = write_checkpoint(checkpoint, architecture="resnet18", hyperparameters={"lr": 0.001, "batch_size": 4},
                                epochs_run=3, best_epoch=2, history=None, split_id=split.split_id, classes=CLASSES,
                                experiment={"name": EXPERIMENT})
    with db.transaction() as conn:
        conn.execute("INSERT INTO models (model_id, experiment, split_id, split_fingerprint, architecture, hyperparameters, "
                     "classes, epochs_run, best_epoch, checkpoint_path) VALUES (?, ?, ?, ?, 'resnet18', ?, ?, 3, 2, ?)",
                     [model_id, EXPERIMENT, split.split_id, split.fingerprint, json.dumps({"lr": 0.001, "batch_size": 4}),
                      json.dumps(CLASSES), str(checkpoint)])

    rng = np.random.default_rng(0)
    for part in ("val", "test"):
        members = parts[part]
        scores = rng.dirichlet(np.ones(3), len(members))
        write_evaluation(db, experiment=EXPERIMENT, model_id=model_id, split_id=split.split_id, dataset="toy", part=part,
                         image_ids=members, labels=[labels[i] for i in members], scores=scores, classes=CLASSES)
    # a cross-dataset test set with its own labels, mapped to ours; 'calm' maps to nothing
    other_blobs = [encode(np.ascontiguousarray(photos["chelsea"][16 * i:16 * i + 16, :16])) for i in range(4)]
    other = _store(db, "other", other_blobs, ["scared", "sad", "calm", "sad"])
    # its 32 px arrays, as images_32 builds them for every dataset: verify looks again for copies of training images
    build_arrays(db, other, 32, objects_root=objects_dir(), arrays_root=data_dir / "arrays", workers=1, log=lambda _: None)
    write_evaluation(db, experiment=EXPERIMENT, model_id=model_id, split_id=split.split_id, dataset="other", part="test",
                     image_ids=other, labels=["scared", "sad", "calm", "sad"], scores=rng.dirichlet(np.ones(3), 4),
                     classes=CLASSES, class_map={"scared": "fear", "sad": "sadness"})
    return Lineage(ids, split.split_id, fid, model_id, checkpoint, parts, uris)


def test_consistent_lineage_verifies(db, lineage):
    full = verify(db, EXPERIMENT, full=True)
    assert full.problems == [] and full.files_hashed == full.files_total == 17  # 14 split images, 3 evaluated of "other"
    assert verify(db, EXPERIMENT, sample=3).problems == []


def test_trace_walks_from_the_number_to_the_images(db, lineage):
    t = trace(db, EXPERIMENT)
    accuracy = next(m for m in t.metrics if m["dataset"] == "toy" and m["part"] == "test" and m["metric"] == "accuracy")
    n_parts = {part: len(members) for part, members in lineage.parts.items()}
    assert sum(n_parts.values()) == 14 and all(n_parts.values())
    assert accuracy["n"] == n_parts["test"] and accuracy["ci_low"] <= accuracy["value"] <= accuracy["ci_high"]
    assert all(m["class"] is None for m in t.metrics)
    assert [(m["dataset"], m["part"]) for m in t.metrics if m["metric"] == "accuracy"] == [
        ("toy", "test"), ("toy", "val"), ("other", "test")]  # the split's dataset first, test first
    assert t.model["model_id"] == lineage.model_id and t.model["hyperparameters"] == {"lr": 0.001, "batch_size": 4}
    assert t.split["split_id"] == lineage.split_id and t.split["parts"] == n_parts
    assert t.filter["filter_id"] == lineage.filter_id and t.filter["n_kept"] == 14
    toy, other = t.datasets
    assert (toy.dataset, toy.count, other.dataset, other.count) == ("toy", 15, "other", 4)
    with db.connect() as conn:
        assert toy.fingerprint == rows_fingerprint(conn.execute("SELECT image_id, label FROM images WHERE dataset = 'toy'").fetchall())
    assert toy.source_uris == tuple(lineage.uris[i] for i in sorted(lineage.image_ids)[:3])

    text = format_trace(t)
    for needle in (lineage.model_id, lineage.split_id, lineage.filter_id, str(lineage.checkpoint), toy.fingerprint,
                   "toy/test  accuracy = ", f"parts test {n_parts['test']}, train {n_parts['train']}, val {n_parts['val']}", "kept 14, removed 1", toy.source_uris[0]):
        assert needle in text

    per_class = trace(db, EXPERIMENT, metric="f1").metrics
    assert {(m["dataset"], m["part"], m["class"]) for m in per_class} >= {("toy", "test", c) for c in CLASSES}
    with pytest.raises(TraceError, match="recorded: .*accuracy"):
        trace(db, EXPERIMENT, metric="auc")
    with pytest.raises(TraceError, match="no_such_experiment"):
        trace(db, "no_such_experiment")


def test_overwritten_checkpoint_is_named(db, lineage):
    lineage.checkpoint.write_bytes(b"different weights")
    problems = verify(db, EXPERIMENT).problems
    assert [(p.where, p.id, p.expected) for p in problems] == [("checkpoint", str(lineage.checkpoint), lineage.model_id)]


def test_edited_split_row_is_named(db, lineage):
    moved = lineage.parts["test"][0]
    with db.transaction() as conn:
        conn.execute("UPDATE splits SET part = 'train' WHERE image_id = ?", [moved])
    problems = verify(db, EXPERIMENT).problems
    assert any(p.where == "splits" and p.id == lineage.split_id and p.expected == lineage.split_id for p in problems)
    # models.split_fingerprint (and split_runs.fingerprint) no longer match the rows
    assert any(p.where == "models" and p.expected == lineage.split_id != p.actual for p in problems)
    assert any(p.where == "predictions" and "outside the split's test part" in p.what and moved[:8] in p.actual for p in problems)
    assert {p.where for p in problems} <= {"splits", "models", "split_runs", "predictions"}


def test_modified_image_object_is_named(db, lineage):
    changed = lineage.parts["train"][2]
    path = object_path(changed)
    path.write_bytes(path.read_bytes() + b"\0")
    problems = verify(db, EXPERIMENT, full=True).problems
    assert [(p.where, p.id, p.expected) for p in problems] == [("object", changed, changed)]
    object_path(lineage.parts["val"][0]).unlink()
    assert {p.id for p in verify(db, EXPERIMENT, full=True).problems} == {changed, lineage.parts["val"][0]}


def test_edited_prediction_no_longer_reproduces_the_metrics(db, lineage):
    with db.connect() as conn:
        image_id, label = conn.execute("SELECT image_id, label FROM predictions WHERE dataset = 'toy' AND part = 'test' "
                                       "ORDER BY image_id LIMIT 1").fetchone()
    # make the prediction of that image certain and right or wrong, whichever it was not: its predicted
    # class still agrees with its scores, so only the recomputed metrics differ
    with db.connect() as conn:
        was_right = conn.execute("SELECT label = predicted FROM predictions WHERE image_id = ? AND part = 'test'",
                                 [image_id]).fetchone()[0]
    new = label if not was_right else next(c for c in CLASSES if c != label)
    with db.transaction() as conn:
        conn.execute("UPDATE predictions SET predicted = ?, scores = ? WHERE image_id = ? AND dataset = 'toy'",
                     [new, json.dumps({c: float(c == new) for c in CLASSES}), image_id])
    problems = verify(db, EXPERIMENT).problems
    assert problems and {p.where for p in problems} == {"metrics"}
    assert any(p.id.endswith("toy/test accuracy") for p in problems)
    assert not any("val" in p.id or "other" in p.id for p in problems)


def test_removed_filtered_image_is_named(db, lineage):
    dropped = lineage.parts["val"][0]
    with db.transaction() as conn:
        conn.execute("DELETE FROM filtered_images WHERE filter_id = ? AND image_id = ?", [lineage.filter_id, dropped])
    problems = verify(db, EXPERIMENT).problems
    assert {(p.where, p.id) for p in problems} == {("filtered_images", lineage.filter_id), ("filter_runs", lineage.filter_id),
                                                   ("splits", lineage.split_id)}
    assert any(dropped in str(p.actual) for p in problems if p.where == "splits")


def test_regression_predictions_reproduce_their_metrics(db, lineage, data_dir):
    """A valence/arousal model on the same split: its MSE is recomputed from the stored JSON values."""
    checkpoint = data_dir / "models" / "va.ckpt"
    model_id = write_checkpoint(checkpoint, split_id=lineage.split_id, targets=["valence", "arousal"], experiment={"name": "toy_va"})
    with db.transaction() as conn:
        conn.execute("INSERT INTO models (model_id, experiment, split_id, split_fingerprint, classes, checkpoint_path) "
                     "VALUES (?, 'toy_va', ?, ?, ?, ?)", [model_id, lineage.split_id, lineage.split_id,
                                                          json.dumps(["valence", "arousal"]), str(checkpoint)])
    test = lineage.parts["test"]
    rng = np.random.default_rng(3)
    for part in ("val", "test"):
        members = lineage.parts[part]
        targets = rng.random((len(members), 2))
        targets[0, 1] = np.nan  # a missing annotation
        write_evaluation(db, experiment="toy_va", model_id=model_id, split_id=lineage.split_id, dataset="toy", part=part,
                         image_ids=members, labels=targets, scores=rng.random((len(members), 2)).astype(np.float32),
                         classes=["valence", "arousal"], task="regression")
    assert verify(db, "toy_va", full=True).problems == []
    with db.transaction() as conn:
        conn.execute("UPDATE predictions SET predicted = ?, scores = ? WHERE model_id = ? AND image_id = ?",
                     ['{"valence": 9.0, "arousal": 9.0}'] * 2 + [model_id, test[1]])
    problems = verify(db, "toy_va").problems
    assert problems and {p.where for p in problems} == {"metrics"}
    assert any(p.id.endswith("toy/test mse") for p in problems)
