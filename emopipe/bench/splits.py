"""`python -m emopipe.bench splits [--rows N] [--repeats R]`: the DuckDB split of a synthetic N-row manifest
against the same stratified rank-and-cut in numpy (same run, same data), checked to give the identical
assignment; then make_split end to end on a DuckDB file against the reference, R times with seeds 0..R-1 (each
run writes its own split, and its split id is checked against the reference's for that seed); then
near-duplicate grouping against brute force. Exits 1 if an assignment or split id differs from the reference.

The make_split ratio is the median of the R runs' ratios: on a shared 2-core machine one run's wall time moves
by 20-40 % with what else runs, which a single pair of timings cannot tell from a change in the code."""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from emopipe.core.near_duplicates import duplicate_groups
from emopipe.core.splits import PARTS, assign_parts, make_split
from emopipe.db import Database
from emopipe.fingerprint import table_fingerprint


def numpy_split(ids: np.ndarray, labels: np.ndarray, ratios: tuple[int, int, int], seed: int) -> np.ndarray:
    """The reference: per class, rank by md5("seed:id")'s first 64 bits and cut at largest-remainder targets."""
    ranks = np.array([int(hashlib.md5(f"{seed}:{i}".encode()).hexdigest()[:16], 16) for i in ids], dtype=np.uint64)
    order = np.lexsort((ids, ranks, labels))
    classes, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
    exact = sizes[:, None] * np.array(ratios)[None, :]
    targets = exact // 100
    seats = sizes - targets.sum(1)
    by_remainder = np.argsort(-(exact % 100), axis=1, kind="stable")  # ties: train, val, test
    for c in range(len(classes)):
        targets[c, by_remainder[c, : seats[c]]] += 1
    position = np.arange(len(ids)) - np.repeat(starts, sizes)
    bounds = np.repeat(np.cumsum(targets, axis=1), sizes, axis=0)
    part = (position[:, None] >= bounds[:, :2]).sum(1)
    out = np.empty(len(ids), dtype=object)
    out[order] = np.array(PARTS, dtype=object)[part]
    return out


def synthetic_manifest(rows: int, classes: int, seed: int) -> pa.Table:
    with duckdb.connect() as conn:
        ids = conn.sql("SELECT sha256(range::VARCHAR) AS image_id FROM range(?)", params=[rows]).to_arrow_table()
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(classes, 2.0))  # uneven classes, as in real datasets
    labels = np.array([f"class{k}" for k in range(classes)])[rng.choice(classes, rows, p=weights)]
    return pa.table({"image_id": ids["image_id"], "label": labels, "official": pa.nulls(rows, pa.string())})


CPU_SECONDS: dict[str, float] = {}


def timed(fn, *args, **kw):
    """(result, wall seconds); the CPU seconds (all threads) go to CPU_SECONDS[fn name], since a busy
    machine inflates wall time."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kw)
    CPU_SECONDS[getattr(fn, "__name__", "?")] = time.process_time() - cpu
    return out, time.perf_counter() - start


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m emopipe.bench splits")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--scheme", default="80/10/10")
    parser.add_argument("--repeats", type=int, default=3, help="make_split runs against the reference, seeds 0..R-1 (default 3)")
    parser.add_argument("--hashes", type=int, default=100_000, help="images for the near-duplicate grouping figure")
    args = parser.parse_args(argv)
    ratios = tuple(int(p) for p in args.scheme.split("/"))
    seed = 0

    items = synthetic_manifest(args.rows, args.classes, seed)
    done, t_duck = timed(assign_parts, items, None, ratios, seed)
    ids, labels = np.array(items["image_id"].to_pylist(), dtype="U64"), np.array(items["label"].to_pylist())

    def reference_run(run_seed: int) -> tuple[np.ndarray, float, float]:
        parts, wall = timed(numpy_split, ids, labels, ratios, run_seed)
        return parts, wall, CPU_SECONDS["numpy_split"]

    first_reference = reference_run(seed)
    reference, t_numpy, _ = first_reference
    duck_parts = dict(zip(done.rows["image_id"].to_pylist(), done.rows["part"].to_pylist()))
    identical = all(duck_parts[i] == p for i, p in zip(ids.tolist(), reference))
    print(f"split of {args.rows:,} rows, {args.classes} classes, {args.scheme} "
          f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start):")
    print(f"  DuckDB SQL (assign_parts)   {t_duck:7.2f} s   ({CPU_SECONDS['assign_parts']:.2f} s CPU, all threads)")
    print(f"  numpy reference             {t_numpy:7.2f} s   ({CPU_SECONDS['numpy_split']:.2f} s CPU; md5 ranks in a Python loop, lexsort, cut)")
    print(f"  ratio numpy / DuckDB        {t_numpy / t_duck:7.2f} x   identical assignment: {'yes' if identical else 'NO'}")

    ratios_by_run, all_same = [], True
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(Path(tmp) / "bench.duckdb")
        with db.transaction() as conn:
            # One chunk: batches that do not fill whole row groups leave part-filled ones, and rewriting
            # those would fall to make_split's checkpoint, not to the setup.
            conn.register("manifest", items.combine_chunks())
            conn.execute("INSERT INTO images (image_id, dataset, source_uri, label) SELECT image_id, 'bench', image_id, label FROM manifest")
            conn.execute("INSERT INTO filter_runs (filter_id, experiment, dataset, params_hash) VALUES ('all', 'bench', 'bench', 'none')")
            # Sorted, as filter_images stores a kept set (the images rows stay in the manifest's order).
            conn.execute("INSERT INTO filtered_images SELECT 'all', image_id FROM manifest ORDER BY image_id")
        os.sync()  # the setup's ~300 MB written back now, not by the kernel during the first timed run
        for run_seed in range(args.repeats):
            reference, t_numpy, cpu_numpy = first_reference if run_seed == seed else reference_run(run_seed)
            result, t_make = timed(make_split, db, experiment="bench", dataset="bench", filter_id="all",
                                   scheme=args.scheme, seed=run_seed)
            same_split = result.split_id == table_fingerprint(pa.table({"image_id": items["image_id"], "part": reference}))
            all_same &= same_split
            ratios_by_run.append(t_numpy / t_make)
            print(f"  seed {run_seed}: numpy reference {t_numpy:5.2f} s ({cpu_numpy:.2f} s CPU), make_split end to end "
                  f"{t_make:5.2f} s ({CPU_SECONDS['make_split']:.2f} s CPU; read, split, fingerprints, write "
                  f"{result.n_images:,} rows): {t_numpy / t_make:.2f} x, split id the reference's: {'yes' if same_split else 'NO'}")
    print(f"  ratio numpy / make_split    {statistics.median(ratios_by_run):7.2f} x   (median of {args.repeats} runs, "
          f"{min(ratios_by_run):.2f}-{max(ratios_by_run):.2f}; split ids the reference's: {'yes' if all_same else 'NO'})")

    n = args.hashes
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) << np.uint64(1)
    copies = rng.integers(0, n, n // 10)
    hashes[copies[: len(copies) // 2]] = hashes[copies[len(copies) // 2:]] ^ np.uint64(0b1011)  # 3 bits apart
    names = [f"img{k:07d}" for k in range(n)]
    groups, t_groups = timed(duplicate_groups, names, hashes, 4)
    sample = min(n, 20_000)
    _, t_lsh_sample = timed(duplicate_groups, names[:sample], hashes[:sample], 4)
    _, t_brute = timed(lambda h: sum(int((np.bitwise_count(h[i:i + 500, None] ^ h[None, :]) <= 4).sum())
                                     for i in range(0, len(h), 500)), hashes[:sample])
    print(f"near-duplicate groups (distance <= 4) of {n:,} hashes: {t_groups:.2f} s, {n - len(set(groups.values())):,} images merged")
    print(f"  on {sample:,}: band LSH {t_lsh_sample:.2f} s vs brute-force pairs {t_brute:.2f} s "
          f"({t_brute / t_lsh_sample:.1f} x; brute force grows with n^2, {(n / sample) ** 2:.0f}x more at {n:,})")
    return 0 if identical and all_same else 1
