"""`kill -9` of a whole `phi3ops run` during training: the training child dies with it, and the
next run closes the dead run in MLflow and resumes from its newest complete checkpoint."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient
from prefect.settings import get_current_settings

import flows.retrain as retrain_flow
from phi3ops.train.checkpoints import MARKER
from tests.conftest import own_model

pytestmark = pytest.mark.slow
MODEL = "phi3ops-killed"
LONG = ["training_config.save_steps=20",
        "evaluation.max_samples=8"]


def trainers(project: Path) -> list[psutil.Process]:
    """The training processes of this project still alive."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if ("phi3ops.train.launch" in cmdline and str(project) in cmdline
                and process.info["status"] != psutil.STATUS_ZOMBIE):
            found.append(process)
    return found


def wait_for(condition, what: str, timeout_s: float = 600):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return result


def test_a_killed_run_takes_its_training_along_and_the_rerun_resumes(
        project, mlflow_server, prefect_harness, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    own_model(project, MODEL)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": mlflow_server,
           "PREFECT_API_URL": str(get_current_settings().api.url)}
    run = subprocess.Popen([sys.executable, "-m", "phi3ops.cli", "run", "--root", str(project),
                            *LONG], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        marker = wait_for(lambda: next(project.glob(f"runs/*/checkpoints/*/{MARKER}"), None),
                          "a complete checkpoint")
        assert trainers(project), "training runs in its own process"
        os.killpg(run.pid, signal.SIGKILL)  # the whole run: CLI, flow and Prefect's workers
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    # The training child lives in a session of its own, out of reach of that signal.
    wait_for(lambda: not trainers(project), "the training child to die", timeout_s=30)
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(MODEL).experiment_id
    [killed] = client.search_runs([experiment])
    assert killed.info.status == "RUNNING", "nobody told MLflow"

    summary = retrain_flow.in_project(project)(root=str(project), overrides=LONG)

    killed = client.get_run(killed.info.run_id)
    assert killed.info.status == "FAILED"
    assert killed.data.tags["phi3ops.closed_by"].startswith(f"run {summary['run_id']} ")
    assert "is gone; it died without ending the run" in killed.data.tags["phi3ops.closed_reason"]
    resumed = Path(summary["resumed_from"])
    assert resumed.parent == marker.parent.parent, "the same run directory"
    assert int(resumed.name.split("-")[1]) >= int(marker.parent.name.split("-")[1])
    assert summary["version"] == 1 and summary["promoted"]
