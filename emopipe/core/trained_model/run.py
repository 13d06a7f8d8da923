"""A training run (the core of `trained_model`): a timm backbone plus a task head trained from the packed
uint8 arrays, checkpointed every epoch, resumable, and saved under the sha256 of its checkpoint.

Data path (device_data.py): the arrays go to the GPU once when they fit, cropping, flipping and
normalization run on the device; no JPEG is decoded during training. On CUDA: bf16 autocast,
optional torch.compile; channels_last everywhere (on 2 CPU cores it, too, runs EfficientNet-Lite0
about 1.6x faster). On the CPU the same code runs deterministically (tests, demo).

Modes: "finetune" trains the whole network; "linear_probe" (the FI study's "feature embedding +
multi-class classification") freezes the pretrained backbone, caches its pooled features
(features.py), and trains a small MLP head on them (no augmentation: the features are of the stored images).

Several processes (DistributedDataParallel, distributed.py): the same loop, with each rank training on
its shard of every epoch's permutation and the gradients all-reduced; rank 0 validates (its numbers are
broadcast, so every rank takes the same scheduler and early-stopping decisions), writes last.pt and the
final checkpoint. In linear_probe mode rank 0 fills the feature cache and the other ranks read it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from emopipe.allocator import keep_freed_memory
from emopipe.atomic import atomic_write
from emopipe.catalog import ExperimentSpec
from emopipe.core.device_data import Ranks, configure_cuda, describe_device, pick_device
from emopipe.core.trained_model.checkpoint import CHECKPOINT_FORMAT, save_checkpoint, spec_dict
from emopipe.core.trained_model.curves import learning_curve_png
from emopipe.core.trained_model.data import Log, TrainingData, check_data
from emopipe.core.trained_model.loop import (better, cpu_state, deterministic, evaluate, make_scheduler, rng_state,
                                             set_rng_state, train_epoch)
from emopipe.core.trained_model.setup import setup_training
from emopipe.fingerprint import params_hash, sha256_file
from emopipe.paths import data_dir
from emopipe.progress import Progress, bars_shown

# Training keys of ExperimentSpec: a run folder (and so a resume) is keyed by these + split + data.
TRAINING_KEYS = ("image_size", "seed", "model", "pretrained", "mode", "task", "targets", "soft_labels",
                 "epochs", "batch_size", "optimizer", "lr", "weight_decay", "label_smoothing", "schedule",
                 "patience", "head_hidden", "augment")


@dataclass
class TrainResult:
    checkpoint_path: Path
    model_id: str  # sha256 of the checkpoint file
    history: list[dict]  # per epoch: epoch, lr, train_loss, train_metric, val_loss, val_metric
    best_epoch: int
    epochs_run: int
    best_val: float  # val_metric at best_epoch
    metric: str  # "accuracy" (higher is better) or "mse" (lower is better)
    device: str
    wall_seconds: float
    images_per_second: float  # training throughput (linear_probe: of the head on cached features)
    curve_png: Path
    run_dir: Path
    resumed_from_epoch: int = 0  # 0: trained from scratch in one go
    hyperparameters: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()})

    @classmethod
    def from_json(cls, text: str) -> "TrainResult":
        d = json.loads(text)
        for key in ("checkpoint_path", "curve_png", "run_dir"):
            d[key] = Path(d[key])
        return cls(**d)


def training_hyperparameters(experiment: ExperimentSpec, world_size: int = 1) -> dict:
    """The experiment's training keys; world_size (training processes, each taking batch_size
    images per step) only when > 1, so single-process runs keep their run folders and checkpoints."""
    hp = {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(experiment, k)) for k in TRAINING_KEYS)}
    if experiment.pretrained not in ("none", "timm", "efficientnet_lite0"):
        hp["pretrained_sha256"] = sha256_file(Path(experiment.pretrained).expanduser())
    if world_size > 1:
        hp["world_size"] = world_size
    return hp


def run_directory(experiment: ExperimentSpec, data: TrainingData, split_id: str, work_dir: Path,
                  world_size: int = 1) -> tuple[Path, dict]:
    """(the run folder work_dir/runs/<hash of experiment, split, data, hyperparameters>, the hyperparameters)."""
    hyperparameters = training_hyperparameters(experiment, world_size)
    run_key = params_hash({"experiment": experiment.name, "split_id": split_id, "data": data.fingerprint(), **hyperparameters})
    return Path(work_dir) / "runs" / run_key, hyperparameters


def finished_result(run_dir: Path) -> TrainResult | None:
    """The TrainResult of a run folder whose training finished (result.json and its checkpoint exist)."""
    path = run_dir / "result.json"
    if not path.is_file():
        return None
    result = TrainResult.from_json(path.read_text())
    return result if result.checkpoint_path.is_file() else None


def train_model(experiment: ExperimentSpec, data: TrainingData, *, split_id: str, work_dir: Path,
                log: Log = print, on_epoch_end: Callable[[int, list[dict]], None] | None = None,
                device: str | torch.device | None = None, feature_cache: Path | None = None,
                ranks: Ranks | None = None) -> TrainResult:
    """Train (or resume, or return the finished run for the same inputs) and save the best epoch's
    network as work_dir/<sha256>.pt, its learning curve beside it as <sha256>.png.

    The run folder work_dir/runs/<hash of experiment, split, data, hyperparameters> holds last.pt,
    written atomically after every epoch; a killed run called again continues after its last epoch.
    ranks: this process's place among DDP processes (torch.distributed initialized by the caller;
    distributed.py); None: one process. Every rank returns the same TrainResult.
    """
    check_data(experiment, data)
    keep_freed_memory()
    ranks = ranks or Ranks()
    run_dir, hyperparameters = run_directory(experiment, data, split_id, Path(work_dir), ranks.world_size)
    return _finished_or_run(experiment, data, split_id, run_dir, Path(work_dir), hyperparameters, device, log,
                            feature_cache, ranks, on_epoch_end, "already trained", lambda run: run.train())


def adopt_tuned_weights(experiment: ExperimentSpec, data: TrainingData, *, weights: Path, history: list[dict],
                        split_id: str, work_dir: Path, log: Log = print, device: str | torch.device | None = None,
                        feature_cache: Path | None = None) -> TrainResult:
    """The model population-based training found, as an ordinary emopipe checkpoint: the best trial's final
    weights (`weights`, the trial's state file) loaded into the network setup_training builds (the same as
    the trial's), validated once more, saved and returned like a trained run; `history` is the trial's,
    epoch by epoch with the hyperparameters PBT gave it. `experiment` carries the trial's final values.
    Not trained again: a retraining under another schedule would not be the model PBT selected."""
    check_data(experiment, data)
    run_dir, hyperparameters = run_directory(experiment, data, split_id, Path(work_dir))
    hyperparameters = {**hyperparameters, "tuned_weights_sha256": sha256_file(weights)}
    run_dir = run_dir.with_name(params_hash({"run": run_dir.name, **hyperparameters}))
    return _finished_or_run(experiment, data, split_id, run_dir, Path(work_dir), hyperparameters, device, log,
                            feature_cache, Ranks(), None, "tuned model already saved", lambda run: run.adopt(weights, history))


def _finished_or_run(experiment, data, split_id, run_dir: Path, work_dir: Path, hyperparameters: dict, device, log: Log,
                     feature_cache, ranks: Ranks, on_epoch_end, done: str, go: Callable[["_Run"], TrainResult]) -> TrainResult:
    """The finished run in run_dir, or go(a new _Run) on the picked device with deterministic CPU kernels."""
    finished = finished_result(run_dir)
    if finished is not None:
        log(f"{experiment.name}: {done} (run {run_dir.name}): model {finished.model_id}")
        return finished
    run_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(device, log)
    configure_cuda(device)
    with deterministic(device):
        return go(_Run(experiment, data, split_id, run_dir, work_dir, hyperparameters, device, log, on_epoch_end,
                       Path(feature_cache) if feature_cache else data_dir() / "features", ranks))


class _Run:
    """One training run's state; train() drives it epoch by epoch, adopt() takes a PBT trial's weights."""

    def __init__(self, experiment, data, split_id, run_dir, work_dir, hyperparameters, device, log,
                 on_epoch_end, feature_cache, ranks: Ranks):
        self.exp, self.data, self.split_id = experiment, data, split_id
        self.run_dir, self.work_dir, self.hp = run_dir, work_dir, hyperparameters
        self.device, self.log, self.on_epoch_end, self.feature_cache = device, log, on_epoch_end, feature_cache
        self.ranks = ranks
        self.started = time.perf_counter()
        self.metric = "accuracy" if experiment.task == "classification" else "mse"

    def train(self) -> TrainResult:
        exp, device, ranks = self.exp, self.device, self.ranks
        setup = setup_training(exp, self.data, device=device, log=self.log, feature_cache=self.feature_cache, ranks=ranks)
        self.net, self.norm = setup.net, setup.norm
        trainable, optimizer, step, pipeline = setup.trainable, setup.optimizer, setup.step, setup.pipeline
        train_src, val_src, val_loss_fn = setup.train_source, setup.val_source, setup.val_loss
        scheduler = make_scheduler(optimizer, exp, self.metric)
        shuffle = torch.Generator().manual_seed(exp.seed)

        state = self._resume(trainable, optimizer, scheduler, shuffle, pipeline)
        history, best_epoch = state["history"], state["best_epoch"]
        # A CPU copy of the best epoch's weights; last.pt stores it only when they are not the current ones.
        best_weights = cpu_state(state["best_state"] or trainable.state_dict())
        seconds, images_trained, wall_before = state["seconds"], state["images_trained"], state["wall_seconds"]
        resumed_from = state["epoch"]
        stop = state["finished"]
        epoch = state["epoch"]
        # A bar over the epochs on a terminal; elsewhere the epoch lines below are the progress.
        epochs_bar = Progress(f"{exp.name}: training", exp.epochs - epoch, "epochs", self.log) if ranks.main and bars_shown() else None
        while not stop and epoch < exp.epochs:
            epoch += 1
            trainable.train()
            t0 = time.perf_counter()
            loss_sum, metric_sum, n_seen = train_epoch(
                step, train_src, pipeline, ranks.shard(torch.randperm(len(train_src), generator=shuffle)), exp.batch_size,
                augment=exp.augment, task=exp.task)
            if ranks.world_size > 1:  # the epoch's figures over all ranks
                totals = ranks.sum(torch.stack([loss_sum.double(), metric_sum.double(),
                                                torch.tensor(n_seen, dtype=torch.float64, device=device)]))
                loss_sum, metric_sum, n_seen = totals[0], totals[1], int(totals[2].item())
            train_loss, train_metric = loss_sum.item() / n_seen, metric_sum.item() / n_seen  # .item(): the one sync
            seconds += time.perf_counter() - t0
            images_trained += n_seen
            val = torch.zeros(2, dtype=torch.float64, device=device)
            if ranks.main:
                val[:] = torch.tensor(evaluate(trainable, val_src, pipeline, val_loss_fn, exp.task, device, 2 * exp.batch_size))
            # Rank 0's numbers everywhere: the scheduler, best epoch and early stop below follow from
            # the history alone, so every rank takes the same decisions.
            val_loss, val_metric = ranks.from_main(val).tolist()
            lr = optimizer.param_groups[-1]["lr"]
            history.append({"epoch": epoch, "lr": lr, "train_loss": train_loss, "train_metric": train_metric,
                            "val_loss": val_loss, "val_metric": val_metric})
            if exp.schedule == "plateau":
                scheduler.step(val_metric)
            elif scheduler is not None:
                scheduler.step()
            if best_epoch == 0 or better(history[-1], history[best_epoch - 1], self.metric):
                best_epoch = epoch
                if ranks.main:
                    best_weights = cpu_state(trainable.state_dict())
            stop = exp.patience > 0 and epoch - best_epoch >= exp.patience
            self.log(f"{exp.name}: epoch {epoch}/{exp.epochs} lr {lr:.2e} train loss {train_loss:.4f} "
                     f"{self.metric} {train_metric:.4f} | val loss {val_loss:.4f} {self.metric} {val_metric:.4f}"
                     f"{' *' if best_epoch == epoch else ''} ({n_seen / max(time.perf_counter() - t0, 1e-9):.0f} images/s)")
            if stop:
                self.log(f"{exp.name}: early stop: no val improvement for {exp.patience} epochs (best epoch {best_epoch})")
            if epochs_bar is not None:
                epochs_bar.advance()
            wall = wall_before + time.perf_counter() - self.started
            rng = ranks.gather(rng_state(shuffle, pipeline, device))  # each rank's augmentation and dropout streams
            if not ranks.main:
                continue
            atomic_write(self.run_dir / "last.pt", lambda f: torch.save({
                "epoch": epoch, "history": history, "best_epoch": best_epoch,
                "best_state": None if best_epoch == epoch else best_weights,
                "model": cpu_state(trainable.state_dict()), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": rng[0], **({"rank_rng": rng} if ranks.world_size > 1 else {}),
                "experiment": spec_dict(exp), "split_id": self.split_id,
                "hyperparameters": self.hp, "seconds": seconds, "images_trained": images_trained,
                "wall_seconds": wall, "finished": stop or epoch >= exp.epochs}, f))
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, history)
        if epochs_bar is not None:
            epochs_bar.close()
        if ranks.main:
            trainable.load_state_dict(best_weights)
            result = self._finish(history, best_epoch, resumed_from, wall_before + time.perf_counter() - self.started,
                                  images_trained / seconds if seconds else 0.0)
        ranks.barrier()  # rank 0 has written result.json
        return result if ranks.main else finished_result(self.run_dir)

    def adopt(self, weights: Path, history: list[dict]) -> TrainResult:
        setup = setup_training(self.exp, self.data, device=self.device, log=self.log, feature_cache=self.feature_cache)
        self.net, self.norm = setup.net, setup.norm
        setup.trainable.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True)["model"])
        val_loss, val_metric = evaluate(setup.trainable, setup.val_source, setup.pipeline, setup.val_loss, self.exp.task,
                                        self.device, 2 * self.exp.batch_size)
        self.log(f"{self.exp.name}: the best PBT trial's weights: val loss {val_loss:.4f} {self.metric} {val_metric:.4f}")
        history = [*history[:-1], {**history[-1], "val_loss": val_loss, "val_metric": val_metric}]
        return self._finish(history, len(history), 0, time.perf_counter() - self.started, 0.0)

    def _resume(self, trainable, optimizer, scheduler, shuffle, pipeline) -> dict:
        last = self.run_dir / "last.pt"
        fresh = {"epoch": 0, "history": [], "best_epoch": 0, "best_state": None, "seconds": 0.0,
                 "images_trained": 0, "wall_seconds": 0.0, "finished": False}
        if not last.is_file():
            return fresh
        state = torch.load(last, map_location="cpu", weights_only=True)
        trainable.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        rng = state["rank_rng"][self.ranks.rank] if self.ranks.world_size > 1 else state["rng"]
        set_rng_state(rng, shuffle, pipeline, self.device)
        self.log(f"{self.exp.name}: resuming after epoch {state['epoch']} from {last}")
        return {k: state[k] for k in fresh}

    def _finish(self, history, best_epoch, resumed_from, wall_seconds, images_per_second) -> TrainResult:
        exp = self.exp
        info = {
            "format": CHECKPOINT_FORMAT, "architecture": exp.model, "image_size": exp.image_size,
            "pretrained": exp.pretrained, "mode": exp.mode, "task": exp.task, "classes": self.data.classes,
            "targets": self.data.targets, "num_outputs": self.data.num_outputs, "head_hidden": exp.head_hidden,
            "normalization": self.norm.as_dict(), "metric": self.metric, "experiment": spec_dict(exp),
            "split_id": self.split_id, "data_fingerprint": self.data.fingerprint(), "hyperparameters": self.hp,
            "history": history, "best_epoch": best_epoch, "epochs_run": len(history),
        }
        path = save_checkpoint(self.work_dir, cpu_state(self.net.state_dict()), info)
        model_id = path.stem
        curve = learning_curve_png(history, self.metric, self.work_dir / f"{model_id}.png", best_epoch=best_epoch,
                                   title=f"{exp.name}: {exp.model} ({exp.mode})")
        best = history[best_epoch - 1]
        result = TrainResult(
            checkpoint_path=path, model_id=model_id, history=history, best_epoch=best_epoch,
            epochs_run=len(history), best_val=best["val_metric"], metric=self.metric,
            device=self._device_text(), wall_seconds=wall_seconds, images_per_second=images_per_second,
            curve_png=curve, run_dir=self.run_dir, resumed_from_epoch=resumed_from, hyperparameters=self.hp)
        atomic_write(self.run_dir / "result.json", lambda f: f.write(result.to_json().encode()))
        self.log(f"{exp.name}: best epoch {best_epoch}: val {self.metric} {best['val_metric']:.4f}; "
                 f"model {model_id} ({wall_seconds:.1f} s, {images_per_second:.0f} images/s)")
        return result

    def _device_text(self) -> str:
        if self.ranks.world_size == 1:
            return describe_device(self.device)
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "?"
        return f"DDP, {self.ranks.world_size} processes ({backend}); rank 0: {describe_device(self.device)}"
