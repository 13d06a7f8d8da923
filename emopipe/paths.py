"""Where emopipe keeps its outputs: `data/` in the project folder, or EMOPIPE_DATA_DIR."""

import os
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    """The root of every output, not created: for readers that must leave a fresh machine as it is."""
    return Path(os.environ.get("EMOPIPE_DATA_DIR") or PROJECT_DIR / "data").resolve()


def data_dir() -> Path:
    """The root of every output; created on first use."""
    root = data_root()
    root.mkdir(parents=True, exist_ok=True)
    return root


def db_path(create_dir: bool = True) -> Path:
    return (data_dir() if create_dir else data_root()) / "emopipe.duckdb"


def sources_dir(dataset: str) -> Path:
    """A dataset's downloads and extracted archives: <data dir>/sources/<dataset> (not created)."""
    return data_root() / "sources" / dataset


def objects_dir() -> Path:
    """Content-addressed store of raw image bytes: objects/<id[:2]>/<id>."""
    return data_dir() / "objects"


def object_path(image_id: str, root: Path | None = None) -> Path:
    return (root or objects_dir()) / image_id[:2] / image_id
