"""Scheduled retraining and the new-data sensor, evaluated through Dagster's own tick machinery against
a repository whose `main` job has the catalog's experiment partitions."""

import datetime as dt
import http.server
import json
import os
import subprocess
import sys
import threading
import textwrap

import dagster as dg
import pytest

from emopipe.automation import build_data_sensor, build_schedules
from emopipe.catalog import CatalogError, load_catalog
from emopipe.core.dataset_versions import observe

CATALOG = """
datasets:
  pics:
    source: folder
    path: pics
  listed:
    source: url_list
    labels: lists/listed.csv
  remote:
    source: url_list
    url: {remote_url}
  unused:
    source: folder
    path: nowhere
experiments:
  on_pics:
    dataset: pics
    retrain: "0 3 * * 1"
  on_listed:
    dataset: listed
    eval_datasets: [pics]
  on_remote:
    dataset: remote
  also-on.listed:
    dataset: listed
    retrain: "30 1 * * *"
"""


@pytest.fixture
def project(tmp_path, photo_jpegs):
    for label, names in {"joy": ["astronaut", "coffee"], "fear": ["rocket"]}.items():
        (tmp_path / "pics" / label).mkdir(parents=True)
        for name in names:
            (tmp_path / "pics" / label / f"{name}.jpg").write_bytes(photo_jpegs[name])
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "listed.csv").write_text("url,label\nhttp://127.0.0.1:9/a.jpg,joy\n")
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "remote.csv").write_text("url,label\nhttp://127.0.0.1:9/b.jpg,fear\n")
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "served"), **kw)
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/remote.csv"
    (tmp_path / "catalog.yaml").write_text(textwrap.dedent(CATALOG).format(remote_url=url))
    yield tmp_path
    server.shutdown()
    server.server_close()


def repository(catalog):
    """A code location like emopipe.definitions: a `main` job partitioned by the catalog's experiments."""
    partitions = dg.StaticPartitionsDefinition(sorted(catalog.experiments))

    @dg.asset(partitions_def=partitions)
    def chain() -> None: ...

    main = dg.define_asset_job("main", selection=[chain])
    return dg.Definitions(assets=[chain], jobs=[main], schedules=build_schedules(catalog),
                          sensors=[build_data_sensor(catalog)]).get_repository_def()


def test_retrain_schedules_launch_their_experiment_partition(project):
    catalog = load_catalog(project / "catalog.yaml")
    repo = repository(catalog)
    schedules = {s.name: s for s in repo.schedule_defs}
    assert set(schedules) == {"retrain_on_pics", "retrain_also_on_listed"}
    weekly = schedules["retrain_on_pics"]
    assert (weekly.cron_schedule, weekly.execution_timezone, weekly.job_name) == ("0 3 * * 1", "UTC", "main")
    assert weekly.default_status == dg.DefaultScheduleStatus.RUNNING
    monday = dt.datetime(2026, 11, 30, 3, 0, tzinfo=dt.timezone.utc)
    with dg.DagsterInstance.ephemeral() as instance:
        context = dg.build_schedule_context(instance=instance, scheduled_execution_time=monday, repository_def=repo)
        (request,) = weekly.evaluate_tick(context).run_requests
        assert request.partition_key == "on_pics"
        assert request.tags["dagster/partition"] == "on_pics"
        assert request.tags["emopipe/trigger"] == "retrain"
        assert request.tags["dagster/schedule_name"] == "retrain_on_pics"
        assert request.run_key == f"on_pics:{monday.isoformat()}"
        daily = schedules["retrain_also_on_listed"]
        context = dg.build_schedule_context(instance=instance, scheduled_execution_time=monday, repository_def=repo)
        (request,) = daily.evaluate_tick(context).run_requests
        assert request.partition_key == "also-on.listed"


def test_invalid_cron_names_the_experiment(tmp_path):
    (tmp_path / "catalog.yaml").write_text("experiments:\n  demo2:\n    dataset: demo\n    retrain: '61 3 * * 1'\n")
    catalog = load_catalog(tmp_path / "catalog.yaml")
    with pytest.raises(CatalogError, match=r"catalog.yaml: experiments.demo2.retrain: '61 3 \* \* 1' is not a valid cron"):
        build_schedules(catalog)


def tick(repo, instance, cursor):
    sensor = repo.get_sensor_def("new_data")
    result = sensor.evaluate_tick(dg.build_sensor_context(cursor=cursor, instance=instance, repository_def=repo))
    return result, result.cursor


def test_sensor_runs_exactly_the_experiments_whose_data_changed(project, photo_jpegs):
    catalog = load_catalog(project / "catalog.yaml")
    repo = repository(catalog)
    sensor = repo.get_sensor_def("new_data")
    assert sensor.minimum_interval_seconds == 60 and sensor.default_status == dg.DefaultSensorStatus.RUNNING
    with dg.DagsterInstance.ephemeral() as instance:
        first, cursor = tick(repo, instance, None)
        assert first.run_requests == [] and "recorded the first version" in first.skip_message
        # Only datasets some experiment uses are watched.
        assert {"pics", "listed", "remote"} <= set(json.loads(cursor)["versions"])
        assert "unused" not in json.loads(cursor)["versions"] and "unused" not in first.skip_message

        again, cursor2 = tick(repo, instance, cursor)
        assert again.run_requests == [] and again.skip_message.startswith("no dataset changed") and cursor2 == cursor

        (project / "pics" / "fear" / "chelsea.jpg").write_bytes(photo_jpegs["chelsea"])
        result, cursor = tick(repo, instance, cursor2)
        requests = {r.partition_key: r for r in result.run_requests}
        assert set(requests) == {"on_pics", "on_listed"}  # on_listed evaluates on pics
        assert requests["on_listed"].tags["emopipe/changed_datasets"] == "pics"
        assert requests["on_pics"].tags["dagster/partition"] == "on_pics"
        assert len({r.run_key for r in result.run_requests}) == 2

        # The local URL list changes: its two experiments, not the folder's own.
        original = (project / "lists" / "listed.csv").read_text()
        changed = "url,label\nhttp://127.0.0.1:9/a.jpg,joy\nhttp://127.0.0.1:9/c.jpg,fear\n"
        (project / "lists" / "listed.csv").write_text(changed)
        result, cursor = tick(repo, instance, cursor)
        assert sorted(r.partition_key for r in result.run_requests) == ["also-on.listed", "on_listed"]
        first_keys = {r.partition_key: r.run_key for r in result.run_requests}

        # Rewritten in place with the same size: the mtime tells (set explicitly: no clock granularity).
        target = project / "pics" / "joy" / "coffee.jpg"
        mtime = target.stat().st_mtime_ns
        target.write_bytes(target.read_bytes())
        os.utime(target, ns=(mtime + 10**9, mtime + 10**9))
        result, cursor = tick(repo, instance, cursor)
        assert sorted(r.partition_key for r in result.run_requests) == ["on_listed", "on_pics"]

        # Reverted, then changed the same way again: both are new changes with new run keys (Dagster
        # would skip a request whose run key it launched before).
        (project / "lists" / "listed.csv").write_text(original)
        reverted, cursor = tick(repo, instance, cursor)
        assert sorted(r.partition_key for r in reverted.run_requests) == ["also-on.listed", "on_listed"]
        (project / "lists" / "listed.csv").write_text(changed)
        again, cursor = tick(repo, instance, cursor)
        keys = {r.partition_key: r.run_key for r in again.run_requests}
        assert set(keys) == set(first_keys) and all(keys[e] != first_keys[e] for e in keys)


def test_sensor_downloads_a_remote_url_list(project):
    catalog = load_catalog(project / "catalog.yaml")
    repo = repository(catalog)
    with dg.DagsterInstance.ephemeral() as instance:
        _, recorded = tick(repo, instance, None)
        (project / "served" / "remote.csv").write_text("url,label\nhttp://127.0.0.1:9/b.jpg,fear\nhttp://127.0.0.1:9/d.jpg,joy\n")
        result, cursor = tick(repo, instance, recorded)
        (request,) = result.run_requests
        assert request.partition_key == "on_remote" and request.tags["emopipe/changed_datasets"] == "remote"
        # A look repeated from the same cursor (the daemon restarted mid-tick) gives the same run key,
        # so Dagster launches that change once.
        (repeated,) = tick(repo, instance, recorded)[0].run_requests
        assert repeated.run_key == request.run_key
        assert tick(repo, instance, cursor)[0].run_requests == []


def test_unreadable_dataset_keeps_its_version_until_it_returns(project):
    catalog = load_catalog(project / "catalog.yaml")
    repo = repository(catalog)
    with dg.DagsterInstance.ephemeral() as instance:
        (project / "pics").rename(project / "pics.away")
        first, cursor = tick(repo, instance, None)
        assert "not readable yet: " in first.skip_message and "pics" in first.skip_message.split("not readable yet: ")[1]
        assert "pics" not in json.loads(cursor)["versions"]
        (project / "pics.away").rename(project / "pics")
        back, cursor = tick(repo, instance, cursor)
        assert back.run_requests == [] and "recorded the first version of pics" in back.skip_message

        # Gone after being seen: the last version is kept, no run; back unchanged (a rename keeps mtimes): no run.
        (project / "pics").rename(project / "pics.away")
        gone, cursor2 = tick(repo, instance, cursor)
        assert gone.run_requests == [] and cursor2 == cursor
        # The sensor logs these as warnings: the dataset was known, so its loss matters.
        assert "the folder" in observe(catalog, cursor).errors["pics"] and "pics" in observe(catalog, cursor).errors["pics"]
        (project / "pics.away").rename(project / "pics")
        back, cursor = tick(repo, instance, cursor2)
        assert back.run_requests == [] and cursor == cursor2
        (project / "pics" / "joy" / "astronaut.jpg").unlink()
        result, _ = tick(repo, instance, cursor)
        assert sorted(r.partition_key for r in result.run_requests) == ["on_listed", "on_pics"]


def test_definitions_wire_schedules_and_sensor(project):
    """The real code location, loaded with this catalog: the retrain tick targets the real `main` job."""
    script = textwrap.dedent("""
        import datetime as dt, dagster as dg
        from emopipe.definitions import defs
        repo = defs.get_repository_def()
        print(sorted(s.name for s in repo.schedule_defs), [s.name for s in repo.sensor_defs])
        at = dt.datetime(2026, 11, 30, 3, tzinfo=dt.timezone.utc)
        ctx = dg.build_schedule_context(scheduled_execution_time=at, repository_def=repo)
        (req,) = repo.get_schedule_def("retrain_on_pics").evaluate_tick(ctx).run_requests
        print(req.partition_key, repo.get_job("main").partitions_def.get_partition_keys())
    """)
    env = {**os.environ, "EMOPIPE_CATALOG": str(project / "catalog.yaml"), "EMOPIPE_DATA_DIR": str(project / "data"),
           "DAGSTER_HOME": str(project)}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    names, request = run.stdout.strip().splitlines()
    assert names == "['retrain_also_on_listed', 'retrain_on_pics'] ['dead_runs', 'new_data']"
    assert request.startswith("on_pics [") and "'on_remote'" in request
