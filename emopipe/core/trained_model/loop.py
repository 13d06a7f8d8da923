"""One epoch of training, one pass of validation, the optimizer and schedule factories, and the state a
resumed run needs back (weights on the CPU, every random stream)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from timm.optim import create_optimizer_v2
from torch import nn

from emopipe.catalog import ExperimentSpec
from emopipe.core.device_data import DeviceBatches, InputPipeline, TrainStep, autocast


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


def better(a: dict, b: dict, metric: str) -> bool:
    if metric == "accuracy":  # ties (small val sets) go to the lower val loss
        return (a["val_metric"], -a["val_loss"]) > (b["val_metric"], -b["val_loss"])
    return a["val_metric"] < b["val_metric"]


def make_optimizer(module: nn.Module, exp: ExperimentSpec, device: torch.device) -> torch.optim.Optimizer:
    # timm's factory: no weight decay on biases and norm weights; its "sgd" is Nesterov, momentum 0.9.
    kwargs = {"fused": True} if device.type == "cuda" and exp.optimizer in ("adamw", "sgd") else {}
    return create_optimizer_v2(module, opt=exp.optimizer, lr=exp.lr, weight_decay=exp.weight_decay, momentum=0.9, **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, exp: ExperimentSpec, metric: str):
    if exp.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=exp.epochs)
    if exp.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max" if metric == "accuracy" else "min", factor=0.1, patience=max(1, exp.patience // 2))
    return None


def cpu_state(state: dict) -> dict:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def rng_state(shuffle: torch.Generator, pipeline: InputPipeline | None, device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state()}
    if pipeline is not None:
        state["augment"] = pipeline.generator.get_state()
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, shuffle: torch.Generator, pipeline: InputPipeline | None, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    shuffle.set_state(state["shuffle"])
    if pipeline is not None:
        pipeline.generator.set_state(state["augment"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextmanager
def deterministic(device: torch.device):
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
