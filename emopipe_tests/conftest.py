"""Shared fixtures: a private data dir and DuckDB file per test, and real photos from skimage.data."""

import io

import numpy as np
import pytest
from PIL import Image

from emopipe.db import Database


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
