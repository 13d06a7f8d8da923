"""emopipe compare: the comparison table of recorded models against real DuckDB metrics rows, seed partitions
and their mean ± std, the paired tests, and every output format."""

import csv
import io
import json
import re
import textwrap

import numpy as np
import pytest

from emopipe.catalog import CatalogError, ExperimentSpec, Reference, load_catalog
from emopipe.cli import main
from emopipe.core.compare import (
    CompareError, comparison, paired_bootstrap, paired_comparison, partitions_to_compare, render,
)
from emopipe.core.evaluation import write_evaluation

CLASSES = ["a", "b", "c"]
RNG = np.random.default_rng(3)
LABELS = RNG.integers(0, 3, size=60)
IDS = [f"img{i:03d}" for i in range(60)]
REFERENCE = Reference("accuracy", 58.3, "fine-tuned CNN")


def noisy_scores(correct_share: float, seed: int, labels=LABELS) -> np.ndarray:
    """Scores whose argmax is the label for about `correct_share` of the images, another class otherwise."""
    rng = np.random.default_rng(seed)
    predicted = np.where(rng.random(len(labels)) < correct_share, labels, (labels + rng.integers(1, 3, len(labels))) % 3)
    return np.eye(3)[predicted] * 0.8 + 0.1


def evaluate(db, experiment, model_id, scores, *, dataset="fi", part="test", ids=IDS, labels=LABELS, split_id="split0123456789ab"):
    return write_evaluation(db, experiment=experiment, model_id=model_id, split_id=split_id, dataset=dataset, part=part,
                            image_ids=ids, labels=[CLASSES[i] for i in labels], scores=scores, classes=CLASSES)


def overall(rows, metric):
    [row] = [r for r in rows if r.metric == metric and r.class_name is None]
    return row


def test_the_numbers_are_the_metrics_rows_and_the_reference_sits_beside_the_own_test_part(db):
    test_rows = evaluate(db, "fi8", "model_fi8_0123456789", noisy_scores(0.7, 1))
    evaluate(db, "fi8", "model_fi8_0123456789", noisy_scores(0.6, 2), part="val")
    other_rows = evaluate(db, "fi8", "model_fi8_0123456789", noisy_scores(0.5, 3), dataset="other")
    experiments = {"fi8": ExperimentSpec("fi8", "fi", reference=REFERENCE)}

    table = comparison(db, {"fi8": "model_fi8_0123456789"}, experiments, part=None)
    lines = {(r["dataset"], r["part"]): r for r in table.rows}
    assert list(lines) == [("fi", "test"), ("fi", "val"), ("other", "test")]  # own dataset first, test before val
    fi = lines["fi", "test"]
    for metric in ("accuracy", "macro_f1"):
        stored = overall(test_rows, metric)
        assert (fi[metric], fi[f"{metric}_ci_low"], fi[f"{metric}_ci_high"]) == (stored.value, stored.ci_low, stored.ci_high)
    assert (fi["n"], fi["model"], fi["split"], fi["seed"]) == (60, "model_fi8_01", "split0123456", 0)
    assert (fi["reference_metric"], fi["reference_value"], fi["reference_source"]) == ("accuracy", 58.3, "fine-tuned CNN")
    assert lines["other", "test"]["accuracy"] == overall(other_rows, "accuracy").value
    assert lines["other", "test"]["reference_value"] is None and lines["fi", "val"]["reference_value"] is None
    assert [r["part"] for r in comparison(db, {"fi8": "model_fi8_0123456789"}, experiments).rows] == ["test", "test"]
    assert [r["dataset"] for r in comparison(db, {"fi8": "model_fi8_0123456789"}, experiments, dataset="other").rows] == ["other"]


def test_regression_rows_show_mse_mae_and_the_mean_pearson_r(db):
    targets = RNG.random((20, 2))
    preds = targets + RNG.normal(0, 0.1, (20, 2))
    rows = write_evaluation(db, experiment="va", model_id="va_model", split_id="s", dataset="va", part="test",
                            image_ids=IDS[:20], labels=targets, scores=preds, classes=["valence", "arousal"], task="regression")
    [line] = comparison(db, {"va": "va_model"}, {"va": ExperimentSpec("va", "va", task="regression")}).rows
    assert (line["mse"], line["mae"], line["mse_ci_low"]) == (overall(rows, "mse").value, overall(rows, "mae").value,
                                                              overall(rows, "mse").ci_low)
    per_target = [r.value for r in rows if r.metric == "pearson_r"]
    assert len(per_target) == 2 and line["pearson_r"] == pytest.approx(np.mean(per_target))
    assert "accuracy" not in line


def test_only_the_recorded_model_is_shown_when_a_newer_model_has_rows(db):
    recorded = evaluate(db, "fi8", "recorded_model_abc", noisy_scores(0.6, 1))
    evaluate(db, "fi8", "newer_model_xyz", noisy_scores(0.9, 2))  # written later: "the newest rows"
    evaluate(db, "emoset", "emoset_model", noisy_scores(0.5, 3), dataset="emoset")
    experiments = {"fi8": ExperimentSpec("fi8", "fi"), "emoset": ExperimentSpec("emoset", "emoset")}
    table = comparison(db, {"fi8": "recorded_model_abc", "emoset": None}, experiments)
    [line] = table.rows
    assert (line["experiment"], line["model"], line["accuracy"]) == ("fi8", "recorded_mod", overall(recorded, "accuracy").value)
    assert table.notes == ("emoset: no evaluation materialization recorded a model; `emopipe run emoset` makes one",)
    missing = comparison(db, {"fi8": "never_evaluated"}, experiments)
    assert missing.rows == () and "never_evaluated"[:12] in missing.notes[0]


def seeded_catalog(tmp_path, seeds="[0, 1, 2]", extra=""):
    path = tmp_path / "catalog.yaml"
    path.write_text(textwrap.dedent(f"""
        experiments:
          seeded:
            dataset: demo
            seeds: {seeds}
            {extra}
    """))
    return path


def test_seeds_expand_to_one_partition_per_seed_on_the_first_seeds_split(tmp_path):
    catalog = load_catalog(seeded_catalog(tmp_path))
    members = {n: e for n, e in catalog.experiments.items() if e.seed_group == "seeded"}
    assert {n: (e.seed, e.seed_of_split) for n, e in members.items()} == {
        "seeded": (0, 0), "seeded@seed1": (1, 0), "seeded@seed2": (2, 0)}
    assert partitions_to_compare(catalog, ["seeded"]) == ["seeded", "seeded@seed1", "seeded@seed2"]
    assert partitions_to_compare(catalog, ["seeded@seed2"]) == ["seeded@seed2"]
    assert catalog.experiment("demo").seed_of_split == catalog.experiment("demo").seed == 0  # no seeds: one seed for both
    import dagster as dg

    keys = dg.StaticPartitionsDefinition(sorted(catalog.experiments)).get_partition_keys()  # Dagster accepts '@'
    assert {"seeded", "seeded@seed1", "seeded@seed2"} <= set(keys)


@pytest.mark.parametrize("seeds, extra, message", [
    ("[0, 0]", "", "experiments.seeded.seeds: [0, 0] repeats a seed"),
    ("[]", "", "experiments.seeded.seeds: expected a non-empty list of non-negative integers"),
    ("seven", "", "experiments.seeded.seeds: expected a non-empty list of non-negative integers, got 'seven'"),
    ("[0, 1]", "seed: 3", "experiments.seeded.seeds: give either seed (one training) or seeds"),
])
def test_bad_seeds_are_named(tmp_path, seeds, extra, message):
    with pytest.raises(CatalogError, match=re.escape(message)):
        load_catalog(seeded_catalog(tmp_path, seeds, extra))


def test_a_seed_group_gets_a_mean_and_sample_std_row(db, tmp_path):
    catalog = load_catalog(seeded_catalog(tmp_path))
    models = {}
    for i, name in enumerate(["seeded", "seeded@seed1", "seeded@seed2"]):
        models[name] = f"model_of_seed_{i}"
        evaluate(db, name, models[name], noisy_scores(0.5 + 0.1 * i, i), dataset="demo")
    table = comparison(db, models, catalog.experiments)
    *seed_rows, summary = table.rows
    assert [r["seed"] for r in seed_rows] == [0, 1, 2]
    assert (summary["experiment"], summary["seed"], summary["n"], summary["split"], summary["model"]) == (
        "seeded", "mean ± std (3 seeds)", 60, "split0123456", None)
    for metric in ("accuracy", "macro_f1"):
        values = [r[metric] for r in seed_rows]
        assert summary[metric] == pytest.approx(np.mean(values)) and summary[f"{metric}_std"] == pytest.approx(np.std(values, ddof=1))
    assert summary["accuracy_std"] > 0
    assert "accuracy_std" in table.columns
    assert "± " in render(table, "md").splitlines()[-1]


def paired_db(db, better_share=1.0, worse_share=0.6, n=200):
    labels = np.random.default_rng(5).integers(0, 3, size=n)
    ids = [f"p{i:04d}" for i in range(n)]
    evaluate(db, "a", "model_a", noisy_scores(better_share, 1, labels), ids=ids, labels=labels)
    evaluate(db, "b", "model_b", noisy_scores(worse_share, 2, labels), ids=ids, labels=labels)
    evaluate(db, "c", "model_c", noisy_scores(0.8, 3, labels[:150]), ids=ids[:150], labels=labels[:150])


def by_test(table):
    return {(r["metric"], r["test"].split(" (")[0]): r for r in table.rows}


def test_a_model_against_itself_is_no_difference(db):
    paired_db(db)
    table = paired_comparison(db, name_a="a", model_a="model_a", name_b="a", model_b="model_a", dataset="fi")
    rows = by_test(table)
    for metric in ("accuracy", "macro_f1"):
        row = rows[metric, "paired bootstrap"]
        assert row["difference"] == 0 and row["difference_ci_low"] <= 0 <= row["difference_ci_high"] and row["p"] >= 0.99
    assert rows["accuracy", "McNemar exact"]["p"] == 1.0
    assert "200 images, the same for both models" in table.notes[0]


def test_a_clearly_better_model_is_significant(db):
    paired_db(db)
    table = paired_comparison(db, name_a="a", model_a="model_a", name_b="b", model_b="model_b", dataset="fi")
    rows = by_test(table)
    accuracy = rows["accuracy", "paired bootstrap"]
    assert accuracy["A: a"] == 1.0 and 0.5 < accuracy["B: b"] < 0.7
    assert accuracy["difference"] == pytest.approx(accuracy["A: a"] - accuracy["B: b"])
    assert 0 < accuracy["difference_ci_low"] < accuracy["difference"] < accuracy["difference_ci_high"]
    assert accuracy["p"] < 0.05 and rows["macro_f1", "paired bootstrap"]["p"] < 0.05
    assert rows["accuracy", "McNemar exact"]["p"] < 0.05
    # the same seed gives the same interval; B − A mirrors A − B
    again = by_test(paired_comparison(db, name_a="b", model_a="model_b", name_b="a", model_b="model_a", dataset="fi"))
    assert again["accuracy", "paired bootstrap"]["difference"] == pytest.approx(-accuracy["difference"])


def test_the_paired_bootstrap_is_seeded():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    a, b = np.array([0, 1, 2, 0, 1, 2, 1, 1]), np.array([0, 1, 1, 0, 2, 2, 1, 0])
    first = paired_bootstrap(labels, a, b, 3, resamples=500, seed=4)
    assert first == paired_bootstrap(labels, a, b, 3, resamples=500, seed=4)
    assert first != paired_bootstrap(labels, a, b, 3, resamples=500, seed=5)


def test_different_image_sets_are_refused_in_one_line(db):
    paired_db(db)
    with pytest.raises(CompareError) as refused:
        paired_comparison(db, name_a="a", model_a="model_a", name_b="c", model_b="model_c", dataset="fi")
    message = str(refused.value)
    assert "\n" not in message
    assert "a (model model_a) has 200, c (model model_c) has 150, 150 are shared" in message
    with pytest.raises(CompareError, match="has 0, b .* has 0, 0 are shared"):
        paired_comparison(db, name_a="a", model_a="model_a", name_b="b", model_b="model_b", dataset="fi", part="val")


@pytest.mark.parametrize("fmt", ["md", "csv", "latex", "json"])
def test_every_format_renders(db, fmt):
    evaluate(db, "fi_8", "model_fi8_0123456789", noisy_scores(0.7, 1))
    table = comparison(db, {"fi_8": "model_fi8_0123456789", "gone": None},
                       {"fi_8": ExperimentSpec("fi_8", "fi", reference=REFERENCE)})
    text = render(table, fmt)
    accuracy = table.rows[0]["accuracy"]
    if fmt == "md":
        header, rule, line, _, note = text.rstrip("\n").split("\n")
        assert "accuracy [95 % CI]" in header and rule.startswith("|---") and f"{accuracy:.4f} [" in line
        assert "58.3 % accuracy (fine-tuned CNN)" in line and note.startswith("gone: no evaluation")
    elif fmt == "csv":
        [row] = list(csv.DictReader(io.StringIO(text)))
        assert float(row["accuracy"]) == accuracy and row["experiment"] == "fi_8" and row["reference_value"] == "58.3"
    elif fmt == "latex":
        assert text.startswith("\\begin{tabular}{") and "\\end{tabular}" in text
        assert "fi\\_8" in text and "\\% accuracy" in text and "% gone: no evaluation" in text
    else:
        loaded = json.loads(text)
        assert loaded["rows"][0]["accuracy"] == accuracy and loaded["notes"] == list(table.notes)


def test_the_command_notes_experiments_without_a_record_and_refuses_bad_pairs(tmp_path, monkeypatch, capsys, data_dir):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))  # an instance that has recorded nothing
    monkeypatch.setenv("EMOPIPE_CATALOG", str(seeded_catalog(tmp_path)))
    assert main(["compare", "seeded", "--format", "csv"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ",".join(["experiment", "seed", "dataset", "part", "n", "reference_metric", "reference_value",
                                     "reference_source", "model", "split"]) + "\n"
    assert [line.split(":")[1] for line in captured.err.splitlines()] == [" seeded", " seeded@seed1", " seeded@seed2"]
    assert main(["compare", "seeded", "seeded@seed1", "--paired"]) == 2
    assert "no evaluation materialization recorded for seeded, seeded@seed1" in capsys.readouterr().err
    assert main(["compare", "seeded", "--paired"]) == 2
    assert "--paired compares two experiments (A B), got 1" in capsys.readouterr().err
