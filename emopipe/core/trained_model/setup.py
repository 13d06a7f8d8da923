"""What a training run and a population-based-training trial build before their first epoch, in one
place and one order: the seeded network, its inputs (images, or the frozen backbone's cached and
standardized features), the regression head's target units, the optimizer, the losses and the device
input pipeline. `train_model` and the PBT trial (core/tuned_hyperparams.py) both call setup_training,
so tuning trains exactly the model that trained_model trains."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from emopipe.catalog import ExperimentSpec
from emopipe.core.device_data import DeviceBatches, InputPipeline, Ranks, TrainStep, describe_device
from emopipe.core.models import Normalization
from emopipe.core.trained_model.data import Log, TrainingData
from emopipe.core.trained_model.features import probe_features, set_standardization
from emopipe.core.trained_model.loop import make_optimizer
from emopipe.core.trained_model.network import EmotionNet, build_net, make_loss

# Added per rank to a seed, so that each process of a DistributedDataParallel run draws its own streams.
RANK_SEED_STRIDE = 1_000_003


@dataclass
class Setup:
    net: EmotionNet
    norm: Normalization
    trainable: nn.Module  # the head (linear_probe) or the whole network
    train_source: DeviceBatches
    val_source: DeviceBatches | None  # None on ranks other than 0 (only rank 0 validates)
    pipeline: InputPipeline | None  # None for linear_probe: its inputs are features, never augmented
    optimizer: torch.optim.Optimizer
    step: TrainStep
    val_loss: nn.Module  # the training loss without label smoothing


def setup_training(exp: ExperimentSpec, data: TrainingData, *, device: torch.device, log: Log,
                   feature_cache: Path | None = None, features: tuple[np.ndarray, np.ndarray] | None = None,
                   ranks: Ranks | None = None) -> Setup:
    """linear_probe reads the backbone's features from `feature_cache` (rank 0 computes what is missing
    while the other ranks wait), or takes them ready-made as `features` (a PBT trial: computed once for
    all trials, through the same cache)."""
    ranks = ranks or Ranks()
    probe = exp.mode == "linear_probe"
    torch.manual_seed(exp.seed)
    net, norm, num_features = build_net(exp.model, image_size=exp.image_size, pretrained=exp.pretrained, mode=exp.mode,
                                        task=exp.task, num_outputs=data.num_outputs, head_hidden=exp.head_hidden)
    log(f"{exp.name}: {exp.model} ({exp.pretrained} weights, {num_features} features) {exp.mode} {exp.task}, "
        f"{len(data.train_ids)} train / {len(data.val_ids)} val images at {exp.image_size} px on {describe_device(device)}")
    y_train, y_val = (torch.from_numpy(np.asarray(y)) for y in (data.y_train, data.y_val))
    if probe:
        if features is None:
            if not ranks.main:  # rank 0 computes the features; the others read them from the cache
                ranks.barrier()
            features = probe_features(net.backbone, norm, architecture=exp.model, image_size=exp.image_size,
                                      batch_size=exp.batch_size, train_ids=data.train_ids, val_ids=data.val_ids,
                                      x_train=data.x_train, x_val=data.x_val, cache=feature_cache, device=device, log=log)
            if ranks.main:
                ranks.barrier()
        set_standardization(net.head[0], features[0])
        inputs = (torch.from_numpy(features[0]), torch.from_numpy(features[1]))
    else:
        inputs = (data.x_train, data.x_val)
    train_source = DeviceBatches(inputs[0], y_train, device)
    val_source = DeviceBatches(inputs[1], y_val, device) if ranks.main else None
    if ranks.world_size > 1:  # same initial weights everywhere (above); from here on each rank its own dropout
        torch.manual_seed(exp.seed + RANK_SEED_STRIDE * ranks.rank)
    net.to(device, memory_format=torch.channels_last)
    trainable = net.head if probe else net
    if probe:
        net.backbone.requires_grad_(False).eval()
    if exp.task == "regression":
        destandardize = net.head[-1]
        destandardize.mean.copy_(torch.from_numpy(data.y_train.mean(0)))
        destandardize.std.copy_(torch.from_numpy(np.maximum(data.y_train.std(0), 1e-6)))
    if exp.compile and device.type != "cuda":
        log("compile: torch.compile is used on CUDA only; running eager on the CPU")
    optimizer = make_optimizer(trainable, exp, device)
    step = TrainStep(ranks.wrap(trainable, device), make_loss(exp.task, exp.label_smoothing, net.head), optimizer, device,
                     compile=exp.compile)
    pipeline = None if probe else InputPipeline(
        norm, device, torch.Generator(device=device).manual_seed(exp.seed + RANK_SEED_STRIDE * ranks.rank))
    return Setup(net, norm, trainable, train_source, val_source, pipeline, optimizer, step,
                 make_loss(exp.task, 0.0, net.head))
