"""Emotion6 in its release format (images/<emotion>/<n>.jpg + ground_truth.txt) through the real ingest into
DuckDB, its strict checks, the distribution metrics on hand-computed cases, and both protocols (valence/arousal
regression, emotion-distribution prediction) as real tiny trainings, evaluated and verified."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from emopipe.catalog import CatalogError, DatasetSpec, load_catalog
from emopipe.core.dataset_versions import dataset_version, observed_datasets
from emopipe.core.evaluation import distribution_metrics, evaluated_images, evaluation_inputs_key, write_evaluation
from emopipe.core.evaluation_views import headline_markdown
from emopipe.core.filtered_images import filter_images
from emopipe.core.images import build_arrays, default_arrays_root, load_array
from emopipe.core.raw_images import attribute_matrix, ingest_dataset
from emopipe.core.sources import SourceError
from emopipe.core.sources.emotion6 import EMOTION6_CATEGORIES, EMOTION6_HEADER, EMOTION6_PROBABILITIES
from emopipe.core.near_duplicates import near_duplicate_groups
from emopipe.core.splits import make_split
from emopipe.core.trained_model import load_checkpoint, load_training_data, predict, record_model, train_model
from emopipe.core.verify import verify
from emopipe.paths import objects_dir

torch.set_num_threads(2)  # other test files run on the same 2 cores

FOLDERS = EMOTION6_CATEGORIES[:6]  # the release has no neutral folder
PER_FOLDER = 6
SOURCE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "camera", "coins", "moon", "grass", "gravel", "brick", "clock")
EXAMPLE_ROW = ["disgust/1.jpg", "2.5", "3.8", "0.133333", "0.7", "0", "0.0666667", "0.1", "0", "0"]  # the release's own
NEUTRAL_HEAVY = ["joy/2.jpg", "5.2", "2.1", "0", "0", "0.0666667", "0.266667", "0", "0", "0.666667"]


def ground_truth_rows() -> list[list[str]]:
    """One row per image: 15 votes, most for the image's folder, written as the release writes shares."""
    rng = np.random.default_rng(6)
    rows = []
    for c, folder in enumerate(FOLDERS):
        for n in range(1, PER_FOLDER + 1):
            votes = rng.multinomial(6, np.ones(7) / 7)
            votes[c] += 9
            valence, arousal = rng.uniform(1, 9, 2)
            rows.append([f"{folder}/{n}.jpg", f"{valence:.2f}", f"{arousal:.2f}", *(f"{v / 15:g}" for v in votes)])
    fixed = {EXAMPLE_ROW[0]: EXAMPLE_ROW, NEUTRAL_HEAVY[0]: NEUTRAL_HEAVY}
    return [fixed.get(row[0], row) for row in rows]


def write_ground_truth(root: Path, rows, header=EMOTION6_HEADER) -> Path:
    path = root / "ground_truth.txt"
    path.write_text("\n".join("\t".join(cells) for cells in [list(header), *rows]) + "\n")
    return path


def make_emotion6(root: Path, photos) -> list[list[str]]:
    """images/<emotion>/<n>.jpg cut from real photos, and ground_truth.txt in the release's exact format."""
    for k, (folder, n) in enumerate((f, n) for f in FOLDERS for n in range(1, PER_FOLDER + 1)):
        photo = photos[SOURCE_PHOTOS[k % len(SOURCE_PHOTOS)]]
        h, w = photo.shape[:2]
        half = (k // len(SOURCE_PHOTOS)) % 3  # another third of the photo on each pass over the list
        crop = photo[:, half * w // 3:(half + 1) * w // 3]
        path = root / "images" / folder / f"{n}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(crop)).resize((96, 72)).save(path, quality=90)
    rows = ground_truth_rows()
    write_ground_truth(root, rows)
    return rows


def spec(root: Path) -> DatasetSpec:
    builtin = load_catalog().dataset("emotion6")
    return dataclasses.replace(builtin, path=str(root), origin="")


def ingest(db, data_dir, dataset: DatasetSpec):
    result = ingest_dataset(db, dataset, objects_root=data_dir / "objects", work_dir=data_dir / "sources" / "emotion6", log=lambda _: None)
    assert result.balanced
    with db.connect() as conn:
        images = {uri: (label, json.loads(a)) for uri, label, a in
                  conn.execute("SELECT source_uri, label, attributes FROM images WHERE dataset = 'emotion6'").fetchall()}
        rejected = conn.execute("SELECT source_uri, reason, detail FROM rejected WHERE dataset = 'emotion6' ORDER BY 1").fetchall()
    return result, images, rejected


# --- the source -----------------------------------------------------------------------------------------


def test_every_row_becomes_an_image_with_its_ratings(db, data_dir, tmp_path, photos):
    root = tmp_path / "Emotion6"
    rows = make_emotion6(root, photos)
    result, images, rejected = ingest(db, data_dir, spec(root))
    assert result.n_images == len(rows) == 36 and rejected == []
    example = images[str(root / "images" / "disgust" / "1.jpg")]
    assert example == ("disgust", {"valence": 2.5, "arousal": 3.8, "prob_anger": 0.133333, "prob_disgust": 0.7,
                                   "prob_fear": 0.0, "prob_joy": 0.0666667, "prob_sadness": 0.1, "prob_surprise": 0.0,
                                   "prob_neutral": 0.0})
    label, neutral = images[str(root / "images" / "joy" / "2.jpg")]
    assert label == "joy" and neutral["prob_neutral"] == 0.666667  # the folder is the label, not the argmax
    assert {label for label, _ in images.values()} == set(FOLDERS)
    shares = np.array([[a[p] for p in EMOTION6_PROBABILITIES] for _, a in images.values()])
    assert np.allclose(shares.sum(1), 1, atol=1e-3)


def test_missing_images_and_paths_outside_are_rejected_rows(db, data_dir, tmp_path, photos):
    root = tmp_path / "Emotion6"
    rows = make_emotion6(root, photos)
    (root / "images" / "fear" / "3.jpg").unlink()
    (tmp_path / "secret.jpg").write_bytes((root / "images" / "joy" / "1.jpg").read_bytes())
    write_ground_truth(root, rows + [["../../secret.jpg", *rows[0][1:]], ["anger/1.jpg", *rows[0][1:]]])
    result, images, rejected = ingest(db, data_dir, spec(root))
    assert result.n_images == 35 and result.n_inputs == 38
    reasons = {uri: (reason, detail) for uri, reason, detail in rejected}
    assert reasons[str(root / "images" / "fear" / "3.jpg")][0] == "missing_file"
    assert reasons[str(tmp_path / "secret.jpg")] == ("outside_dataset", "../../secret.jpg")  # never opened
    repeated = [detail for reason, detail in reasons.values() if reason == "repeated_row"]
    assert repeated == [f"{root / 'ground_truth.txt'}: line 39 repeats line 2 ({root / 'images' / 'anger' / '1.jpg'})"]


@pytest.mark.parametrize("change, message", [
    (lambda header, rows: ([*header[:2], "[arousl]", *header[3:]], rows), r"line 1: column 3 is '\[arousl\]', expected '\[arousal\]'"),
    (lambda header, rows: (header[:-1], rows), r"line 1: 9 columns, expected the 10"),
    (lambda header, rows: (header, [rows[0][:3] + ["0.5"] * 7, *rows[1:]]), r"line 2: the 7 probabilities .* sum to 3\.5, not 1"),
    (lambda header, rows: (header, [*rows[:4], rows[4][:3] + ["1.2", "-0.2", "0", "0", "0", "0", "0"], *rows[5:]]),
     r"line 6: \[prob\. anger\] is 1\.2, not a probability in \[0, 1\]"),
    (lambda header, rows: (header, [rows[0][:1] + ["9.5"] + rows[0][2:], *rows[1:]]), r"line 2: \[valence\] is 9\.5, outside the rating scale 1\.\.9"),
    (lambda header, rows: (header, [rows[0][:2] + ["high"] + rows[0][3:], *rows[1:]]), r"line 2: \[arousal\] is 'high', not a number"),
    (lambda header, rows: (header, [rows[0][:5], *rows[1:]]), r"line 2: 5 tab-separated fields, expected 10"),
    (lambda header, rows: (header, [["1.jpg", *rows[0][1:]], *rows[1:]]), r"line 2: \[image_filename\] '1\.jpg' names no category folder"),
    (lambda header, rows: (header, [*rows, [rows[0][0], "5", *rows[0][2:]]]), r"lines 2 and 38 both list anger/1\.jpg with different values"),
])
def test_bad_ground_truth_names_file_line_and_field(db, data_dir, tmp_path, photos, change, message):
    root = tmp_path / "Emotion6"
    rows = make_emotion6(root, photos)
    header, rows = change(list(EMOTION6_HEADER), rows)
    path = write_ground_truth(root, rows, header)
    with pytest.raises(SourceError, match=message) as e:
        ingest(db, data_dir, spec(root))
    assert str(e.value).startswith(f"{path}: line")


def test_missing_release_files_are_clear_errors(db, data_dir, tmp_path):
    with pytest.raises(SourceError, match=r"datasets\.emotion6\.path: the folder .* does not exist; expected the Emotion6 folder"):
        ingest(db, data_dir, spec(tmp_path / "nowhere"))
    (tmp_path / "Emotion6" / "images").mkdir(parents=True)
    with pytest.raises(SourceError, match=r"ground_truth\.txt: does not exist"):
        ingest(db, data_dir, spec(tmp_path / "Emotion6"))


def test_a_changed_rating_is_a_new_dataset_version(tmp_path, photos):
    root = tmp_path / "Emotion6"
    rows = make_emotion6(root, photos)
    before = dataset_version(spec(root))
    assert dataset_version(spec(root)) == before and "emotion6" in observed_datasets(load_catalog())
    write_ground_truth(root, [rows[0][:1] + ["7.5"] + rows[0][2:], *rows[1:]])
    assert dataset_version(spec(root)) != before


def test_catalog_entries(tmp_path):
    catalog = load_catalog()
    dataset = catalog.dataset("emotion6")
    assert dataset.source == "emotion6" and dataset.classes == EMOTION6_CATEGORIES
    va, distribution = catalog.experiment("emotion6_va"), catalog.experiment("emotion6_distribution")
    assert va.task == "regression" and va.targets == ("valence", "arousal")
    assert distribution.task == "classification" and distribution.soft_labels == EMOTION6_PROBABILITIES
    assert {va.split, distribution.split} == {"70/15/15"} and "Peng et al., CVPR 2015" in va.description + distribution.description
    file = tmp_path / "catalog.yaml"
    file.write_text(json.dumps({"datasets": {"e6": {"source": "emotion6"}}}))
    with pytest.raises(CatalogError, match=r"datasets\.e6\.path: source emotion6 needs 'path'"):
        load_catalog(file)


# --- distribution metrics --------------------------------------------------------------------------------


def test_distribution_metrics_on_hand_computed_cases():
    same = np.array([[0.2, 0.3, 0.5], [0.0, 1.0, 0.0]])
    values = {r.metric: r.value for r in distribution_metrics(same, same, resamples=0)}
    assert values == pytest.approx({"kl_divergence": 0.0, "bhattacharyya": 1.0, "cosine_similarity": 1.0, "top1_argmax": 1.0})

    # p = (1/2, 1/2, 0), q = (1/4, 1/4, 1/2): KL = ln 2, BC = 2 sqrt(1/8) = 1/sqrt(2), cos = (1/4) / (sqrt(1/2) sqrt(3/8)) = 1/sqrt(3)
    p, q = np.array([[0.5, 0.5, 0.0]]), np.array([[0.25, 0.25, 0.5]])
    values = {r.metric: r.value for r in distribution_metrics(p, q, resamples=0)}
    assert values == pytest.approx({"kl_divergence": math.log(2), "bhattacharyya": 1 / math.sqrt(2),
                                    "cosine_similarity": 1 / math.sqrt(3), "top1_argmax": 0.0})
    # A class the raters chose and the model rules out costs log(1 / epsilon), not infinity.
    disjoint = {r.metric: r.value for r in distribution_metrics(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]), resamples=0)}
    assert disjoint == pytest.approx({"kl_divergence": math.log(1e8), "bhattacharyya": 0.0, "cosine_similarity": 0.0, "top1_argmax": 0.0})


def test_distribution_metrics_ties_counts_missing_rows_and_cis():
    # Vote counts are normalized; a tie for the top class counts for either; a NaN row (no distribution) is left out.
    true = np.array([[2.0, 2.0, 1.0], [0.0, 3.0, 0.0], [np.nan, np.nan, np.nan], [1.0, 0.0, 0.0]])
    logits = np.log(np.array([[0.2, 0.6, 0.2], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4], [0.7, 0.2, 0.1]]))
    rows = {r.metric: r for r in distribution_metrics(true, logits, resamples=200)}
    assert rows["top1_argmax"].value == pytest.approx(2 / 3) and {r.n for r in rows.values()} == {3}
    kl_second = math.log(1 / 0.1)
    kl_first = 0.4 * math.log(0.4 / 0.2) + 0.4 * math.log(0.4 / 0.6) + 0.2 * math.log(0.2 / 0.2)
    assert rows["kl_divergence"].value == pytest.approx((kl_first + kl_second + math.log(1 / 0.7)) / 3)
    for r in rows.values():
        assert r.ci_low <= r.value <= r.ci_high
    assert distribution_metrics(np.full((2, 3), np.nan), logits[:2]) == []


# --- the two protocols, trained and evaluated -------------------------------------------------------------


def train_and_evaluate(db, data_dir, tmp_path, photos, name: str):
    """The chain the assets run, in-process: ingest, 32 px arrays, no text filter, the experiment's 70/15/15
    split, a tiny training (resnet10t from scratch, 2 epochs), and evaluation of test and val as the asset does."""
    root = tmp_path / "Emotion6"
    make_emotion6(root, photos)
    dataset = spec(root)
    ingest(db, data_dir, dataset)
    exp = dataclasses.replace(load_catalog().experiment(name), model="resnet10t", pretrained="none", mode="finetune",
                              image_size=32, epochs=2, batch_size=8)
    filtered = filter_images(db, experiment=exp.name, dataset="emotion6", text_filter=False, params_hash=None, params=None)
    with db.connect() as conn:
        ids = [r[0] for r in conn.execute("SELECT image_id FROM images WHERE dataset = 'emotion6'").fetchall()]
    build_arrays(db, ids, 32, objects_root=objects_dir(), arrays_root=default_arrays_root(), workers=1, log=lambda _: None)
    split = make_split(db, experiment=exp.name, dataset="emotion6", filter_id=filtered.filter_id, scheme=exp.split,
                       seed=exp.seed, groups=near_duplicate_groups(db, filtered.filter_id))
    data = load_training_data(db, split.split_id, exp, classes=list(dataset.classes))
    result = train_model(exp, data, split_id=split.split_id, work_dir=data_dir / "models", log=lambda _: None, device="cpu")
    model_id = record_model(db, result, exp, split.split_id, split.fingerprint)
    model, info = load_checkpoint(result.checkpoint_path)
    names = info["classes"] or info["targets"]
    rows = []
    for part in ("test", "val"):
        images = evaluated_images(db, "emotion6", split.split_id, part)
        ids = [i for i, _, _ in images]
        attributes = [a for _, _, a in images]
        scores = predict(model, info, load_array(db, ids, 32), device="cpu")
        labels = attribute_matrix(ids, attributes, names) if exp.task == "regression" else [label for _, label, _ in images]
        distributions = attribute_matrix(ids, attributes, exp.soft_labels) if exp.soft_labels else None
        key = evaluation_inputs_key(split_id=split.split_id, images=images, task=exp.task, class_map=None)
        rows += write_evaluation(db, experiment=exp.name, model_id=model_id, split_id=split.split_id, dataset="emotion6",
                                 part=part, image_ids=ids, labels=labels, scores=scores, classes=names, task=exp.task,
                                 inputs_key=key, distributions=distributions)
    # Every stored number recomputed from the predictions rows (and, for soft labels, the images' attributes).
    assert verify(db, exp.name, full=True).problems == []
    return exp, {(r.part, r.metric, r.class_name): r for r in rows}, rows


def test_valence_arousal_regression_protocol(db, data_dir, tmp_path, photos):
    exp, found, _ = train_and_evaluate(db, data_dir, tmp_path, photos, "emotion6_va")
    for part in ("test", "val"):
        for key in [(part, "mse", None), (part, "mae", None), *((part, m, t) for t in ("valence", "arousal") for m in ("mse", "mae", "pearson_r"))]:
            assert key in found and math.isfinite(found[key].value), key
        assert found[(part, "mse", "valence")].value >= 0 and -1 <= found[(part, "pearson_r", "arousal")].value <= 1
        assert not any(m in {"kl_divergence", "top1_argmax"} for p, m, _ in found if p == part)


def test_distribution_protocol(db, data_dir, tmp_path, photos):
    exp, found, rows = train_and_evaluate(db, data_dir, tmp_path, photos, "emotion6_distribution")
    for part in ("test", "val"):
        accuracy = found[(part, "accuracy", None)]  # against the folder label, beside the distribution's argmax
        for metric in ("kl_divergence", "bhattacharyya", "cosine_similarity", "top1_argmax"):
            r = found[(part, metric, None)]
            assert math.isfinite(r.value) and r.ci_low <= r.value <= r.ci_high and r.n == accuracy.n, (part, metric)
        assert found[(part, "kl_divergence", None)].value > 0  # two epochs from scratch do not match the raters
        assert 0 < found[(part, "bhattacharyya", None)].value < 1 and 0 <= found[(part, "top1_argmax", None)].value <= 1
        assert (part, "recall", "neutral") in found  # the 7th class is a class of the model
    assert "KL [95 % CI]" in headline_markdown(rows)
