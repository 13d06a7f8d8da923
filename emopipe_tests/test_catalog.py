"""The catalog: built-in entries, the EMOPIPE_CATALOG merge, and errors that name file, key and allowed values."""

import subprocess
import sys
import textwrap

import pytest

from emopipe.catalog import CatalogError, load_catalog


def write(tmp_path, text):
    path = tmp_path / "catalog.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_builtin_demo_is_valid():
    catalog = load_catalog(path="")
    demo = catalog.experiment("demo")
    assert demo.dataset == "demo" and catalog.dataset("demo").source == "synthetic"
    assert demo.split_ratios == (70, 15, 15)
    assert 32 in catalog.image_sizes() and 224 in catalog.image_sizes()


def test_text_engine_comes_from_the_experiment_then_the_dataset_then_the_default(tmp_path):
    catalog = load_catalog(write(tmp_path, """
        datasets:
          scans: {source: synthetic, text_engine: easyocr}
        experiments:
          own: {dataset: scans, text_engine: ppocr}
          inherited: {dataset: scans}
          plain: {dataset: demo}
        """))
    assert [catalog.text_engine(catalog.experiment(e)) for e in ("own", "inherited", "plain")] == ["ppocr", "easyocr", "ppocr"]


def test_each_engine_brings_its_own_min_confidence_unless_the_catalog_sets_one(tmp_path):
    catalog = load_catalog(write(tmp_path, """
        experiments:
          fast: {dataset: demo}
          easy: {dataset: demo, text_engine: easyocr}
          strict: {dataset: demo, text_engine: easyocr, text_thresholds: {min_confidence: 0.7}}
        """))
    found = {e: catalog.thresholds(catalog.experiment(e)).as_dict() for e in ("fast", "easy", "strict")}
    assert {e: t["min_confidence"] for e, t in found.items()} == {"fast": 0.4, "easy": 0.2, "strict": 0.7}
    assert found["fast"]["min_area"] == 0.001 and found["strict"]["min_chars"] == 2


def test_user_catalog_merges_over_builtin(tmp_path):
    (tmp_path / "photos").mkdir()
    path = write(tmp_path, f"""
        datasets:
          mine:
            source: folder
            path: {tmp_path / 'photos'}
            classes: [happy, sad]
        experiments:
          mine_fi:
            dataset: mine
            image_size: 32
            split: 80/10/10
            eval_datasets: [demo, {{dataset: demo, class_map: {{sadness: sad, '*': happy}}}}]
          demo:
            dataset: demo
            epochs: 1
    """)
    catalog = load_catalog(path)
    assert set(catalog.experiments) >= {"demo", "mine_fi"}
    assert catalog.experiment("demo").epochs == 1  # the user's entry wins
    assert catalog.experiment("fi_probe32").head_hidden == (256, 128) and catalog.experiment("demo").head_hidden == 256
    exp = catalog.experiment("mine_fi")
    assert exp.datasets == ("mine", "demo", "demo")
    assert exp.eval_datasets[1].class_map == {"sadness": "sad", "*": "happy"}
    assert catalog.dataset("mine").classes == ("happy", "sad")
    assert 32 in catalog.image_sizes()


def test_catalog_from_environment(tmp_path, monkeypatch):
    path = write(tmp_path, "experiments:\n  quick:\n    dataset: demo\n    epochs: 2\n")
    monkeypatch.setenv("EMOPIPE_CATALOG", str(path))
    assert load_catalog().experiment("quick").epochs == 2


@pytest.mark.parametrize(
    "text, key, allowed",
    [
        ("experiments:\n  x:\n    dataset: demo\n    split: 60/30/20\n", "experiments.x.split", "70/15/15, 80/10/10, official"),
        ("experiments:\n  x:\n    dataset: nope\n", "experiments.x.dataset", "demo"),
        ("experiments:\n  x:\n    dataset: demo\n    mode: frozen\n", "experiments.x.mode", "finetune, linear_probe"),
        ("experiments:\n  x:\n    dataset: demo\n    optimiser: sgd\n", "experiments.x", "optimizer"),
        ("experiments:\n  x:\n    dataset: demo\n    epochs: ten\n", "experiments.x.epochs", None),
        ("experiments:\n  x:\n    dataset: demo\n    head_hidden: [256, 0]\n", "experiments.x.head_hidden", "[256, 128]"),
        ("experiments:\n  x:\n    dataset: demo\n    pretrained: /no/such.pt\n", "experiments.x.pretrained", "efficientnet_lite0"),
        ("experiments:\n  x:\n    dataset: demo\n    task: regression\n", "experiments.x.targets", None),
        ("datasets:\n  d:\n    source: ftp\n", "datasets.d.source", "synthetic, folder, archive, url_list"),
        ("datasets:\n  d:\n    source: archive\n    url: https://example.org/a.zip\n", "datasets.d.sha256", None),
        ("datasets:\n  d:\n    source: folder\n", "datasets.d.path", None),
        ("experiments:\n  x:\n    dataset: demo\n    text_thresholds: {min_conf: 0.5}\n", "experiments.x.text_thresholds", "min_confidence"),
        ("experiments:\n  x:\n    dataset: demo\n    text_engine: tesseract\n", "experiments.x.text_engine", "ppocr, easyocr"),
    ],
)
def test_errors_name_file_key_and_allowed_values(tmp_path, text, key, allowed):
    path = write(tmp_path, text)
    with pytest.raises(CatalogError) as err:
        load_catalog(path)
    message = str(err.value)
    assert str(path) in message and key in message
    if allowed:
        assert allowed in message


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(tmp_path / "missing.yaml")
    with pytest.raises(CatalogError, match="not valid YAML"):
        load_catalog(write(tmp_path, "experiments: [unclosed\n"))
    with pytest.raises(CatalogError, match="unknown top-level"):
        load_catalog(write(tmp_path, "experiment: {}\n"))


def test_definitions_validate_shows_the_error_without_traceback(tmp_path):
    path = write(tmp_path, "experiments:\n  x:\n    dataset: demo\n    split: 50/50\n")
    env = {"EMOPIPE_CATALOG": str(path), "EMOPIPE_DATA_DIR": str(tmp_path / "data"), "PATH": __import__("os").environ["PATH"]}
    out = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-m", "emopipe.definitions"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "experiments.x.split" in text and str(path) in text and "70/15/15" in text
