"""FractalNet (Larsson, Maire, Shakhnarovich 2016, "FractalNet: Ultra-Deep Neural Networks without
Residuals"), registered in timm so `create_model("fractalnet_c4b5", ...)` finds it by name.

timm has no FractalNet. This is the paper's CIFAR network: B fractal blocks, each followed by a 2x2
max-pool, channels 64, 128, 256, 512, 512 and dropout 0, 0.1, ..., 0.4 by block. A block of C columns
expands f_1(z) = conv(z), f_{C+1}(z) = join(f_C(f_C(z)), conv(z)); column i holds 2^i conv-BN-ReLU
layers and a join averages (element-wise mean) every column ending at that depth. Training regularizes
with drop-path, chosen per batch: with probability 0.5 global (one column for the whole network),
else local (each join drops each input with p = 0.15, keeping at least one). In eval mode every
column is used: the output is deterministic.
"""

from __future__ import annotations

import torch
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

CHANNELS = (64, 128, 256, 512, 512)
DROPOUT = (0.0, 0.1, 0.2, 0.3, 0.4)
LOCAL_DROP = 0.15
GLOBAL_PROB = 0.5


def _conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class FractalBlock(nn.Module):
    """C columns; column i has 2^i layers, one every 2^(C-1-i) depth steps; the columns that end a
    layer at the same depth are joined (mean) and all continue from the join."""

    def __init__(self, in_channels: int, out_channels: int, columns: int, dropout: float):
        super().__init__()
        self.num_columns = columns
        self.depth = 2 ** (columns - 1)
        self.columns = nn.ModuleList(
            nn.ModuleList(_conv(in_channels if k == 0 else out_channels, out_channels) for k in range(2 ** i))
            for i in range(columns))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, column: int | None = None) -> torch.Tensor:
        """column: global drop-path (only that column runs); None: every column, local drop-path in training."""
        current = [x] * self.num_columns
        done = [0] * self.num_columns  # layers run per column
        for step in range(1, self.depth + 1):
            active = [i for i in range(self.num_columns) if step % (self.depth >> i) == 0]
            if column is not None:
                active = [column] if column in active else []
            if not active:
                continue
            outs = []
            for i in active:
                outs.append(self.columns[i][done[i]](current[i]))
                done[i] += 1
            joined = self._join(outs)
            for i in active:
                current[i] = joined
        return self.dropout(current[column if column is not None else self.num_columns - 1])

    def _join(self, outs: list[torch.Tensor]) -> torch.Tensor:
        if self.training and len(outs) > 1:
            keep = torch.rand(len(outs)) >= LOCAL_DROP
            outs = [o for o, k in zip(outs, keep) if k] or [outs[int(torch.randint(len(outs), ()))]]
        return outs[0] if len(outs) == 1 else torch.stack(outs).mean(0)


class FractalNet(nn.Module):
    """Fractal blocks + max-pool, then global average pooling and a linear classifier (timm's interface:
    num_features, forward_features, forward_head, get_classifier, reset_classifier)."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, columns: int = 4,
                 channels: tuple[int, ...] = CHANNELS, dropout: tuple[float, ...] = DROPOUT,
                 global_prob: float = GLOBAL_PROB, global_pool: str = "avg", **_):
        super().__init__()
        self.num_classes, self.num_columns, self.global_prob = num_classes, columns, global_prob
        blocks, width = [], in_chans
        for out_channels, p in zip(channels, dropout):
            blocks.append(FractalBlock(width, out_channels, columns, p))
            width = out_channels
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.MaxPool2d(2)
        self.num_features = self.head_hidden_size = width
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # One draw per batch: global drop-path keeps one column through every block. The draws come
        # from torch's CPU generator (seeded and checkpointed by training), on the host: no GPU sync.
        column = None
        if self.training and float(torch.rand(())) < self.global_prob:
            column = int(torch.randint(self.num_columns, ()))
        for block in self.blocks:
            x = self.pool(block(x, column))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def _cfg(**kwargs) -> dict:
    return {"num_classes": 1000, "input_size": (3, 32, 32), "pool_size": (1, 1), "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": "blocks.0.columns.0.0.0", "classifier": "fc", **kwargs}


default_cfgs = generate_default_cfgs({"fractalnet_c3b5": _cfg(), "fractalnet_c4b5": _cfg()})


def _create(variant: str, pretrained: bool, **kwargs) -> FractalNet:
    return build_model_with_cfg(FractalNet, variant, pretrained, **kwargs)


@register_model
def fractalnet_c3b5(pretrained: bool = False, **kwargs) -> FractalNet:
    """FractalNet-20 (CIFAR): 3 columns, 5 blocks (deepest path 4 x 5 = 20 conv layers)."""
    return _create("fractalnet_c3b5", pretrained, columns=3, **kwargs)


@register_model
def fractalnet_c4b5(pretrained: bool = False, **kwargs) -> FractalNet:
    """FractalNet-40 (CIFAR): 4 columns, 5 blocks (deepest path 8 x 5 = 40 conv layers)."""
    return _create("fractalnet_c4b5", pretrained, columns=4, **kwargs)
