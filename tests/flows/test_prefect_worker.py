"""prefect.yaml deployed to a process work pool on a real `prefect server start`, its run picked
up and run by a real `prefect worker start`: the way a team runs retrains on its own machines."""

import json
import subprocess

import pytest
import yaml
from mlflow import MlflowClient

from phi3ops.config import load_config
from tests.conftest import REPO, git, own_model, stop
from tests.flows.test_schedule import PREFECT, prefect_server, run_now

POOL = "phi3ops-process"
MODEL = "phi3ops-worker"


def deployments() -> list[dict]:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]


@pytest.mark.parametrize("deployment", deployments(), ids=lambda d: d["name"])
def test_prefect_yaml_follows_the_pipeline_yaml(deployment):
    """The cron lives twice, in prefect.yaml for Prefect and in the pipeline YAML for `make
    schedule`: the two must say the same."""
    cfg = load_config(REPO / deployment["parameters"]["pipeline"])
    assert deployment["name"] == cfg.name
    assert [s["cron"] for s in deployment["schedules"]] == [cfg.schedule]
    assert deployment["entrypoint"] == "flows/retrain.py:retrain"
    assert deployment["concurrency_limit"] == 1, "one retrain at a time, like `make schedule`"


@pytest.mark.slow
@pytest.mark.scale
def test_worker_runs_the_deployment(project, mlflow_server, tmp_path):
    own_model(project, MODEL)

    def prefect(*args: str, timeout: float = 300) -> str:
        done = subprocess.run([*PREFECT, *args], cwd=project, env=env, capture_output=True,
                              text=True, timeout=timeout)
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}{done.stderr}"
        return done.stdout

    with prefect_server(tmp_path, mlflow_server) as env:
        prefect("work-pool", "create", POOL, "--type", "process")
        prefect("--no-prompt", "deploy", "--all")  # what `make deploy` runs, from the root

        deployment = json.loads(prefect("deployment", "inspect", "retrain/tiny-cpu", "-o", "json"))
        cfg = load_config(project / "pipelines" / "tiny-cpu.yaml")
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == [cfg.schedule]
        assert deployment["work_pool_name"] == POOL
        assert json.loads(prefect("work-pool", "inspect", POOL, "-o", "json"))["type"] == "process"
        assert deployment["global_concurrency_limit"]["limit"] == 1
        # The root is where `prefect deploy` ran: the flow's parameter and the worker's directory.
        root = str(project.resolve())
        assert deployment["parameters"] == {"pipeline": "pipelines/tiny-cpu.yaml", "root": root}
        assert deployment["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": root}}]

        # Started elsewhere: the pull step, not the worker's directory, finds the project.
        worker = subprocess.Popen(
            [*PREFECT, "worker", "start", "--pool", POOL], cwd=tmp_path,
            env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"},  # picked up within a second
            stdout=(tmp_path / "worker.log").open("w"), stderr=subprocess.STDOUT)
        try:
            run = run_now(env)
            worker_log = (tmp_path / "worker.log").read_text()
            assert run.returncode == 0, run.stdout + run.stderr + worker_log
            assert "Completed" in run.stdout + run.stderr, run.stdout + worker_log
        finally:
            stop(worker)

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    [version] = client.search_model_versions(f"name='{MODEL}'")
    assert version.tags["phi3ops.code_git_rev"] == git(project, "rev-parse", "HEAD")
    run_record = client.get_run(version.run_id)
    assert run_record.info.status == "FINISHED"
    assert run_record.data.params["training_config.max_steps"] == "5", "the run's parameters"
    # Prefect's results in the project, as with `phi3ops run`, where the next run from it finds
    # the preprocess cache; none in the worker's PREFECT_HOME.
    results = [p.name for p in (project / ".cache" / "prefect-results").iterdir()]
    assert any(name.startswith("preprocess-") for name in results), results
    assert not (tmp_path / "prefect" / "storage").exists()
