"""The views of stored evaluations: the headline table (Markdown, with 95 % CIs, the catalog's reference and
the notes on excluded images), and the confusion matrix rebuilt from its rows and drawn as a PNG."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from emopipe.atomic import atomic_write
from emopipe.catalog import Reference
from emopipe.core.evaluation import MetricRow, row_normalized
from emopipe.markdown import markdown_table

# Metrics whose stored value is a fraction but whose reference (and table cell) is in percent.
_PERCENT = ("accuracy",)


def confusion_from_rows(rows: Sequence[MetricRow], classes: Sequence[str]) -> np.ndarray:
    """The counts matrix back from `confusion_count` rows (of one dataset and part)."""
    index = {name: i for i, name in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for r in rows:
        if r.metric == "confusion_count":
            true, pred = r.class_name.split("->")
            matrix[index[true], index[pred]] = int(r.value)
    return matrix


# ---------------------------------------------------------------------------------------------
# Views


def _cell(metric: str, value: float | None, low: float | None = None, high: float | None = None) -> str:
    if value is None or value != value:
        return "—"
    if metric in _PERCENT:
        text = f"{value * 100:.2f} %"
        return text + (f" [{low * 100:.1f}, {high * 100:.1f}]" if low is not None else "")
    digits = 3 if metric.endswith("f1") else 4
    return f"{value:.{digits}f}" + (f" [{low:.{digits}f}, {high:.{digits}f}]" if low is not None else "")


def _reference_cells(reference: Reference | None, values: Mapping[str, float | None]) -> tuple[str, str]:
    """(reference, difference) cells; the difference is in points for accuracy (reference in %)."""
    if reference is None:
        return "", ""
    ref_text = f"{reference.value:g}{' %' if reference.metric in _PERCENT else ''} {reference.metric}"
    if reference.source:
        ref_text += f" ({reference.source})"
    ours = values.get(reference.metric)
    if ours is None or ours != ours:
        return ref_text, "—"
    if reference.metric in _PERCENT:
        return ref_text, f"{ours * 100 - reference.value:+.2f} pts"
    return ref_text, f"{ours - reference.value:+.4g}"


_HEADLINE = (("accuracy", "accuracy % [95 % CI]"), ("macro_f1", "macro-F1 [95 % CI]"),
             ("mse", "MSE [95 % CI]"), ("mae", "MAE [95 % CI]"), ("kl_divergence", "KL [95 % CI]"))


def headline_markdown(
    rows: Sequence[MetricRow], reference: Reference | None = None, *, reference_dataset: str | None = None
) -> str:
    """A Markdown table: one line per (dataset, part) with the headline metrics, their CIs and n.

    The reference (the catalog's published number) is set beside the test part of reference_dataset
    (default: the first dataset in rows), with our value minus it.
    """
    overall = {(r.dataset, r.part, r.metric): r for r in rows if r.class_name is None}
    groups = list(dict.fromkeys((r.dataset, r.part) for r in rows))
    columns = [(m, title) for m, title in _HEADLINE if any(key[2] == m for key in overall)]
    reference_dataset = reference_dataset or (groups[0][0] if groups else None)
    header = ["dataset", "part", "n", *(title for _, title in columns)]
    if reference:
        header += ["reference", "difference"]
    lines = []
    for dataset, part in groups:
        found = {m: overall.get((dataset, part, m)) for m, _ in columns}
        n = next((r.n for r in found.values() if r is not None), None)
        cells = [str(dataset), str(part), str(n)]
        cells += [_cell(m, r.value, r.ci_low, r.ci_high) if r else "—" for m, r in found.items()]
        if reference:
            shown = reference if (dataset == reference_dataset and part == "test") else None
            values = {m: r.value for m, r in found.items() if r is not None}
            cells += list(_reference_cells(shown, values))
        lines.append(cells)
    excluded = [(d, p, r.value) for (d, p, m), r in overall.items() if m == "excluded" and r.value > 0]
    notes = [f"{d} ({p}): {int(v)} images excluded (their label maps to no class)" for d, p, v in excluded]
    overlapping = [(d, p, r.value) for (d, p, m), r in overall.items() if m == "excluded_overlap" and r.value > 0]
    notes += [f"{d} ({p}): {int(v)} images excluded: copies or near-duplicates of training images" for d, p, v in overlapping]
    # A blank line ends the table: a plain line right below it would render as one more row.
    return markdown_table(header, lines) + "".join(f"\n\n{note}" for note in notes) + "\n"


def confusion_png(matrix: np.ndarray, classes: Sequence[str], path: str | os.PathLike) -> Path:
    """The row-normalized confusion matrix as a heat map, each cell annotated with rate and count."""
    # Figure + the Agg canvas directly: no pyplot, so no global backend or figure registry is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = np.asarray(matrix)
    rates = row_normalized(matrix)
    c = len(classes)
    side = max(4.0, 0.7 * c + 2.5)
    fig = Figure(figsize=(side + 1, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(c), labels=classes, rotation=45, ha="right")
    ax.set_yticks(range(c), labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if c <= 20:
        for i in range(c):
            for j in range(c):
                ax.text(j, i, f"{rates[i, j]:.2f}\n({matrix[i, j]})", ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_title(f"confusion (n = {int(matrix.sum())})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))  # a reader never sees a half-written PNG
    return path
