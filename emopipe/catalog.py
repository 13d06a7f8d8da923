"""The dataset/experiment catalog: the built-in `catalog.yaml`, with EMOPIPE_CATALOG merged over it.

Every entry is validated when the catalog loads; a mistake raises CatalogError naming the file,
the key and the allowed values, so `dagster definitions validate` shows it without a traceback.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from emopipe.catalog_entry import CatalogEntry, CatalogError, check_name, did_you_mean, read_catalog_file

BUILTIN_CATALOG = Path(__file__).with_name("catalog.yaml")

SOURCES = ("synthetic", "folder", "archive", "url_list", "emoset", "parquet", "emotic", "webemo", "emotion6")
SPLIT_SCHEMES = ("70/15/15", "80/10/10", "official", "a/b/c summing to 100")
MODES = ("finetune", "linear_probe")
TASKS = ("classification", "regression")
OPTIMIZERS = ("adamw", "sgd", "adagrad")
# OCR engines of the text filter (emopipe/core/text_engines). ppocr is the default: on the captioned-photo set
# (`python -m emopipe.bench ocr --quality`, figures in the README) it finds as many captions as EasyOCR with
# about a tenth of EasyOCR's fp32 CPU time; why its input sizes and min_confidence: emopipe/core/text_engines/ppocr.py.
TEXT_ENGINES = ("ppocr", "easyocr")
DEFAULT_TEXT_ENGINE = "ppocr"
# An engine's min_confidence where text_thresholds sets none: recognizers differ in how sure they are of the
# same text. EasyOCR reads real text at 0.2-0.4 often; PP-OCR reads textures as short words at 0.2-0.4.
ENGINE_MIN_CONFIDENCE = {"ppocr": 0.4, "easyocr": 0.2}
SCHEDULES = ("cosine", "plateau", "none")
PRETRAINED_KINDS = ("none", "timm", "efficientnet_lite0", "a path to a weights file")


@dataclass(frozen=True)
class TextThresholds:
    """When an image counts as containing text (see README, 'Text filter')."""

    min_confidence: float | None = None  # None: the engine's (ENGINE_MIN_CONFIDENCE)
    min_area: float = 0.001  # fraction of the image covered by boxes that pass min_confidence
    min_chars: int = 2  # ASCII letters and digits in the boxes that pass

    def for_engine(self, engine: str) -> TextThresholds:
        """These thresholds with the engine's min_confidence where none is set (what decisions and their
        params_hash use, so the hash holds the number, not None)."""
        return self if self.min_confidence is not None else replace(self, min_confidence=ENGINE_MIN_CONFIDENCE[engine])

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class DataFile:
    location: str  # a local path (relative: to the catalog file's folder) or an http(s) URL
    sha256: str | None = None  # checks the file when given


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    source: str
    path: str | None = None  # folder: root folder (class-per-subfolder or manifest-relative paths);
    # emoset: EmoSet-118K's data_root; emotic: the image root; webemo: the folder of train25.txt/test25.txt;
    # emotion6: the folder holding images/ and ground_truth.txt
    labels: str | None = None  # folder/archive: CSV manifest path,label[,attrs]; url_list: CSV url,label[,attrs];
    # emotic: Annotations.mat, a converted CSV or a folder of them (relative to path)
    files: tuple[DataFile, ...] = ()  # parquet: the Parquet files
    image_column: str = "image"  # parquet: the image bytes (Hugging Face Image struct or binary)
    label_column: str = "label"  # parquet: the label (int with class names, or string)
    url: str | None = None  # archive: http(s) URL; url_list: URL of the CSV (or use `labels`)
    sha256: str | None = None  # archive: required checksum of the archive
    classes: tuple[str, ...] | None = None  # fixes class order; labels outside it are rejected
    class_map: dict[str, str] = field(default_factory=dict)  # raw label -> class ('*' = every other)
    split_column: str = "split"  # attribute holding the official part (train/val/test)
    max_image_bytes: int = 64 << 20  # one image file or download larger than this is rejected as too_large
    retry_failed_urls: bool = False  # url_list: download again the URLs that failed for good last time
    n_per_class: int = 100  # synthetic only
    seed: int = 0  # synthetic only
    text_thresholds: TextThresholds | None = None
    text_engine: str | None = None  # None: DEFAULT_TEXT_ENGINE (an experiment's own key wins)
    description: str = ""
    origin: str = ""  # the catalog file that defined it


@dataclass(frozen=True)
class EvalDataset:
    dataset: str
    class_map: dict[str, str] = field(default_factory=dict)  # that dataset's label -> our class


@dataclass(frozen=True)
class TuneSpec:
    """Population-based training (Ray Tune) of lr, weight_decay and batch_size before trained_model."""

    population: int = 4  # trials trained side by side
    perturbation_interval: int = 2  # epochs between exploit/explore steps
    epochs: int = 8  # epochs per trial
    quantile_fraction: float = 0.25  # bottom fraction copies the top fraction


@dataclass(frozen=True)
class Reference:
    metric: str
    value: float
    source: str = ""


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    dataset: str
    eval_datasets: tuple[EvalDataset, ...] = ()
    image_size: int = 224
    text_filter: bool = True
    text_thresholds: TextThresholds | None = None  # None: the dataset's, else the defaults
    text_engine: str | None = None  # None: the dataset's, else DEFAULT_TEXT_ENGINE
    split: str = "70/15/15"
    seed: int = 0
    model: str = "tf_efficientnet_lite0"
    pretrained: str = "efficientnet_lite0"
    mode: str = "finetune"
    task: str = "classification"
    targets: tuple[str, ...] = ()  # regression: attribute columns to predict
    soft_labels: tuple[str, ...] = ()  # classification: per-class vote-share attribute columns
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    schedule: str = "cosine"
    patience: int = 5  # early stopping: epochs without validation improvement
    head_hidden: int | tuple[int, ...] = 256  # linear_probe: hidden width(s) of the MLP head; [256, 128] = 3 layers
    compile: bool = False  # torch.compile on CUDA
    augment: bool = True  # random resized crop + horizontal flip on the device
    gpus: int = 1  # >1: DistributedDataParallel over that many processes per node (torchrun)
    nodes: int = 1  # >1: torchrun across machines (see README, "Scale-out")
    tune: TuneSpec | None = None  # population-based training before trained_model; None = off
    explain_per_class: int = 1  # Integrated-Gradients heatmaps per class in `explanations`; 0 = off
    reference: Reference | None = None
    retrain: str | None = None  # cron string for scheduled retraining; None = off
    description: str = ""
    origin: str = ""
    # Set by the `seeds` expansion (not catalog keys): the experiment the seed partitions came from, and the
    # seed of its split, which is the first seed's for every partition (same split, other training seeds).
    seed_group: str | None = None
    split_seed: int | None = None

    @property
    def seed_of_split(self) -> int:
        """The split's seed: `seed` (split and training seed) unless a `seeds` expansion pinned it."""
        return self.seed if self.split_seed is None else self.split_seed

    @property
    def datasets(self) -> tuple[str, ...]:
        """The training dataset first, then the cross-dataset test sets."""
        return (self.dataset, *(e.dataset for e in self.eval_datasets))

    @property
    def split_ratios(self) -> tuple[int, int, int] | None:
        """(train, val, test) percentages, or None for the official split."""
        return None if self.split == "official" else tuple(int(p) for p in self.split.split("/"))


@dataclass(frozen=True)
class Catalog:
    datasets: dict[str, DatasetSpec]
    experiments: dict[str, ExperimentSpec]
    files: tuple[str, ...]

    def experiment(self, name: str) -> ExperimentSpec:
        if name not in self.experiments:
            raise CatalogError(f"unknown experiment {name!r}{did_you_mean(name, self.experiments)}; "
                               f"known: {', '.join(sorted(self.experiments))}")
        return self.experiments[name]

    def dataset(self, name: str) -> DatasetSpec:
        return self.datasets[name]

    def thresholds(self, exp: ExperimentSpec) -> TextThresholds:
        """The experiment's text_thresholds, else its dataset's, else the defaults, for its text engine."""
        chosen = exp.text_thresholds or self.datasets[exp.dataset].text_thresholds or TextThresholds()
        return chosen.for_engine(self.text_engine(exp))

    def text_engine(self, exp: ExperimentSpec) -> str:
        return exp.text_engine or self.datasets[exp.dataset].text_engine or DEFAULT_TEXT_ENGINE

    def image_sizes(self) -> list[int]:
        """32 and 224 are always built (32 feeds near-duplicate hashing, 224 feeds OCR)."""
        return sorted({32, 224, *(e.image_size for e in self.experiments.values())})


def load_catalog(path: str | os.PathLike | None = None) -> Catalog:
    """The built-in catalog with `path` (default: $EMOPIPE_CATALOG) merged over it, validated."""
    files = [BUILTIN_CATALOG]
    user = path if path is not None else os.environ.get("EMOPIPE_CATALOG")
    if user:
        files.append(Path(user))
    raw_datasets: dict[str, tuple[dict, Path]] = {}
    raw_experiments: dict[str, tuple[dict, Path]] = {}
    for file in files:
        doc = read_catalog_file(file)
        for section, target in (("datasets", raw_datasets), ("experiments", raw_experiments)):
            entries = doc.get(section) or {}
            if not isinstance(entries, dict):
                raise CatalogError(f"{file}: {section}: expected a mapping of name -> entry")
            for name, entry in entries.items():
                if not isinstance(entry, dict):
                    raise CatalogError(f"{file}: {section}.{name}: expected a mapping of keys")
                check_name(file, f"{section}.{name}", name)
                target[str(name)] = (entry, file)
    datasets = {n: _dataset(n, e, f) for n, (e, f) in raw_datasets.items()}
    experiments = {spec.name: spec for n, (e, f) in raw_experiments.items()
                   for spec in seed_partitions(_experiment(n, e, f, datasets), _seeds(n, e, f))}
    return Catalog(datasets, experiments, tuple(str(f) for f in files))


def _thresholds(e: CatalogEntry, name: str = "text_thresholds") -> TextThresholds | None:
    """The entry's `text_thresholds` mapping (or None), each value checked."""
    value = e.entry.get(name)
    if value is None:
        return None
    allowed = {f.name for f in fields(TextThresholds)}
    sub = CatalogEntry(e.file, f"{e.key}.{name}", value if isinstance(value, dict) else {}, allowed)
    if not isinstance(value, dict):
        sub.fail("expected a mapping", allowed=sorted(allowed))
    return TextThresholds(
        min_confidence=sub.get("min_confidence", float, TextThresholds.min_confidence),
        min_area=sub.get("min_area", float, TextThresholds.min_area),
        min_chars=sub.get("min_chars", int, TextThresholds.min_chars),
    )


DATASET_KEYS = {f.name for f in fields(DatasetSpec)} - {"name", "origin"}
SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def _data_files(e: CatalogEntry) -> tuple[DataFile, ...]:
    value = e.entry.get("files") or []
    if not isinstance(value, list):
        value = [value]
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            item = {"url" if re.match(r"https?://", item) else "path": item}
        if not isinstance(item, dict):
            e.fail(f"entry {i}: expected a path, a URL or {{url|path: ..., sha256: ...}}", "files")
        sub = CatalogEntry(e.file, f"{e.key}.files[{i}]", item, {"url", "path", "sha256"})
        url, path, sha256 = sub.get("url", str), sub.get("path", str), sub.get("sha256", str)
        if bool(url) == bool(path):
            sub.fail("give exactly one of 'url' (http(s)) or 'path'")
        if url and not re.match(r"https?://", url):
            sub.fail(f"{url!r} is not an http(s) URL", "url")
        if sha256 is not None and not SHA256.fullmatch(sha256):
            sub.fail("expected the file's 64-hex-digit checksum", "sha256")
        out.append(DataFile(url or path, sha256))
    return tuple(out)


def _dataset(name: str, entry: dict, file: Path) -> DatasetSpec:
    e = CatalogEntry(file, f"datasets.{name}", entry, DATASET_KEYS)
    source = e.get("source", str, choices=SOURCES, required=True)
    spec = DatasetSpec(
        name=name,
        source=source,
        path=e.get("path", str),
        labels=e.get("labels", str),
        files=_data_files(e),
        image_column=e.get("image_column", str, "image"),
        label_column=e.get("label_column", str, "label"),
        url=e.get("url", str),
        sha256=e.get("sha256", str),
        classes=e.str_list("classes") or None,
        class_map=e.str_map("class_map"),
        split_column=e.get("split_column", str, "split"),
        max_image_bytes=e.get("max_image_bytes", int, DatasetSpec.max_image_bytes),
        retry_failed_urls=e.get("retry_failed_urls", bool, False),
        n_per_class=e.get("n_per_class", int, 100),
        seed=e.get("seed", int, 0),
        text_thresholds=_thresholds(e),
        text_engine=e.get("text_engine", str, None, TEXT_ENGINES),
        description=e.get("description", str, ""),
        origin=str(file),
    )
    if source == "folder" and not spec.path:
        e.fail("a folder dataset needs 'path' (class-per-subfolder root, or the root its manifest paths are relative to)", "path")
    # Paths are checked when the dataset is read, so the built-in study entries load on any machine.
    needs_path = {"emoset": "EmoSet-118K's folder (info.json, train.json, image/, annotation/)",
                  "emotic": "EMOTIC's image root (ade20k/, emodb_small/, framesdb/, mscoco/)",
                  "webemo": "the folder holding WEBEmo's train25.txt and test25.txt",
                  "emotion6": "the Emotion6 folder holding images/ and ground_truth.txt"}
    if source in needs_path and not spec.path:
        e.fail(f"source {source} needs 'path': {needs_path[source]}", "path")
    if source == "emotic" and not spec.labels:
        e.fail("an emotic dataset needs 'labels': Annotations.mat, a converted CSV, or a folder of train/val/test CSVs", "labels")
    if source == "parquet" and not spec.files:
        e.fail("a parquet dataset needs 'files': Parquet paths or http(s) URLs (optionally {url: ..., sha256: ...})", "files")
    if source == "archive":
        if not spec.url or not re.match(r"https?://", spec.url):
            e.fail("an archive dataset needs an http(s) 'url' of a .zip, .tar or .tar.gz", "url")
        if not spec.sha256 or not SHA256.fullmatch(spec.sha256):
            e.fail("an archive dataset needs 'sha256': the archive's 64-hex-digit checksum", "sha256")
    if source == "url_list":
        where = spec.labels or spec.url
        if not where:
            e.fail("a url_list dataset needs 'labels' (a local CSV url,label[,...]) or 'url' (the CSV's http(s) URL)", "labels")
    if spec.n_per_class < 1:
        e.fail("must be at least 1", "n_per_class")
    if spec.max_image_bytes < 1:
        e.fail("must be a positive number of bytes", "max_image_bytes", ["67108864 (64 MiB, the default)"])
    return spec


EXPERIMENT_KEYS = {f.name for f in fields(ExperimentSpec)} - {"name", "origin", "seed_group", "split_seed"} | {"seeds"}
# `name@seed<N>`: '@' is not allowed in catalog names, so a seed partition never takes an experiment's name,
# and Dagster allows it in partition keys (it refuses only '|', ',', '[', ']' and control characters).
SEED_PARTITION_SEPARATOR = "@seed"


def seed_partition_name(experiment: str, seed: int, first_seed: int) -> str:
    """The first seed keeps the experiment's own name (its partition and history stay as they were)."""
    return experiment if seed == first_seed else f"{experiment}{SEED_PARTITION_SEPARATOR}{seed}"


def _seeds(name: str, entry: dict, file: Path) -> tuple[int, ...]:
    """The `seeds` list, checked: distinct non-negative integers, and not together with `seed`."""
    value = entry.get("seeds")
    if value is None:
        return ()
    e = CatalogEntry(file, f"experiments.{name}", {}, set())
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
        e.fail(f"expected a non-empty list of non-negative integers, got {value!r}", "seeds", ["[0, 1, 2]"])
    if len(set(value)) != len(value):
        e.fail(f"{value!r} repeats a seed", "seeds")
    if entry.get("seed") is not None:
        e.fail("give either seed (one training) or seeds (one partition per training seed, all on the first seed's split)", "seeds")
    return tuple(value)


def seed_partitions(spec: ExperimentSpec, seeds: tuple[int, ...]) -> list[ExperimentSpec]:
    """One experiment per training seed (one partition each), all split with the first seed; [spec] without seeds."""
    if not seeds:
        return [spec]
    return [replace(spec, name=seed_partition_name(spec.name, seed, seeds[0]), seed=seed,
                                seed_group=spec.name, split_seed=seeds[0]) for seed in seeds]


def _head_hidden(e: CatalogEntry) -> int | tuple[int, ...]:
    value = e.entry.get("head_hidden", 256)
    widths = value if isinstance(value, list) else [value]
    if not widths or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
        e.fail(f"expected a width or a list of widths, got {value!r}", "head_hidden", ["256", "[256, 128]"])
    return value if isinstance(value, int) else tuple(value)


def _experiment(name: str, entry: dict, file: Path, datasets: dict[str, DatasetSpec]) -> ExperimentSpec:
    # Long on purpose: one statement per catalog key, in the order of ExperimentSpec, so a reader checks a
    # key's type, default and allowed values in one place.
    e = CatalogEntry(file, f"experiments.{name}", entry, EXPERIMENT_KEYS)
    dataset = e.get("dataset", str, choices=sorted(datasets), required=True)
    evals = []
    for i, item in enumerate(entry.get("eval_datasets") or []):
        if isinstance(item, str):
            item = {"dataset": item}
        if not isinstance(item, dict):
            e.fail(f"entry {i}: expected a dataset name or {{dataset: NAME, class_map: {{...}}}}", "eval_datasets")
        sub = CatalogEntry(file, f"experiments.{name}.eval_datasets[{i}]", item, {"dataset", "class_map"})
        evals.append(EvalDataset(sub.get("dataset", str, choices=sorted(datasets), required=True), sub.str_map("class_map")))
        if evals[-1].dataset == dataset:
            sub.fail("is the experiment's own dataset; its test part is evaluated already", "dataset")
    split = e.get("split", str, "70/15/15")
    if split != "official":
        parts = split.split("/")
        if len(parts) != 3 or not all(p.isdigit() for p in parts) or sum(map(int, parts)) != 100 or int(parts[0]) == 0:
            e.fail(f"{split!r} is not a split scheme", "split", SPLIT_SCHEMES)
    pretrained = e.get("pretrained", str, "efficientnet_lite0")
    if pretrained not in PRETRAINED_KINDS[:3] and not Path(pretrained).expanduser().exists():
        e.fail(f"{pretrained!r} is neither a known kind nor an existing weights file", "pretrained", PRETRAINED_KINDS)
    ref = entry.get("reference")
    reference = None
    if ref is not None:
        sub = CatalogEntry(file, f"experiments.{name}.reference", ref if isinstance(ref, dict) else {}, {"metric", "value", "source"})
        if not isinstance(ref, dict):
            sub.fail("expected {metric: NAME, value: NUMBER, source: TEXT}")
        reference = Reference(sub.get("metric", str, required=True), sub.get("value", float, required=True), sub.get("source", str, ""))
    tune = None
    if entry.get("tune") is not None:
        raw = entry["tune"] if isinstance(entry["tune"], dict) else {}
        sub = CatalogEntry(file, f"experiments.{name}.tune", raw, {f.name for f in fields(TuneSpec)})
        if not isinstance(entry["tune"], dict):
            sub.fail("expected a mapping", allowed=sorted(f.name for f in fields(TuneSpec)))
        tune = TuneSpec(
            population=sub.get("population", int, TuneSpec.population),
            perturbation_interval=sub.get("perturbation_interval", int, TuneSpec.perturbation_interval),
            epochs=sub.get("epochs", int, TuneSpec.epochs),
            quantile_fraction=sub.get("quantile_fraction", float, TuneSpec.quantile_fraction),
        )
        if tune.population < 2 or tune.perturbation_interval < 1 or tune.epochs < 1:
            sub.fail("population must be at least 2, perturbation_interval and epochs at least 1")
    spec = ExperimentSpec(
        name=name,
        dataset=dataset,
        eval_datasets=tuple(evals),
        image_size=e.get("image_size", int, 224),
        text_filter=e.get("text_filter", bool, True),
        text_thresholds=_thresholds(e),
        text_engine=e.get("text_engine", str, None, TEXT_ENGINES),
        split=split,
        seed=e.get("seed", int, 0),
        model=e.get("model", str, "tf_efficientnet_lite0"),
        pretrained=pretrained,
        mode=e.get("mode", str, "finetune", MODES),
        task=e.get("task", str, "classification", TASKS),
        targets=e.str_list("targets"),
        soft_labels=e.str_list("soft_labels"),
        epochs=e.get("epochs", int, 10),
        batch_size=e.get("batch_size", int, 64),
        optimizer=e.get("optimizer", str, "adamw", OPTIMIZERS),
        lr=e.get("lr", float, 1e-3),
        weight_decay=e.get("weight_decay", float, 0.05),
        label_smoothing=e.get("label_smoothing", float, 0.0),
        schedule=e.get("schedule", str, "cosine", SCHEDULES),
        patience=e.get("patience", int, 5),
        head_hidden=_head_hidden(e),
        compile=e.get("compile", bool, False),
        augment=e.get("augment", bool, True),
        gpus=e.get("gpus", int, 1),
        nodes=e.get("nodes", int, 1),
        tune=tune,
        explain_per_class=e.get("explain_per_class", int, 1),
        reference=reference,
        retrain=e.get("retrain", str),
        description=e.get("description", str, ""),
        origin=str(file),
    )
    if not 8 <= spec.image_size <= 1024:
        e.fail(f"{spec.image_size} is out of range", "image_size", ["8..1024 (32 and 224 are built in)"])
    if spec.gpus < 1 or spec.nodes < 1:
        e.fail("gpus and nodes must be at least 1", "gpus")
    if spec.epochs < 1 or spec.batch_size < 1:
        e.fail("epochs and batch_size must be at least 1", "epochs")
    if spec.task == "regression" and not spec.targets:
        e.fail("a regression experiment names its target attribute columns", "targets")
    if spec.retrain is not None and len(spec.retrain.split()) != 5:
        e.fail(f"{spec.retrain!r} is not a 5-field cron string", "retrain", ['"0 3 * * 1" (Mondays 03:00)'])
    return spec
