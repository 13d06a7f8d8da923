"""Calibration of a classifier's scores: expected calibration error (ECE) over equal-width confidence
bins, and the reliability diagram drawn from the stored bins.

ECE (Guo et al., ICML 2017): the test images are binned by confidence (the top class's probability) into
CALIBRATION_BINS equal-width bins over [0, 1] (right-closed, the first bin includes 0); per bin the gap
|accuracy - mean confidence| is weighted by the bin's share of the images. Plain numpy: a histogram and
two weighted sums, which also lets the bootstrap compute every resample at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emopipe.atomic import atomic_write

CALIBRATION_BINS = 15


@dataclass(frozen=True)
class CalibrationBin:
    low: float
    high: float
    n: int
    confidence: float  # mean top-class probability of the bin's images
    accuracy: float


def probabilities(scores: np.ndarray) -> np.ndarray:
    """Rows that are already probability distributions as they are; other rows (logits) through a softmax."""
    scores = np.asarray(scores, dtype=np.float64)
    is_distribution = (scores >= 0).all(1) & (np.abs(scores.sum(1) - 1) < 1e-3)
    shifted = np.exp(scores - scores.max(1, keepdims=True))
    return np.where(is_distribution[:, None], scores, shifted / shifted.sum(1, keepdims=True))


def bin_index(confidence: np.ndarray, bins: int = CALIBRATION_BINS) -> np.ndarray:
    """Each confidence's bin: (k/bins, (k+1)/bins], with 0 in the first bin."""
    return np.clip(np.ceil(np.asarray(confidence) * bins).astype(np.int64) - 1, 0, bins - 1)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS,
                               index: np.ndarray | None = None) -> np.ndarray:
    """ECE of each row of `index` (resampled positions, shape (R, N)), or of all images when index is None."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    which = bin_index(confidence, bins)
    if index is None:
        index = np.arange(len(confidence))[None, :]
    offsets = (np.arange(len(index)) * bins)[:, None]
    flat = (which[index] + offsets).ravel()
    size = len(index) * bins
    gap = (np.bincount(flat, confidence[index].ravel(), size) - np.bincount(flat, correct[index].ravel(), size))
    return np.abs(gap.reshape(len(index), bins)).sum(1) / index.shape[1]


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> list[CalibrationBin]:
    """The non-empty bins with their counts, mean confidence and accuracy (what the diagram shows)."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    which = bin_index(confidence, bins)
    out = []
    for k in np.unique(which):
        members = which == k
        out.append(CalibrationBin(k / bins, (k + 1) / bins, int(members.sum()), float(confidence[members].mean()),
                                  float(correct[members].mean())))
    return out


def stored_bins(rows) -> list[CalibrationBin]:
    """The bins back from one part's stored metric rows (`calibration_confidence` / `calibration_accuracy`,
    class "<low>-<high>", as classification_metrics writes them), in confidence order."""
    confidence = {r.class_name: r.value for r in rows if r.metric == "calibration_confidence"}
    bins = [CalibrationBin(*(float(edge) for edge in r.class_name.split("-")), r.n, confidence[r.class_name], r.value)
            for r in rows if r.metric == "calibration_accuracy"]
    return sorted(bins, key=lambda b: b.low)


def reliability_png(bins: list[CalibrationBin], ece: float, title: str, path: str | os.PathLike) -> Path:
    """The reliability diagram: accuracy per confidence bin against the diagonal, bin counts beneath."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(4.8, 5.2), height_ratios=(3, 1), sharex=True)
    width = 1 / CALIBRATION_BINS
    top.bar([b.low for b in bins], [b.accuracy for b in bins], width=width, align="edge", color="#4c72b0",
            edgecolor="white", label="accuracy")
    # The gap spans accuracy to mean confidence either way (over- or under-confident), never overlapping the bar.
    top.bar([b.low for b in bins], [abs(b.confidence - b.accuracy) for b in bins],
            bottom=[min(b.confidence, b.accuracy) for b in bins], width=width, align="edge", color="none",
            edgecolor="#dd8452", hatch="//", label="gap to mean confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set(ylim=(0, 1), ylabel="accuracy", title=f"{title}\nECE {ece:.3f} ({CALIBRATION_BINS} bins)")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar([b.low for b in bins], [b.n for b in bins], width=width, align="edge", color="gray")
    bottom.set(xlim=(0, 1), xlabel="confidence (top-class probability)", ylabel="images")
    figure.tight_layout()
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=110))
    plt.close(figure)
    return path
