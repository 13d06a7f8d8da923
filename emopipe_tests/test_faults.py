"""Bad input, faults and tampering, one test per defect found by pushing them through the real pipeline:
paths leaving their dataset, a killed training run, forged numbers under `trace --verify`, a broken tar
link, downloads held in memory, repeated manifest rows, and messages. (Ray listening on loopback only:
test_tuned_hyperparams.py.)"""

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import tracemalloc
from pathlib import Path

import duckdb
import pytest

from emopipe.catalog import CatalogError, DatasetSpec, load_catalog
from emopipe.core.download import SourceError, download_file
from emopipe.core.raw_images import Rejected, ingest_dataset, inspect_image
from emopipe.core.sources import SourceItem, fetch_items
from emopipe.core.verify import verify
from emopipe.paths import object_path
from emopipe_tests.test_sources import make_tar
from emopipe_tests.test_trace import EXPERIMENT, lineage  # noqa: F401 (the fixture)

PROJECT = Path(__file__).resolve().parents[1]


def _ingest(db, spec, data_dir):
    return ingest_dataset(db, spec, objects_root=data_dir / "objects", work_dir=data_dir / "sources" / spec.name, log=lambda _: None)


def _rejected(db, dataset):
    with db.connect() as conn:
        return conn.execute("SELECT source_uri, reason, detail FROM rejected WHERE dataset = ? ORDER BY source_uri", [dataset]).fetchall()


# --- 1. paths stay inside their dataset ---------------------------------------------------------------


def test_links_and_manifest_rows_leading_out_of_the_dataset_are_rejected_unread(db, data_dir, tmp_path, photo_jpegs):
    secret = tmp_path / "private"
    (secret / "joy").mkdir(parents=True)
    (secret / "joy" / "outside.jpg").write_bytes(photo_jpegs["astronaut"])
    (secret / "passwords.txt").write_text("root:hunter2\n")
    root = tmp_path / "dataset"
    (root / "joy").mkdir(parents=True)
    (root / "fear").mkdir()
    (root / "joy" / "a.jpg").write_bytes(photo_jpegs["coffee"])
    (root / "fear" / "b.jpg").write_bytes(photo_jpegs["rocket"])
    os.symlink(secret / "joy" / "outside.jpg", root / "joy" / "link_out.jpg")  # a file link out
    os.symlink(secret / "joy", root / "fear" / "folder_out")  # a folder link out: not even listed
    os.symlink(root / "joy" / "a.jpg", root / "fear" / "inside.jpg")  # a link that stays inside: kept
    result = _ingest(db, DatasetSpec(name="walked", source="folder", path=str(root)), data_dir)
    assert result.balanced and result.n_images == 2 and result.n_duplicates == 1  # inside.jpg has a.jpg's bytes
    assert _rejected(db, "walked") == [
        (str(root / "fear" / "folder_out"), "outside_dataset", str(root / "fear" / "folder_out")),
        (str(root / "joy" / "link_out.jpg"), "outside_dataset", str(root / "joy" / "link_out.jpg"))]

    manifest = root / "labels.csv"
    manifest.write_text("path,label\njoy/a.jpg,joy\n../private/joy/outside.jpg,joy\n"
                        f"{secret / 'passwords.txt'},joy\n../../../../../../etc/passwd,joy\njoy/link_out.jpg,joy\n")
    result = _ingest(db, DatasetSpec(name="listed", source="folder", path=str(root), labels=str(manifest)), data_dir)
    assert result.balanced and result.n_inputs == 5 and result.n_images == 1
    assert sorted((reason, detail) for _, reason, detail in _rejected(db, "listed")) == sorted([
        ("outside_dataset", "../private/joy/outside.jpg"), ("outside_dataset", str(secret / "passwords.txt")),
        ("outside_dataset", "../../../../../../etc/passwd"), ("outside_dataset", "joy/link_out.jpg")])
    # nothing from outside was stored or quoted
    assert not object_path(hashlib.sha256(photo_jpegs["astronaut"]).hexdigest(), data_dir / "objects").exists()
    assert not any("hunter2" in (detail or "") or "root:" in (detail or "") for *_, detail in _rejected(db, "listed"))


def test_a_downloaded_archive_cannot_make_the_ingest_read_local_files(db, data_dir, server, tmp_path, photo_jpegs):
    local = tmp_path / "local.jpg"
    local.write_bytes(photo_jpegs["chelsea"])
    depth = "../" * len(data_dir.parts)
    manifest = f"path,label\njoy/a.jpg,joy\n{depth}{str(local).lstrip('/')},joy\n{local},joy\n".encode()
    body = make_tar({"FI/joy/a.jpg": photo_jpegs["clock"], "FI/labels.csv": manifest})
    server.serve("/FI.tar.gz", body)
    spec = DatasetSpec(name="fi", source="archive", url=server.url("/FI.tar.gz"), sha256=hashlib.sha256(body).hexdigest(),
                       path="FI", labels="labels.csv")
    result = _ingest(db, spec, data_dir)
    assert result.balanced and result.n_images == 1
    assert [reason for _, reason, _ in _rejected(db, "fi")] == ["outside_dataset", "outside_dataset"]
    assert not object_path(hashlib.sha256(photo_jpegs["chelsea"]).hexdigest(), data_dir / "objects").exists()


# --- 2. a killed training run never blocks the next ----------------------------------------------------

KILL_CATALOG = """
datasets:
  small:
    source: synthetic
    n_per_class: 8
    seed: 5
experiments:
  killed:
    dataset: small
    image_size: 32
    text_filter: false
    split: 60/20/20
    model: resnet10t
    pretrained: none
    epochs: 40
    patience: 1000
    batch_size: 48
    explain_per_class: 0
  waiting:
    dataset: small
    image_size: 32
    text_filter: false
    model: resnet10t
    pretrained: none
    epochs: 1
    explain_per_class: 0
"""


def _instance_runs(home: Path) -> dict[str, tuple[str, str]]:
    """run_id -> (partition, status) from the Dagster home's run storage, read as a user's UI would."""
    code = ("import dagster as dg, json\n"
            "with dg.DagsterInstance.get() as i:\n"
            "    print(json.dumps({r.run_id: [r.tags.get('dagster/partition'), r.status.value] for r in i.get_runs()}))\n"
            "    print(json.dumps(sorted(i.event_log_storage.get_concurrency_run_ids())))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "DAGSTER_HOME": str(home)},
                         capture_output=True, text=True, timeout=120, check=True).stdout.splitlines()
    return json.loads(out[0]), set(json.loads(out[1]))


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_sigkill_during_training_then_the_next_run_resumes_and_sigterm_stops_a_waiting_run(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(PROJECT / "dagster.yaml", home)  # the project's instance settings: the gpu pool has one slot
    (tmp_path / "catalog.yaml").write_text(textwrap.dedent(KILL_CATALOG))
    env = {**os.environ, "EMOPIPE_CATALOG": str(tmp_path / "catalog.yaml"), "EMOPIPE_DATA_DIR": str(tmp_path / "data"),
           "DAGSTER_HOME": str(home)}
    env.pop("PYTEST_CURRENT_TEST", None)
    runs = tmp_path / "data" / "models" / "runs"

    def emopipe(*args, **kw):
        return subprocess.Popen([sys.executable, "-m", "emopipe.cli", *args], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)

    killed = emopipe("run", "killed")
    _wait(lambda: list(runs.glob("*/last.pt")), 300, "the first epoch checkpoint of 'killed'")

    # A second experiment's run reaches the gpu pool while 'killed' trains, and waits for the slot.
    waiting = emopipe("run", "waiting")

    def waiting_blocked():
        statuses, holders = _instance_runs(home)
        return [r for r, (p, s) in statuses.items() if p == "waiting" and s == "STARTED" and r in holders]

    [waiting_run] = _wait(waiting_blocked, 300, "the 'waiting' run to queue for the gpu pool")
    time.sleep(2)
    stopped_at = time.monotonic()
    waiting.send_signal(signal.SIGTERM)
    out, _ = waiting.communicate(timeout=30)
    assert time.monotonic() - stopped_at < 15, "SIGTERM took too long"
    assert waiting.returncode == 128 + signal.SIGTERM and "marked canceled" in out, out
    statuses, holders = _instance_runs(home)
    assert statuses[waiting_run][1] == "CANCELED" and waiting_run not in holders

    os.killpg(killed.pid, signal.SIGKILL)  # the whole session, as the OOM killer or a lost shell would
    killed.communicate(timeout=30)
    doctor = subprocess.run([sys.executable, "-m", "emopipe.cli", "doctor"], env=env, capture_output=True, text=True, timeout=120)
    assert doctor.returncode == 1 and "is gone" in doctor.stdout, doctor.stdout + doctor.stderr

    again = emopipe("run", "killed")
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out[-3000:]
    assert "marked 1 run(s) whose process is gone as failed and freed their pool slots" in out
    assert "resuming after epoch" in out, out[-3000:]
    statuses, holders = _instance_runs(home)
    assert sorted(s for p, s in statuses.values() if p == "killed") == ["FAILURE", "SUCCESS"] and not holders
    with duckdb.connect(str(tmp_path / "data" / "emopipe.duckdb"), read_only=True) as conn:
        assert conn.execute("SELECT epochs_run FROM models WHERE experiment = 'killed'").fetchall() == [(40,)]


HOLDER = """
import time
import dagster as dg

@dg.op(pool="gpu")
def holds_the_gpu():
    time.sleep(300)

@dg.job
def training():
    holds_the_gpu()

with dg.DagsterInstance.get() as instance:
    training.execute_in_process(instance=instance)
"""


def test_the_dead_runs_sensor_frees_the_slot_of_a_killed_run(tmp_path):
    """What the daemon does every minute under `dagster dev`: the killed run is marked failed, its slot freed."""
    import dagster as dg

    from emopipe.dead_runs import dead_runs

    shutil.copy(PROJECT / "dagster.yaml", tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], env={**os.environ, "DAGSTER_HOME": str(tmp_path)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        try:
            [run_id] = _wait(lambda: instance.event_log_storage.get_concurrency_run_ids(), 120, "the gpu slot to be taken")
            assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED
            assert "no run without a process" in dead_runs(dg.build_sensor_context(instance=instance)).skip_message
        finally:
            holder.kill()
            holder.wait()
        outcome = dead_runs(dg.build_sensor_context(instance=instance))
        assert run_id[:8] in outcome.skip_message and "freed their pool slots" in outcome.skip_message
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
        assert not instance.event_log_storage.get_concurrency_run_ids()


# --- 3. trace --verify recomputes what trace prints --------------------------------------------------


def test_verify_catches_forged_intervals_deleted_rows_and_edited_model_records(db, lineage):  # noqa: F811
    assert verify(db, EXPERIMENT).problems == []
    with db.transaction() as conn:
        conn.execute("CREATE TABLE kept_metrics AS SELECT * FROM metrics; CREATE TABLE kept_models AS SELECT * FROM models")

    def problems_after(sql):
        with db.transaction() as conn:
            conn.execute(sql)
        found = verify(db, EXPERIMENT).problems
        with db.transaction() as conn:  # undo
            conn.execute("DELETE FROM metrics; INSERT INTO metrics SELECT * FROM kept_metrics; "
                         "DELETE FROM models; INSERT INTO models SELECT * FROM kept_models")
        return found

    ci = problems_after("UPDATE metrics SET ci_low = ci_low - 0.1 WHERE dataset = 'toy' AND part = 'test' AND metric = 'accuracy'")
    assert [(p.where, p.id.endswith("toy/test accuracy")) for p in ci] == [("metrics", True)] and "CI" in ci[0].what
    deleted = problems_after("DELETE FROM metrics WHERE dataset = 'other' AND metric = 'macro_f1'")
    assert [(p.where, p.what) for p in deleted] == [("metrics", "metric rows the predictions imply but the table lacks")]
    assert "macro_f1" in deleted[0].actual
    excluded = problems_after("DELETE FROM metrics WHERE dataset = 'other' AND metric = 'excluded'")  # 'calm' maps to nothing
    assert len(excluded) == 1 and "excluded" in excluded[0].actual
    extra = problems_after("INSERT INTO metrics SELECT experiment, model_id, split_id, dataset, part, 'auc', NULL, 0.99, NULL, NULL, n, "
                           "created_at FROM metrics WHERE dataset = 'toy' AND part = 'test' AND metric = 'accuracy'")
    assert [p.what for p in extra] == ["metric rows the predictions do not imply"]
    edited = problems_after("UPDATE models SET architecture = 'vit_base_patch16_224', best_epoch = 3, "
                            "hyperparameters = '{\"lr\": 0.1, \"batch_size\": 4}'")
    assert sorted(p.what for p in edited) == sorted(f"{c} == the checkpoint's own record" for c in ("architecture", "best_epoch", "hyperparameters"))


def test_verify_hashes_a_fresh_sample_each_time(db, lineage):  # noqa: F811
    samples = set()
    for _ in range(6):
        report = verify(db, EXPERIMENT, sample=4)
        assert report.files_hashed == 4 and report.files_total == 17
    tampered = lineage.parts["train"][0]
    path = object_path(tampered)
    path.write_bytes(path.read_bytes() + b"\0")
    for _ in range(60):  # 4 of 17 per call: a fixed sample would miss it for ever with probability 13/17
        problems = verify(db, EXPERIMENT, sample=4).problems
        samples.add(bool(problems))
        if problems:
            assert [(p.where, p.id) for p in problems] == [("object", tampered)]
            break
    assert True in samples, "60 fresh samples never reached the tampered file"
    assert verify(db, EXPERIMENT, sample=100).files_hashed == 17  # a small set is hashed whole


# --- 4. a tar hard link to a missing member ------------------------------------------------------------


def test_a_tar_hard_link_to_a_missing_member_names_archive_and_member(db, data_dir, server, photo_jpegs):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("joy/a.jpg")
        info.size = len(photo_jpegs["clock"])
        tf.addfile(info, io.BytesIO(photo_jpegs["clock"]))
        link = tarfile.TarInfo("joy/b.jpg")
        link.type, link.linkname = tarfile.LNKTYPE, "joy/missing.jpg"
        tf.addfile(link)
    body = buf.getvalue()
    server.serve("/broken.tar", body)
    spec = DatasetSpec(name="broken", source="archive", url=server.url("/broken.tar"), sha256=hashlib.sha256(body).hexdigest())
    # SourceError is a UserError: the asset raises a Failure that disallows Dagster's run retries.
    with pytest.raises(SourceError, match=r"broken\.tar: member 'joy/b\.jpg' is a hard link to 'joy/missing\.jpg'"):
        _ingest(db, spec, data_dir)


# --- 5. downloads stream to disk, capped per URL -------------------------------------------------------


def test_url_responses_stream_to_files_and_a_cap_stops_a_huge_one_early(server, tmp_path, photo_jpegs):
    big = photo_jpegs["coffee"] + b"\0" * (24 << 20)  # a valid 24 MB JPEG (trailing bytes after its end)
    sent = {"endless": 0}

    def endless(handler, n):
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.end_headers()  # no Content-Length: only the bytes tell
        try:
            for _ in range(1000):
                handler.wfile.write(b"\0" * (1 << 20))
                sent["endless"] += 1 << 20
        except OSError:
            pass

    for i in range(3):
        server.serve(f"/big{i}.jpg", big)
    server.routes["/endless.jpg"] = endless
    items = [SourceItem(server.url(f"/big{i}.jpg"), "joy") for i in range(3)] + [SourceItem(server.url("/endless.jpg"), "joy")]
    tracemalloc.start()
    got = {f.item.uri: f for f in fetch_items(items, workers=4, max_bytes=32 << 20, incoming=tmp_path / "incoming")}
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20, f"{peak >> 20} MB held in memory for 3 x 24 MB downloads"  # held whole: 72 MB
    for i in range(3):
        f = got[server.url(f"/big{i}.jpg")]
        assert f.data is None and f.file.parent == tmp_path / "incoming" and f.file.read_bytes() == big
    endless_result = got[server.url("/endless.jpg")]
    assert endless_result.reason == "too_large" and "33554432" in endless_result.detail
    assert sent["endless"] < 48 << 20  # stopped soon after the cap, not after the server's 1000 MB
    assert sorted(p.name for p in (tmp_path / "incoming").iterdir()) == sorted(got[server.url(f"/big{i}.jpg")].file.name for i in range(3))


def test_the_byte_cap_is_a_catalog_key(tmp_path):
    (tmp_path / "c.yaml").write_text("datasets:\n  d: {source: folder, path: /x, max_image_bytes: 1000}\n")
    assert load_catalog(tmp_path / "c.yaml").dataset("d").max_image_bytes == 1000
    assert load_catalog(tmp_path / "c.yaml").dataset("demo").max_image_bytes == 64 << 20


# --- 6. repeated manifest rows are accounted for -------------------------------------------------------


def test_identical_manifest_rows_are_counted(db, data_dir, tmp_path, photo_jpegs):
    root = tmp_path / "d"
    root.mkdir()
    names = list(photo_jpegs)[:10]
    for name in names:
        (root / f"{name}.jpg").write_bytes(photo_jpegs[name])
    rows = [f"{name}.jpg,joy" for name in names] * 2 + [f"{names[0]}.jpg,joy"]  # 21 rows, 10 images
    (root / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    result = _ingest(db, DatasetSpec(name="m", source="folder", path=str(root), labels="labels.csv"), data_dir)
    assert (result.n_inputs, result.n_images, result.n_rejected, result.n_duplicates) == (21, 10, 11, 0) and result.balanced
    repeated = _rejected(db, "m")
    assert {reason for _, reason, _ in repeated} == {"repeated_row"}
    assert any(detail.endswith(f"line 22 repeats line 2 ({root / names[0]}.jpg)") for *_, detail in repeated), repeated


# --- 8. messages ---------------------------------------------------------------------------------------


def test_catalog_numbers_like_1e_4_and_suggestions(tmp_path):
    catalog = tmp_path / "c.yaml"
    catalog.write_text("experiments:\n  probe: {dataset: demo, lr: 1e-4, weight_decay: 5E-2}\n")
    loaded = load_catalog(catalog)
    assert (loaded.experiment("probe").lr, loaded.experiment("probe").weight_decay) == (1e-4, 5e-2)
    with pytest.raises(CatalogError, match=r"unknown experiment 'prob' \(did you mean 'probe'\?\)"):
        loaded.experiment("prob")
    catalog.write_text("experiments:\n  probe: {dataset: demo, epocs: 3}\n")
    with pytest.raises(CatalogError, match=r"unknown key\(s\) \['epocs'\] \(did you mean 'epochs'\?\)"):
        load_catalog(catalog)
    catalog.write_text("experiments:\n  probe: {dataset: demo, optimizer: adamv}\n")
    with pytest.raises(CatalogError, match=r"'adamv' is not allowed \(did you mean 'adamw'\?\)"):
        load_catalog(catalog)


def test_a_missing_archive_says_what_to_fix_and_keeps_nothing(server, tmp_path):
    with pytest.raises(SourceError) as failed:
        download_file(server.url("/gone.zip"), tmp_path / "a.zip", "0" * 64)
    assert "HTTP 404" in str(failed.value) and "check the dataset's url" in str(failed.value) and "resumes" not in str(failed.value)
    assert not list(tmp_path.iterdir())


def test_the_decompression_bomb_limit_named_is_the_one_applied():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (20000, 10000)).save(buf, "PNG")  # 200 Mpx: Pillow itself refuses it before we read its size
    with pytest.raises(Rejected) as refused:
        inspect_image(buf.getvalue())
    assert refused.value.reason == "decompression_bomb" and "89478485" in refused.value.detail and "178956970" not in refused.value.detail


@pytest.mark.slow
def test_a_user_mistake_under_emopipe_run_is_one_line(tmp_path):
    (tmp_path / "c.yaml").write_text(textwrap.dedent(f"""
        datasets:
          absent: {{source: folder, path: {tmp_path / 'no_such_folder'}}}
        experiments:
          absent: {{dataset: absent, text_filter: false}}
        """))
    shutil.copy(PROJECT / "dagster.yaml", tmp_path)
    env = {**os.environ, "EMOPIPE_CATALOG": str(tmp_path / "c.yaml"), "EMOPIPE_DATA_DIR": str(tmp_path / "data"),
           "DAGSTER_HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "emopipe.cli", "run", "absent"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"emopipe: c.yaml: datasets.absent.path: the folder {tmp_path / 'no_such_folder'} does not exist"
                                               .replace("c.yaml", str(tmp_path / "c.yaml"))], run.stderr
    assert "Traceback" not in run.stdout + run.stderr and "Stack Trace" not in run.stdout + run.stderr
