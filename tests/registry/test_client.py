"""A Registry talks to the server its config names, whatever MLflow's process-wide URI says,
and leaves that URI (and MLFLOW_TRACKING_URI) as it found them. Against a real MLflow server."""

import os
import uuid

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.tracking._tracking_service import utils as tracking

from phi3ops.config import MlflowConfig
from phi3ops.registry.client import Registry


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """MLflow's process-wide URI on another store, as a user's code in the same process might
    leave it; put back (and its environment variable with it) after the test."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    mlflow.set_tracking_uri(other)
    yield other
    mlflow.set_tracking_uri(None)


def test_a_registry_uses_its_own_server_not_the_process_wide_uri(mlflow_server, elsewhere,
                                                                 tmp_path):
    experiment = f"own-{uuid.uuid4().hex[:8]}"
    registry = Registry(MlflowConfig(tracking_uri=mlflow_server, experiment=experiment,
                                     registered_model=f"m-{uuid.uuid4().hex[:8]}"))
    run_id = registry.client.create_run(registry.experiment_id).info.run_id
    registry.client.log_text(run_id, "hello", "note.txt")

    on_server = MlflowClient(mlflow_server)
    assert on_server.get_experiment_by_name(experiment).experiment_id == registry.experiment_id
    assert registry.read_text(f"runs:/{run_id}/note.txt") == "hello"
    assert MlflowClient(elsewhere).get_experiment_by_name(experiment) is None
    assert registry.alias("champion") is None, "no such model yet: no version, no error"
    assert mlflow_server not in repr(registry), "a URI may hold credentials"


def test_as_process_default_puts_the_process_wide_uri_back(mlflow_server, elsewhere):
    registry = Registry(MlflowConfig(tracking_uri=mlflow_server,
                                     experiment=f"active-{uuid.uuid4().hex[:8]}"))
    run_id = registry.client.create_run(registry.experiment_id).info.run_id
    with registry.as_process_default(), mlflow.start_run(run_id=run_id):
        mlflow.log_param("where", "the registry's server")  # MLflow's module functions
    assert registry.client.get_run(run_id).data.params == {"where": "the registry's server"}
    assert mlflow.get_tracking_uri() == elsewhere


def test_as_process_default_keeps_mlflow_tracking_uri(mlflow_server, monkeypatch):
    """MLflow's setter drops the variable when it restores an unset URI; a Registry does not."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert tracking._tracking_uri is None
    registry = Registry(MlflowConfig(tracking_uri=mlflow_server,
                                     experiment=f"env-{uuid.uuid4().hex[:8]}"))
    with registry.as_process_default():
        assert mlflow.get_tracking_uri() == mlflow_server
    assert tracking._tracking_uri is None
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:9"


def test_phi3ops_registers_on_a_local_store_while_the_process_wide_uri_is_elsewhere(
        adapter, elsewhere, tmp_path):
    """`make run`'s default store (SQLite, no server): MLflow's SQL registry finds a logged model
    through the process-wide URI, which registration points at the right store meanwhile."""
    from phi3ops.registry.store import Candidate, Lineage, register_adapter

    local = tmp_path / "project"
    local.mkdir()
    registry = Registry(MlflowConfig(tracking_uri=f"sqlite:///{local / 'mlruns.db'}",
                                     artifact_location=(local / "mlartifacts").as_uri()))
    run_id = registry.client.create_run(registry.experiment_id).info.run_id
    lineage = Lineage("d.dir", "r1", "c1", "r1", "h1", "l1", "tiny-cpu", "tiny-phi3")
    version = register_adapter(registry, run_id, Candidate(lineage, {"tuned_rougeL": 0.5},
                                                           *adapter, max_new_tokens=8))
    assert registry.alias("challenger").version == version.version
    assert version.run_id == run_id
    assert mlflow.get_tracking_uri() == elsewhere
    assert MlflowClient(elsewhere).search_registered_models() == []
