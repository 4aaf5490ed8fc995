"""A user's mistake ends in one paragraph that names the cause and the fix, exit 2, no traceback
(unless --debug), and before any heavy work: MLflow down, a version or model that does not
exist."""

import subprocess
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from phi3ops.cli.main import main
from tests.cli.test_cli import phi3ops
from tests.conftest import REPO, free_port


def own_model(root: Path, name: str | None = None) -> str:
    """Give the project at `root` a registered model of its own (mlflow.yaml), so tests on the
    session's MLflow server do not meet each other's versions."""
    name = name or f"errors-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True, exist_ok=True)
    settings = (REPO / "mlflow.yaml").read_text()
    (root / "mlflow.yaml").write_text(settings.replace("registered_model: phi3ops-chat",
                                                       f"registered_model: {name}"))
    return name


def one_paragraph(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_run_with_mlflow_down_ends_within_its_timeout(project):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = phi3ops("run", "--root", str(project), "--mlflow-timeout", "3", cwd=project,
                     env={"MLFLOW_TRACKING_URI": uri})
    error = one_paragraph(result)
    assert f"MLflow at {uri} is not reachable (Connection refused)" in error
    assert "MLFLOW_TRACKING_URI" in error and "--mlflow-timeout" in error
    retries = [line for line in result.stderr.splitlines() if "retry" in line]
    assert 1 <= len(retries) <= 4, result.stderr  # one line per retry, a bounded number
    assert len(result.stderr.splitlines()) == len(retries) + 1, result.stderr
    # It stopped before any stage: no Prefect server, no data checked out, no MLflow run.
    assert "Prefect" not in result.stdout + result.stderr
    assert not (project / "data").exists() and not (project / "mlruns.db").exists()


def test_the_flow_entry_point_takes_the_same_timeout(project, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(SystemExit) as stopped:  # `python -m flows.retrain` is `phi3ops run`
        main(["run", "--root", str(project), "--mlflow-timeout", "1"])
    assert stopped.value.code == 2
    assert "is not reachable (Connection refused); waited 1 s" in capsys.readouterr().err


def test_promote_names_the_versions_that_exist(tmp_path, mlflow_server):
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    name = own_model(tmp_path)
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    client.create_registered_model(name)
    run = client.create_run(client.create_experiment(name))
    for _ in range(2):  # versions nobody tagged: not phi3ops' own
        client.create_model_version(name, source=f"runs:/{run.info.run_id}/model",
                                    run_id=run.info.run_id)

    error = one_paragraph(phi3ops("promote", "--version", "999", "--root", str(tmp_path),
                                  env=env))
    assert f"version 999 of {name} does not exist; its versions are 1..2" in error

    error = one_paragraph(phi3ops("promote", "--version", "2", "--root", str(tmp_path), env=env))
    assert f"refusing {name} v2: it lacks phi3ops' registration tags" in error
    assert client.get_registered_model(name).aliases == {}, "nothing was promoted"

    other = tmp_path / "other"
    missing = own_model(other)
    error = one_paragraph(phi3ops("promote", "--version", "1", "--root", str(other), env=env))
    assert f"registered model {missing} does not exist" in error and "phi3ops run" in error

    debug = phi3ops("--debug", "promote", "--version", "999", "--root", str(tmp_path), env=env)
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "RegistryError" in debug.stderr


def test_evaluate_checks_the_model_before_the_data(project, mlflow_server):
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    own_model(project)
    error = one_paragraph(phi3ops("evaluate", "--root", str(project), "--model",
                                  "models:/nope/1", cwd=project, env=env))
    assert "registered model nope does not exist" in error
    error = one_paragraph(phi3ops("evaluate", "--root", str(project), "--model",
                                  "runs/typo/adapter", cwd=project, env=env))
    assert "'runs/typo/adapter' is no model phi3ops can load" in error
    assert "adapter directory that exists" in error
    assert not (project / "data").exists(), "no data was checked out or preprocessed"
