"""Training (the core of `trained_model`): a timm backbone plus a task head, trained from the packed
uint8 arrays, checkpointed every epoch, resumable, and saved under the sha256 of its checkpoint.

Data path (device_data.py): the arrays go to the GPU once when they fit, cropping, flipping and
normalization run on the device; no JPEG is decoded during training. On CUDA: bf16 autocast,
optional torch.compile; channels_last everywhere (on 2 CPU cores it, too, runs EfficientNet-Lite0
about 1.6x faster). On the CPU the same code runs deterministically (tests, demo).

Modes: "finetune" trains the whole network; "linear_probe" (the FI study's "feature embedding +
multi-class classification") freezes the pretrained backbone, computes its pooled features once per
(architecture, weights, image size, image) into a cache under <data_dir>/features/, and trains a small
MLP head on them (no augmentation: the features are of the stored images).

Several processes (DistributedDataParallel, launched by distributed.py through torchrun): the same
loop, with each rank training on its shard of every epoch's permutation and the gradients all-reduced;
rank 0 validates (its numbers are broadcast, so every rank takes the same scheduler and early-stopping
decisions), writes last.pt and the final checkpoint. In linear_probe mode rank 0 fills the feature
cache and the other ranks read it; the head is trained with DDP.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import timm
import torch
from timm.optim import create_optimizer_v2
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

import emopipe
from emopipe.catalog import ExperimentSpec
from emopipe.core.device_data import (DeviceBatches, InputPipeline, Ranks, TrainStep, autocast, configure_cuda,
                                      describe_device, pick_device)
from emopipe.core.models import Normalization, create_model, weights_fingerprint
from emopipe.core.raw_images import attribute_matrix
from emopipe.db import Database
from emopipe.errors import UserError
from emopipe.fingerprint import params_hash, rows_fingerprint, sha256_file
from emopipe.paths import PROJECT_DIR, data_dir

CHECKPOINT_FORMAT = "emopipe.trained_model/1"
# Training keys of ExperimentSpec: a run folder (and so a resume) is keyed by these + split + data.
TRAINING_KEYS = ("image_size", "seed", "model", "pretrained", "mode", "task", "targets", "soft_labels",
                 "epochs", "batch_size", "optimizer", "lr", "weight_decay", "label_smoothing", "schedule",
                 "patience", "head_hidden", "augment")
HEAD_DROPOUT = 0.2

Log = Callable[[str], None]


class TrainingError(UserError):
    """Training inputs that cannot work: no images in a part, a label outside the classes, a missing
    regression target or vote share."""


# --- data ---------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """The train and val parts as packed uint8 arrays (N, S, S, 3) plus targets:
    classification: y int64 (N,) class indices, or float32 (N, C) class probabilities (soft labels);
    regression: y float32 (N, T), one column per target."""

    classes: list[str] | None
    targets: list[str] | None
    train_ids: list[str]
    val_ids: list[str]
    x_train: np.ndarray
    x_val: np.ndarray
    y_train: np.ndarray
    y_val: np.ndarray

    @property
    def num_outputs(self) -> int:
        return len(self.classes) if self.classes is not None else len(self.targets)

    def fingerprint(self) -> str:
        """Over (part, image_id, target) rows; the pixels follow from the ids (content addresses)."""
        rows = [("train", i, json.dumps(np.asarray(y).tolist())) for i, y in zip(self.train_ids, self.y_train)]
        rows += [("val", i, json.dumps(np.asarray(y).tolist())) for i, y in zip(self.val_ids, self.y_val)]
        return rows_fingerprint(rows + [("classes", json.dumps(self.classes), json.dumps(self.targets))])


def load_training_data(db: Database, split_id: str, experiment: ExperimentSpec, *,
                       classes: list[str] | None = None, arrays_root: Path | None = None) -> TrainingData:
    """The split's train and val images (splits ⋈ images), their targets, and their arrays at the
    experiment's image size. classes: the dataset's class order (default: its labels, sorted)."""
    from emopipe.core.images import load_array

    with db.connect() as conn:
        rows = conn.execute(
            "SELECT s.part, s.image_id, i.label, i.attributes FROM splits s "
            "JOIN images i ON i.image_id = s.image_id AND i.dataset = ? "
            "WHERE s.split_id = ? AND s.part IN ('train', 'val') ORDER BY s.part, s.image_id",
            [experiment.dataset, split_id]).fetchall()
        if classes is None and experiment.task == "classification":
            classes = [r[0] for r in conn.execute(
                "SELECT DISTINCT i.label FROM splits s JOIN images i ON i.image_id = s.image_id AND i.dataset = ? "
                "WHERE s.split_id = ? AND i.label IS NOT NULL ORDER BY 1", [experiment.dataset, split_id]).fetchall()]
    parts = {p: [r for r in rows if r[0] == p] for p in ("train", "val")}
    for part, part_rows in parts.items():
        if not part_rows:
            raise TrainingError(f"split {split_id} of dataset {experiment.dataset!r} has no {part} images "
                                f"(experiment {experiment.name!r}); materialize splits for it first")
    ys = {p: _targets(part_rows, experiment, classes) for p, part_rows in parts.items()}
    ids = {p: [r[1] for r in part_rows] for p, part_rows in parts.items()}
    return TrainingData(
        classes=list(classes) if experiment.task == "classification" else None,
        targets=list(experiment.targets) if experiment.task == "regression" else None,
        train_ids=ids["train"], val_ids=ids["val"],
        x_train=load_array(db, ids["train"], experiment.image_size, arrays_root=arrays_root),
        x_val=load_array(db, ids["val"], experiment.image_size, arrays_root=arrays_root),
        y_train=ys["train"], y_val=ys["val"])


def _targets(rows: list[tuple], experiment: ExperimentSpec, classes: list[str] | None) -> np.ndarray:
    if experiment.task == "regression":
        return _attribute_matrix(rows, experiment.targets, experiment, "targets")
    if experiment.soft_labels:
        if len(experiment.soft_labels) != len(classes):
            raise TrainingError(
                f"experiment {experiment.name!r}: soft_labels names {len(experiment.soft_labels)} vote-share "
                f"columns but the dataset has {len(classes)} classes ({', '.join(classes)}); give one per class, in that order")
        shares = _attribute_matrix(rows, experiment.soft_labels, experiment, "soft_labels")
        totals = shares.sum(1, keepdims=True)
        if (totals <= 0).any():
            bad = rows[int(np.argmax(totals[:, 0] <= 0))][1]
            raise TrainingError(f"experiment {experiment.name!r}: image {bad} has no positive vote share in {list(experiment.soft_labels)}")
        return (shares / totals).astype(np.float32)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({r[2] for r in rows if r[2] not in index}, key=str)
    if unknown:
        raise TrainingError(f"experiment {experiment.name!r}: label(s) {unknown[:5]} are not among the classes "
                            f"{list(classes)} (fix the dataset's classes / class_map in the catalog)")
    return np.array([index[r[2]] for r in rows], dtype=np.int64)


def _attribute_matrix(rows: list[tuple], columns: tuple[str, ...], experiment: ExperimentSpec, key: str) -> np.ndarray:
    """The columns for every training row; unlike evaluation, a missing value is an error here."""
    try:
        out = attribute_matrix([r[1] for r in rows], [r[3] for r in rows], columns)
    except UserError as e:
        raise TrainingError(f"experiment {experiment.name!r} ({key}): {e}") from None
    if np.isnan(out).any():
        n, j = np.argwhere(np.isnan(out))[0]
        raise TrainingError(f"experiment {experiment.name!r} ({key}): image {rows[n][1]} has no {columns[j]}; "
                            f"the dataset's manifest needs a numeric column {columns[j]!r} for every image")
    return out.astype(np.float32)


# --- the network ----------------------------------------------------------------------------------


class Standardize(nn.Module):
    """Fixed per-feature standardization (set from the training features) in front of a probe head."""

    def __init__(self, num_features: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Destandardize(nn.Module):
    """Last layer of a regression head: standardized outputs -> target units (training mean/std)."""

    def __init__(self, num_targets: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_targets))
        self.register_buffer("std", torch.ones(num_targets))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean


class StandardizedMSE(nn.Module):
    """MSE in units of each target's training variance (1.0: as good as predicting the mean), so
    targets of any scale train alike; the reported metric stays the MSE in the targets' own units."""

    def __init__(self, std: torch.Tensor):
        super().__init__()
        self.register_buffer("std", std)

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (((out - y) / self.std) ** 2).mean()


class EmotionNet(nn.Module):
    """A timm backbone (pooled features, num_classes=0) followed by a task head."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def make_head(mode: str, task: str, num_features: int, num_outputs: int, hidden: int | Sequence[int]) -> nn.Sequential:
    """finetune: one linear layer; linear_probe: standardized features -> MLP. A regression head ends in
    Destandardize with its last linear layer zeroed, so it starts by predicting the training mean."""
    if mode == "linear_probe":
        layers, width = [Standardize(num_features)], num_features
        for hidden_width in ([hidden] if isinstance(hidden, int) else hidden):
            layers += [nn.Linear(width, hidden_width), nn.ReLU(), nn.Dropout(HEAD_DROPOUT)]
            width = hidden_width
        layers.append(nn.Linear(width, num_outputs))
    else:
        layers = [nn.Linear(num_features, num_outputs)]
    if task == "regression":
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
        layers.append(Destandardize(num_outputs))
    return nn.Sequential(*layers)


def build_net(architecture: str, *, image_size: int, pretrained: str, mode: str, task: str, num_outputs: int,
              head_hidden: int | Sequence[int]) -> tuple[EmotionNet, Normalization, int]:
    """(network, input normalization, backbone feature width)."""
    backbone, norm = create_model(architecture, num_outputs=0, image_size=image_size, pretrained=pretrained)
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        num_features = backbone(torch.zeros(1, 3, image_size, image_size)).shape[-1]
    backbone.train(was_training)
    return EmotionNet(backbone, make_head(mode, task, num_features, num_outputs, head_hidden)), norm, num_features


# --- linear probe: the feature cache ------------------------------------------------------------------


def extract_features(backbone: nn.Module, norm: Normalization, images: np.ndarray, *,
                     device: torch.device, batch_size: int = 128) -> np.ndarray:
    """(N, F) float32 pooled features of the un-augmented images (fp32, eval mode)."""
    backbone.eval().to(device, memory_format=torch.channels_last)
    pipeline = InputPipeline(norm, device)
    source = DeviceBatches(images, None, device)
    out = []
    with torch.inference_mode():
        for x, _ in source.batches(torch.arange(len(source)), batch_size):
            out.append(backbone(pipeline(x)).float())
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, 0), np.float32)


def cached_features(cache_dir: Path, ids: list[str], images: "np.ndarray | _Concat",
                    compute: Callable[[np.ndarray], np.ndarray], log: Log = print, chunk: int = 8192) -> np.ndarray:
    """Features of `ids` (images[n] is the image of ids[n]), computing and caching only those not
    in cache_dir yet, `chunk` images at a time (bounded memory; a killed run keeps finished chunks).

    Layout: shards <hash>.npy (rows of float32 features) each with <hash>.ids.json (their image ids),
    written temp + rename, the ids last: a shard counts only once both are complete, and concurrent
    runs write differently named shards.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    where: dict[str, tuple[Path, int]] = {}
    for index_file in sorted(cache_dir.glob("*.ids.json")):
        shard = index_file.with_name(index_file.name.removesuffix(".ids.json") + ".npy")
        for row, image_id in enumerate(json.loads(index_file.read_text())):
            where.setdefault(image_id, (shard, row))
    first = {}
    for n, image_id in enumerate(ids):
        first.setdefault(image_id, n)
    missing = [n for image_id, n in first.items() if image_id not in where]
    log(f"features: {len(first) - len(missing)} of {len(first)} cached in {cache_dir}, computing {len(missing)}")
    for start in range(0, len(missing), chunk):
        positions = missing[start:start + chunk]
        new_ids = [ids[n] for n in positions]
        features = np.ascontiguousarray(compute(images[positions]), dtype=np.float32)
        name = params_hash({"ids": new_ids})
        shard = cache_dir / f"{name}.npy"
        _atomic_write(shard, lambda f: np.save(f, features))
        _atomic_write(cache_dir / f"{name}.ids.json", lambda f: f.write(json.dumps(new_ids).encode()))
        for row, image_id in enumerate(new_ids):
            where[image_id] = (shard, row)
    maps = {}
    rows = []
    for image_id in ids:
        shard, row = where[image_id]
        if shard not in maps:
            maps[shard] = np.load(shard, mmap_mode="r")
        rows.append(maps[shard][row])
    return np.stack(rows).astype(np.float32)


# --- training --------------------------------------------------------------------------------------


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
    _check_data(experiment, data)
    ranks = ranks or Ranks()
    work_dir = Path(work_dir)
    run_dir, hyperparameters = run_directory(experiment, data, split_id, work_dir, ranks.world_size)
    finished = finished_result(run_dir)
    if finished is not None:
        log(f"{experiment.name}: already trained (run {run_dir.name}): model {finished.model_id}")
        return finished
    run_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(device, log)
    configure_cuda(device)
    with _deterministic(device):
        return _Run(experiment, data, split_id, run_dir, work_dir, hyperparameters, device, log,
                    on_epoch_end, Path(feature_cache) if feature_cache else data_dir() / "features", ranks).train()


class _Run:
    """One training run's state; train() drives it epoch by epoch."""

    def __init__(self, experiment, data, split_id, run_dir, work_dir, hyperparameters, device, log,
                 on_epoch_end, feature_cache, ranks: Ranks):
        self.exp, self.data, self.split_id = experiment, data, split_id
        self.run_dir, self.work_dir, self.hp = run_dir, work_dir, hyperparameters
        self.device, self.log, self.on_epoch_end, self.feature_cache = device, log, on_epoch_end, feature_cache
        self.ranks = ranks
        self.started = time.perf_counter()
        self.probe = experiment.mode == "linear_probe"
        self.metric = "accuracy" if experiment.task == "classification" else "mse"

    def train(self) -> TrainResult:
        exp, device = self.exp, self.device
        torch.manual_seed(exp.seed)
        self.net, self.norm, num_features = build_net(
            exp.model, image_size=exp.image_size, pretrained=exp.pretrained, mode=exp.mode, task=exp.task,
            num_outputs=self.data.num_outputs, head_hidden=exp.head_hidden)
        self.log(f"{exp.name}: {exp.model} ({exp.pretrained} weights, {num_features} features) {exp.mode} "
                 f"{exp.task}, {len(self.data.train_ids)} train / {len(self.data.val_ids)} val images at "
                 f"{exp.image_size} px on {describe_device(device)}")
        train_src, val_src = self._sources()
        trainable = self.net.head if self.probe else self.net
        ranks = self.ranks
        if ranks.world_size > 1:  # same initial weights everywhere (above); from here on each rank its own dropout
            torch.manual_seed(exp.seed + 1_000_003 * ranks.rank)
        self.net.to(device, memory_format=torch.channels_last)
        if self.probe:
            self.net.backbone.requires_grad_(False).eval()
        if exp.task == "regression":
            destandardize = self.net.head[-1]
            destandardize.mean.copy_(torch.from_numpy(self.data.y_train.mean(0)))
            destandardize.std.copy_(torch.from_numpy(np.maximum(self.data.y_train.std(0), 1e-6)))
        if exp.compile and device.type != "cuda":
            self.log("compile: torch.compile is used on CUDA only; running eager on the CPU")
        optimizer = make_optimizer(trainable, exp, device)
        scheduler = _scheduler(optimizer, exp, self.metric)
        loss_fn = make_loss(exp.task, exp.label_smoothing, self.net.head)
        val_loss_fn = make_loss(exp.task, 0.0, self.net.head)
        step = TrainStep(ranks.wrap(trainable, device), loss_fn, optimizer, device, compile=exp.compile)
        pipeline = None if self.probe else InputPipeline(
            self.norm, device, torch.Generator(device=device).manual_seed(exp.seed + 1_000_003 * ranks.rank))
        shuffle = torch.Generator().manual_seed(exp.seed)

        state = self._resume(trainable, optimizer, scheduler, shuffle, pipeline)
        history, best_epoch = state["history"], state["best_epoch"]
        # A CPU copy of the best epoch's weights; last.pt stores it only when they are not the current ones.
        best_weights = _cpu_state(state["best_state"] or trainable.state_dict())
        seconds, images_trained, wall_before = state["seconds"], state["images_trained"], state["wall_seconds"]
        resumed_from = state["epoch"]
        stop = state["finished"]
        epoch = state["epoch"]
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
            if best_epoch == 0 or _better(history[-1], history[best_epoch - 1], self.metric):
                best_epoch = epoch
                if ranks.main:
                    best_weights = _cpu_state(trainable.state_dict())
            stop = exp.patience > 0 and epoch - best_epoch >= exp.patience
            self.log(f"{exp.name}: epoch {epoch}/{exp.epochs} lr {lr:.2e} train loss {train_loss:.4f} "
                     f"{self.metric} {train_metric:.4f} | val loss {val_loss:.4f} {self.metric} {val_metric:.4f}"
                     f"{' *' if best_epoch == epoch else ''} ({n_seen / max(time.perf_counter() - t0, 1e-9):.0f} images/s)")
            if stop:
                self.log(f"{exp.name}: early stop: no val improvement for {exp.patience} epochs (best epoch {best_epoch})")
            wall = wall_before + time.perf_counter() - self.started
            rng = ranks.gather(_rng_state(shuffle, pipeline, device))  # each rank's augmentation and dropout streams
            if not ranks.main:
                continue
            _atomic_save(self.run_dir / "last.pt", {
                "epoch": epoch, "history": history, "best_epoch": best_epoch,
                "best_state": None if best_epoch == epoch else best_weights,
                "model": _cpu_state(trainable.state_dict()), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": rng[0], **({"rank_rng": rng} if ranks.world_size > 1 else {}),
                "experiment": spec_dict(exp), "split_id": self.split_id,
                "hyperparameters": self.hp, "seconds": seconds, "images_trained": images_trained,
                "wall_seconds": wall, "finished": stop or epoch >= exp.epochs})
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, history)
        if ranks.main:
            trainable.load_state_dict(best_weights)
            result = self._finish(history, best_epoch, resumed_from, wall_before + time.perf_counter() - self.started,
                                  images_trained / seconds if seconds else 0.0)
        ranks.barrier()  # rank 0 has written result.json
        return result if ranks.main else finished_result(self.run_dir)

    def _sources(self) -> tuple[DeviceBatches, DeviceBatches | None]:
        """(train, val) inputs and targets; val on rank 0 only (the only rank that validates)."""
        data, device, ranks = self.data, self.device, self.ranks
        y_train, y_val = (torch.from_numpy(np.asarray(y)) for y in (data.y_train, data.y_val))
        if not self.probe:
            return DeviceBatches(data.x_train, y_train, device), \
                DeviceBatches(data.x_val, y_val, device) if ranks.main else None
        backbone = self.net.backbone
        key = f"{self.exp.model}-{self.exp.image_size}px-{weights_fingerprint(backbone)[:16]}"
        if not ranks.main:  # rank 0 computes the features; the others read them from the cache
            ranks.barrier()
        features = cached_features(
            self.feature_cache / key, data.train_ids + data.val_ids, _Concat(data.x_train, data.x_val),
            lambda images: extract_features(backbone, self.norm, images, device=device, batch_size=max(2 * self.exp.batch_size, 64)),
            self.log)
        if ranks.main:
            ranks.barrier()
        f_train, f_val = features[: len(data.train_ids)], features[len(data.train_ids):]
        standardize = self.net.head[0]
        standardize.mean.copy_(torch.from_numpy(f_train.mean(0)))
        std = f_train.std(0)
        # Floor: a feature (nearly) constant on the training images must not blow up on others.
        standardize.std.copy_(torch.from_numpy(np.maximum(std, 0.1 * std.mean() + 1e-6)))
        return (DeviceBatches(torch.from_numpy(f_train), y_train, device),
                DeviceBatches(torch.from_numpy(f_val), y_val, device) if ranks.main else None)

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
        _set_rng_state(rng, shuffle, pipeline, self.device)
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
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.work_dir / f".checkpoint.{os.getpid()}.tmp"
        # info as canonical JSON text: pickling equal dicts can give different bytes (shared vs
        # separate string objects, e.g. after a resume), and the file's sha256 is the model's id.
        _atomic_save(tmp, {"state_dict": _cpu_state(self.net.state_dict()), "info": json.dumps(info, sort_keys=True)})
        model_id = sha256_file(tmp)
        path = self.work_dir / f"{model_id}.pt"
        os.replace(tmp, path)
        curve = learning_curve_png(history, self.metric, self.work_dir / f"{model_id}.png", best_epoch=best_epoch,
                                   title=f"{exp.name}: {exp.model} ({exp.mode})")
        best = history[best_epoch - 1]
        result = TrainResult(
            checkpoint_path=path, model_id=model_id, history=history, best_epoch=best_epoch,
            epochs_run=len(history), best_val=best["val_metric"], metric=self.metric,
            device=self._device_text(), wall_seconds=wall_seconds, images_per_second=images_per_second,
            curve_png=curve, run_dir=self.run_dir, resumed_from_epoch=resumed_from, hyperparameters=self.hp)
        _atomic_write(self.run_dir / "result.json", lambda f: f.write(result.to_json().encode()))
        self.log(f"{exp.name}: best epoch {best_epoch}: val {self.metric} {best['val_metric']:.4f}; "
                 f"model {model_id} ({wall_seconds:.1f} s, {images_per_second:.0f} images/s)")
        return result


    def _device_text(self) -> str:
        if self.ranks.world_size == 1:
            return describe_device(self.device)
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "?"
        return f"DDP, {self.ranks.world_size} processes ({backend}); rank 0: {describe_device(self.device)}"


class _Concat:
    """Two arrays read as one by a list of positions, without first copying both into one."""

    def __init__(self, a: np.ndarray, b: np.ndarray):
        self.a, self.b = a, b

    def __getitem__(self, positions: list[int]) -> np.ndarray:
        p = np.asarray(positions, dtype=np.int64)
        n = len(self.a)
        out = np.empty((len(p), *self.a.shape[1:]), self.a.dtype)
        first = p < n
        out[first] = self.a[p[first]]
        out[~first] = self.b[p[~first] - n]
        return out


def train_epoch(step: TrainStep, source: DeviceBatches, pipeline: InputPipeline | None, order: torch.Tensor,
                batch_size: int, *, augment: bool, task: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One pass over source in `order`: (summed loss, summed metric) as device tensors, images seen."""
    loss_sum = torch.zeros((), device=source.device)
    metric_sum = torch.zeros((), device=source.device)
    n_seen = 0
    for x, y in source.batches(order, batch_size, drop_last=True):
        if pipeline is not None:
            x = pipeline(x, augment=augment)
        loss, out = step(x, y)
        loss_sum += loss * len(y)
        metric_sum += _metric_sum(out, y, task)
        n_seen += len(y)
    return loss_sum, metric_sum, n_seen


def evaluate(net: nn.Module, source: DeviceBatches, pipeline: InputPipeline | None, loss_fn: nn.Module,
             task: str, device: torch.device, batch_size: int) -> tuple[float, float]:
    """(mean loss, metric) over source: accuracy, or the MSE in the targets' units. Eager (not the
    compiled forward: eval mode would make torch.compile trace the graph a second time)."""
    was_training = net.training
    net.eval()
    loss_sum = torch.zeros((), device=device)
    metric_sum = torch.zeros((), device=device)
    with torch.inference_mode(), autocast(device):
        for x, y in source.batches(torch.arange(len(source)), batch_size):
            out = net(pipeline(x) if pipeline is not None else x).float()
            loss_sum += loss_fn(out, y) * len(y)
            metric_sum += _metric_sum(out, y, task)
    net.train(was_training)
    return loss_sum.item() / len(source), metric_sum.item() / len(source)


def _metric_sum(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    if task == "regression":
        return ((out - y) ** 2).mean(1).sum()
    labels = y if y.ndim == 1 else y.argmax(1)
    return (out.argmax(1) == labels).sum()


def _better(a: dict, b: dict, metric: str) -> bool:
    if metric == "accuracy":  # ties (small val sets) go to the lower val loss
        return (a["val_metric"], -a["val_loss"]) > (b["val_metric"], -b["val_loss"])
    return a["val_metric"] < b["val_metric"]


def make_loss(task: str, smoothing: float, head: nn.Sequential) -> nn.Module:
    if task == "regression":
        return StandardizedMSE(head[-1].std)
    # CrossEntropyLoss takes class indices or class probabilities (soft labels) alike.
    return nn.CrossEntropyLoss(label_smoothing=smoothing)


def make_optimizer(module: nn.Module, exp: ExperimentSpec, device: torch.device) -> torch.optim.Optimizer:
    # timm's factory: no weight decay on biases and norm weights; its "sgd" is Nesterov, momentum 0.9.
    kwargs = {"fused": True} if device.type == "cuda" and exp.optimizer in ("adamw", "sgd") else {}
    return create_optimizer_v2(module, opt=exp.optimizer, lr=exp.lr, weight_decay=exp.weight_decay, momentum=0.9, **kwargs)


def _scheduler(optimizer: torch.optim.Optimizer, exp: ExperimentSpec, metric: str):
    if exp.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=exp.epochs)
    if exp.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max" if metric == "accuracy" else "min", factor=0.1, patience=max(1, exp.patience // 2))
    return None


def _check_data(exp: ExperimentSpec, data: TrainingData) -> None:
    for part, x, y, ids in (("train", data.x_train, data.y_train, data.train_ids), ("val", data.x_val, data.y_val, data.val_ids)):
        if len(ids) < (2 if part == "train" else 1):
            raise TrainingError(f"experiment {exp.name!r}: {len(ids)} {part} image(s) is too few to train on")
        if x.dtype != np.uint8 or x.shape != (len(ids), exp.image_size, exp.image_size, 3) or len(y) != len(ids):
            raise ValueError(f"{part}: expected uint8 images ({len(ids)}, {exp.image_size}, {exp.image_size}, 3) "
                             f"and {len(ids)} targets, got {x.dtype} {x.shape} and {len(y)}")
    if (exp.task == "classification") != (data.classes is not None):
        raise ValueError(f"task {exp.task} needs {'classes' if exp.task == 'classification' else 'targets'} in TrainingData")


def _cpu_state(state: dict) -> dict:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _rng_state(shuffle: torch.Generator, pipeline: InputPipeline | None, device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state()}
    if pipeline is not None:
        state["augment"] = pipeline.generator.get_state()
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, shuffle: torch.Generator, pipeline: InputPipeline | None, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    shuffle.set_state(state["shuffle"])
    if pipeline is not None:
        pipeline.generator.set_state(state["augment"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextmanager
def _deterministic(device: torch.device):
    """Deterministic kernels on the CPU (same seed and inputs -> same weights); CUDA keeps fast ones."""
    if device.type != "cpu":
        yield
        return
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def spec_dict(exp: ExperimentSpec) -> dict:
    """The experiment spec as plain data, without `origin` (the path of the catalog file that defined
    it), so the same training in another checkout gives the same checkpoint bytes."""
    d = dataclasses.asdict(exp)
    d.pop("origin", None)
    return d




def _atomic_write(path: Path, write: Callable) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_save(path: Path, obj) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


# --- the learning curve --------------------------------------------------------------------------


def learning_curve_png(history: list[dict], metric: str, path: Path, *, best_epoch: int | None = None,
                       title: str = "") -> Path:
    """Loss and metric per epoch (train and val), best epoch marked; written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend state in a library

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    for ax, key, label in zip(fig.subplots(1, 2), ("loss", "metric"), ("loss", metric)):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "o-", label="val")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best (epoch {best_epoch})")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return path


# --- the models table, checkpoints, prediction ------------------------------------------------------


def record_model(db: Database, result: TrainResult, experiment: ExperimentSpec, split_id: str,
                 split_fingerprint: str | None) -> str:
    """Write (or replace) the `models` row for a finished run; returns model_id."""
    _, info = _read_checkpoint(result.checkpoint_path)
    with db.transaction() as conn:
        conn.execute(
            "INSERT OR REPLACE INTO models (model_id, experiment, split_id, split_fingerprint, architecture, "
            "hyperparameters, classes, epochs_run, best_epoch, history, device, versions, code_version, "
            "wall_seconds, images_per_second, checkpoint_path) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [result.model_id, experiment.name, split_id, split_fingerprint, experiment.model,
             json.dumps(result.hyperparameters), json.dumps(info["classes"] or info["targets"]), result.epochs_run,
             result.best_epoch, json.dumps(result.history), result.device, json.dumps(versions()), code_version(),
             result.wall_seconds, result.images_per_second, str(result.checkpoint_path)])
    return result.model_id


def versions() -> dict:
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "numpy": np.__version__, "cuda": torch.version.cuda}


def code_version() -> str:
    """emopipe's version, plus the git commit when running from a checkout."""
    try:
        commit = subprocess.run(["git", "-C", str(PROJECT_DIR), "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{emopipe.__version__}+g{commit}" if commit else emopipe.__version__


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """(network in eval mode on the CPU, info: classes, targets, normalization, image_size, task, ...)."""
    state, info = _read_checkpoint(Path(path))
    net, _, _ = build_net(info["architecture"], image_size=info["image_size"], pretrained="none", mode=info["mode"],
                          task=info["task"], num_outputs=info["num_outputs"], head_hidden=info["head_hidden"])
    # A state dict saved from a DistributedDataParallel wrapper names every key "module.<key>".
    consume_prefix_in_state_dict_if_present(state, "module.")
    net.load_state_dict(state)
    return net.eval(), info


def checkpoint_info(path: str | Path) -> dict:
    """The record stored inside an emopipe checkpoint: architecture, hyperparameters, history, best_epoch,
    epochs_run, classes/targets, split_id; what the `models` row of that checkpoint must repeat."""
    return _read_checkpoint(Path(path))[1]


def _read_checkpoint(path: Path) -> tuple[dict, dict]:
    if not path.is_file():
        raise TrainingError(f"checkpoint {path} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    info = json.loads(checkpoint["info"]) if isinstance(checkpoint, dict) and isinstance(checkpoint.get("info"), str) else {}
    if info.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not an emopipe trained-model checkpoint ({CHECKPOINT_FORMAT})")
    return checkpoint["state_dict"], info


def predict(model: nn.Module, info: dict, x: np.ndarray, *, device: str | torch.device | None = None,
            batch_size: int = 256) -> np.ndarray:
    """Class probabilities (N, C), or regression outputs (N, T), for uint8 images (N, S, S, 3)."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.eval().to(device, memory_format=torch.channels_last)
    pipeline = InputPipeline(Normalization.from_dict(info["normalization"]), device)
    source = DeviceBatches(x, None, device)
    out = []
    with torch.inference_mode(), autocast(device):
        for batch, _ in source.batches(torch.arange(len(source)), batch_size):
            y = model(pipeline(batch)).float()
            out.append(y.softmax(1) if info["task"] == "classification" else y)
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, info["num_outputs"]), np.float32)
