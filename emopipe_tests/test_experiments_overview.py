"""`emopipe experiments` (emopipe/experiments_overview.py): columns aligned for any name, whether each dataset's
data is here and where it was looked for, the newest headline result from a real DuckDB file, "database busy"
while another process holds it, and no Dagster or torch import."""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from emopipe.cli import main
from emopipe.core.evaluation import write_evaluation
from emopipe.experiments_overview import COLUMNS

LONG_NAME = "cross_dataset_probe_with_a_name_far_longer_than_any_fixed_width_column_" + "x" * 40
MODEL_ID = "0123456789abcdef" * 4
ARCHIVE_SHA = "ab" * 32


@pytest.fixture
def catalog(tmp_path, monkeypatch, data_dir):
    """A catalog with a folder that exists (with a manifest), one that does not, and an archive at a URL."""
    here = tmp_path / "photos"
    (here / "happy").mkdir(parents=True)
    (here / "labels.csv").write_text("path,label\nhappy/a.jpg,happy\n")
    path = tmp_path / "catalog.yaml"
    path.write_text(textwrap.dedent(f"""
        datasets:
          here: {{source: folder, path: photos, labels: labels.csv}}
          gone: {{source: folder, path: no_such_folder}}
          fetched: {{source: archive, url: "http://127.0.0.1:9/fetched.zip", sha256: {ARCHIVE_SHA}}}
        experiments:
          short: {{dataset: here, image_size: 32, model: resnet18, split: 80/10/10}}
          {LONG_NAME}: {{dataset: gone, eval_datasets: [here], model: tf_efficientnet_lite0}}
          remote: {{dataset: fetched, task: regression, targets: [valence], model: resnet18, image_size: 64}}
    """))
    monkeypatch.setenv("EMOPIPE_CATALOG", str(path))
    return tmp_path


def table(capsys) -> dict[str, list[list[str]]]:
    """The printed table cut at the header's column offsets: experiment name -> its lines' cells."""
    assert main(["experiments"]) == 0
    lines = capsys.readouterr().out.splitlines()
    columns = list(re.finditer(r"\S+(?: \S+)*", lines[1]))  # cells are 2+ spaces apart, names hold single ones
    assert [c.group() for c in columns] == list(COLUMNS)
    offsets = [c.start() for c in columns]
    rows: dict[str, list[list[str]]] = {}
    for line in lines[2:-1]:
        # Every cell starts at its column's offset: the character before each offset is blank.
        assert all(line[o - 1:o] in (" ", "") for o in offsets[1:]), line
        cells = [line[a:b].strip() for a, b in zip(offsets, offsets[1:] + [len(line)])]
        if cells[0]:
            rows[cells[0]] = [cells]
        else:
            rows[list(rows)[-1]].append(cells)
    rows["last line"] = [[lines[-1]]]
    return rows


def test_rows_are_aligned_and_say_whether_the_data_is_here(catalog, data_dir, capsys):
    rows = table(capsys)
    assert rows["short"] == [["short", "here", "present", "resnet18 @ 32px", "80/10/10", "—",
                              f"{catalog / 'photos'} + {catalog / 'photos' / 'labels.csv'}"]]
    long_rows = rows[LONG_NAME]
    assert long_rows[0][:3] == [LONG_NAME, "gone", "missing"] and long_rows[0][-1] == str(catalog / "no_such_folder")
    assert long_rows[1][1:3] == ["+ here (eval)", "present"]
    assert rows["remote"][0][2] == "not fetched" and rows["remote"][0][-1] == "http://127.0.0.1:9/fetched.zip"
    assert rows["last line"] == [[f"results: none yet (no database at {data_dir / 'emopipe.duckdb'})"]]
    assert not (data_dir / "emopipe.duckdb").exists()  # read, never created


def test_last_result_and_ingested_images_come_from_the_database(catalog, db, capsys):
    ids = [f"img{k}" for k in range(4)]
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])  # 3 of 4 right
    write_evaluation(db, experiment="short", model_id=MODEL_ID, split_id="s1", dataset="here", part="test",
                     image_ids=ids, labels=["happy", "happy", "sad", "sad"], scores=scores, classes=["happy", "sad"],
                     resamples=0)
    write_evaluation(db, experiment="remote", model_id="f" * 64, split_id="s2", dataset="fetched", part="test",
                     image_ids=ids[:2], labels=np.array([[0.5], [0.1]]), scores=np.array([[0.3], [0.1]]),
                     classes=["valence"], task="regression", resamples=0)
    with db.transaction() as conn:
        conn.execute("INSERT INTO images (image_id, dataset, source_uri, label, attributes) VALUES "
                     "('a', 'fetched', 'u1', 'x', ?), ('b', 'fetched', 'u2', 'x', ?)", [json.dumps({})] * 2)
    rows = table(capsys)
    assert rows["short"][0][5] == "accuracy 75.0 % (model 01234567)"
    assert rows["remote"][0][2] == "ingested (2 images)"
    assert rows["remote"][0][5] == "mse 0.02 (model ffffffff)"
    assert rows[LONG_NAME][0][5] == "—"
    assert rows["last line"][0][0].startswith("results: newest test-part")


def test_a_database_held_by_another_process_reads_as_busy(catalog, db, data_dir, capsys):
    with db.connect():
        pass  # creates the file with its schema
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); time.sleep(60)",
         str(data_dir / "emopipe.duckdb")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rows = table(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert rows["last line"][0][0].startswith("results: database busy")
    assert rows["short"][0][5] == "?" and rows["remote"][0][2] == "unknown"
    assert rows["short"][0][2] == "present"  # the file system still answers


def test_listing_imports_neither_dagster_nor_torch(catalog):
    code = ("import sys; from emopipe.cli import main; assert main(['experiments']) == 0; "
            "loaded = [m for m in ('torch', 'dagster') if m in sys.modules]; assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", code], env=os.environ.copy(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "short" in done.stdout
