"""The HTML report (core/report.py, `emopipe report`): built from a real tiny run (test_assets' `chain`:
the `wiring` experiment materialized in this process), self-contained, and rendered by headless Chromium
with every image loaded; the text filter's removals from test_trace's lineage, where one image shows text."""

import re

import dagster as dg
import pytest

from emopipe.catalog import ExperimentSpec, load_catalog
from emopipe.cli import main
from emopipe.core.evaluation import MetricRow
from emopipe.core.report import build_report, per_class_html, write_report
from emopipe.db import Database
from emopipe_tests.test_assets import chain, query  # noqa: F401  (chain: a fixture, used by name)
from emopipe_tests.test_trace import EXPERIMENT, lineage  # noqa: F401  (lineage: a fixture)
from emopipe_tests.ui_support import chromium


def headline_accuracy(db_file) -> str:
    """The wiring experiment's test accuracy as the headline shows it (headline_markdown: percent, 2 decimals)."""
    [(value,)] = query(db_file, "SELECT value FROM metrics WHERE experiment = 'wiring' AND dataset = 'wiring' "
                                "AND part = 'test' AND metric = 'accuracy' AND class IS NULL")
    return f"{value * 100:.2f} %"


@pytest.fixture(scope="module")
def report(chain):  # noqa: F811
    """(the DuckDB file, the report written to data/reports/) of the materialized wiring chain."""
    _, db_file, result = chain
    assert result.success
    return db_file, write_report(Database(db_file), load_catalog().experiment("wiring"))


def test_report_holds_the_numbers_and_embeds_every_image(report):
    db_file, path = report
    page = path.read_text()
    [(model_id, split_id)] = query(db_file, "SELECT model_id, split_id FROM models")
    assert path.name == f"wiring-{model_id[:12]}.html" and path.parent.name == "reports"
    assert headline_accuracy(db_file) in page and model_id in page and split_id in page
    assert "newest metrics rows" in page  # no model was named: the report says which it took
    for alt in ("wiring confusion matrix", "wiring reliability diagram", "learning curve", "IG heatmap of "):
        assert re.search(rf'<img src="data:image/png;base64,[A-Za-z0-9+/]+=*" alt="{alt}', page), alt
    assert "verified: every number" in page
    assert not re.search(r'src="(?!data:)|href=|url\(|@import|<link', page)  # nothing outside the file


def test_per_class_table_holds_classes_only():
    """Calibration bins and confusion cells are stored with a class_name too; the table shows only classes."""
    rows = [MetricRow("f1", 0.8, "joy", n=5, dataset="d", part="test"),
            MetricRow("precision", 0.75, "joy", n=5, dataset="d", part="test"),
            MetricRow("f1", 0.5, "fear", n=3, dataset="d", part="test"),
            MetricRow("calibration_accuracy", 1.0, "0.933-1.000", n=4, dataset="d", part="test"),
            MetricRow("calibration_confidence", 0.97, "0.933-1.000", n=4, dataset="d", part="test"),
            MetricRow("confusion_count", 2, "joy->fear", n=2, dataset="d", part="test"),
            MetricRow("f1", 0.1, "joy", n=9, dataset="d", part="val")]
    table = per_class_html(rows, ["joy", "fear"], "d")
    assert re.findall(r"<tr><td>([^<]*)</td>", table) == ["joy", "fear"]
    assert "calibration" not in table and "0.933" not in table and "confusion" not in table


def test_report_shows_what_the_text_filter_removed(db, lineage):  # noqa: F811
    page = build_report(db, ExperimentSpec(name=EXPERIMENT, dataset="toy")).html
    removed = lineage.image_ids[0]  # the one image whose text_scores row says has_text
    assert "<tr><th>removed (text found)</th><td>1</td></tr>" in page
    assert re.search(rf'<img src="data:image/jpeg;base64,[^"]+" alt="removed {removed[:12]}">', page)
    assert "No learning curve" in page  # this model row has no history and no curve beside its checkpoint


def test_an_unknown_experiment_is_one_line_and_exit_2(capsys):
    assert main(["report", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("emopipe: unknown experiment 'nosuch'") and err.count("\n") == 1


def dagster_home(tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("")  # an empty instance file: Dagster's defaults, no warning printed
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def test_an_experiment_never_evaluated_says_what_to_run(data_dir, tmp_path, monkeypatch, capsys):
    dagster_home(tmp_path, monkeypatch)
    assert main(["report", "wiring"]) == 2
    err = capsys.readouterr().err
    assert "has not been evaluated" in err and "run `emopipe run wiring`" in err and err.count("\n") == 1


def record_evaluation(model_id: str) -> None:
    """An `evaluation` materialization of the wiring partition, recording model_id, in $DAGSTER_HOME's instance."""
    with dg.DagsterInstance.get() as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization("evaluation", partition="wiring",
                                                                    metadata={"model_id": model_id}))


def test_the_command_reports_the_model_the_instance_recorded(chain, tmp_path, monkeypatch, capsys):  # noqa: F811
    _, db_file, _ = chain
    [(model_id,)] = query(db_file, "SELECT model_id FROM models")
    home = dagster_home(tmp_path, monkeypatch)
    out = tmp_path / "report.html"
    assert main(["report", "wiring", "--out", str(out)]) == 0  # no record yet: the newest metrics rows' model
    assert capsys.readouterr().out.strip() == str(out) and "newest metrics rows" in out.read_text()

    record_evaluation(model_id)
    assert main(["report", "wiring", "--out", str(out)]) == 0
    page = out.read_text()
    assert f"latest evaluation materialization recorded (Dagster instance {home})" in page and model_id in page

    record_evaluation("0" * 64)  # a model this database never evaluated
    assert main(["report", "wiring"]) == 2
    err = capsys.readouterr().err
    assert "model 000000000000" in err and "has no metrics rows" in err and err.count("\n") == 1


@pytest.mark.slow
def test_chromium_loads_every_image_of_the_report(report, tmp_path):
    db_file, path = report
    dom = chromium(path.as_uri(), tmp_path / "profile", "--dump-dom").stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, dom[-3000:]
    assert int(loaded[1]) == int(loaded[2]) >= 1
    assert headline_accuracy(db_file) in dom
    assert '<p id="images-warning" class="bad" hidden=""></p>' in dom
