"""Shared fixtures: a private data dir and DuckDB file per test, real photos from skimage.data, and the
test catalog (WIRING_CATALOG) that the in-process Dagster tests materialize."""

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emopipe.db import Database
from emopipe_tests.http_server import Server

# Experiments small enough to materialize in this process with dg.materialize. The asset modules read
# the catalog once, when they are first imported, so it is set here, before any test module imports them;
# subprocess tests set EMOPIPE_CATALOG themselves.
WIRING_CATALOG = """
datasets:
  wiring:
    source: synthetic
    n_per_class: 6
    seed: 7
  wiring_copies:
    source: folder
    path: wiring_copies        # beside the catalog file
experiments:
  wiring: &wiring
    dataset: wiring
    image_size: 32
    text_filter: false
    split: 50/25/25
    model: resnet10t
    pretrained: none
    epochs: 2
    batch_size: 8
    explain_per_class: 1
  wiring_tuned:
    <<: *wiring
    explain_per_class: 0
    tune: {population: 2, perturbation_interval: 1, epochs: 2}
  wiring_seeded:               # two partitions: wiring_seeded (seed 0) and wiring_seeded@seed1
    <<: *wiring
    explain_per_class: 0
    seeds: [0, 1]
  wiring_leakage:              # test_leakage.py fills wiring_copies with copies of wiring's images before it runs
    <<: *wiring
    explain_per_class: 0
    eval_datasets: [wiring_copies]
"""
if "EMOPIPE_CATALOG" not in os.environ:
    _catalog = Path(tempfile.mkdtemp(prefix="emopipe-test-catalog-")) / "catalog.yaml"
    _catalog.write_text(WIRING_CATALOG)
    os.environ["EMOPIPE_CATALOG"] = str(_catalog)


@pytest.fixture
def server():
    """A real HTTP server on 127.0.0.1 (emopipe_tests/http_server.py), closed after the test."""
    s = Server()
    yield s
    s.close()


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A fresh EMOPIPE_DATA_DIR, so nothing a test writes lands in the project's data/."""
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("EMOPIPE_DATA_DIR", str(root))
    return root


@pytest.fixture
def db(data_dir):
    return Database(data_dir / "emopipe.duckdb")


def _skimage_photos() -> dict[str, np.ndarray]:
    from skimage import data

    # Only images bundled in the wheel (others would need a download). "text" and "page" show text.
    names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
             "camera", "coins", "moon", "grass", "gravel", "brick", "clock", "text", "page"]
    photos = {}
    for name in names:
        arr = getattr(data, name)()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        photos[name] = np.ascontiguousarray(arr[..., :3]).astype(np.uint8)
    return photos


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real RGB photos (name -> HxWx3 uint8) shipped with scikit-image."""
    return _skimage_photos()


def encode(arr: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="session")
def photo_jpegs(photos) -> dict[str, bytes]:
    return {name: encode(arr, "JPEG", quality=90) for name, arr in photos.items()}
