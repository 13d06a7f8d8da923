"""Calibration (core/calibration.py): ECE on a hand-computed case, its bins, and the reliability diagram."""

import numpy as np
import pytest
from PIL import Image

from emopipe.core.calibration import calibration_bins, expected_calibration_error, probabilities, reliability_png
from emopipe.core.evaluation import classification_metrics


def test_ece_of_a_hand_computed_case():
    # Bins of width 1/15: 0.9 and 0.9 share (0.867, 0.933] (accuracy 1/2), 0.6 is alone in (0.533, 0.6]
    # (accuracy 1), 0.3 alone in (0.267, 0.333] (accuracy 0):
    # ECE = 2/4 * |0.5 - 0.9| + 1/4 * |1 - 0.6| + 1/4 * |0 - 0.3| = 0.2 + 0.1 + 0.075.
    confidence, correct = np.array([0.9, 0.9, 0.6, 0.3]), np.array([1, 0, 1, 0])
    assert expected_calibration_error(confidence, correct)[0] == pytest.approx(0.375)
    bins = calibration_bins(confidence, correct)
    assert [(round(b.low, 3), b.n, b.accuracy) for b in bins] == [(0.267, 1, 0.0), (0.533, 1, 1.0), (0.867, 2, 0.5)]
    # Resampled index rows give each resample's ECE: all four images, then image 0 four times (conf 0.9, right).
    index = np.array([[0, 1, 2, 3], [0, 0, 0, 0]])
    assert expected_calibration_error(confidence, correct, index=index) == pytest.approx([0.375, 0.1])


def test_a_perfectly_calibrated_model_has_ece_zero_and_metrics_carry_it():
    # Two classes; confidence 0.75 on every image and right on 3 of 4: accuracy equals confidence.
    scores = np.array([[0.75, 0.25], [0.75, 0.25], [0.75, 0.25], [0.25, 0.75]])
    labels = np.array([0, 0, 1, 1])
    rows = {(r.metric, r.class_name): r for r in classification_metrics(labels, scores, ["a", "b"], resamples=50)}
    assert rows[("ece", None)].value == pytest.approx(0.0)
    assert rows[("ece", None)].ci_low is not None
    assert rows[("calibration_accuracy", "0.733-0.800")].value == pytest.approx(0.75)
    assert rows[("calibration_accuracy", "0.733-0.800")].n == 4


def test_logits_are_turned_into_probabilities_and_distributions_kept():
    logits = np.array([[2.0, 0.0], [0.2, 0.8]])
    p = probabilities(logits)
    assert p[0] == pytest.approx([np.exp(2) / (np.exp(2) + 1), 1 / (np.exp(2) + 1)])
    assert p[1] == pytest.approx([0.2, 0.8])  # already a distribution


def test_reliability_diagram_is_a_readable_png(tmp_path):
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.2, 1.0, 300)
    correct = rng.uniform(size=300) < confidence
    path = reliability_png(calibration_bins(confidence, correct), float(expected_calibration_error(confidence, correct)[0]),
                           "demo test", tmp_path / "reliability.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 300


def test_the_bins_come_back_from_the_stored_rows():
    from emopipe.core.calibration import stored_bins

    rng = np.random.default_rng(1)
    scores = rng.dirichlet(np.ones(3), 200)
    labels = rng.integers(0, 3, 200)
    rows = classification_metrics(labels, scores, ["a", "b", "c"], resamples=0)
    confidence, correct = scores.max(1), scores.argmax(1) == labels
    assert [(round(b.low, 3), b.n, b.accuracy) for b in stored_bins(rows)] == [
        (round(b.low, 3), b.n, b.accuracy) for b in calibration_bins(confidence, correct)]
