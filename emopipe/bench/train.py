"""`python -m emopipe.bench train [--config MODEL:SIZE:BATCH ...] [--steps N] [--out FILE]`: training
images/s through the real data path (packed uint8 arrays -> device gather -> per-sample crop + flip
-> normalize -> model step, i.e. trained_model.train_epoch) against the same model and step on
synthetic tensors already on the device, measured in the same run. The ratio is what the data path
costs: target >= 0.95 on CUDA. On CUDA the arrays are measured both held on the GPU ("resident") and
streamed from pinned host memory ("streamed").

Defaults: on CUDA resnet18 at 32 px (batch 1024), vit_base_patch16_224 and efficientnetv2_s at 224
(batch 256); on the CPU resnet18 at 32 px, batch 8, a few steps (a smoke run, under a minute; there
images/s are per CPU-second of this process, robust to other jobs on the machine).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from pathlib import Path

import timm
import torch

from emopipe.catalog import ExperimentSpec
from emopipe.core.device_data import DeviceBatches, InputPipeline, TrainStep, configure_cuda, describe_device
from emopipe.core.trained_model import build_net, make_loss, make_optimizer, train_epoch

CUDA_CONFIGS = ("resnet18:32:1024", "vit_base_patch16_224:224:256", "efficientnetv2_s:224:256")
CPU_CONFIGS = ("resnet18:32:8",)
NUM_CLASSES = 8


def _timed(run, device: torch.device) -> float:
    """Wall seconds on CUDA (synchronized); on the CPU this process's CPU seconds, which other jobs on
    a shared machine disturb far less than wall time (the step runs on all its threads either way)."""
    if device.type != "cuda":
        start = time.process_time()
        run()
        return time.process_time() - start
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_config(model: str, size: int, batch: int, *, steps: int, warmup: int, repeats: int,
                 device: torch.device, compile: bool, resident: bool) -> dict:
    exp = ExperimentSpec(name="bench", dataset="bench", model=model, image_size=size, batch_size=batch,
                         pretrained="none", mode="finetune", compile=compile)
    torch.manual_seed(0)
    net, norm, _ = build_net(model, image_size=size, pretrained="none", mode="finetune", task="classification",
                             num_outputs=NUM_CLASSES, head_hidden=exp.head_hidden)
    net.to(device, memory_format=torch.channels_last).train()
    step = TrainStep(net, make_loss("classification", 0.0, net.head), make_optimizer(net, exp, device), device,
                     compile=compile)

    n = batch * steps  # one epoch of the real path = `steps` steps
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8).numpy()
    labels = torch.randint(0, NUM_CLASSES, (n,))
    source = DeviceBatches(images, labels, device, on_device=None if resident else False)
    pipeline = InputPipeline(norm, device, torch.Generator(device=device).manual_seed(0))
    shuffle = torch.Generator().manual_seed(0)

    x_synthetic = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y_synthetic = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def real(n_steps: int) -> None:
        order = torch.randperm(n, generator=shuffle)[: n_steps * batch]
        train_epoch(step, source, pipeline, order, batch, augment=True, task="classification")[0].item()

    def synthetic(n_steps: int) -> None:
        for _ in range(n_steps):
            step(x_synthetic, y_synthetic)

    _timed(lambda: (synthetic(warmup), real(warmup)), device)  # cudnn autotune, torch.compile, allocator
    best = {"synthetic": float("inf"), "real": float("inf")}
    for _ in range(repeats):  # alternate, keep each one's best: drift on the machine hits both alike
        best["synthetic"] = min(best["synthetic"], _timed(lambda: synthetic(steps), device))
        best["real"] = min(best["real"], _timed(lambda: real(steps), device))
    synthetic_ips, real_ips = steps * batch / best["synthetic"], steps * batch / best["real"]
    return {
        "model": model, "image_size": size, "batch_size": batch, "steps": steps, "compile": compile and device.type == "cuda",
        "data_path": "resident" if source.on_device else "streamed", "device": describe_device(device),
        "synthetic_images_per_second": round(synthetic_ips, 1), "real_images_per_second": round(real_ips, 1),
        "ratio": round(real_ips / synthetic_ips, 4), "array_gib": round(images.nbytes / 2**30, 3),
        "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
    }


def write_rows(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text(json.dumps(rows, indent=2) + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m emopipe.bench train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", metavar="MODEL:SIZE:BATCH",
                        help=f"repeatable (default on CUDA: {' '.join(CUDA_CONFIGS)}; on CPU: {' '.join(CPU_CONFIGS)})")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default: CUDA 40, CPU 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: CUDA 10, CPU 1)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating measurements, best kept (default 2)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA only)")
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    parser.add_argument("--no-streamed", action="store_true", help="CUDA: skip the pinned-host streaming measurement")
    parser.add_argument("--out", type=Path, default=None, help="write the figures to this .json or .csv file")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    configure_cuda(device)
    configs = args.config or list(CUDA_CONFIGS if cuda else CPU_CONFIGS)
    steps = args.steps or (40 if cuda else 2)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    print(f"{describe_device(device)}; torch {torch.__version__}, timm {timm.__version__}; "
          f"{len(os.sched_getaffinity(0))} CPU(s), load average {os.getloadavg()[0]:.1f}; {steps} steps x {args.repeats}")
    rows = []
    for config in configs:
        model, size, batch = config.split(":")
        for resident in ((True, False) if cuda and not args.no_streamed else (True,)):
            row = bench_config(model, int(size), int(batch), steps=steps, warmup=warmup, repeats=args.repeats,
                               device=device, compile=args.compile, resident=resident)
            rows.append(row)
            print(f"{model} {size}px batch {batch} ({row['data_path']}{', compiled' if row['compile'] else ''}): "
                  f"synthetic tensors {row['synthetic_images_per_second']:.0f} images/s, real data path "
                  f"{row['real_images_per_second']:.0f} images/s, ratio {row['ratio']:.3f}")
            if cuda:
                torch.cuda.empty_cache()
    if args.out:
        write_rows(rows, args.out)
        print(f"figures written to {args.out}")
    return 0
