"""webemo (WEBEmo, Panda et al. ECCV 2018; release files train25.txt / test25.txt: "<url> <index>" per
line, the index into the 25 fine classes in alphabetical order): `path` is the folder holding them.
Label: the fine class; attributes emotion7, polarity (the 25 -> 7 -> 2 hierarchy) and split."""

from __future__ import annotations

from pathlib import Path

from emopipe.core.download import SourceError, is_http_url
from emopipe.core.sources.items import SourceItem, part_from_name

# (fine class, its 7-class parent, polarity) in release index order: train25.txt's label i is row i.
WEBEMO_HIERARCHY = (
    ("affection", "love", "positive"), ("cheerfullness", "joy", "positive"), ("confusion", "confusion", "negative"),
    ("contentment", "joy", "positive"), ("disappointment", "sadness", "negative"), ("disgust", "anger", "negative"),
    ("enthrallment", "joy", "positive"), ("envy", "anger", "negative"), ("exasperation", "anger", "negative"),
    ("gratitude", "love", "positive"), ("horror", "fear", "negative"), ("irritabilty", "anger", "negative"),
    ("lust", "love", "positive"), ("neglect", "sadness", "negative"), ("nervousness", "fear", "negative"),
    ("optimism", "joy", "positive"), ("pride", "joy", "positive"), ("rage", "anger", "negative"),
    ("relief", "joy", "positive"), ("sadness", "sadness", "negative"), ("shame", "sadness", "negative"),
    ("suffering", "sadness", "negative"), ("surprise", "surprise", "positive"), ("sympathy", "sadness", "negative"),
    ("zest", "joy", "positive"),
)
WEBEMO_FILES = ("train25.txt", "test25.txt")


def webemo_class_map(parent: str, other: str = "others") -> dict[str, str]:
    """A class_map from the 25 fine labels: those under the 7-class `parent` -> parent, the rest -> other."""
    parents = {p for _, p, _ in WEBEMO_HIERARCHY}
    if parent not in parents:
        raise ValueError(f"{parent!r} is not a WEBEmo 7-class emotion; known: {', '.join(sorted(parents))}")
    return {**{fine: parent for fine, p, _ in WEBEMO_HIERARCHY if p == parent}, "*": other}


def webemo_items(root: Path, where: str) -> list[SourceItem]:
    """The image URLs of train25.txt / test25.txt with their fine label and its parents."""
    if not root.is_dir():
        raise SourceError(f"{where}.path: the folder {root} does not exist; expected the WEBEmo release files {', '.join(WEBEMO_FILES)}")
    items: dict[str, SourceItem] = {}
    for name in WEBEMO_FILES:
        path = root / name
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise SourceError(f"{path}: does not exist; the WEBEmo release has {' and '.join(WEBEMO_FILES)} ('<url> <label index>' per line)") from None
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2 or not fields[1].isdigit() or int(fields[1]) >= len(WEBEMO_HIERARCHY) or not is_http_url(fields[0]):
                raise SourceError(f"{path}: line {n}: expected '<http(s) url> <label index 0..{len(WEBEMO_HIERARCHY) - 1}>', got {line.strip()!r}")
            fine, parent, polarity = WEBEMO_HIERARCHY[int(fields[1])]
            item = SourceItem(fields[0], fine, {"emotion7": parent, "polarity": polarity, "split": part_from_name(name)})
            if items.setdefault(fields[0], item) != item:
                raise SourceError(f"{path}: line {n}: {fields[0]} is listed again with another label or part")
    return list(items.values())
