"""The scheduled deployment against a real `prefect server start` on 127.0.0.1."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import free_port, stop

pytestmark = pytest.mark.slow
# Far fewer steps and held-out answers than the pipeline's: these tests are about who runs the flow.
QUICK = ["training_config.max_steps=5", "evaluation.max_samples=8"]


def wait_for(url: str, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, f"{url} never answered"
            time.sleep(1)


def test_served_deployment_runs_when_triggered(project, mlflow_server, tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "MLFLOW_TRACKING_URI": mlflow_server, "HF_HUB_OFFLINE": "1",
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    prefect = [sys.executable, "-m", "prefect"]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([*prefect, "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    served = None
    try:
        wait_for(f"{api}/health", server)
        served = subprocess.Popen([sys.executable, "flows/schedule.py", "--root", str(project)],
                                  cwd=project, env=env, stdout=(tmp_path / "serve.log").open("w"),
                                  stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            listed = subprocess.run([*prefect, "deployment", "ls"], env=env, capture_output=True,
                                    text=True)
            if "retrain/tiny-cpu" in listed.stdout:
                break
            assert served.poll() is None and time.monotonic() < deadline, (
                (tmp_path / "serve.log").read_text())
            time.sleep(2)
        inspect = subprocess.run([*prefect, "deployment", "inspect", "retrain/tiny-cpu"],
                                 env=env, capture_output=True, text=True)
        assert "0 3 * * 1" in inspect.stdout, "the cron comes from the pipeline YAML"
        run = subprocess.run([*prefect, "deployment", "run", "retrain/tiny-cpu", "--param",
                              f"overrides={json.dumps(QUICK)}", "--watch", "--watch-timeout",
                              "600"], env=env, capture_output=True, text=True, timeout=700)
        assert run.returncode == 0, run.stdout + run.stderr + (tmp_path / "serve.log").read_text()
        assert "Completed" in run.stdout + run.stderr
    finally:
        for proc in (served, server):
            if proc is not None:
                stop(proc)
