"""The heatmaps `explanations` wrote, recorded with what they were made from, so that a run with the same
model, test images and settings reuses them instead of running Integrated Gradients again (minutes on a
CPU). Torch-free: deciding to reuse costs no model load."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from emopipe.atomic import atomic_write
from emopipe.fingerprint import params_hash, sha256_bytes, sha256_file

MANIFEST = "heatmaps.json"
# Bump when the heatmaps' computation or drawing changes: stored ones made by the older code are redrawn.
HEATMAPS_VERSION = 2


@dataclass(frozen=True)
class Heatmap:
    label: str
    image_id: str
    file: str  # name inside the heatmaps folder
    sha256: str


def heatmaps_key(*, model_id: str, split_id: str, test_ids: Sequence[str], per_class: int) -> str:
    """What the chosen images and their heatmaps depend on: the model, its split's test images, how many per class."""
    return params_hash({"model_id": model_id, "split_id": split_id, "test_ids": sorted(test_ids), "per_class": per_class,
                        "version": HEATMAPS_VERSION})


def stored_heatmaps(folder: Path, key: str) -> list[Heatmap] | None:
    """The heatmaps recorded in `folder` for `key`, if every file is still there with its bytes; else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("key") != key:
        return None
    heatmaps = [Heatmap(**entry) for entry in manifest["heatmaps"]]
    if not all((folder / h.file).is_file() and sha256_file(folder / h.file) == h.sha256 for h in heatmaps):
        return None
    return heatmaps


def write_heatmaps(folder: Path, key: str, pngs: Sequence[tuple[str, str, bytes]]) -> list[Heatmap]:
    """Write (label, image_id, png) as `<label>-<image_id[:12]>.png` and the manifest that records them under key
    (written last: an interrupted write leaves no manifest that names missing files)."""
    folder.mkdir(parents=True, exist_ok=True)
    heatmaps = []
    for label, image_id, png in pngs:
        name = f"{label}-{image_id[:12]}.png"
        atomic_write(folder / name, lambda f, data=png: f.write(data))
        heatmaps.append(Heatmap(label, image_id, name, sha256_bytes(png)))
    manifest = json.dumps({"key": key, "heatmaps": [asdict(h) for h in heatmaps]}, indent=1).encode()
    atomic_write(folder / MANIFEST, lambda f: f.write(manifest))
    return heatmaps
