"""MLflow tracking and model registry: runs, the registered adapter with its lineage, loading.

    phi3ops chat --alias champion "What is the capital of France?"

Every registered version gets `@challenger`; promotion.py decides whether `@champion` moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.utils.time import get_current_time_millis

from phi3ops.config import MlflowConfig, PipelineConfig
from phi3ops.errors import RegistryError
from phi3ops.preprocess import PreprocessResult
from phi3ops.serving import INPUT_EXAMPLE, MODEL_CODE, model_artifacts

RUNTIME_PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers",
                    "mlflow", "pandas")


@dataclass
class Lineage:
    dataset_md5: str
    data_git_rev: str
    config_hash: str
    code_git_rev: str
    pipeline: str
    base_model: str

    def tags(self) -> dict[str, str]:
        return {f"phi3ops.{k}": v for k, v in self.__dict__.items()}


def connect(cfg: MlflowConfig) -> str:
    """Point MLflow at the configured server or file and return the experiment id."""
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.tracking_uri)
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(cfg.experiment, artifact_location=(
            None if cfg.tracking_uri.startswith("http") else cfg.artifact_location))
    except MlflowException:  # created concurrently
        return mlflow.get_experiment_by_name(cfg.experiment).experiment_id


def start_run(cfg: MlflowConfig, pipeline: PipelineConfig, run_name: str | None = None) -> str:
    """Create the run of one retrain and record the resolved config as params and config.yaml."""
    experiment_id = connect(cfg)
    client = MlflowClient()
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={"phi3ops.pipeline": pipeline.name,
                                  "phi3ops.config_hash": pipeline.config_hash()})
    run_id = run.info.run_id
    params = {"model.name_or_path": pipeline.model.name_or_path}
    for section in ("training_config", "peft_config"):
        for key, value in getattr(pipeline, section).model_dump(mode="json").items():
            params[f"{section}.{key}"] = value
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_text(run_id, yaml.safe_dump(pipeline.model_dump(mode="json"), sort_keys=False),
                    "config.yaml")
    return run_id


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    now = get_current_time_millis()
    MlflowClient().log_batch(run_id, metrics=[
        Metric(k, float(v), now, step or 0) for k, v in metrics.items()
    ])


def log_tags(run_id: str, tags: dict[str, str]) -> None:
    MlflowClient().log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def log_preprocess(run_id: str, prep: PreprocessResult) -> None:
    """Counts as `data_*` metrics; stats, length histogram and quarantine under data/."""
    log_metrics(run_id, {f"data_{k}": v for k, v in prep.counts().items()})
    client = MlflowClient()
    client.log_artifact(run_id, str(prep.histogram_path), "data")
    client.log_dict(run_id, {"rejected_by_rule": prep.rejected_by_rule,
                             "messages_by_role": prep.messages_by_role}, "data/stats.json")
    if prep.n_rejected:
        client.log_artifact(run_id, str(prep.quarantine_path), "data")


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    MlflowClient().log_text(run_id, text, artifact_file)


def log_samples(run_id: str, samples: list[dict], artifact_file: str) -> None:
    """Per-sample answers as an MLflow table (shown side by side in the UI's evaluation view)."""
    if samples:
        columns = {key: [s[key] for s in samples] for key in samples[0]}
        MlflowClient().log_table(run_id, data=columns, artifact_file=artifact_file)


def end_run(run_id: str, failed: bool = False) -> None:
    MlflowClient().set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def register_adapter(
    cfg: MlflowConfig, run_id: str, adapter_dir: Path, base_dir: Path | None,
    lineage: Lineage, metrics: dict[str, float], max_new_tokens: int,
    evaluated_against: str | None = None,
) -> ModelVersion:
    """Log the adapter as a pyfunc model in the run, register it and set `@challenger`."""
    connect(cfg)
    signature = infer_signature(INPUT_EXAMPLE, ["The capital of France is Paris."])
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="adapter",
            python_model=MODEL_CODE,
            artifacts=model_artifacts(adapter_dir, base_dir),
            model_config={"base_model": lineage.base_model, "max_new_tokens": max_new_tokens},
            signature=signature,
            input_example=INPUT_EXAMPLE,
            pip_requirements=[f"{p}=={installed_version(p)}" for p in RUNTIME_PACKAGES],
        )
    tags = {**lineage.tags(), "phi3ops.artifact_type": "adapter", "phi3ops.run_id": run_id}
    if evaluated_against is not None:  # the champion scored on the same split in this run
        tags["phi3ops.evaluated_against"] = evaluated_against
    version = mlflow.register_model(info.model_uri, cfg.registered_model, tags=tags)
    client = MlflowClient()
    for key, value in metrics.items():
        client.set_model_version_tag(cfg.registered_model, version.version, f"metric.{key}",
                                     repr(float(value)))
    client.set_registered_model_alias(cfg.registered_model, cfg.challenger_alias, version.version)
    return version


def alias_version(cfg: MlflowConfig, alias: str) -> ModelVersion | None:
    try:
        return MlflowClient().get_model_version_by_alias(cfg.registered_model, alias)
    except MlflowException:
        return None


def load_registered(cfg: MlflowConfig, uri: str):
    """The pyfunc model behind a model URI (`models:/NAME@ALIAS`, `runs:/ID/adapter`, ...)."""
    connect(cfg)
    try:
        return mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as e:
        raise RegistryError(f"cannot load {uri} from {cfg.tracking_uri}: {e}. Run `make run` "
                            "first, or check the alias (`phi3ops promote`).") from e


def load_chat_model(cfg: MlflowConfig, uri: str):
    """(model, tokenizer) inside a registered phi3ops model, for scoring or generation."""
    chat = load_registered(cfg, uri).unwrap_python_model()
    return chat.model, chat.tokenizer


def load_champion(cfg: MlflowConfig):
    """(version, (model, tokenizer)) of the current champion, to score it on this run's split;
    None when there is no champion yet."""
    champion = alias_version(cfg, cfg.champion_alias)
    if champion is None:
        return None
    return champion.version, load_chat_model(
        cfg, f"models:/{cfg.registered_model}/{champion.version}")
