"""emoset (EmoSet-118K, github.com/JingyuanYY/EmoSet README "File Structure"): `path` holds info.json
(label2idx per attribute; `emotion` gives the 8 classes), train.json / val.json / test.json (lists of
[emotion, image_id, "image/<emotion>/<id>.jpg", "annotation/<emotion>/<id>.json"]), image/ and
annotation/. The official part becomes the attribute `split`; the annotation JSON's scalar attributes
(brightness, colorfulness, scene, facial_expression, human_action) and its `object` list (joined with
';') are kept as attributes."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from emopipe.core.download import SourceError
from emopipe.core.sources.items import DatasetRoot, SourceItem, outside

EMOSET_SCALARS = ("brightness", "colorfulness", "scene", "facial_expression", "human_action")


def emoset_items(root: Path, where: str) -> list[SourceItem]:
    """EmoSet-118K's official parts from train/val/test.json, labels checked against info.json."""
    if not root.is_dir():
        raise SourceError(f"{where}: the folder {root} does not exist; expected EmoSet-118K's data_root (info.json, train.json, image/...)")
    info = _read_json(root / "info.json", "EmoSet's info.json (label2idx per attribute)")
    try:
        emotions = set(info["emotion"]["label2idx"])
    except (KeyError, TypeError):
        raise SourceError(f"{root / 'info.json'}: no emotion.label2idx mapping") from None
    rows, escaped = [], []
    dataset_root = DatasetRoot(root)
    for part in ("train", "val", "test"):
        entries = _read_json(root / f"{part}.json", f"EmoSet's {part} list [[emotion, id, image path, annotation path], ...]")
        for n, entry in enumerate(entries):
            # The release has [emotion, id, image, annotation]; some re-packs drop the id.
            if not isinstance(entry, list) or len(entry) not in (3, 4) or not all(isinstance(x, str) for x in entry):
                raise SourceError(f"{root / f'{part}.json'}: entry {n} is {entry!r}; expected [emotion, id, image path, annotation path]")
            emotion, image, annotation = entry[0], entry[-2], entry[-1]
            if emotion not in emotions:
                raise SourceError(f"{root / f'{part}.json'}: entry {n} has emotion {emotion!r}, not in info.json ({', '.join(sorted(emotions))})")
            name = entry[1] if len(entry) == 4 else Path(image).stem
            uri, annotation_path = dataset_root.join(image), dataset_root.join(annotation)
            if not dataset_root.holds(uri):
                escaped.append(outside(uri, image))
                continue
            # An annotation outside the dataset is not read: the image keeps only its label and part.
            rows.append((uri, emotion, part, name, annotation_path if dataset_root.holds(annotation_path) else None))
    with ThreadPoolExecutor(max_workers=8) as pool:
        annotations = list(pool.map(_emoset_annotation, (r[4] for r in rows)))
    items, seen = [], set()
    for (uri, emotion, part, name, _), extra in zip(rows, annotations):
        if uri in seen:
            raise SourceError(f"{root}: {uri} is listed twice in train/val/test.json")
        seen.add(uri)
        items.append(SourceItem(uri, emotion, {"split": part, "emoset_id": name, **extra}))
    return items + list({r.uri: r for r in escaped}.values())


def _emoset_annotation(path: str | None) -> dict:
    """The annotation's scalar attributes; a missing or unreadable file only loses them."""
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    out = {k: data[k] for k in EMOSET_SCALARS if isinstance(data.get(k), (str, int, float))}
    if isinstance(data.get("object"), list):
        out["object"] = ";".join(map(str, data["object"]))
    return out


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{path}: does not exist; expected {what}") from None
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: cannot read {what}: {e}") from None
