"""`python -m emopipe.bench scale --n N`: the ingest-to-split chain at N images, then again after 1 % more.

Generates N distinct 500×375 JPEGs (the typical FI/EmoSet size; smooth random colour fields with
camera-like noise, 8 classes) into a temp folder, writes a catalog with one folder dataset and one
experiment (text filter off, 80/10/10), and materializes raw_images, images_32, images_224,
text_scores, filtered_images and splits (with its check) in one Dagster run (in-process executor). Then it adds N/100 new images and does it again.
Printed per step and run: CPU-seconds (this process and every process it started), wall seconds and
peak RSS of this process; then the incremental/full CPU ratio and the full run's CPU per image.

Start-up (Python, Dagster and the definitions) is paid once here and printed apart: under
`dagster asset materialize` every step pays it in its own process (about 1 CPU-s each, see README).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

STEPS = ("raw_images", "images_32", "images_224", "text_scores", "filtered_images", "splits")
CLASSES = ("amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness")
WIDTH, HEIGHT = 500, 375
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _write_jpegs(folder: str, start: int, count: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(start)
    noise = rng.normal(0, 6, (4, HEIGHT, WIDTH, 3)).astype(np.float32)  # reused: drawing it costs more than the encode
    for k in range(start, start + count):
        field = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((WIDTH, HEIGHT), Image.BICUBIC)
        pixels = np.clip(np.asarray(field, np.float32) + noise[k % 4], 0, 255).astype(np.uint8)
        path = Path(folder) / CLASSES[k % len(CLASSES)] / f"img{k:07d}.jpg"
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def generate(folder: Path, start: int, count: int, workers: int) -> float:
    """Images start..start+count-1 into folder/<class>/; returns the wall seconds it took."""
    began = time.perf_counter()
    for name in CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
    chunk = 500
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_jpegs, *zip(*[(str(folder), s, min(chunk, start + count - s))
                                           for s in range(start, start + count, chunk)])))
    return time.perf_counter() - began


def write_catalog(root: Path, folder: Path) -> Path:
    path = root / "catalog.yaml"
    path.write_text(
        f"datasets:\n  scale:\n    source: folder\n    path: {folder}\n"
        "experiments:\n  scale:\n    dataset: scale\n    text_filter: false\n    split: 80/10/10\n")
    return path


def _tree_cpu_seconds() -> float:
    """CPU-seconds of this process, the children it reaped, and every live descendant (with what they
    reaped: the forkserver's pool workers are its children, not ours)."""
    own = os.times()
    total = own.user + own.system + own.children_user + own.children_system
    parents, stats = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry)] = int(fields[1])
            stats[int(entry)] = sum(int(v) for v in fields[11:15]) / CLOCK_TICKS
    ours = {os.getpid()}
    for _ in range(8):  # descendants a few generations deep
        ours |= {pid for pid, parent in parents.items() if parent in ours}
    return total + sum(stats[pid] for pid in ours - {os.getpid()})


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class StepFigure:
    step: str
    cpu_s: float
    wall_s: float
    peak_rss_mib: float


def materialize(defs, instance) -> list[StepFigure]:
    """One Dagster run of STEPS (and their checks) for the partition, in this process; each step's
    figures run from the end of the one before (the first from the run's start) to its success hook."""
    import dagster as dg

    marks = []

    @dg.success_hook
    def mark(context):
        marks.append((context.step_key, _tree_cpu_seconds(), time.perf_counter(), _peak_rss_mib()))
        _reset_peak_rss()

    job = dg.define_asset_job("bench_scale", selection=dg.AssetSelection.assets(*STEPS), hooks={mark},
                              executor_def=dg.in_process_executor)
    resolved = dg.Definitions.merge(defs, dg.Definitions(jobs=[job])).get_job_def("bench_scale")
    _reset_peak_rss()
    began = ("run start", _tree_cpu_seconds(), time.perf_counter(), 0.0)
    if not resolved.execute_in_process(partition_key="scale", instance=instance, run_config=QUIET).success:
        raise SystemExit("the run failed; run it with --keep DIR and look at the Dagster logs there")
    marks.append(("run end", _tree_cpu_seconds(), time.perf_counter(), _peak_rss_mib()))
    return [StepFigure(step, cpu - before[1], wall - before[2], rss)
            for before, (step, cpu, wall, rss) in zip([began, *marks], marks)]


def print_run(title: str, figures: list[StepFigure]) -> None:
    print(f"{title}:")
    for f in figures:
        print(f"  {f.step:36s} {f.cpu_s:8.2f} CPU-s {f.wall_s:8.2f} s wall   peak RSS {f.peak_rss_mib:7.0f} MiB")
    print(f"  {'total':36s} {sum(f.cpu_s for f in figures):8.2f} CPU-s {sum(f.wall_s for f in figures):8.2f} s wall")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m emopipe.bench scale")
    parser.add_argument("--n", type=int, default=10_000, help="images in the first run (then 1 %% more)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="emopipe-scale-") as tmp:
        return run(args.n, args.keep or Path(tmp))


def run(n: int, root: Path) -> int:
    root.mkdir(parents=True, exist_ok=True)
    folder, added = root / "images", max(1, n // 100)
    cores = len(os.sched_getaffinity(0))
    print(f"bench scale: {n:,} JPEGs {WIDTH}x{HEIGHT}, then +{added:,}; {cores} cores, {cpu_model()}")
    print(f"  generated {n:,} images in {generate(folder, 0, n, cores):.0f} s (not counted)")
    os.environ.update(EMOPIPE_CATALOG=str(write_catalog(root, folder)), EMOPIPE_DATA_DIR=str(root / "data"),
                      DAGSTER_HOME=str(root / "dagster_home"))
    (root / "dagster_home").mkdir(exist_ok=True)
    (root / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    began = _tree_cpu_seconds()
    import dagster as dg

    from emopipe.definitions import defs

    instance = dg.DagsterInstance.get()
    print(f"  start-up (Python, Dagster, definitions): {_tree_cpu_seconds() - began:.2f} CPU-s, paid once here")
    full = materialize(defs, instance)
    print_run(f"full run, {n:,} images", full)
    print(f"  generated {added:,} more in {generate(folder, n, added, cores):.0f} s (not counted)")
    incremental = materialize(defs, instance)
    print_run(f"after adding {added:,} images (1 %)", incremental)
    full_cpu, incremental_cpu = sum(f.cpu_s for f in full), sum(f.cpu_s for f in incremental)
    print(f"incremental / full CPU: {incremental_cpu / full_cpu:.1%}   (target <= 5 %)")
    print(f"full run CPU per image: {1000 * full_cpu / n:.2f} CPU-ms   (compare across --n: linear if equal)")
    return 0
