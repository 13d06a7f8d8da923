import json
import math

import numpy as np
import pytest
from PIL import Image

from emopipe.catalog import Reference
from emopipe.core.evaluation import (
    EvaluationError,
    bootstrap_ci,
    classification_metrics,
    map_labels,
    pearson_r,
    regression_metrics,
    write_evaluation,
)
from emopipe.core.evaluation_views import confusion_from_rows, confusion_png, headline_markdown

CLASSES = ["a", "b", "c"]
# 8 samples, 3 classes; class c is never predicted. Hand-computed below.
LABELS = np.array([0, 0, 0, 1, 1, 1, 2, 2])
SCORES = np.array([
    [0.70, 0.20, 0.10],  # a -> a
    [0.60, 0.10, 0.30],  # a -> a
    [0.30, 0.50, 0.20],  # a -> b (top-2 hit)
    [0.10, 0.80, 0.10],  # b -> b
    [0.20, 0.60, 0.20],  # b -> b
    [0.50, 0.10, 0.40],  # b -> a (top-2: a, c: miss)
    [0.20, 0.45, 0.35],  # c -> b (top-2 hit)
    [0.40, 0.35, 0.25],  # c -> a (top-2 miss)
])


def by_key(rows):
    return {(r.metric, r.class_name): r for r in rows}


def test_classification_metrics_match_hand_computed_values():
    rows = by_key(classification_metrics(LABELS, SCORES, CLASSES))
    # confusion (true x predicted): a [2 1 0], b [1 2 0], c [1 1 0]
    assert rows["accuracy", None].value == 0.5
    assert rows["top2_accuracy", None].value == 0.75
    assert ("top3_accuracy", None) not in rows  # k must be below the number of classes
    assert rows["precision", "a"].value == 0.5 and rows["recall", "a"].value == pytest.approx(2 / 3)
    assert rows["f1", "a"].value == pytest.approx(4 / 7) and rows["f1", "b"].value == pytest.approx(4 / 7)
    # never predicted: precision 0 (not NaN), recall 0, F1 0
    assert rows["precision", "c"].value == 0.0 and rows["recall", "c"].value == 0.0 and rows["f1", "c"].value == 0.0
    assert rows["precision", "c"].n == 2  # n of a class row is its support
    assert rows["macro_f1", None].value == pytest.approx(8 / 21)
    assert rows["weighted_f1", None].value == pytest.approx(3 / 7)
    assert rows["confusion_count", "c->b"].value == 1 and rows["confusion_count", "a->a"].value == 2
    assert rows["confusion_rate", "a->b"].value == pytest.approx(1 / 3)
    matrix = confusion_from_rows(list(rows.values()), CLASSES)
    assert matrix.tolist() == [[2, 1, 0], [1, 2, 0], [1, 1, 0]]


def test_top5_with_more_classes_and_ties_rank_like_argmax():
    scores = np.zeros((2, 7))
    scores[0, [1, 2]] = 1.0  # tie: argmax takes class 1, so label 2 is not top-1 but is top-2
    scores[1, 6] = 1.0
    # sample 1: ranking 6, then the zeros in index order 0, 1, 2, 3: label 3 ranks 5th
    rows = by_key(classification_metrics(np.array([2, 3]), scores, list("abcdefg"), resamples=0))
    assert rows["accuracy", None].value == 0.0
    assert rows["top2_accuracy", None].value == 0.5
    assert rows["top3_accuracy", None].value == 0.5
    assert rows["top5_accuracy", None].value == 1.0


def test_bootstrap_cis_contain_the_estimate_and_are_deterministic():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 4, 400)
    scores = rng.random((400, 4))
    scores[np.arange(400), labels] += rng.random(400)  # better than chance, not perfect
    first = by_key(classification_metrics(labels, scores, list("wxyz")))
    again = by_key(classification_metrics(labels, scores, list("wxyz")))
    for metric in ("accuracy", "macro_f1"):
        row = first[metric, None]
        assert row.ci_low < row.value < row.ci_high
        assert 0.02 < row.ci_high - row.ci_low < 0.2  # about ±2.5 points for n = 400
        assert (row.ci_low, row.ci_high) == (again[metric, None].ci_low, again[metric, None].ci_high)
    other_seed = by_key(classification_metrics(labels, scores, list("wxyz"), seed=1))["accuracy", None]
    assert (other_seed.ci_low, other_seed.ci_high) != (first["accuracy", None].ci_low, first["accuracy", None].ci_high)
    # the tiny hand set too
    tiny = by_key(classification_metrics(LABELS, SCORES, CLASSES))
    assert tiny["accuracy", None].ci_low <= 0.5 <= tiny["accuracy", None].ci_high


def test_bootstrap_ci_of_a_mean_is_the_textbook_interval():
    values = np.random.default_rng(0).normal(10, 2, 2000)
    low, high = bootstrap_ci(lambda idx: values[idx].mean(1), len(values), resamples=2000)
    half = 1.96 * values.std() / math.sqrt(len(values))
    assert low == pytest.approx(values.mean() - half, abs=0.03)
    assert high == pytest.approx(values.mean() + half, abs=0.03)


def test_regression_metrics_match_hand_computed_values():
    targets = np.array([[1, 2], [2, 3], [3, np.nan], [4, 5.0]])  # one missing annotation
    preds = np.array([[1.5, 2], [2, 2], [2, 4], [4, 5.0]])
    rows = by_key(regression_metrics(targets, preds, ["valence", "arousal"]))
    assert rows["mse", "valence"].value == pytest.approx(1.25 / 4)  # errors 0.5, 0, -1, 0
    assert rows["mae", "valence"].value == pytest.approx(1.5 / 4)
    assert rows["mse", "arousal"].value == pytest.approx(1 / 3) and rows["mse", "arousal"].n == 3
    assert rows["mse", None].value == pytest.approx(2.25 / 7)
    assert rows["mae", None].value == pytest.approx(2.5 / 7)
    assert rows["mse", None].ci_low <= rows["mse", None].value <= rows["mse", None].ci_high
    assert rows["pearson_r", "valence"].value == pytest.approx(np.corrcoef([1, 2, 3, 4], [1.5, 2, 2, 4])[0, 1])
    assert rows["pearson_r", "arousal"].value == pytest.approx(np.corrcoef([2, 3, 5], [2, 2, 5])[0, 1])


def test_pearson_is_nan_when_undefined():
    assert math.isnan(pearson_r(np.ones(5), np.arange(5)))
    assert math.isnan(pearson_r(np.array([1.0, np.nan]), np.array([2.0, 3.0])))
    assert pearson_r(np.array([1, 2, np.nan, 4]), np.array([2, 4, 5, 8])) == pytest.approx(1.0)


def test_map_labels_for_cross_dataset_evaluation():
    classes = ["others", "sadness"]
    labels = ["sadness", "joy", "anger", None, "sadness"]
    assert map_labels(labels, classes, {"sadness": "sadness", "*": "others"}).tolist() == [1, 0, 0, -1, 1]
    assert map_labels(labels, classes, {"sadness": "sadness", "joy": "others"}).tolist() == [1, 0, -1, -1, 1]
    assert map_labels(["others", "fear"], classes).tolist() == [0, -1]  # no map: labels are class names
    with pytest.raises(EvaluationError, match="happiness"):
        map_labels(labels, classes, {"joy": "happiness"})


def test_write_evaluation_maps_excludes_and_stores_rows(db):
    classes = ["others", "sadness"]
    ids = [f"img{i}" for i in range(6)]
    labels = ["sadness", "joy", "anger", "sadness", "fear", "surprise"]
    scores = np.array([[0.2, 0.8], [0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.5, 0.5], [0.1, 0.9]])
    rows = write_evaluation(db, experiment="webemo", model_id="m1", split_id="s1", dataset="emotion6", part="test",
                            image_ids=ids, labels=labels, scores=scores, classes=classes,
                            class_map={"sadness": "sadness", "joy": "others", "anger": "others"})
    found = by_key(rows)
    # fear and surprise map to nothing: excluded, counted. Kept: 0 ok, 1 ok, 2 wrong, 3 wrong.
    assert found["excluded", None].value == 2
    assert found["accuracy", None].value == 0.5 and found["accuracy", None].n == 4
    assert all(r.dataset == "emotion6" and r.part == "test" for r in rows)
    assert headline_markdown(rows).endswith("\n\nemotion6 (test): 2 images excluded (their label maps to no class)\n")
    with db.connect() as conn:
        preds = conn.execute("SELECT image_id, label, predicted, scores FROM predictions ORDER BY image_id").fetchall()
        stored = conn.execute("SELECT value, ci_low, ci_high, n FROM metrics WHERE metric = 'accuracy'").fetchall()
    assert [p[:3] for p in preds] == [("img0", "sadness", "sadness"), ("img1", "others", "others"),
                                      ("img2", "others", "sadness"), ("img3", "sadness", "others")]
    assert json.loads(preds[0][3]) == {"others": 0.2, "sadness": 0.8}
    assert stored == [(0.5, found["accuracy", None].ci_low, found["accuracy", None].ci_high, 4)]
    with pytest.raises(EvaluationError, match="emotion6"):
        write_evaluation(db, experiment="webemo", model_id="m1", split_id="s1", dataset="emotion6", part="test",
                         image_ids=["x"], labels=["fear"], scores=np.array([[0.5, 0.5]]), classes=classes,
                         class_map={"sadness": "sadness"})


def test_write_evaluation_is_idempotent_per_experiment_model_dataset_part(db):
    ids = [f"id{i}" for i in range(8)]
    labels = [CLASSES[i] for i in LABELS]
    common = dict(experiment="exp", model_id="m1", split_id="s1", dataset="d", image_ids=ids, labels=labels, classes=CLASSES)

    def counts():
        with db.connect() as conn:
            return (conn.execute("SELECT part, count(*) FROM metrics GROUP BY part ORDER BY part").fetchall(),
                    conn.execute("SELECT part, count(*) FROM predictions GROUP BY part ORDER BY part").fetchall())

    first = write_evaluation(db, part="test", scores=SCORES, **common)
    write_evaluation(db, part="val", scores=SCORES, **common)
    assert counts() == ([("test", len(first)), ("val", len(first))], [("test", 8), ("val", 8)])
    # same key again, in another order and with every sample now right: rows replaced, not added
    perfect = np.eye(3)[LABELS]
    again = write_evaluation(db, part="test", scores=perfect[::-1], **{**common, "image_ids": ids[::-1], "labels": labels[::-1]})
    assert counts() == ([("test", len(again)), ("val", len(first))], [("test", 8), ("val", 8)])
    with db.connect() as conn:
        assert conn.execute("SELECT part, value FROM metrics WHERE metric = 'accuracy' ORDER BY part").fetchall() == [
            ("test", 1.0), ("val", 0.5)]


def test_regression_predictions_store_missing_targets_as_null(db):
    rows = write_evaluation(db, experiment="emotic", model_id="m", split_id="s", dataset="emotic", part="test",
                            image_ids=["p", "q", "r"], labels=np.array([[0.5, np.nan], [0.2, 0.4], [0.9, 0.1]]),
                            scores=np.array([[0.4, 0.3], [0.2, 0.5], [0.7, 0.1]], dtype=np.float32),
                            classes=["valence", "arousal"], task="regression")
    assert by_key(rows)["mse", "arousal"].n == 2
    mse = by_key(rows)["mse", None].value  # (0.01 + 0.01 + 0.04 + 0) / 5
    assert mse == pytest.approx(0.012, rel=1e-6)
    table = headline_markdown(rows, Reference("mse", 0.043, "MobileNetV2"))
    assert "MSE [95 % CI]" in table and "0.0120 [" in table and "0.043 mse (MobileNetV2) | -0.031 |" in table
    with db.connect() as conn:
        label, predicted = conn.execute("SELECT label, predicted FROM predictions WHERE image_id = 'p'").fetchone()
    assert json.loads(label) == {"valence": 0.5, "arousal": None}
    assert json.loads(predicted)["valence"] == float(np.float32(0.4))  # float32 output stored exactly


def test_headline_markdown_shows_the_numbers(db):
    labels = [CLASSES[i] for i in LABELS]
    ids = [f"id{i}" for i in range(8)]
    common = dict(split_id="split0123456789abcdef", image_ids=ids, labels=labels, classes=CLASSES)
    rows = write_evaluation(db, experiment="fi8", model_id="old_model", dataset="fi", part="test", scores=SCORES, **common)
    rows += write_evaluation(db, experiment="fi8", model_id="old_model", dataset="other", part="test",
                             scores=np.eye(3)[LABELS], **common)
    reference = Reference("accuracy", 58.3, "fine-tuned CNN")
    table = headline_markdown(rows, reference)
    lines = table.splitlines()
    assert "accuracy % [95 % CI]" in lines[0] and "macro-F1" in lines[0] and "reference" in lines[0]
    fi_line = next(line for line in lines if line.startswith("| fi |"))
    assert "50.00 %" in fi_line and "0.381" in fi_line and "| 8 |" in fi_line
    assert "58.3 % accuracy (fine-tuned CNN)" in fi_line and "-8.30 pts" in fi_line
    other_line = next(line for line in lines if line.startswith("| other |"))
    assert "100.00 %" in other_line and "58.3" not in other_line  # the reference is the main dataset's



def test_confusion_png_is_a_readable_image(tmp_path):
    matrix = np.array([[2, 1, 0], [1, 2, 0], [1, 1, 0]])
    path = confusion_png(matrix, CLASSES, tmp_path / "plots" / "confusion.png")
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and image.width >= 300 and image.height >= 300
        colours = np.asarray(image.convert("RGB"))
    assert (colours.std(axis=(0, 1)) > 10).all()  # a drawing, not a blank canvas
    assert list(tmp_path.joinpath("plots").iterdir()) == [path]  # no temporary file left behind


def test_box_and_vad_are_also_reported_as_groups():
    names = ["box_x1", "box_y1", "valence", "arousal"]
    targets = np.array([[0.0, 0.0, 0.5, 0.5], [1.0, 1.0, 0.5, 0.5]])
    preds = np.array([[0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 0.7, 0.9]])
    rows = {(r.metric, r.class_name): r.value for r in regression_metrics(targets, preds, names, resamples=0)}
    assert rows[("mse", "box")] == pytest.approx((0.25 + 0.25) / 4)
    assert rows[("mse", "vad")] == pytest.approx((0.04 + 0.16) / 4)
    assert rows[("mse", None)] == pytest.approx((0.5 + 0.2) / 8)

