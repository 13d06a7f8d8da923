"""The asset wiring, in this process: `dg.materialize` of the whole chain for one small experiment
partition (conftest's `wiring`), against a temp data dir and DuckDB file, then one asset again."""

import collections

import dagster as dg
import duckdb
import numpy as np
import pytest
from dagster_duckdb import DuckDBResource

from emopipe.db import CONNECTION_CONFIG


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """(materialize(selection), the DuckDB file, the result of materializing everything once)."""
    root = tmp_path_factory.mktemp("wiring")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMOPIPE_DATA_DIR", str(root / "data"))
        from emopipe.definitions import ASSETS, CHECKS

        resources = {"duckdb": DuckDBResource(database=str(root / "data" / "emopipe.duckdb"), connection_config=CONNECTION_CONFIG),
                     "io_manager": dg.FilesystemIOManager(base_dir=str(root / "io"))}
        instance = dg.DagsterInstance.ephemeral()

        def materialize(selection=None):
            return dg.materialize([*ASSETS, *CHECKS], selection=selection, partition_key="wiring", resources=resources,
                                  instance=instance, raise_on_error=False)

        yield materialize, root / "data" / "emopipe.duckdb", materialize()


def query(db, sql):
    with duckdb.connect(str(db), read_only=True) as conn:
        return conn.execute(sql).fetchall()


def test_the_whole_chain_materializes_and_its_checks_pass(chain):
    _, db, result = chain
    assert result.success, [e.event_specific_data.error.message for e in result.all_events if e.is_step_failure]
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert {"raw_images", "images_32", "text_scores", "filtered_images", "splits", "tuned_hyperparams", "trained_model",
            "evaluation", "explanations"} <= materialized
    checks = {e.event_specific_data.check_name: e.event_specific_data.passed for e in result.all_events
              if e.event_type_value == "ASSET_CHECK_EVALUATION"}
    assert checks == {"text_detection_quality": True, "split_is_sound": True, "lineage_verified": True}
    [(model_id, split_id)] = query(db, "SELECT model_id, split_id FROM models")
    evaluation = result.output_for_node("evaluation")
    assert (evaluation["model_id"], evaluation["split_id"]) == (model_id, split_id)
    assert query(db, "SELECT count(*) FROM images")[0][0] == 48
    assert query(db, "SELECT DISTINCT model_id FROM metrics") == [(model_id,)]


def test_evaluation_alone_reads_the_recorded_model(chain):
    materialize, db, first = chain
    assert first.success
    again = materialize(["evaluation"])
    assert again.success
    assert query(db, "SELECT count(*) FROM models")[0][0] == 1  # nothing trained again
    assert again.output_for_node("evaluation")["model_id"] == query(db, "SELECT model_id FROM models")[0][0]


def _counted(monkeypatch, module, name: str, calls: collections.Counter) -> None:
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls[name] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def test_a_second_run_reuses_evaluation_and_explanations_until_an_input_changes(chain, monkeypatch):
    import emopipe.core.explanations as explanations_core
    import emopipe.core.trained_model as trained_model_core

    materialize, db, first = chain
    assert first.success
    calls = collections.Counter()
    _counted(monkeypatch, trained_model_core, "predict", calls)
    _counted(monkeypatch, explanations_core, "explain", calls)
    metric_rows = "SELECT dataset, part, metric, class, value, ci_low, ci_high, n FROM metrics ORDER BY ALL"
    before = query(db, metric_rows)

    again = materialize(["evaluation", "explanations"])
    assert again.success
    assert calls == {}  # no image predicted, no heatmap drawn
    assert query(db, metric_rows) == before
    metadata = {e.asset_key.to_user_string(): e.event_specific_data.materialization.metadata
                for e in again.get_asset_materialization_events()}
    first_metadata = {e.asset_key.to_user_string(): e.event_specific_data.materialization.metadata
                      for e in first.get_asset_materialization_events()}
    assert first_metadata["evaluation"]["reused"].value == "none: every part evaluated now"
    assert metadata["evaluation"]["reused"].value == "wiring/test, wiring/val"
    assert metadata["explanations"]["reused"].value is True
    assert again.output_for_node("explanations") == first.output_for_node("explanations")

    # An evaluation stored from other inputs (here: its recorded key no longer matches) is computed again.
    with duckdb.connect(str(db)) as conn:
        conn.execute("UPDATE evaluation_inputs SET inputs_key = 'older inputs' WHERE part = 'val'")
    assert materialize(["evaluation"]).success
    assert calls == {"predict": 1}
    assert query(db, metric_rows) == before


def test_all_experiments_shows_the_models_the_evaluations_recorded(chain):
    materialize, db, first = chain
    assert first.success
    # A newer model's rows of the same experiment: the table keeps showing the recorded model.
    with duckdb.connect(str(db)) as conn:
        conn.execute("INSERT INTO metrics (experiment, model_id, split_id, dataset, part, metric, value, n) "
                     "VALUES ('wiring', 'a_newer_model', 's', 'wiring', 'test', 'accuracy', 0.123, 5)")
    again = materialize(["evaluation"])
    [event] = [e for e in again.get_asset_materialization_events() if e.asset_key.to_user_string() == "evaluation"]
    table = event.event_specific_data.materialization.metadata["all_experiments"].value
    lines = [record.data for record in table.records]
    model_id = again.output_for_node("evaluation")["model_id"]
    assert {(line["experiment"], line["model"]) for line in lines} == {("wiring", model_id[:12])}
    assert 0.123 not in {line["accuracy"] for line in lines}


def test_seeds_train_one_model_per_seed_on_one_split_and_compare_summarizes_them(tmp_path):
    """`seeds: [0, 1]` (conftest's wiring_seeded): each seed is its own partition, trained for real."""
    from emopipe.assets.common import CATALOG
    from emopipe.core.compare import comparison
    from emopipe.core.trace import trace
    from emopipe.core.verify import verify
    from emopipe.db import Database
    from emopipe.definitions import ASSETS, CHECKS

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMOPIPE_DATA_DIR", str(tmp_path / "data"))
        db_file = tmp_path / "data" / "emopipe.duckdb"
        resources = {"duckdb": DuckDBResource(database=str(db_file), connection_config=CONNECTION_CONFIG),
                     "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))}
        instance = dg.DagsterInstance.ephemeral()
        models = {}
        for partition in ("wiring_seeded", "wiring_seeded@seed1"):
            result = dg.materialize([*ASSETS, *CHECKS], partition_key=partition, resources=resources, instance=instance,
                                    raise_on_error=False)
            assert result.success, partition
            models[partition] = result.output_for_node("evaluation")["model_id"]
        rows = query(db_file, "SELECT experiment, model_id, split_id FROM models ORDER BY experiment")
        assert [r[0] for r in rows] == ["wiring_seeded", "wiring_seeded@seed1"]
        assert len({r[1] for r in rows}) == 2 and len({r[2] for r in rows}) == 1  # two models, one split
        table = comparison(Database(db_file), models, CATALOG.experiments)
        for partition, model_id in models.items():  # each seed traces and verifies on its own
            assert trace(Database(db_file), partition).model["model_id"] == model_id
            assert verify(Database(db_file), partition, model_id=model_id, objects_root=tmp_path / "data" / "objects").problems == []
    *seeds, summary = [r for r in table.rows if r["dataset"] == "wiring"]
    assert [r["seed"] for r in seeds] == [0, 1]
    accuracies = [r["accuracy"] for r in seeds]
    assert summary["accuracy"] == pytest.approx(np.mean(accuracies))
    assert summary["accuracy_std"] == pytest.approx(np.std(accuracies, ddof=1))
