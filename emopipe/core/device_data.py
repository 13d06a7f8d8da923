"""The training data path on the device: packed uint8 arrays (or cached features) served by index,
cropped, flipped and normalized on the device, and the optimization step (bf16 autocast,
channels_last, optional torch.compile on CUDA).

Arrays go to the GPU once when they fit (else each batch is gathered into pinned host memory and
copied with non_blocking=True), so no JPEG is decoded and no CPU worker touches a pixel per step.

Ranks: this process's place among DistributedDataParallel training processes (one process: every
collective is a no-op, so the training loop reads the same either way).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from emopipe.core.models import Normalization

CROP_SCALE = (0.25, 1.0)  # RandomResizedCrop area fraction; torchvision's 0.08 is too harsh for 32 px
CROP_RATIO = (3 / 4, 4 / 3)
# Keep this much GPU memory free for activations when deciding whether the arrays live on the GPU.
GPU_HEADROOM_BYTES = 12 << 30
GPU_HEADROOM_FRACTION = 0.25


def pick_device(device: str | torch.device | None = None, log: Callable[[str], None] = print) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    log(f"no CUDA GPU: running on the CPU ({torch.get_num_threads()} threads)")
    return torch.device("cpu")


def fits_on_gpu(nbytes: int, device: torch.device) -> bool:
    free, total = torch.cuda.mem_get_info(device)
    return nbytes <= free - max(GPU_HEADROOM_BYTES, GPU_HEADROOM_FRACTION * total)


class DeviceBatches:
    """Inputs (packed uint8 images, or features) and targets, served to the device by index.

    On a GPU they are held there when they fit and gathered on the GPU per batch; otherwise each batch
    is gathered into freshly allocated pinned host memory (PyTorch's caching host allocator does not
    reuse a block until its copy has finished) and copied with non_blocking=True, so the gather of the
    next batch overlaps the GPU's work on this one. Nothing here synchronizes with the GPU.
    """

    def __init__(self, inputs: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor | None,
                 device: torch.device, *, on_device: bool | None = None):
        self.device = device
        self.inputs, self.targets = _host_tensor(inputs), None if targets is None else _host_tensor(targets)
        if on_device is None:
            on_device = device.type != "cuda" or fits_on_gpu(self.inputs.nbytes, device)
        self.on_device = on_device
        if on_device:
            self.inputs = self.inputs.to(device)
            self.targets = None if self.targets is None else self.targets.to(device)

    def __len__(self) -> int:
        return len(self.inputs)

    def batches(self, order: torch.Tensor, batch_size: int, *, drop_last: bool = False
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """(inputs, targets) on the device, batch by batch in `order` (a CPU index tensor).
        drop_last drops a final partial batch unless it is the only one (BatchNorm needs > 1 sample)."""
        n = len(order)
        stops = range(batch_size, n + 1, batch_size) if drop_last and n >= batch_size else \
            range(batch_size, n + batch_size, batch_size)
        order = order.to(self.device) if self.on_device else order
        start = 0
        for stop in stops:
            yield self.take(order[start:min(stop, n)])
            start = stop

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.on_device:
            return self.inputs.index_select(0, index), None if self.targets is None else self.targets.index_select(0, index)
        return _pinned_gather(self.inputs, index, self.device), \
            None if self.targets is None else _pinned_gather(self.targets, index, self.device)


def _host_tensor(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    if not a.flags.writeable or not a.flags.c_contiguous:  # torch.from_numpy wants writable C order
        a = np.array(a, order="C")
    return torch.from_numpy(a)


def _pinned_gather(source: torch.Tensor, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return source.index_select(0, index)
    buffer = torch.empty((len(index), *source.shape[1:]), dtype=source.dtype, pin_memory=True)
    torch.index_select(source, 0, index, out=buffer)
    return buffer.to(device, non_blocking=True)


class InputPipeline:
    """uint8 (B, S, S, 3) batches on the device -> normalized float (B, 3, S, S) model input, with a
    per-sample random resized crop and horizontal flip when augmenting.

    Why not torchvision.transforms.v2.RandomResizedCrop: on a batched tensor it draws one crop for the
    whole batch. Here every sample gets its own crop box and flip, drawn from a device generator
    (seeded: reproducible, and no host-to-device copy per step), applied in one affine_grid +
    grid_sample call (bilinear; the crop is never larger than the output, so no aliasing).
    """

    def __init__(self, norm: Normalization, device: torch.device, generator: torch.Generator | None = None):
        mean, std = torch.tensor(norm.mean), torch.tensor(norm.std)
        self.scale = (1 / (255 * std)).view(1, 3, 1, 1).to(device)
        self.shift = (-mean / std).view(1, 3, 1, 1).to(device)
        self.generator = generator

    def __call__(self, images: torch.Tensor, *, augment: bool = False) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()  # NHWC storage: already the channels_last layout
        if augment:
            x = random_resized_crop_flip(x, self.generator)
        return torch.addcmul(self.shift, x, self.scale).contiguous(memory_format=torch.channels_last)


def random_resized_crop_flip(x: torch.Tensor, generator: torch.Generator | None,
                             scale: tuple[float, float] = CROP_SCALE, ratio: tuple[float, float] = CROP_RATIO) -> torch.Tensor:
    """Per-sample RandomResizedCrop(size = input size) + RandomHorizontalFlip on a (B, C, H, W) float batch."""
    r = torch.rand(x.shape[0], 5, generator=generator, device=x.device)
    area = scale[0] + (scale[1] - scale[0]) * r[:, 0]
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * r[:, 1])
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # crop width / image width
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    flip = torch.where(r[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = (1 - w) * (2 * r[:, 2] - 1)  # crop centre, in [-1, 1] image coordinates
    theta[:, 1, 1] = h
    theta[:, 1, 2] = (1 - h) * (2 * r[:, 3] - 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class TrainStep:
    """One optimization step: bf16 autocast on CUDA, optional torch.compile of the forward pass."""

    def __init__(self, net: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, *, compile: bool = False):
        self.net, self.loss_fn, self.optimizer = net, loss_fn, optimizer
        self.forward = torch.compile(net) if compile and device.type == "cuda" else net
        self.device = device

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss, outputs), both detached; nothing is read back to the host."""
        with autocast(self.device):
            out = self.forward(x)
        loss = self.loss_fn(out.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), out.detach().float()


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on the CPU (no fast bf16 there)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def configure_cuda(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


class Ranks:
    """This process's rank among `world_size` training processes (torch.distributed, set up by the
    caller), and the few collectives training needs. The default, one process, does no communication."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank

    @property
    def main(self) -> bool:
        """Rank 0: validates, logs and writes the checkpoints."""
        return self.rank == 0

    def shard(self, order: torch.Tensor) -> torch.Tensor:
        """This rank's share of an epoch's order (the same permutation on every rank): every
        world_size-th index, the order cut to a multiple of world_size so that all ranks run the
        same number of steps (a rank with one step more would wait forever for its all-reduce)."""
        if self.world_size == 1:
            return order
        return order[self.rank:len(order) - len(order) % self.world_size:self.world_size]

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """The module to train: DistributedDataParallel (gradients all-reduced) when several ranks."""
        if self.world_size == 1:
            return module
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """values summed over the ranks (a device tensor: nccl takes CUDA tensors only)."""
        if self.world_size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def from_main(self, values: torch.Tensor) -> torch.Tensor:
        """Rank 0's values on every rank."""
        if self.world_size > 1:
            dist.broadcast(values, src=0)
        return values

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
