"""What the `phi3ops` commands share: the options every command takes, and how they load the
project's settings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from phi3ops.config import ProjectPaths, load_config, load_mlflow_config

Root = Annotated[Path, typer.Option(help="project root (holds mlflow.yaml, data.dvc, flows/)")]
Pipeline = Annotated[Path, typer.Option(help="pipeline YAML, relative to the root")]
DEFAULT_PIPELINE = Path("pipelines/tiny-cpu.yaml")
MLFLOW_TIMEOUT_S = 60.0  # mlflow_wait.DEFAULT_TIMEOUT_S; not imported: `--help` stays fast
MlflowTimeout = Annotated[float, typer.Option(
    min=0, help="wait at most this long for an MLflow server that does not answer")]


def open_registry(paths: ProjectPaths, timeout_s: float):
    """The registry mlflow.yaml names (resolved against the root), once its server answers (or
    a clear error)."""
    from phi3ops.registry.client import Registry
    from phi3ops.registry.mlflow_wait import wait_for_mlflow

    mcfg = mlflow_config(paths)
    wait_for_mlflow(mcfg.tracking_uri, timeout_s)
    return Registry(mcfg)


def mlflow_config(paths: ProjectPaths):
    """mlflow.yaml resolved against the root; no server asked (that needs MLflow imported)."""
    return load_mlflow_config(paths.root / "mlflow.yaml").resolved(paths.root)


def load_pipeline(paths: ProjectPaths, pipeline: Path, overrides: list[str] | None = None):
    """The pipeline config, its relative paths (a chat template file) read from the root."""
    return load_config(paths.pipeline(pipeline), overrides, paths.root)
