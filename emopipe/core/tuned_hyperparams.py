"""Population-based training (the core of `tuned_hyperparams`): Ray Tune's PBT searches lr,
weight_decay and batch_size for an experiment before `trained_model` trains with the winner.

`experiment.tune.population` trials train side by side on the split's train part: each is set up by
trained_model's own setup_training (the same network, features, standardization, optimizer and losses
as a training run) and trained epoch by epoch with its train_epoch and evaluate, and they report the val metric. Every `perturbation_interval` epochs
each trial checkpoints; the bottom `quantile_fraction` of trials copy the weights and optimizer state
of a top trial (exploit) and perturb its hyperparameters (explore). The learning rate is constant
within a segment: PBT itself is the schedule.

Ray runs on this machine only: its node binds 127.0.0.1, the dashboard and usage reporting are off,
its temp and result folders live under the data dir. Needs the `tune` extra (ray[tune]).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from emopipe.allocator import keep_freed_memory
from emopipe.atomic import atomic_write
from emopipe.catalog import ExperimentSpec
from emopipe.core.device_data import configure_cuda, pick_device
from emopipe.core.trained_model import (TrainingData, build_net, check_data, evaluate, setup_training, train_epoch,
                                        training_hyperparameters)
from emopipe.core.trained_model.features import probe_features
from emopipe.errors import UserError
from emopipe.fingerprint import params_hash
from emopipe.paths import data_dir
from emopipe.threads import available_cores, threads_per_worker

Log = Callable[[str], None]
# AF_UNIX socket paths are limited to 107 bytes; Ray puts its sockets in <temp>/session_<time>_<pid>/sockets/.
RAY_TEMP_MAX_CHARS = 40


class TuneError(UserError):
    """Ray Tune is missing, or the tuning could not run."""


@dataclass
class TuneResult:
    best_config: dict  # lr, weight_decay, batch_size of the best trial at the end
    best_val: float  # that trial's last val metric
    metric: str  # "accuracy" (higher is better) or "mse"
    trials: list[dict]  # per trial: trial_id, config (final), val_metric, history (one dict per epoch)
    perturbations: int  # exploit/explore steps PBT made
    best_trial: str = ""  # its trial_id
    best_checkpoint: str = ""  # the best trial's final weights (its state file, kept beside result.json)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TuneResult":
        return cls(**json.loads(text))


def search_space(experiment: ExperimentSpec, n_train: int) -> dict:
    """Ranges around the experiment's own values: lr and weight_decay a decade either way (log scale),
    batch size halved or doubled (never above the train part)."""
    from ray import tune

    sizes = sorted({max(2, min(n_train, b)) for b in (experiment.batch_size // 2, experiment.batch_size, experiment.batch_size * 2)})
    return {"lr": tune.loguniform(experiment.lr / 10, experiment.lr * 10),
            "weight_decay": tune.loguniform(max(experiment.weight_decay, 1e-4) / 10, max(experiment.weight_decay, 1e-4) * 10),
            "batch_size": tune.choice(sizes)}


# Ray's own switch for "this machine is no cluster": with it off, the node's address is the loopback one, and
# GCS, raylet, workers, object manager and runtime-env agent bind it. `_node_ip_address="127.0.0.1"` alone is
# not enough: Ray replaces a loopback node address by the machine's external one, and its servers then listen
# on every interface (Ray has no authentication by default). Read when Ray is imported, and inherited by the
# processes Ray starts.
RAY_LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _local_ray():
    os.environ.setdefault(RAY_LOOPBACK_ONLY, "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to the internet
    import ray

    return ray


def tune_hyperparameters(experiment: ExperimentSpec, data: TrainingData, *, work_dir: Path, log: Log = print,
                         num_cpus: int | None = None, feature_cache: Path | None = None) -> TuneResult:
    """Run PBT for experiment.tune and return the best trial's hyperparameters and every trial's history.
    (Long on purpose: Ray's start, the Tuner's configuration and its shutdown belong in one try/finally.)
    The result is kept as work_dir/pbt-<hash of experiment, tune settings, data>/result.json and
    returned from there when the same tuning is asked for again."""
    if experiment.tune is None:
        raise ValueError(f"experiment {experiment.name!r} has no tune settings")
    try:
        ray = _local_ray()
        from ray import tune
        from ray.tune.schedulers import PopulationBasedTraining
        from ray.tune.search.basic_variant import BasicVariantGenerator
    except ImportError:
        raise TuneError(f"experiment {experiment.name!r} sets tune: population-based training needs Ray Tune "
                        f"(pip install 'emopipe[tune]', or pip install 'ray[tune]')") from None
    check_data(experiment, data)
    spec = experiment.tune
    key = params_hash({"experiment": experiment.name, "tune": dataclasses.asdict(spec), "data": data.fingerprint(),
                       **training_hyperparameters(experiment)})
    work_dir = Path(work_dir).resolve()
    result_file = work_dir / f"pbt-{key}" / "result.json"
    if result_file.is_file():
        log(f"{experiment.name}: already tuned ({result_file})")
        return TuneResult.from_json(result_file.read_text())
    metric_name = "accuracy" if experiment.task == "classification" else "mse"
    mode = "max" if metric_name == "accuracy" else "min"
    inputs = _probe_features(experiment, data, feature_cache or data_dir() / "features", log) \
        if experiment.mode == "linear_probe" else None
    space = search_space(experiment, len(data.train_ids))
    scheduler = PopulationBasedTraining(
        time_attr="training_iteration", perturbation_interval=spec.perturbation_interval,
        # synch: every trial reaches the interval before any exploits (a fair comparison, a reproducible order)
        hyperparam_mutations=space, quantile_fraction=spec.quantile_fraction, synch=True)
    num_cpus = num_cpus or available_cores()
    cpus_per_trial = threads_per_worker(spec.population, num_cpus)  # trials x threads = cores (emopipe/threads.py)
    # The trials share the GPUs (one GPU: each gets 1/population of it, all train at once).
    gpus_per_trial = min(1.0, torch.cuda.device_count() / spec.population) if torch.cuda.is_available() else 0
    started_here = not ray.is_initialized()
    ray_temp, ray_temp_is_ours = _ray_temp_dir(log) if started_here else (None, False)
    if started_here:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 _temp_dir=str(ray_temp), log_to_driver=False, configure_logging=False)
        if ray.util.get_node_ip_address() != "127.0.0.1":
            ray.shutdown()
            raise TuneError(f"Ray's node took the address {ray.util.get_node_ip_address()}, not 127.0.0.1: Ray was imported "
                            f"before emopipe could keep it on loopback; set {RAY_LOOPBACK_ONLY}=0 before starting Python")
    try:
        trainable = tune.with_resources(
            tune.with_parameters(_trial, experiment=experiment, data=data, features=inputs, threads=cpus_per_trial),
            {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(scheduler=scheduler, metric="val_metric", mode=mode, num_samples=spec.population,
                                        search_alg=BasicVariantGenerator(random_state=experiment.seed),
                                        reuse_actors=True),  # exploit: no new worker process, no re-import of torch
            run_config=tune.RunConfig(name="trials", storage_path=str(result_file.parent),
                                      stop={"training_iteration": spec.epochs}, verbose=0,
                                      # PBT may restore a trial from a peer's checkpoint one interval old: keep a few.
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=4)))
        log(f"{experiment.name}: PBT over {spec.population} trials x {spec.epochs} epochs, perturbing every "
            f"{spec.perturbation_interval} epochs ({cpus_per_trial} CPU(s){', a GPU share' if gpus_per_trial else ''} each)")
        grid = tuner.fit()
        errors = [r.error for r in grid if r.error is not None]
        if errors:
            raise TuneError(f"experiment {experiment.name!r}: {len(errors)} PBT trial(s) failed: {errors[0]}")
    finally:
        if started_here:
            ray.shutdown()
        if ray_temp_is_ours:
            shutil.rmtree(ray_temp, ignore_errors=True)
    trials, results = [], {}
    for r in grid:
        results[r.metrics["trial_id"]] = r
        history = [{k: _plain(v) for k, v in row.items() if k in HISTORY_KEYS} for row in r.metrics_dataframe.to_dict("records")]
        trials.append({"trial_id": r.metrics["trial_id"], "config": _config(r.config), "val_metric": float(r.metrics["val_metric"]),
                       "history": history})
    better = max if mode == "max" else min
    best = better(trials, key=lambda t: t["val_metric"])
    perturbations = int(getattr(scheduler, "_num_perturbations", 0))
    log(f"{experiment.name}: PBT best val {metric_name} {best['val_metric']:.4f} with {best['config']} "
        f"({perturbations} perturbations)")
    result_file.parent.mkdir(parents=True, exist_ok=True)
    best_checkpoint = result_file.parent / "best.pt"
    with results[best["trial_id"]].checkpoint.as_directory() as folder:  # its last report carried a checkpoint
        state = (Path(folder) / "state.pt").read_bytes()
    atomic_write(best_checkpoint, lambda f: f.write(state))
    result = TuneResult(best_config=best["config"], best_val=float(best["val_metric"]), metric=metric_name,
                        trials=trials, perturbations=perturbations, best_trial=best["trial_id"],
                        best_checkpoint=str(best_checkpoint))
    atomic_write(result_file, lambda f: f.write(result.to_json().encode()))
    return result


HISTORY_KEYS = ("epoch", "lr", "weight_decay", "batch_size", "train_loss", "train_metric", "val_loss", "val_metric",
                "restored_from")


def _config(config: dict) -> dict:
    return {"lr": float(config["lr"]), "weight_decay": float(config["weight_decay"]), "batch_size": int(config["batch_size"])}


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _ray_temp_dir(log: Log) -> tuple[Path, bool]:
    """(<data dir>/ray, False), unless that path is too long for Ray's unix sockets: then (a short
    folder in /tmp, True: remove it after the run)."""
    path = data_dir().resolve() / "ray"
    if len(str(path)) <= RAY_TEMP_MAX_CHARS:
        path.mkdir(parents=True, exist_ok=True)
        return path, False
    short = Path(tempfile.mkdtemp(prefix="emopipe-ray-"))
    log(f"Ray temp dir {short} (the data dir's path is too long for Ray's unix sockets; removed afterwards)")
    return short, True


def _probe_features(experiment: ExperimentSpec, data: TrainingData, cache: Path, log: Log) -> tuple[np.ndarray, np.ndarray]:
    """linear_probe: the frozen backbone's features of train and val, computed once for all trials
    (the same cache and key as trained_model's)."""
    device = pick_device(None, log)
    net, norm, _ = build_net(experiment.model, image_size=experiment.image_size, pretrained=experiment.pretrained,
                             mode=experiment.mode, task=experiment.task, num_outputs=data.num_outputs,
                             head_hidden=experiment.head_hidden)
    return probe_features(net.backbone, norm, architecture=experiment.model, image_size=experiment.image_size,
                          batch_size=experiment.batch_size, train_ids=data.train_ids, val_ids=data.val_ids,
                          x_train=data.x_train, x_val=data.x_val, cache=cache, device=device, log=log)


def _trial(config: dict, *, experiment: ExperimentSpec, data: TrainingData, features, threads: int) -> None:
    """One PBT trial (runs in a Ray worker): train epoch by epoch, report the val metric, checkpoint
    every perturbation_interval epochs; on restore (own checkpoint or a copied one) continue from it
    with the config PBT gives."""
    from ray import tune

    keep_freed_memory()
    torch.set_num_threads(threads)
    device = pick_device(None, lambda _: None)
    configure_cuda(device)
    exp = dataclasses.replace(experiment, lr=float(config["lr"]), weight_decay=float(config["weight_decay"]),
                              batch_size=int(config["batch_size"]))
    probe = exp.mode == "linear_probe"
    setup = setup_training(exp, data, device=device, log=lambda _: None, features=features)
    trainable, optimizer, step, pipeline = setup.trainable, setup.optimizer, setup.step, setup.pipeline
    trial_id = tune.get_context().get_trial_id()

    epoch, restored_from = 0, ""
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)
        trainable.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        epoch = state["epoch"]
        restored_from = state["trial_id"]  # another trial's id: PBT copied its weights here
        for group in optimizer.param_groups:  # the loaded state carries the old values; PBT's new ones apply
            group["lr"] = exp.lr
            if group["weight_decay"] > 0:
                group["weight_decay"] = exp.weight_decay
    shuffle = torch.Generator().manual_seed(exp.seed * 1000 + epoch)
    interval = experiment.tune.perturbation_interval
    while epoch < experiment.tune.epochs:
        epoch += 1
        trainable.train()
        loss_sum, metric_sum, n_seen = train_epoch(step, setup.train_source, pipeline,
                                          torch.randperm(len(setup.train_source), generator=shuffle),
                                          exp.batch_size, augment=exp.augment and not probe, task=exp.task)
        val_loss, val_metric = evaluate(trainable, setup.val_source, pipeline, setup.val_loss, exp.task, device,
                                        2 * exp.batch_size)
        metrics = {"epoch": epoch, "lr": exp.lr, "weight_decay": exp.weight_decay, "batch_size": exp.batch_size,
                   "train_loss": loss_sum.item() / max(n_seen, 1), "train_metric": metric_sum.item() / max(n_seen, 1),
                   "val_loss": val_loss, "val_metric": val_metric,
                   "restored_from": restored_from}
        if epoch % interval == 0 or epoch == experiment.tune.epochs:
            with tempfile.TemporaryDirectory() as folder:
                torch.save({"model": {k: v.detach().cpu() for k, v in trainable.state_dict().items()},
                            "optimizer": optimizer.state_dict(), "epoch": epoch, "trial_id": trial_id},
                           Path(folder) / "state.pt")
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        else:
            tune.report(metrics)
        restored_from = ""
