"""The four studies end to end on tiny fixtures in their releases' layouts: each built-in experiment, with
only its size knobs shrunk (no pretrained download, small images, 1 epoch), runs from raw files to its
evaluation rows and reference table."""

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import duckdb
import numpy as np
import pytest
import scipy.io
import yaml

from test_dataset_formats import held_out_person, image_entry, struct_array, train_person

from emopipe.catalog import BUILTIN_CATALOG
from emopipe.core.sources.emotion6 import EMOTION6_HEADER
from emopipe.core.sources.webemo import WEBEMO_HIERARCHY
from emopipe.core.synthetic import MIKELS, render, synthetic_listing

pytestmark = pytest.mark.slow  # every study experiment end to end in subprocesses

SHRUNK = {"pretrained": "none", "epochs": 1, "batch_size": 16, "compile": False, "explain_per_class": 0}
SIZES = {"emoset_vit": 32, "fi_resnet32": 32, "fi_probe32": 32, "fi_probe32_lr1e4": 32, "fi_fractalnet32": 32,
         "emotic_bbox_vad": 64, **{f"webemo_sadness_{m}": 64 for m in ("b0", "b2", "s", "xception", "xception_scratch")},
         "emotion6_va": 32, "emotion6_distribution": 32}


def images(n_per_class: int, seed: int):
    """Synthetic JPEG/PNG bytes per Mikels class (the demo generator; a few carry text)."""
    out = {c: [] for c in MIKELS}
    for uri, label, _ in synthetic_listing(n_per_class, seed):
        out[label].append(render(uri))
    return out


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_emoset(root: Path) -> None:
    parts = {"train": [], "val": [], "test": []}
    for emotion, blobs in images(6, 11).items():
        for n, data in enumerate(blobs):
            name = f"{emotion}_{n:05d}"
            write(root / "image" / emotion / f"{name}.jpg", data)
            part = "train" if n < 4 else ("val" if n == 4 else "test")
            parts[part].append([emotion, name, f"image/{emotion}/{name}.jpg", f"annotation/{emotion}/{name}.json"])
    (root / "info.json").write_text(json.dumps({"emotion": {"label2idx": {c: i for i, c in enumerate(MIKELS)}}}))
    for part, listing in parts.items():
        (root / f"{part}.json").write_text(json.dumps(listing))


def make_fi(root: Path) -> None:
    for emotion, blobs in images(10, 12).items():
        for n, data in enumerate(blobs):
            write(root / emotion / f"{emotion}_{n}.jpg", data)


def make_emotic(root: Path) -> Path:
    """Annotations.mat in the release's struct layout (helpers shared with test_dataset_formats)."""
    blobs = [b for bs in images(2, 13).values() for b in bs]
    rng = np.random.default_rng(0)

    def box():
        return [int(rng.integers(0, 200)), int(rng.integers(0, 150)), int(rng.integers(300, 640)), int(rng.integers(250, 480))]

    def vad():
        return [float(v) for v in rng.integers(1, 11, 3)]

    def entry(i, persons):
        write(root / "emotic" / "mscoco" / "images" / f"img{i}.jpg", blobs[i])
        return image_entry(f"img{i}.jpg", "mscoco/images", persons)

    train = [entry(i, [train_person(box(), vad(), ["Peace"])]) for i in range(10)]
    train.append(entry(10, [train_person(box(), vad(), ["Peace"]), train_person(box(), vad(), ["Fatigue"])]))
    held = {part: [entry(i, [held_out_person(box(), [vad(), vad()], ["Fear"])]) for i in ids]
            for part, ids in (("val", range(11, 13)), ("test", range(13, 16)))}
    path = root / "Annotations" / "Annotations.mat"
    path.parent.mkdir(parents=True)
    scipy.io.savemat(path, {"train": struct_array(train), "val": struct_array(held["val"]), "test": struct_array(held["test"])})
    return path


def make_emotion6(root: Path) -> None:
    """images/<emotion>/<n>.jpg and ground_truth.txt in the release's format (vote shares, neutral included)."""
    blobs = [b for bs in images(5, 16).values() for b in bs]
    rng = np.random.default_rng(16)
    rows = []
    for c, emotion in enumerate(["anger", "disgust", "fear", "joy", "sadness", "surprise"]):
        for n in range(1, 7):
            write(root / "images" / emotion / f"{n}.jpg", blobs[6 * c + n - 1])
            votes = rng.multinomial(6, np.ones(7) / 7)
            votes[c] += 9
            rows.append([f"{emotion}/{n}.jpg", *(f"{v:.2f}" for v in rng.uniform(1, 9, 2)), *(f"{v / 15:g}" for v in votes)])
    write(root / "ground_truth.txt", "\n".join("\t".join(r) for r in [list(EMOTION6_HEADER), *rows]).encode() + b"\n")


class Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    make_emoset(root / "EmoSet-118K")
    make_fi(root / "FI")
    annotations = make_emotic(root / "EMOTIC")
    blobs = [b for bs in images(2, 14).values() for b in bs]
    for i, c in enumerate(["anger", "fear", "joy", "love", "sadness", "surprise"]):
        for k in range(2):
            write(root / "UnBiasedEmo" / "images" / c / f"{c}{k}.jpg", blobs[2 * i + k])
    make_emotion6(root / "Emotion6")
    # WEBEmo: URL lists of images served by a real HTTP server on 127.0.0.1.
    web = root / "web"
    index = {fine: i for i, (fine, _, _) in enumerate(WEBEMO_HIERARCHY)}
    fine = [f for f, _, _ in WEBEMO_HIERARCHY]
    blobs = [b for bs in images(6, 15).values() for b in bs]
    handler = lambda *a, **k: Files(*a, directory=str(web), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    lines = {"train25.txt": [], "test25.txt": []}
    for i, data in enumerate(blobs):
        write(web / f"{i}.jpg", data)
        label = "sadness" if i % 2 else fine[i % len(fine)]
        lines["train25.txt" if i < 38 else "test25.txt"].append(f"http://127.0.0.1:{server.server_port}/{i}.jpg {index[label]}")
    for name, rows in lines.items():
        write(root / "WEBEmo" / name, ("\n".join(rows) + "\n").encode())

    builtin = yaml.safe_load(BUILTIN_CATALOG.read_text())
    paths = {"emoset": {"path": str(root / "EmoSet-118K")}, "fi": {"path": str(root / "FI")},
             "emotic": {"path": str(root / "EMOTIC" / "emotic"), "labels": str(annotations)},
             "webemo": {"path": str(root / "WEBEmo")}, "unbiasedemo": {"path": str(root / "UnBiasedEmo" / "images")},
             "emotion6": {"path": str(root / "Emotion6")}}
    catalog = {"datasets": {n: {**builtin["datasets"][n], **p} for n, p in paths.items()},
               "experiments": {n: {**builtin["experiments"][n], **SHRUNK, "image_size": s} for n, s in SIZES.items()}}
    (root / "catalog.yaml").write_text(yaml.safe_dump(catalog))
    env = {**os.environ, "EMOPIPE_CATALOG": str(root / "catalog.yaml"), "EMOPIPE_DATA_DIR": str(root / "data"),
           "DAGSTER_HOME": str(root)}
    yield root, env
    server.shutdown()


@pytest.mark.parametrize("experiment", list(SIZES))
def test_study_runs_end_to_end(studies, experiment):
    root, env = studies
    run = subprocess.run([sys.executable, "-m", "emopipe.cli", "run", experiment], env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    if yaml.safe_load(BUILTIN_CATALOG.read_text())["experiments"][experiment].get("reference"):
        assert "| reference | difference |" in run.stdout  # the comparison with the published number
    with duckdb.connect(str(root / "data" / "emopipe.duckdb"), read_only=True) as conn:
        rows = conn.execute("SELECT dataset, part, metric FROM metrics WHERE experiment = ? AND class IS NULL", [experiment]).fetchall()
    metric = "mse" if experiment in ("emotic_bbox_vad", "emotion6_va") else "accuracy"
    assert (experiment.split("_")[0], "test", metric) in rows
    if experiment == "emotion6_distribution":  # the distribution metrics beside the accuracy against the folder
        assert {("emotion6", "test", m) for m in ("kl_divergence", "bhattacharyya", "cosine_similarity", "top1_argmax")} <= set(rows)
    if experiment.startswith("webemo"):  # cross-dataset tests, mapped to sadness vs others
        assert {("unbiasedemo", "test", "accuracy"), ("emotion6", "test", "accuracy")} <= set(rows)
    if experiment.startswith("fi_probe32"):  # the study's 3-layer softmax head on frozen features
        import torch

        from emopipe.core.trained_model import load_checkpoint

        with duckdb.connect(str(root / "data" / "emopipe.duckdb"), read_only=True) as conn:
            (checkpoint,) = conn.execute("SELECT checkpoint_path FROM models WHERE experiment = ?", [experiment]).fetchone()
        model, _ = load_checkpoint(checkpoint)
        assert sum(isinstance(m, torch.nn.Linear) for m in model.head.modules()) == 3
    if experiment == "emotic_bbox_vad":
        with duckdb.connect(str(root / "data" / "emopipe.duckdb"), read_only=True) as conn:
            reasons = conn.execute("SELECT reason FROM rejected WHERE dataset = 'emotic'").fetchall()
            groups = conn.execute("SELECT class FROM metrics WHERE experiment = ? AND part = 'test' AND metric = 'mse' "
                                  "AND class IN ('box', 'vad')", [experiment]).fetchall()
        assert reasons == [("multiple_persons",)]
        assert sorted(groups) == [("box",), ("vad",)]  # the study's box MSE and VAD MSE, beside the total
