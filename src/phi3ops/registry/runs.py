"""MLflow runs: one per retrain, its params, metrics, tags and artifacts, and the closing of
runs whose process died without ending them.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import yaml
from mlflow.entities import Metric, Param, RunTag

from phi3ops.config import PipelineConfig
from phi3ops.locking import process_alive, process_started
from phi3ops.registry.client import Registry

if TYPE_CHECKING:  # types only: chat and serving load no `datasets`
    from mlflow.data.dataset import Dataset

    from phi3ops.data.preprocess import PreprocessResult


def start_run(registry: Registry, cfg: PipelineConfig, run_name: str | None = None) -> str:
    """Create the run of one retrain and record the resolved config as params and config.yaml."""
    client = registry.client
    run = client.create_run(registry.experiment_id, run_name=run_name,
                            tags={"phi3ops.pipeline": cfg.name,
                                  "phi3ops.config_hash": cfg.config_hash(), **owner_tags()})
    run_id = run.info.run_id
    params = {"model.name_or_path": cfg.model.name_or_path}
    for section in ("training_config", "peft_config"):
        for key, value in getattr(cfg, section).model_dump(mode="json").items():
            params[f"{section}.{key}"] = value
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_text(run_id, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False),
                    "config.yaml")
    return run_id


def log_metrics(registry: Registry, run_id: str, metrics: dict[str, float], step: int | None = None,
                dataset: Dataset | None = None, model_id: str | None = None) -> None:
    """Metrics of one step, naming the dataset they were measured on and the logged model they
    describe (MLflow 3: the registry shows a version's model metrics), when given."""
    link = {"model_id": model_id}
    if dataset is not None:
        link.update(dataset_name=dataset.name, dataset_digest=dataset.digest)
    log_metric_steps(registry, run_id, [(step or 0, metrics)], link=link)


def log_metric_steps(registry: Registry, run_id: str, points: list[tuple[int, dict[str, float]]],
                     link: dict | None = None) -> None:
    """Metrics of several steps in as few calls as MLflow's batch limit allows."""
    now = int(time.time() * 1000)  # MLflow's timestamps: epoch milliseconds
    metrics = [Metric(k, float(v), now, step, **(link or {})) for step, values in points
               for k, v in values.items()]
    for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 per batch
        registry.client.log_batch(run_id, metrics=metrics[start:start + 1000])


def log_tags(registry: Registry, run_id: str, tags: dict[str, str]) -> None:
    registry.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def log_preprocess(registry: Registry, run_id: str, prep: PreprocessResult) -> None:
    """Counts as `data_*` metrics; stats, length histogram and quarantine under data/."""
    log_metrics(registry, run_id, {f"data_{k}": v for k, v in prep.counts().items()})
    client = registry.client
    client.log_artifact(run_id, str(prep.histogram_path), "data")
    client.log_dict(run_id, {"rejected_by_rule": prep.rejected_by_rule,
                             "messages_by_role": prep.messages_by_role}, "data/stats.json")
    if prep.n_rejected:
        client.log_artifact(run_id, str(prep.quarantine_path), "data")


def log_text(registry: Registry, run_id: str, text: str, artifact_file: str) -> None:
    registry.client.log_text(run_id, text, artifact_file)


def log_figure(registry: Registry, run_id: str, figure, artifact_file: str) -> None:
    """A matplotlib figure as an image artifact; closed afterwards so figures do not pile up."""
    from matplotlib import pyplot as plt

    registry.client.log_figure(run_id, figure, artifact_file)
    plt.close(figure)


def log_samples(registry: Registry, run_id: str, samples: list[dict], artifact_file: str) -> None:
    """Per-sample answers as an MLflow table (shown side by side in the UI's evaluation view)."""
    if samples:
        columns = {key: [s[key] for s in samples] for key in samples[0]}
        registry.client.log_table(run_id, data=columns, artifact_file=artifact_file)


def end_run(registry: Registry, run_id: str, failed: bool = False) -> None:
    registry.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def end_skipped(registry: Registry, run_id: str, reason: str) -> None:
    """End a run that found its version made before: why it trained nothing, in a tag."""
    log_tags(registry, run_id, {"phi3ops.skipped": reason})
    end_run(registry, run_id)


def owner_tags() -> dict[str, str]:
    """Which process owns a run, so that a later run can tell when it died without ending it."""
    pid = os.getpid()
    return {"phi3ops.host": socket.gethostname(), "phi3ops.pid": str(pid),
            "phi3ops.pid_started": repr(process_started(pid))}


def close_dead_runs(registry: Registry, closer_run_id: str) -> list[str]:
    """Mark FAILED the RUNNING runs of this experiment whose process on this host is gone (a
    `kill -9`, a power cut): MLflow never hears of such a death. Each gets tags saying who closed
    it and when. Runs of other hosts are left alone: their processes cannot be checked here."""
    host = socket.gethostname()
    running = registry.client.search_runs(
        [registry.experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                                      f"tags.`phi3ops.host` = '{host}'")
    closed = []
    for run in running:
        tags = run.data.tags
        started = tags.get("phi3ops.pid_started", "None")
        if run.info.run_id == closer_run_id or process_alive(
                int(tags.get("phi3ops.pid", 0)), None if started == "None" else float(started)):
            continue
        log_tags(registry, run.info.run_id, {
            "phi3ops.closed_by": f"run {closer_run_id} ({host}, pid {os.getpid()})",
            "phi3ops.closed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "phi3ops.closed_reason": f"its process (pid {tags.get('phi3ops.pid')} on {host}) "
                                     "is gone; it died without ending the run"})
        end_run(registry, run.info.run_id, failed=True)
        closed.append(run.info.run_id)
    return closed
