"""The Dagster UI as a user meets it: `dagster dev` on 127.0.0.1 with a private instance, the asset graph and a
materialization of one experiment over GraphQL, and the evaluation page rendered by headless Chromium."""

import os
import re
import textwrap
import time
from pathlib import Path

import pytest

from emopipe_tests.sockets import listeners
from emopipe_tests.ui_support import CHROMIUM, REPO, DagsterDev, chromium

pytestmark = pytest.mark.slow  # dagster dev, a launched run and headless Chromium: minutes

EXPERIMENT = "ui_tiny"
CATALOG = f"""
datasets:
  ui_tiny:
    source: synthetic
    n_per_class: 10
    seed: 5
experiments:
  {EXPERIMENT}:
    dataset: ui_tiny
    image_size: 64
    split: 60/20/20
    model: tf_efficientnet_lite0
    pretrained: efficientnet_lite0
    mode: linear_probe
    epochs: 5
    # OCR is covered by test_text_scores and test_pipeline; here it would only make the run minutes longer.
    text_filter: false
    explain_per_class: 0   # no heatmaps: test_explanations covers them
"""
CHAIN = {
    "raw_images": "ingest", "images_32": "images", "images_224": "images", "text_scores": "text_filter",
    "filtered_images": "text_filter", "splits": "splits", "trained_model": "training", "evaluation": "evaluation",
    "explanations": "evaluation",
}
RUN_TIMEOUT_S = 900
ARTIFACTS = REPO / "test-artifacts"

LAUNCH = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on PythonError { message stack }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidSubsetError { message }
    ... on PipelineNotFoundError { message }
    ... on RunConflict { message }
    ... on UnauthorizedError { message }
  }
}"""
RUN_STATUS = """
query($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { status } ... on RunNotFoundError { message } }
}"""
RUN_STEPS = """
query($runId: ID!) {
  runOrError(runId: $runId) { ... on Run { startTime endTime stepStats { stepKey startTime endTime } } }
}"""
RUN_FAILURES = """
query($runId: ID!) {
  logsForRun(runId: $runId) {
    ... on EventConnection { events { __typename ... on MessageEvent { message level stepKey } } }
  }
}"""
EVALUATION_METADATA = """
query($partition: String!) {
  assetNodes(assetKeys: [{path: ["evaluation"]}]) {
    assetMaterializations(partitions: [$partition], limit: 1) {
      runId partition
      metadataEntries {
        label __typename
        ... on FloatMetadataEntry { floatValue }
        ... on MarkdownMetadataEntry { mdStr }
        ... on TextMetadataEntry { text }
      }
    }
  }
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    (root / "catalog.yaml").write_text(textwrap.dedent(CATALOG))
    (root / "home").mkdir()
    env = {**os.environ, "EMOPIPE_CATALOG": str(root / "catalog.yaml"), "EMOPIPE_DATA_DIR": str(root / "data")}
    env.pop("PYTEST_CURRENT_TEST", None)
    dev = DagsterDev(root / "home", env, log=root / "dagster_dev.log")
    try:
        started = time.monotonic()
        dev.wait_ready()
        print(f"\ndagster dev ready on {dev.url} in {time.monotonic() - started:.0f} s")
        # What the UI's "Skip" on its first-visit newsletter dialog does: the dialog would cover the page.
        assert dev.graphql("mutation { setNuxSeen }")["setNuxSeen"]
        yield dev
    finally:
        dev.stop()


@pytest.fixture(scope="module")
def materialized(server):
    """One run of the `main` job for the test experiment, launched and followed as the UI does it."""
    params = {
        "selector": {"repositoryLocationName": "emopipe", "repositoryName": "__repository__", "jobName": "main"},
        "mode": "default",
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": EXPERIMENT}]},
    }
    launched = server.graphql(LAUNCH, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    status = launched["run"]["status"]
    while status not in ("SUCCESS", "FAILURE", "CANCELED"):
        assert time.monotonic() < deadline, f"run {run_id} still {status} after {RUN_TIMEOUT_S} s:\n{server.log_tail()}"
        time.sleep(2)
        reply = server.graphql(RUN_STATUS, {"runId": run_id})["runOrError"]
        assert reply["__typename"] == "Run", reply
        status = reply["status"]
    if status != "SUCCESS":
        events = server.graphql(RUN_FAILURES, {"runId": run_id})["logsForRun"]["events"]
        errors = [f"{e.get('stepKey')}: {e['message']}" for e in events if e.get("level") in ("ERROR", "CRITICAL")]
        pytest.fail(f"run {run_id} ended {status}:\n" + "\n".join(errors) + f"\n{server.log_tail()}")
    stats = server.graphql(RUN_STEPS, {"runId": run_id})["runOrError"]
    steps = ", ".join(f"{s['stepKey']} {s['endTime'] - s['startTime']:.0f}s" for s in stats["stepStats"] if s["endTime"])
    print(f"\nrun {run_id}: {stats['endTime'] - stats['startTime']:.0f} s ({steps})")
    return run_id


def evaluation_metadata(server) -> tuple[str, dict]:
    materializations = server.graphql(EVALUATION_METADATA, {"partition": EXPERIMENT})["assetNodes"][0]["assetMaterializations"]
    assert len(materializations) == 1
    entries = materializations[0]["metadataEntries"]
    return materializations[0]["runId"], {e["label"]: e for e in entries}


def test_graph_and_materialization_over_graphql(server, materialized):
    nodes = server.graphql("{ assetNodes { assetKey { path } groupName description partitionKeys jobNames } }")["assetNodes"]
    by_key = {"/".join(n["assetKey"]["path"]): n for n in nodes}
    for key, group in CHAIN.items():
        assert key in by_key, f"asset {key} missing from the UI's graph: {sorted(by_key)}"
        node = by_key[key]
        assert node["groupName"] == group, (key, node["groupName"])
        assert len(node["description"] or "") > 40, (key, node["description"])
        assert EXPERIMENT in node["partitionKeys"] and "demo" in node["partitionKeys"], (key, node["partitionKeys"])
        assert "main" in node["jobNames"], (key, node["jobNames"])

    run_id, metadata = evaluation_metadata(server)
    assert run_id == materialized
    accuracy = metadata[f"{EXPERIMENT}/test/accuracy"]["floatValue"]
    assert 0.0 <= accuracy <= 1.0
    assert len(metadata["model_id"]["text"]) == 64
    assert "accuracy" in metadata["headline"]["mdStr"]
    assert "data:image/png;base64," in metadata[f"confusion matrix: {EXPERIMENT} test"]["mdStr"]


def test_evaluation_page_renders_the_headline_metric(server, materialized, tmp_path):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} missing in CI: .ci/run installs the Debian package chromium")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); CI installs it")
    _, metadata = evaluation_metadata(server)
    accuracy = metadata[f"{EXPERIMENT}/test/accuracy"]["floatValue"]
    # The Partitions tab with the partition selected shows its latest materialization's metadata table.
    url = f"{server.url}/assets/evaluation?view=partitions&partition={EXPERIMENT}"

    label = f"{EXPERIMENT}/test/accuracy"
    for _ in range(3):  # a loaded machine may stop virtual time before the page's GraphQL data arrived
        page = chromium(url, tmp_path / "profile", "--dump-dom")
        assert page.returncode == 0, page.stderr[-3000:]
        dom = page.stdout
        if label in dom:
            break
    assert label in dom, f"metric label not rendered; DOM tail:\n{dom[-3000:]}"
    # The label and its value in one row of the metadata table, not merely somewhere on the page.
    rows = re.findall(r"<tr\b.*?</tr>", dom, flags=re.S)
    assert any(label in row and f">{accuracy:g}<" in row for row in rows), f"accuracy {accuracy} not rendered beside {label}"
    assert f"{accuracy * 100:.2f} %" in dom, "the headline table (Markdown) not rendered"
    assert "Join the Dagster community" not in dom

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "evaluation_page.png"
    shot = chromium(url, tmp_path / "profile", f"--screenshot={screenshot}")
    assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-3000:]
    print(f"screenshot: {screenshot}")


def test_dagster_dev_listens_on_loopback_only(server, materialized):
    """The webserver, the daemon, the code servers and the run worker: every port they hold is on 127.0.0.1."""
    group = server.process.pid  # dagster dev leads its own process group; its children stay in it

    def in_group(pid):
        try:
            return pid is not None and os.getpgid(pid) == group
        except ProcessLookupError:
            return False

    held = [s for s in listeners() if in_group(s.pid)]
    assert any(s.port == server.port for s in held), held
    assert all(s.loopback for s in held), [s for s in held if not s.loopback]
