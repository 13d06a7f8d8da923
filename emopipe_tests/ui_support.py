"""Helpers for the UI test: a private `dagster dev` on 127.0.0.1, its GraphQL API, and headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"  # never any other address: the test server must not be reachable from outside
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class DagsterDev:
    """`dagster dev` (webserver + daemon, so queued runs launch) in its own process group."""

    def __init__(self, home: Path, env: dict[str, str], log: Path):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.home = home
        # The project's instance settings (run queue, concurrency pools, retries, monitoring) apply here too.
        shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
        self.log = log
        self._log_file = open(log, "wb")
        # workspace.yaml from the repository root: the same code location a user's `dagster dev` loads.
        self.process = subprocess.Popen(
            ["dagster", "dev", "-h", HOST, "-p", str(self.port), "-w", str(REPO / "workspace.yaml")],
            cwd=REPO, env={**env, "DAGSTER_HOME": str(home)}, stdout=self._log_file, stderr=subprocess.STDOUT,
            start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dagster dev exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                # The webserver answers before the code location has loaded: wait for the location too.
                data = self.graphql("{ workspaceOrError { ... on Workspace { locationEntries { name "
                                    "locationOrLoadError { __typename } } } } }")
                entries = data["workspaceOrError"]["locationEntries"]
                kinds = {e["name"]: (e["locationOrLoadError"] or {}).get("__typename") for e in entries}
                if kinds.get("emopipe") == "RepositoryLocation":
                    return
                if kinds.get("emopipe") == "PythonError":
                    raise RuntimeError(f"code location emopipe failed to load:\n{self.log_tail()}")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        raise TimeoutError(f"dagster dev not ready on {self.url} after {timeout:.0f} s:\n{self.log_tail()}")

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply = json.load(response)
        if reply.get("errors"):
            raise AssertionError(f"GraphQL errors: {reply['errors']}")
        return reply["data"]

    def log_tail(self, n: int = 6000) -> str:
        self._log_file.flush()
        return self.log.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> None:
        """SIGTERM to the whole group (dagster dev, webserver, daemon, code server, run workers), then SIGKILL."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            os.killpg(self.process.pid, signal.SIGKILL)  # children that outlived their parent
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self._log_file.close()


def chromium(url: str, profile: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Headless Chromium on a URL; with --dump-dom its stdout is the DOM after the page's scripts ran."""
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
         f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--window-size=1400,1000", *extra, url],
        capture_output=True, text=True, timeout=timeout)
