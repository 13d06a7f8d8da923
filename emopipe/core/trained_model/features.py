"""linear_probe: the frozen backbone's pooled features, computed once per (architecture, weights, image
size, image) into a cache under <data_dir>/features/, and the head's input standardization."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from emopipe.atomic import atomic_write
from emopipe.core.device_data import DeviceBatches, InputPipeline
from emopipe.core.models import Normalization
from emopipe.fingerprint import params_hash
from emopipe.progress import Progress

Log = Callable[[str], None]


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


def cached_features(cache_dir: Path, ids: list[str], images: "np.ndarray | Concat",
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
    progress = Progress("features", len(missing), "images", log)
    for start in range(0, len(missing), chunk):
        positions = missing[start:start + chunk]
        new_ids = [ids[n] for n in positions]
        features = np.ascontiguousarray(compute(images[positions]), dtype=np.float32)
        name = params_hash({"ids": new_ids})
        shard = cache_dir / f"{name}.npy"
        atomic_write(shard, lambda f: np.save(f, features))
        atomic_write(cache_dir / f"{name}.ids.json", lambda f: f.write(json.dumps(new_ids).encode()))
        for row, image_id in enumerate(new_ids):
            where[image_id] = (shard, row)
        progress.advance(len(new_ids))
    progress.close()
    maps = {}
    rows = []
    for image_id in ids:
        shard, row = where[image_id]
        if shard not in maps:
            maps[shard] = np.load(shard, mmap_mode="r")
        rows.append(maps[shard][row])
    return np.stack(rows).astype(np.float32)


class Concat:
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


def feature_key(architecture: str, image_size: int, backbone: nn.Module) -> str:
    """The cache folder of a backbone's features: the same images through the same weights at the same size."""
    from emopipe.core.models import weights_fingerprint

    return f"{architecture}-{image_size}px-{weights_fingerprint(backbone)[:16]}"


def probe_features(backbone: nn.Module, norm: Normalization, *, architecture: str, image_size: int, batch_size: int,
                   train_ids: list[str], val_ids: list[str], x_train: np.ndarray, x_val: np.ndarray, cache: Path,
                   device: torch.device, log: Log) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) features of the frozen backbone, through the cache (computed only for new images)."""
    features = cached_features(
        cache / feature_key(architecture, image_size, backbone), train_ids + val_ids, Concat(x_train, x_val),
        lambda images: extract_features(backbone, norm, images, device=device, batch_size=max(2 * batch_size, 64)), log)
    return features[: len(train_ids)], features[len(train_ids):]


def set_standardization(standardize: nn.Module, train_features: np.ndarray) -> None:
    """The probe head's fixed input standardization, from the training features."""
    standardize.mean.copy_(torch.from_numpy(train_features.mean(0)))
    std = train_features.std(0)
    # Floor: a feature (nearly) constant on the training images must not blow up on others.
    standardize.std.copy_(torch.from_numpy(np.maximum(std, 0.1 * std.mean() + 1e-6)))
