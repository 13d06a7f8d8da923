import importlib.util
import threading
import time

import numpy as np
import pytest

from emopipe.catalog import ExperimentSpec, TuneSpec
from emopipe.core.trained_model import TrainingData
from emopipe.core.tuned_hyperparams import tune_hyperparameters
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
