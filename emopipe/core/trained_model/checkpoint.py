"""Checkpoints and the `models` table: the trained network saved under the sha256 of its file, the
record stored inside it, loading it back for prediction, and the experiment spec as plain data."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import timm
import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

import emopipe
from emopipe.allocator import keep_freed_memory
from emopipe.atomic import atomic_write
from emopipe.catalog import EvalDataset, ExperimentSpec, Reference, TextThresholds, TuneSpec
from emopipe.core.device_data import DeviceBatches, InputPipeline, autocast, pick_device
from emopipe.core.models import Normalization
from emopipe.core.trained_model.data import TrainingError
from emopipe.core.trained_model.network import build_net
from emopipe.db import Database
from emopipe.fingerprint import sha256_file
from emopipe.paths import PROJECT_DIR

CHECKPOINT_FORMAT = "emopipe.trained_model/1"

if TYPE_CHECKING:
    from emopipe.core.trained_model.run import TrainResult


OPTIONAL_SPEC_FIELDS = ("seed_group", "split_seed")


def spec_dict(exp: ExperimentSpec) -> dict:
    """The experiment spec as plain data, without `origin` (the path of the catalog file that defined
    it), so the same training in another checkout gives the same checkpoint bytes."""
    d = dataclasses.asdict(exp)
    d.pop("origin", None)
    # Seed fields (catalog `seeds`) only when set: a training without them keeps the checkpoint bytes, and so
    # the model id, it had before they existed.
    for key in OPTIONAL_SPEC_FIELDS:
        if d.get(key) is None:
            d.pop(key, None)
    return d


def experiment_from_dict(d: dict, origin: str = "") -> ExperimentSpec:
    """The inverse of spec_dict (after a JSON round trip); checked, so a new nested field fails loudly."""
    nested = {"eval_datasets": lambda v: tuple(EvalDataset(**e) for e in v),
              "text_thresholds": lambda v: TextThresholds(**v), "tune": lambda v: TuneSpec(**v),
              "reference": lambda v: Reference(**v)}
    fields = {k: (nested[k](v) if k in nested and v is not None else tuple(v) if isinstance(v, list) else v)
              for k, v in d.items()}
    spec = ExperimentSpec(**fields, origin=origin)
    if json.loads(json.dumps(spec_dict(spec))) != {k: v for k, v in d.items() if not (k in OPTIONAL_SPEC_FIELDS and v is None)}:
        raise ValueError(f"experiment {d.get('name')!r} does not survive the round trip through job.json")
    return spec


def save_checkpoint(work_dir: Path, state_dict: dict, info: dict) -> Path:
    """work_dir/<sha256>.pt holding the network's weights and `info` (the record `models` repeats)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = work_dir / f".checkpoint.{os.getpid()}.tmp"
    # info as canonical JSON text: pickling equal dicts can give different bytes (shared vs
    # separate string objects, e.g. after a resume), and the file's sha256 is the model's id.
    atomic_write(tmp, lambda f: torch.save({"state_dict": state_dict, "info": json.dumps(info, sort_keys=True)}, f))
    path = work_dir / f"{sha256_file(tmp)}.pt"
    os.replace(tmp, path)
    return path


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
    keep_freed_memory()
    device = pick_device(device, log=lambda _: None)
    model.eval().to(device, memory_format=torch.channels_last)
    pipeline = InputPipeline(Normalization.from_dict(info["normalization"]), device)
    source = DeviceBatches(x, None, device)
    out = []
    with torch.inference_mode(), autocast(device):
        for batch, _ in source.batches(torch.arange(len(source)), batch_size):
            y = model(pipeline(batch)).float()
            out.append(y.softmax(1) if info["task"] == "classification" else y)
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, info["num_outputs"]), np.float32)
