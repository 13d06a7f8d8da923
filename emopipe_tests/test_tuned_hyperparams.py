import importlib.util
import json
from pathlib import Path
import threading
import time

import numpy as np
import pytest

from emopipe.catalog import ExperimentSpec, TuneSpec
from emopipe.core.trained_model import TrainingData, adopt_tuned_weights, load_checkpoint, predict
from emopipe.core.tuned_hyperparams import tune_hyperparameters
from emopipe.fingerprint import sha256_file
from emopipe_tests.sockets import listeners

# Not imported here: emopipe keeps Ray on loopback by settings Ray reads when it is first imported.
pytestmark = [pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="the tune extra (ray[tune]) is not installed"),
              pytest.mark.slow]  # a real Ray cluster on this machine


def _data(n_train: int = 24, n_val: int = 12, size: int = 32) -> TrainingData:
    """Two classes: a bright left half or a bright right half."""
    rng = np.random.default_rng(0)

    def part(n, offset):
        y = np.arange(n) % 2
        x = rng.integers(0, 60, (n, size, size, 3), dtype=np.uint8)
        x[y == 1, :, : size // 2] += 180
        x[y == 0, :, size // 2:] += 180
        return x, y.astype(np.int64), [f"{offset + i:064x}" for i in range(n)]

    x_train, y_train, train_ids = part(n_train, 0)
    x_val, y_val, val_ids = part(n_val, n_train)
    return TrainingData(classes=["left", "right"], targets=None, train_ids=train_ids, val_ids=val_ids,
                        x_train=x_train, x_val=x_val, y_train=y_train, y_val=y_val)


def test_population_based_training_perturbs_and_picks_a_trial_config(data_dir, tmp_path):
    experiment = ExperimentSpec(
        name="pbt_tiny", dataset="tiny", image_size=32, model="test_resnet", pretrained="none", epochs=4,
        batch_size=8, lr=3e-3, weight_decay=0.01, augment=False,
        tune=TuneSpec(population=2, perturbation_interval=2, epochs=4, quantile_fraction=0.5))
    logs = []
    before = {(s.address, s.port) for s in listeners()}
    opened, tuning = set(), threading.Event()

    def watch():  # every socket that starts listening while the tuning runs (Ray's GCS, raylet, workers, agents)
        while not tuning.is_set():
            opened.update(s for s in listeners() if (s.address, s.port) not in before)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.perf_counter()
    try:
        result = tune_hyperparameters(experiment, _data(), work_dir=tmp_path / "models", log=logs.append, num_cpus=2)
    finally:
        tuning.set()
        watcher.join()
    print(f"PBT: {time.perf_counter() - started:.1f} s")
    ray_servers = [s for s in opened if "ray" in s.command]
    assert len({s.pid for s in ray_servers}) >= 3, opened  # GCS, raylet, workers: the watch saw them
    assert all(s.loopback for s in opened), [s for s in opened if not s.loopback]
    import ray

    # the same tuning again: the stored result, no Ray
    assert tune_hyperparameters(experiment, _data(), work_dir=tmp_path / "models", log=logs.append) == result
    assert "already tuned" in logs[-1] and not ray.is_initialized()
    assert not ray.is_initialized()  # shut down again
    assert result.metric == "accuracy" and len(result.trials) == 2
    for trial in result.trials:
        assert [h["epoch"] for h in trial["history"]] == [1, 2, 3, 4], trial["history"]
        assert 0.0 <= trial["val_metric"] <= 1.0
    assert result.best_config in [t["config"] for t in result.trials]
    assert set(result.best_config) == {"lr", "weight_decay", "batch_size"}
    assert result.best_val == max(t["val_metric"] for t in result.trials)
    # PBT exploited at epoch 2: the worse trial continued from the better one's weights with a new config
    assert result.perturbations >= 1
    ids = {t["trial_id"] for t in result.trials}
    copied = [(t["trial_id"], h) for t in result.trials for h in t["history"]
              if h["restored_from"] and h["restored_from"] != t["trial_id"]]
    assert copied and all(h["restored_from"] in ids and h["epoch"] == 3 for _, h in copied), copied
    for trial_id, h in copied:
        donor = next(t for t in result.trials if t["trial_id"] == h["restored_from"])
        before = donor["history"][1]
        assert (h["lr"], h["weight_decay"], h["batch_size"]) != (before["lr"], before["weight_decay"], before["batch_size"])
    assert (data_dir / "ray").is_dir() or any("Ray temp dir" in line for line in logs)


def test_trained_model_takes_the_best_trials_weights(data_dir, tmp_path):
    """What PBT found is the model: the best trial's final weights, saved as an ordinary checkpoint whose
    val metric is the trial's own and whose history is the trial's schedule of hyperparameters."""
    import dataclasses

    experiment = ExperimentSpec(
        name="pbt_adopt", dataset="tiny", image_size=32, model="test_resnet", pretrained="none", epochs=4,
        batch_size=8, lr=3e-3, weight_decay=0.01, augment=False,
        tune=TuneSpec(population=2, perturbation_interval=2, epochs=4, quantile_fraction=0.5))
    data = _data()
    tuned = tune_hyperparameters(experiment, data, work_dir=tmp_path / "tune", log=lambda _: None, num_cpus=2)
    best = next(t for t in tuned.trials if t["trial_id"] == tuned.best_trial)
    assert best["val_metric"] == tuned.best_val and (tmp_path / "tune").rglob("best.pt")
    final = dataclasses.replace(experiment, **tuned.best_config)
    kwargs = dict(weights=Path(tuned.best_checkpoint), history=best["history"], split_id="s1", work_dir=tmp_path / "models",
                  log=lambda _: None, device="cpu", feature_cache=tmp_path / "features")
    result = adopt_tuned_weights(final, data, **kwargs)
    assert result.best_val == pytest.approx(tuned.best_val, abs=1e-6)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4] and result.best_epoch == 4
    assert [h["lr"] for h in result.history] == [h["lr"] for h in best["history"]]
    model, info = load_checkpoint(result.checkpoint_path)
    accuracy = (predict(model, info, data.x_val, device="cpu").argmax(1) == data.y_val).mean()
    assert accuracy == pytest.approx(tuned.best_val, abs=1e-6)
    assert adopt_tuned_weights(final, data, **kwargs).model_id == result.model_id  # the same inputs: the saved model


def test_the_assets_pass_the_tuned_model_through(tmp_path, monkeypatch):
    """Through Dagster (conftest's `wiring_tuned`): trained_model records the best trial's weights."""
    import dagster as dg
    import duckdb
    from dagster_duckdb import DuckDBResource

    from emopipe.db import CONNECTION_CONFIG

    monkeypatch.setenv("EMOPIPE_DATA_DIR", str(tmp_path / "data"))
    from emopipe.definitions import ASSETS, CHECKS

    db = tmp_path / "data" / "emopipe.duckdb"
    result = dg.materialize([*ASSETS, *CHECKS], selection=["*trained_model"], partition_key="wiring_tuned",
                            resources={"duckdb": DuckDBResource(database=str(db), connection_config=CONNECTION_CONFIG),
                                       "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))},
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success
    tuned, trained = result.output_for_node("tuned_hyperparams"), result.output_for_node("trained_model")
    with duckdb.connect(str(db), read_only=True) as conn:
        [(hyperparameters, history)] = conn.execute("SELECT hyperparameters, history FROM models").fetchall()
    assert json.loads(hyperparameters)["lr"] == tuned["best_config"]["lr"]
    assert json.loads(hyperparameters)["tuned_weights_sha256"] == sha256_file(tuned["best_checkpoint"])
    assert [h["lr"] for h in json.loads(history)] == [h["lr"] for h in tuned["best_history"]]
    assert trained["model_id"] == sha256_file(trained["checkpoint_path"])
