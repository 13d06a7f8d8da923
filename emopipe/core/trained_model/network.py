"""The network: a timm backbone (pooled features) and a task head, and the loss that trains it."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from emopipe.core.models import Normalization, create_model

HEAD_DROPOUT = 0.2


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


def make_loss(task: str, smoothing: float, head: nn.Sequential) -> nn.Module:
    if task == "regression":
        return StandardizedMSE(head[-1].std)
    # CrossEntropyLoss takes class indices or class probabilities (soft labels) alike.
    return nn.CrossEntropyLoss(label_smoothing=smoothing)
