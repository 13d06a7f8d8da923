"""Where emopipe keeps its outputs: `data/` in the project folder, or EMOPIPE_DATA_DIR."""

import os
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The root of every output; created on first use."""
    root = Path(os.environ.get("EMOPIPE_DATA_DIR") or PROJECT_DIR / "data").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def db_path() -> Path:
    return data_dir() / "emopipe.duckdb"


def objects_dir() -> Path:
    """Content-addressed store of raw image bytes: objects/<id[:2]>/<id>."""
    return data_dir() / "objects"


def object_path(image_id: str, root: Path | None = None) -> Path:
    return (root or objects_dir()) / image_id[:2] / image_id
