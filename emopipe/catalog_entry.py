"""Reading a catalog file: the YAML document, entry names, and each entry's values checked one by one, every
mistake a CatalogError that names the file, the key and the allowed values (emopipe/catalog.py builds the
specs from them)."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import yaml

from emopipe.errors import UserError


class CatalogError(UserError):
    """A user mistake in a catalog file: the message names file, key and allowed values."""


NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def did_you_mean(word, known) -> str:
    """" (did you mean 'epochs'?)" for the closest known name, or nothing."""
    close = difflib.get_close_matches(str(word), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_catalog_file(file: Path) -> dict:
    try:
        text = Path(file).read_text()
    except OSError as e:
        raise CatalogError(f"{file}: cannot read the catalog file ({e.strerror}); set EMOPIPE_CATALOG to an existing YAML file") from None
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise CatalogError(f"{file}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise CatalogError(f"{file}: top level must be a mapping with 'datasets' and/or 'experiments'")
    unknown = set(doc) - {"datasets", "experiments"}
    if unknown:
        raise CatalogError(f"{file}: unknown top-level key(s) {sorted(unknown)}; allowed: datasets, experiments")
    return doc


def check_name(file, key, name):
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise CatalogError(f"{file}: {key}: names may use letters, digits, '_', '-', '.' only")


class CatalogEntry:
    """Reads one catalog entry, turning every mistake into a CatalogError with file and key."""

    def __init__(self, file: Path, key: str, entry: dict, allowed: set[str]):
        self.file, self.key, self.entry = file, key, entry
        unknown = sorted(set(map(str, entry)) - allowed)
        if unknown:
            self.fail(f"unknown key(s) {unknown}{did_you_mean(unknown[0], allowed)}", allowed=sorted(allowed))

    def fail(self, message: str, sub: str | None = None, allowed=None):
        key = f"{self.key}.{sub}" if sub else self.key
        hint = f"; allowed: {', '.join(map(str, allowed))}" if allowed is not None else ""
        raise CatalogError(f"{self.file}: {key}: {message}{hint}")

    def get(self, name, kind, default=None, choices=None, required=False):
        if name not in self.entry or self.entry[name] is None:
            if required:
                self.fail("is required", name, choices)
            return default
        value = self.entry[name]
        if kind is float and isinstance(value, str) and NUMBER.fullmatch(value.strip()):
            # YAML 1.1 (PyYAML) reads 1e-4 as a string: it wants a dot (1.0e-4). Writers mean a number.
            value = float(value)
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            self.fail(f"expected {names}, got {value!r}", name, choices)
        if choices is not None and value not in choices:
            self.fail(f"{value!r} is not allowed{did_you_mean(value, choices)}", name, choices)
        return value

    def str_list(self, name) -> tuple[str, ...]:
        value = self.entry.get(name) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(f"expected a list of names, got {value!r}", name)
        return tuple(value)

    def str_map(self, name, value=None) -> dict[str, str]:
        value = self.entry.get(name) if value is None else value
        if not value:
            return {}
        if not isinstance(value, dict):
            self.fail(f"expected a mapping label -> class, got {value!r}", name)
        return {str(k): str(v) for k, v in value.items()}
