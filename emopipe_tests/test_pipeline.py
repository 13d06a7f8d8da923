"""The whole chain through Dagster, as a user runs it: `emopipe run`, `dagster asset materialize`,
`emopipe trace --verify`, on a small synthetic experiment in a private data dir and Dagster instance."""

import json
import os
import re
import subprocess
import sys
import textwrap

import duckdb
import pytest

pytestmark = pytest.mark.slow  # `emopipe run` and `dagster asset materialize` in subprocesses, real OCR

CATALOG = """
datasets:
  tiny:
    source: synthetic
    n_per_class: 15
    seed: 3
  tiny_other:
    source: synthetic
    n_per_class: 4
    seed: 4
experiments:
  tiny:
    dataset: tiny
    eval_datasets: [{dataset: tiny_other, class_map: {amusement: amusement, sadness: sadness}}]
    image_size: 64
    split: 60/20/20
    model: tf_efficientnet_lite0
    pretrained: efficientnet_lite0
    mode: linear_probe
    epochs: 15
    reference: {metric: accuracy, value: 50.0, source: "made up for the test"}
  tiny_blind:
    dataset: tiny
    text_thresholds: {min_chars: 1000}  # deliberately bad: no image can pass, recall 0
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    (root / "catalog.yaml").write_text(textwrap.dedent(CATALOG))
    env = {**os.environ, "EMOPIPE_CATALOG": str(root / "catalog.yaml"), "EMOPIPE_DATA_DIR": str(root / "data"),
           "DAGSTER_HOME": str(root)}
    env.pop("PYTEST_CURRENT_TEST", None)
    run = subprocess.run([sys.executable, "-m", "emopipe.cli", "run", "tiny"], env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return root, env, run.stdout


def query(root, sql, params=()):
    with duckdb.connect(str(root / "data" / "emopipe.duckdb"), read_only=True) as conn:
        return conn.execute(sql, list(params)).fetchall()


def test_run_prints_headline_trace_and_where(project):
    root, _, out = project
    assert "| dataset | part |" in out and "reference" in out
    assert "emopipe trace tiny" in out and "dagster dev" in out and str(root / "data") in out


ENGINE_EVENTS = ("STEP_START", "STEP_OUTPUT", "LOADED_INPUT", "STEP_INPUT", "HANDLED_OUTPUT", "ASSET_MATERIALIZATION",
                 "PickledObjectFilesystemIOManager", "Writing file at", "DEBUG")
USED_STEPS = ["raw_images", "images_32", "images_64", "text_scores", "filtered_images", "splits", "trained_model",
              "evaluation", "explanations"]


def finished_steps(out: str) -> list[str]:
    return [line[2:].split(":")[0] for line in out.splitlines() if line.startswith("✓ ")]


def test_run_reports_one_result_line_per_used_step_and_no_engine_events(project):
    _, _, out = project  # captured: not a terminal, so plain lines and no progress bars
    assert not [marker for marker in ENGINE_EVENTS if marker in out]
    assert sorted(finished_steps(out)) == sorted(USED_STEPS)
    assert "images_224" not in out and "tuned_hyperparams" not in out  # steps tiny does not use
    assert re.search(r"^  check text_detection_quality: passed, precision 1\.000, recall 1\.000", out, re.M)
    assert re.search(r"^✓ text_scores: 120 images, \d+ with text \(120 OCR'd now", out, re.M)
    assert re.search(r"^    text_scores: OCR: 120/120 images in ", out, re.M)


def test_a_second_run_reuses_every_stage(project):
    root, env, _ = project
    run = subprocess.run([sys.executable, "-m", "emopipe.cli", "run", "tiny"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    done = {line[2:].split(":")[0]: line for line in run.stdout.splitlines() if line.startswith("✓ ")}
    assert sorted(done) == sorted(USED_STEPS)
    assert "(0 new)" in done["raw_images"] and "(0 decoded, 152 cached)" in done["images_64"]
    assert "(0 OCR'd now, 120 from the cache)" in done["text_scores"]
    assert "already trained" in run.stdout
    assert "stored metrics reused" in done["evaluation"] and "8 heatmaps reused" in done["explanations"]
    assert query(root, "SELECT count(*) FROM models")[0][0] == 1


def test_chain_is_recorded_and_model_learned(project):
    root, _, _ = project
    (n_images,) = query(root, "SELECT count(*) FROM images WHERE dataset = 'tiny'")[0]
    assert n_images == 120
    (n_scored,) = query(root, "SELECT count(*) FROM text_scores")[0]
    assert n_scored == 120
    kept, removed = query(root, "SELECT n_kept, n_removed FROM filter_runs WHERE experiment = 'tiny'")[0]
    assert kept + removed == 120 and removed >= 10  # the synthetic text images went
    parts = dict(query(root, "SELECT part, count(*) FROM splits GROUP BY part"))
    assert parts["train"] > parts["val"] > 0 and parts["test"] > 0
    model_id, split_id, history = query(root, "SELECT model_id, split_id, history FROM models WHERE experiment = 'tiny'")[0]
    best_val = max(h["val_metric"] for h in json.loads(history))
    assert best_val >= 2 / 8  # at least twice chance on 8 classes
    rows = query(root, "SELECT dataset, part, value FROM metrics WHERE metric = 'accuracy' AND class IS NULL AND model_id = ? AND split_id = ?",
                 [model_id, split_id])
    assert {(d, p) for d, p, _ in rows} == {("tiny", "test"), ("tiny", "val"), ("tiny_other", "test")}
    # The cross-dataset set: only its amusement and sadness images map to the model's classes.
    (n_other,) = query(root, "SELECT count(*) FROM predictions WHERE model_id = ? AND dataset = 'tiny_other'", [model_id])[0]
    (excluded,) = query(root, "SELECT value FROM metrics WHERE dataset = 'tiny_other' AND metric = 'excluded'")[0]
    assert (n_other, excluded) == (8, 24)
    (n_test,) = query(root, "SELECT count(*) FROM predictions WHERE model_id = ? AND dataset = 'tiny' AND part = 'test'", [model_id])[0]
    assert n_test == parts["test"]
    heatmaps = list((root / "data" / "reports").glob(f"tiny-{model_id[:12]}-ig/*.png"))
    assert len(heatmaps) == 8  # one Integrated-Gradients overlay per class


def test_trace_verifies_then_catches_a_replaced_checkpoint(project):
    root, env, _ = project
    ok = subprocess.run([sys.executable, "-m", "emopipe.cli", "trace", "tiny", "--metric", "accuracy", "--verify", "--full"],
                        env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "verified" in ok.stdout and "split" in ok.stdout and "synthetic://" in ok.stdout

    # Re-evaluating alone uses the recorded checkpoint; no training happens.
    (n_models,) = query(root, "SELECT count(*) FROM models")[0]
    again = subprocess.run(["dagster", "asset", "materialize", "-m", "emopipe.definitions", "--select", "evaluation", "--partition", "tiny"],
                           env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert query(root, "SELECT count(*) FROM models")[0][0] == n_models

    checkpoint = query(root, "SELECT checkpoint_path FROM models")[0][0]
    with open(checkpoint, "ab") as f:
        f.write(b"tampered")
    bad = subprocess.run([sys.executable, "-m", "emopipe.cli", "trace", "tiny", "--verify"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert "checkpoint" in bad.stderr and "VERIFY FAILED" in bad.stderr


def test_bad_threshold_fails_the_blocking_text_check(project):
    """Through Dagster: the quality check reads the materialization's decisions, fails loudly, and nothing
    downstream is built from them; the new threshold re-decided from stored boxes without new OCR."""
    root, env, _ = project
    (n_ocr,) = query(root, "SELECT count(*) FROM ocr_results")[0]
    run = subprocess.run(["dagster", "asset", "materialize", "-m", "emopipe.definitions", "--select",
                          "raw_images,images_224,text_scores,filtered_images", "--partition", "tiny_blind"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=root)
    output = run.stdout + run.stderr
    assert run.returncode != 0, output[-3000:]
    assert "precision nan, recall 0.000" in output and "text_detection_quality" in output
    assert query(root, "SELECT count(*) FROM filter_runs WHERE experiment = 'tiny_blind'")[0][0] == 0
    assert query(root, "SELECT count(*) FROM ocr_results")[0][0] == n_ocr
