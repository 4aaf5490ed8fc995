"""The scheduled deployment against a real `prefect server start` on 127.0.0.1."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import free_port, stop

pytestmark = pytest.mark.slow
# Far fewer steps and held-out answers than the pipeline's: these tests are about who runs the flow.
QUICK = ["training_config.max_steps=5", "evaluation.max_samples=8"]
PREFECT = [sys.executable, "-m", "prefect"]


def wait_for(url: str, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, f"{url} never answered"
            time.sleep(1)


@contextmanager
def prefect_server(tmp_path: Path, mlflow_server: str) -> Iterator[dict[str, str]]:
    """A real `prefect server start` on a free port, its home in tmp_path; yields the
    environment its clients (the CLI, a served flow, a worker) run with."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "MLFLOW_TRACKING_URI": mlflow_server, "HF_HUB_OFFLINE": "1",
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=(tmp_path / "server.log").open("w"),
                              stderr=subprocess.STDOUT)
    try:
        wait_for(f"{api}/health", server)
        yield env
    finally:
        stop(server)


def run_now(env: dict[str, str]) -> subprocess.CompletedProcess:
    """`prefect deployment run retrain/tiny-cpu --watch` with QUICK's overrides."""
    return subprocess.run([*PREFECT, "deployment", "run", "retrain/tiny-cpu", "--param",
                           f"overrides={json.dumps(QUICK)}", "--watch", "--watch-timeout", "600"],
                          env=env, capture_output=True, text=True, timeout=700)


def test_served_deployment_runs_when_triggered(project, mlflow_server, tmp_path):
    with prefect_server(tmp_path, mlflow_server) as env:
        served = subprocess.Popen([sys.executable, "-m", "flows.schedule", "--root", str(project)],
                                  cwd=project, env=env, stdout=(tmp_path / "serve.log").open("w"),
                                  stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                listed = subprocess.run([*PREFECT, "deployment", "ls"], env=env,
                                        capture_output=True, text=True)
                if "retrain/tiny-cpu" in listed.stdout:
                    break
                assert served.poll() is None and time.monotonic() < deadline, (
                    (tmp_path / "serve.log").read_text())
                time.sleep(2)
            inspect = subprocess.run([*PREFECT, "deployment", "inspect", "retrain/tiny-cpu"],
                                     env=env, capture_output=True, text=True)
            assert "0 3 * * 1" in inspect.stdout, "the cron comes from the pipeline YAML"
            run = run_now(env)
            assert run.returncode == 0, (run.stdout + run.stderr
                                         + (tmp_path / "serve.log").read_text())
            assert "Completed" in run.stdout + run.stderr
        finally:
            stop(served)
