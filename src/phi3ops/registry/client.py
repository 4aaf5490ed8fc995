"""One MLflow server with its experiment and registered model, as mlflow.yaml names them.

    registry = Registry(mcfg)
    registry.alias("champion")                 # the version behind @champion, or None
    registry.client.get_run(run_id)            # MLflow's own client, bound to that server

Every function that talks to MLflow is handed a Registry. MLflow's module functions follow a
process-wide URI that whoever called `mlflow.set_tracking_uri` last has set; a Registry owns its
client, so code handed one talks to the server it names and to no other.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from phi3ops.config import MlflowConfig
from phi3ops.retry import with_retries

T = TypeVar("T")


class Registry:
    """The MLflow server, experiment and registered model of one mlflow.yaml."""

    def __init__(self, config: MlflowConfig):
        self.config = config
        self.client = MlflowClient(tracking_uri=config.tracking_uri,
                                   registry_uri=config.tracking_uri)

    @classmethod
    def at(cls, tracking_uri: str) -> Registry:
        """A server known only by its URI (a training child logging metrics)."""
        return cls(MlflowConfig(tracking_uri=tracking_uri))

    @property
    def uri(self) -> str:
        return self.config.tracking_uri

    @property
    def model(self) -> str:
        """The registered model's name."""
        return self.config.registered_model

    def __repr__(self) -> str:  # the URI may hold credentials: never printed
        return f"Registry(model={self.model!r})"

    @cached_property
    def experiment_id(self) -> str:
        """The experiment's id, created on first use (by whoever comes first)."""
        found = self.client.get_experiment_by_name(self.config.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.config.experiment, artifact_location=(
                None if self.uri.startswith("http") else self.config.artifact_location))
        except MlflowException:  # created concurrently
            return self.client.get_experiment_by_name(self.config.experiment).experiment_id

    def retried(self, what: str, call: Callable[[], T]) -> T:
        """`call` under mlflow.yaml's retry policy (retry.py: network errors only)."""
        return with_retries(what, call, self.config.retry)

    def alias(self, alias: str) -> ModelVersion | None:
        """The version `@alias` names, or None when it names none."""
        try:
            return self.client.get_model_version_by_alias(self.model, alias)
        except MlflowException:
            return None

    def read_text(self, artifact_uri: str) -> str:
        """A text artifact (`runs:/ID/config.yaml`, a model version's requirements.txt)."""
        with tempfile.TemporaryDirectory(prefix="phi3ops-artifact-") as tmp:
            return Path(mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_uri, dst_path=tmp, tracking_uri=self.uri)).read_text()

    @contextmanager
    def as_process_default(self) -> Iterator[None]:
        """This server as MLflow's process-wide URI for the block, then put back as it was,
        MLFLOW_TRACKING_URI with it (MLflow's own setter drops that variable when it restores
        an unset URI). Only where MLflow has no client form: `mlflow.pyfunc.log_model` logs to
        the active run of that URI, and a SQL registry store reads it to find a logged model."""
        from mlflow.tracking._tracking_service import utils  # private: tells unset from default

        before, env_before = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(before)
            if env_before is not None:
                os.environ["MLFLOW_TRACKING_URI"] = env_before
