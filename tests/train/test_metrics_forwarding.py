"""Training metrics travel child -> JSON lines -> the caller -> the MLflow run (a real server)."""

import json
import logging

from mlflow import MlflowClient

from phi3ops.train.launch import METRICS_FILE, MetricsForwarder, _metrics_writer


def test_complete_lines_reach_the_run_and_a_half_written_one_waits(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server)
    run_id = client.create_run(client.create_experiment(f"fwd-{tmp_path.name}")).info.run_id
    write = _metrics_writer(tmp_path, enabled=True)
    forward = MetricsForwarder(tmp_path / METRICS_FILE, run_id, mlflow_server)
    forward.forward()  # nothing written yet
    write({"loss": 2.5, "tokens_per_s": 100.0}, 10)
    write({"loss": 2.0, "tokens_per_s": 110.0}, 20)
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write(json.dumps({"step": 30, "metrics": {"loss": 1.5}})[:12])  # mid-write
    forward.forward()
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(10, 2.5), (20, 2.0)]
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write(json.dumps({"step": 30, "metrics": {"loss": 1.5}})[12:] + "\n")
    forward.forward()
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [10, 20, 30]
    assert len(client.get_metric_history(run_id, "tokens_per_s")) == 2


def test_an_unreachable_mlflow_costs_the_points_not_the_training(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail now, not after backoff
    write = _metrics_writer(tmp_path, enabled=True)
    write({"loss": 2.5}, 10)
    forward = MetricsForwarder(tmp_path / METRICS_FILE, "0" * 32, "http://127.0.0.1:9")
    with caplog.at_level(logging.WARNING), forward:  # the thread's last forward, on close
        pass
    assert "could not log training metrics of steps [10]" in caplog.text
    assert _metrics_writer(tmp_path, enabled=False) is None
