"""Comparing results: the headline numbers of chosen models side by side, each seed group summarized as
mean ± std, and a paired significance test of two models on the same images.

Which model stands for an experiment is the caller's choice (the CLI and the evaluation asset pass the model
the latest `evaluation` materialization recorded in Dagster); nothing here picks "the newest rows".

    comparison(db, models, experiments)   -> Table: one row per (experiment, dataset, part), + seed means
    paired_comparison(db, ...)            -> Table: A − B in accuracy and macro-F1, paired bootstrap, McNemar
    render(table, fmt)                    -> md | csv | latex | json text
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

from emopipe.catalog import Catalog, ExperimentSpec
from emopipe.db import Database
from emopipe.errors import UserError
from emopipe.core.evaluation import confusion_batch, macro_f1_score

# The headline metrics, in column order: accuracy and macro-F1 for classification; MSE, MAE and Pearson r
# for regression (Pearson r is stored per target: the table shows its mean over the targets).
HEADLINE_METRICS = ("accuracy", "macro_f1", "mse", "mae", "pearson_r")
FORMATS = ("md", "csv", "latex", "json")
PAIRED_RESAMPLES = 10_000
PAIRED_SEED = 0
CI_LEVEL = 0.95
# Resampled indices are drawn in chunks of about this many elements (8 bytes each), bounding memory.
CHUNK_ELEMENTS = 4_000_000


class CompareError(UserError):
    """Models that cannot be compared: no recorded model, no predictions, different image sets."""


@dataclass(frozen=True)
class Table:
    """Rows as data: column -> value, numbers stay numbers (None = empty); notes say what is missing."""

    columns: tuple[str, ...]
    rows: tuple[dict, ...]
    notes: tuple[str, ...] = ()

    def header_and_rows(self) -> tuple[list[str], list[list]]:
        return list(self.columns), [[row.get(c) for c in self.columns] for row in self.rows]


# ---------------------------------------------------------------------------------------------
# The comparison table


def partitions_to_compare(catalog: Catalog, names: Sequence[str]) -> list[str]:
    """The experiment partitions named (all the catalog's when none): a seeded experiment's own name
    brings every seed partition of it; `name@seed1` only that one. Unknown names raise CatalogError."""
    chosen: list[str] = []
    for name in names or sorted(catalog.experiments):
        spec = catalog.experiment(name)
        members = [n for n, s in catalog.experiments.items() if s.seed_group == name] if spec.seed_group == name else [name]
        chosen += [m for m in members if m not in chosen]
    return chosen


def comparison(db: Database, models: Mapping[str, str | None], experiments: Mapping[str, ExperimentSpec], *,
               dataset: str | None = None, part: str | None = "test") -> Table:
    """One row per (experiment, dataset, part) of the model given for each experiment (None: no model
    recorded, said in a note), with the headline metrics and their 95 % CIs, n, the catalog's reference
    beside the experiment's own test part, and short model and split ids. Experiments of one seed group
    are followed by a mean ± std row (sample std, ddof=1) per (dataset, part) when two or more seeds have one."""
    notes = [f"{name}: no evaluation materialization recorded a model; `emopipe run {name}` makes one"
             for name, m in models.items() if m is None]
    wanted = {name: m for name, m in models.items() if m is not None}
    lines = _metric_lines(db, wanted, dataset, part)
    notes += [f"{name}: the recorded model {m[:12]} has no metrics rows" + (f" on {dataset or 'any dataset'}/{part or 'any part'}")
              for name, m in wanted.items() if not any(key[0] == name for key in lines)]
    metrics = [m for m in HEADLINE_METRICS if any(m in line for line in lines.values())]
    rows = []
    for members in _groups(list(wanted), experiments).values():
        spec = experiments.get(members[0])
        data_parts = dict.fromkeys(key[1:] for key in lines if key[0] in members)
        for data_part in sorted(data_parts, key=lambda dp: spec is None or dp[0] != spec.dataset):  # own dataset first
            member_rows = [_row(name, experiments.get(name), *data_part, lines[(name, *data_part)], metrics)
                           for name in members if (name, *data_part) in lines]
            rows += member_rows
            if spec is not None and spec.seed_group and len(member_rows) >= 2:
                rows.append(_seed_summary(spec, member_rows, metrics))
    columns = ["experiment", "seed", "dataset", "part", "n"]
    for m in metrics:
        columns += [m, f"{m}_ci_low", f"{m}_ci_high"] + ([f"{m}_std"] if any(f"{m}_std" in r for r in rows) else [])
    columns += ["reference_metric", "reference_value", "reference_source", "model", "split"]
    return Table(tuple(columns), tuple(rows), tuple(notes))


def _metric_lines(db: Database, models: Mapping[str, str], dataset: str | None, part: str | None) -> dict[tuple, dict]:
    """{(experiment, dataset, part): {"model", "split", "n", metric: (value, ci_low, ci_high)}} for exactly
    the given (experiment, model_id) pairs, in their order, then by dataset, test before val."""
    if not models:
        return {}
    wanted = pa.table({"experiment": list(models), "model_id": list(models.values()), "position": range(len(models))})
    with db.connect() as conn:
        conn.register("wanted", wanted)
        try:
            found = conn.execute("""
                SELECT m.experiment, m.dataset, m.part, m.model_id, any_value(m.split_id), m.metric,
                       avg(m.value) FILTER (WHERE NOT isnan(m.value)), any_value(m.ci_low), any_value(m.ci_high),
                       max(m.n)
                FROM metrics m JOIN wanted w USING (experiment, model_id)
                WHERE ((m.class IS NULL AND m.metric IN ('accuracy', 'macro_f1', 'mse', 'mae')) OR m.metric = 'pearson_r')
                  AND (?::VARCHAR IS NULL OR m.dataset = ?) AND (?::VARCHAR IS NULL OR m.part = ?)
                GROUP BY m.experiment, m.dataset, m.part, m.model_id, m.metric, w.position
                ORDER BY w.position, m.dataset, m.part != 'test', m.part
            """, [dataset, dataset, part, part]).fetchall()
        finally:
            conn.unregister("wanted")
    lines: dict[tuple, dict] = {}
    for experiment, data, data_part, model_id, split_id, metric, value, low, high, n in found:
        line = lines.setdefault((experiment, data, data_part), {"model": model_id, "split": split_id})
        if metric != "pearson_r":  # pearson_r's n is per target; the table's n is the images evaluated
            line.setdefault("n", n)
        line[metric] = (value, low, high)
    return lines


def _groups(names: list[str], experiments: Mapping[str, ExperimentSpec]) -> dict[str, list[str]]:
    """The names in order of first appearance, each seed group's partitions together."""
    groups: dict[str, list[str]] = {}
    for name in names:
        spec = experiments.get(name)
        groups.setdefault(spec.seed_group if spec is not None and spec.seed_group else name, []).append(name)
    return groups


def _reference(spec: ExperimentSpec | None, dataset: str, part: str) -> dict:
    """The catalog's published number, beside the test part of the experiment's own dataset only."""
    shown = spec.reference if spec is not None and dataset == spec.dataset and part == "test" else None
    return {"reference_metric": shown and shown.metric, "reference_value": shown and shown.value,
            "reference_source": shown and shown.source}


def _row(name: str, spec: ExperimentSpec | None, dataset: str, part: str, line: dict, metrics: list[str]) -> dict:
    row = {"experiment": name, "seed": spec.seed if spec is not None else None, "dataset": dataset, "part": part,
           "n": line.get("n"), **_reference(spec, dataset, part), "model": line["model"][:12], "split": line["split"][:12]}
    for m in metrics:
        row[m], row[f"{m}_ci_low"], row[f"{m}_ci_high"] = line.get(m, (None, None, None))
    return row


def _seed_summary(spec: ExperimentSpec, member_rows: list[dict], metrics: list[str]) -> dict:
    """Mean and sample std (ddof=1) of each metric over the seeds' rows of one (dataset, part)."""
    first = member_rows[0]
    splits = {r["split"] for r in member_rows}
    ns = {r["n"] for r in member_rows}
    row = {"experiment": spec.seed_group, "seed": f"mean ± std ({len(member_rows)} seeds)", "dataset": first["dataset"],
           "part": first["part"], "n": ns.pop() if len(ns) == 1 else None,
           **_reference(spec, first["dataset"], first["part"]), "model": None,
           "split": splits.pop() if len(splits) == 1 else "differ"}
    for m in metrics:
        values = [r[m] for r in member_rows]
        if any(v is None for v in values):
            continue
        row[m], row[f"{m}_std"] = float(np.mean(values)), float(np.std(values, ddof=1))
    return row


# ---------------------------------------------------------------------------------------------
# Paired significance of two models on the same images


@dataclass(frozen=True)
class PairedDifference:
    metric: str
    value_a: float
    value_b: float
    difference: float  # A − B
    ci_low: float
    ci_high: float
    p_value: float  # two-sided


def paired_bootstrap(labels: np.ndarray, predicted_a: np.ndarray, predicted_b: np.ndarray, n_classes: int, *,
                     resamples: int = PAIRED_RESAMPLES, seed: int = PAIRED_SEED) -> list[PairedDifference]:
    """A − B in accuracy and macro-F1 with a paired-bootstrap CI and two-sided p-value.

    Each resample draws images with replacement and scores both models on the same indices. p is the
    share of resampled differences at least as far from the observed one as the observed one is from 0
    (the bootstrap distribution shifted to the null, Efron & Tibshirani 1993, §16.4), as (1 + count) / (1 + B).
    Hand-rolled rather than scipy.stats.bootstrap: that gives an interval but no p-value, and this way both
    metrics and the p-value come from one set of resampled indices.
    """
    labels, a, b = (np.asarray(x, dtype=np.int64) for x in (labels, predicted_a, predicted_b))
    n = len(labels)
    statistics = {"accuracy": lambda idx, p: (labels[idx] == p[idx]).mean(-1),
                  "macro_f1": lambda idx, p: macro_f1_score(confusion_batch(labels[idx], p[idx], n_classes))}
    everything = np.arange(n)[None]
    rng = np.random.default_rng(seed)
    chunk = max(1, CHUNK_ELEMENTS // max(n, 1))
    draws = {m: [] for m in statistics}
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        for m, statistic in statistics.items():
            draws[m].append(statistic(idx, a) - statistic(idx, b))
    tail = (1 - CI_LEVEL) / 2 * 100
    out = []
    for m, statistic in statistics.items():
        value_a, value_b = float(statistic(everything, a)[0]), float(statistic(everything, b)[0])
        observed = value_a - value_b
        differences = np.concatenate(draws[m])
        low, high = np.percentile(differences, [tail, 100 - tail])
        extreme = int((np.abs(differences - observed) >= abs(observed)).sum())
        out.append(PairedDifference(m, value_a, value_b, observed, float(low), float(high), (1 + extreme) / (1 + resamples)))
    return out


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int, float]:
    """(A right where B is wrong, B right where A is wrong, two-sided exact p): a binomial test of the
    discordant pairs against 1/2; p = 1 when there are none."""
    # Imported here: scipy.stats takes ~0.6 CPU-s to import, and this module loads with every step's definitions.
    from scipy.stats import binomtest

    only_a = int((correct_a & ~correct_b).sum())
    only_b = int((~correct_a & correct_b).sum())
    return only_a, only_b, (binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0)


def paired_comparison(db: Database, *, name_a: str, model_a: str, name_b: str, model_b: str, dataset: str,
                      part: str = "test", resamples: int = PAIRED_RESAMPLES, seed: int = PAIRED_SEED) -> Table:
    """The paired tests of two classifiers' `predictions` rows on dataset/part. Refuses (CompareError) unless
    both models have predictions for exactly the same images, with the same labels."""
    labels, predicted_a, predicted_b = _paired_predictions(db, name_a, model_a, name_b, model_b, dataset, part)
    classes = {c: i for i, c in enumerate(sorted(set(labels) | set(predicted_a) | set(predicted_b)))}
    y, a, b = (np.array([classes[c] for c in values]) for values in (labels, predicted_a, predicted_b))
    col_a, col_b = f"A: {name_a}", f"B: {name_b}"
    test = f"paired bootstrap ({resamples} resamples)"
    rows = [{"metric": d.metric, col_a: d.value_a, col_b: d.value_b, "difference": d.difference,
             "difference_ci_low": d.ci_low, "difference_ci_high": d.ci_high, "p": d.p_value, "test": test}
            for d in paired_bootstrap(y, a, b, len(classes), resamples=resamples, seed=seed)]
    only_a, only_b, p = mcnemar_exact(y == a, y == b)
    rows.append({**{k: rows[0][k] for k in ("metric", col_a, col_b, "difference")}, "p": p,
                 "test": f"McNemar exact (only A right: {only_a}, only B right: {only_b})"})
    columns = ("metric", col_a, col_b, "difference", "difference_ci_low", "difference_ci_high", "p", "test")
    note = (f"{dataset}/{part}: {len(y)} images, the same for both models; A = {name_a} (model {model_a[:12]}), "
            f"B = {name_b} (model {model_b[:12]}); difference = A − B, 95 % CI")
    return Table(columns, tuple(rows), (note,))


def _paired_predictions(db: Database, name_a: str, model_a: str, name_b: str, model_b: str, dataset: str,
                        part: str) -> tuple[list[str], list[str], list[str]]:
    """(labels, A's predictions, B's predictions) by image_id; CompareError when the image sets differ."""
    with db.connect() as conn:
        n_a, n_b, shared, same_label = conn.execute("""
            WITH a AS (SELECT image_id, label FROM predictions WHERE model_id = ? AND dataset = ? AND part = ?),
                 b AS (SELECT image_id, label FROM predictions WHERE model_id = ? AND dataset = ? AND part = ?)
            SELECT (SELECT count(*) FROM a), (SELECT count(*) FROM b), count(*), count(*) FILTER (WHERE a.label = b.label)
            FROM a JOIN b USING (image_id)
        """, [model_a, dataset, part, model_b, dataset, part]).fetchone()
        if not (n_a == n_b == shared == same_label) or shared == 0:
            what = (f"{shared - same_label} shared images carry different labels (different class maps?)"
                    if n_a == n_b == shared and shared else f"{shared} are shared")
            raise CompareError(f"a paired test needs both models' predictions on the same {dataset}/{part} images: "
                               f"{name_a} (model {model_a[:12]}) has {n_a}, {name_b} (model {model_b[:12]}) has {n_b}, {what}")
        found = conn.execute("""
            SELECT a.label, a.predicted, b.predicted FROM predictions a JOIN predictions b USING (dataset, part, image_id)
            WHERE a.model_id = ? AND b.model_id = ? AND dataset = ? AND part = ? ORDER BY image_id
        """, [model_a, model_b, dataset, part]).fetchall()
    labels, predicted_a, predicted_b = (list(column) for column in zip(*found))
    return labels, predicted_a, predicted_b


# ---------------------------------------------------------------------------------------------
# Rendering

# The stdlib csv module, the project's Markdown helper and a few lines of LaTeX: pandas is no dependency, and
# its to_latex/to_markdown would pull jinja2/tabulate in for the same few lines.


def render(table: Table, fmt: str) -> str:
    """md (notes below the table), csv (data columns, notes left out), latex (tabular; notes as comments) or
    json ({"columns", "rows", "notes"}; NaN as null)."""
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=table.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: "" if row.get(c) is None else row.get(c) for c in table.columns} for row in table.rows)
        return out.getvalue()
    if fmt == "json":
        rows = [{c: _json_value(row.get(c)) for c in table.columns} for row in table.rows]
        return json.dumps({"columns": list(table.columns), "rows": rows, "notes": list(table.notes)}, indent=1,
                          ensure_ascii=False) + "\n"
    header, cells = _display(table)
    if fmt == "md":
        from emopipe.markdown import markdown_table

        text = markdown_table(header, cells) if cells else "(no rows)"
        return text + "".join(f"\n\n{note}" for note in table.notes) + "\n"
    if fmt == "latex":
        lines = ["\\begin{tabular}{" + "l" * len(header) + "}", "\\hline",
                 " & ".join(map(_latex, header)) + " \\\\", "\\hline"]
        lines += [" & ".join(map(_latex, row)) + " \\\\" for row in cells]
        lines += ["\\hline", "\\end{tabular}"] + [f"% {note}" for note in table.notes]
        return "\n".join(lines) + "\n"
    raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")


def _display(table: Table) -> tuple[list[str], list[list[str]]]:
    """Text cells for people: a value with its CI as `v [low, high]`, with its std as `v ± s`, the
    reference as `value metric (source)`."""
    merged = ("_ci_low", "_ci_high", "_std")
    shown = [c for c in table.columns if not c.endswith(merged) and not c.startswith("reference_")]
    header = [f"{c} [95 % CI]" if f"{c}_ci_low" in table.columns else c for c in shown]
    if "reference_metric" in table.columns:
        position = shown.index("model") if "model" in shown else len(shown)
        shown.insert(position, "reference")
        header.insert(position, "reference")
    cells = []
    for row in table.rows:
        line = []
        for c in shown:
            if c == "reference":
                unit = " %" if row.get("reference_metric") == "accuracy" else ""  # published accuracies are in %
                line.append("" if row.get("reference_value") is None else
                            f"{row['reference_value']:g}{unit} {row['reference_metric']}"
                            + (f" ({row['reference_source']})" if row.get("reference_source") else ""))
                continue
            text = _text(c, row.get(c))
            if row.get(f"{c}_ci_low") is not None:
                text += f" [{_text(c, row[f'{c}_ci_low'])}, {_text(c, row[f'{c}_ci_high'])}]"
            if row.get(f"{c}_std") is not None:
                text += f" ± {_text(c, row[f'{c}_std'])}"
            line.append(text)
        cells.append(line)
    return header, cells


def _text(column: str, value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if column == "p":
            return f"{value:.3g}"
        return f"{value:+.4f}" if column == "difference" else f"{value:.4f}"
    return str(value)


def _json_value(value):
    return None if isinstance(value, float) and math.isnan(value) else value


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$",
                  "−": "--"}


def _latex(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
