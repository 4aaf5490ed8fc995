"""The retrain flow under contention and faults: one run per model at a time, and a failure
after the alias move rolls the promotion back. Also: preprocessing is a Prefect cache hit on the
next run, and what Prefect persisted is JSON."""

import contextvars
import json
import threading
import time

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)

import flows.retrain as retrain_flow
from phi3ops import locking
from phi3ops.config import load_mlflow_config
from phi3ops.errors import BusyError, RegistryError
from phi3ops.registry import promotion
from phi3ops.registry.client import Registry
from tests.conftest import own_model

pytestmark = pytest.mark.slow
MODEL = "phi3ops-faults"  # its own model and experiment on the session's MLflow server
WEAK = ["training_config.max_steps=30"]  # beats the base (ROUGE-L +0.34); the full run beats it


def in_thread(target, *args) -> threading.Thread:
    """A thread that sees the Prefect test harness's settings (they live in context variables)."""
    thread = threading.Thread(target=contextvars.copy_context().run, args=(target, *args))
    thread.start()
    return thread


def task_states(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


def artifact(flow_run_id, key: str) -> str:
    with get_client(sync_client=True) as client:
        [found] = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(
                any_=[flow_run_id])))
    return found.data


def test_one_retrain_per_model_and_a_failed_promotion_rolls_back(project, mlflow_server,
                                                                 prefect_harness, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    own_model(project, MODEL)
    flow = retrain_flow.in_project(project)
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    lock = locking.lock_path(project, f"retrain-{MODEL}")
    states = {}

    def trigger(name: str) -> None:
        states[name] = flow(root=str(project), overrides=WEAK, return_state=True)

    # Three triggers on the same model: the first trains; one that will not wait ends at once
    # and says who holds the model; one that waits starts after the first has finished.
    first = in_thread(trigger, "first")
    deadline = time.monotonic() + 300
    while locking.holder(lock) is None:
        assert first.is_alive() and time.monotonic() < deadline, "the first run never locked"
        time.sleep(0.2)
    with pytest.raises(BusyError, match=rf"retrain-{MODEL}: another run holds the lock \(pid "
                                        r"\d+ on .* \(flow run .*\)\); did not wait"):
        flow(root=str(project), overrides=WEAK, lock_timeout_s=0)
    waiter = in_thread(trigger, "waiter")
    first.join(1800)
    waiter.join(600)
    trained, waited = states["first"].result(), states["waiter"].result()
    assert trained["promoted"] and "first champion" in trained["reason"]
    assert waited["skipped"] and waited["reason"].startswith(
        "nothing changed since v1 (data, config and code are the same; it was promoted")
    trained_run = client.get_run(trained["run_id"]).info
    waited_run = client.get_run(waited["run_id"]).info
    with get_client(sync_client=True) as prefect:
        waiter_began = prefect.read_flow_run(states["waiter"].state_details.flow_run_id).start_time
    assert waiter_began.timestamp() * 1000 < trained_run.end_time, "it was triggered meanwhile"
    assert waited_run.start_time >= trained_run.end_time, "but did its work after, never during"
    assert len(client.search_runs([trained_run.experiment_id])) == 2, "the busy one made no run"

    # The full run beats that champion; then tagging the run fails (MLflow went away, say),
    # after the alias move. The transaction puts every alias back and the run is FAILED.
    real_log_tags = promotion.log_tags

    def unreachable(registry, run_id, tags):
        if "phi3ops.promotion" in tags:
            raise RegistryError("could not tag the run: MLflow unreachable")
        real_log_tags(registry, run_id, tags)

    monkeypatch.setattr(promotion, "log_tags", unreachable)
    failed = flow(root=str(project), return_state=True)
    assert failed.is_failed()
    with pytest.raises(RegistryError, match="MLflow unreachable"):
        failed.result()
    new = client.search_model_versions(f"name='{MODEL}'", order_by=["version_number DESC"])[0]
    assert new.version == "2"
    assert new.tags["promotion.decision"] == "rolled-back", "it had been promoted, then undone"
    assert "failed after promoting it" in new.tags["promotion.reason"]
    registry = Registry(load_mlflow_config(project / "mlflow.yaml").resolved(project))
    assert promotion.alias_snapshot(registry) == {"champion": "1", "previous-champion": None,
                                              "challenger": "1"}
    failed_run = client.get_run(new.run_id)
    assert failed_run.info.status == "FAILED"
    assert "phi3ops.promotion" not in failed_run.data.tags

    # Same data, preprocess config, tokenizer and code: preprocessing was a Prefect cache hit.
    tasks = task_states(failed.state_details.flow_run_id)
    assert tasks["preprocess"] == "Cached" and tasks["record"] == "Failed"
    assert tasks["register"] == tasks["promote"] == "RolledBack"
    # The failure report names the step that failed and says the aliases were put back.
    report = artifact(failed.state_details.flow_run_id, "retrain-failure")
    assert report.startswith("# retrain tiny-cpu failed in `record`"), report
    assert "rolled back: the aliases are where they were" in report

    # What Prefect persisted is JSON, in the project: the preprocess task's record (metadata and
    # result), each flow run's return value or exception (the result alone).
    stored = [json.loads(p.read_text())
              for p in (project / ".cache" / "prefect-results").iterdir() if p.is_file()]
    records = [doc for doc in stored if "metadata" in doc]
    assert [r["metadata"]["serializer"]["type"] for r in records] == ["json"]
    prep = json.loads(records[0]["result"])
    assert prep["__class__"] == "phi3ops.data.preprocess.PreprocessResult"
    assert prep["data"]["n_accepted"] == 1200
    flow_results = [doc for doc in stored if "metadata" not in doc]
    assert {doc.get("run_id") for doc in flow_results} >= {trained["run_id"], waited["run_id"]}
    assert {doc.get("__exc_type__") for doc in flow_results} >= {
        "phi3ops.errors.BusyError", "phi3ops.errors.RegistryError"}
