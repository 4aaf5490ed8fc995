"""Retrain flow: version_data -> preprocess -> train -> evaluate -> register -> promote.

    phi3ops run --pipeline pipelines/tiny-cpu.yaml [key.path=value ...]
    python -m flows.retrain --pipeline pipelines/tiny-cpu.yaml      # the same command

flows/ is the project's entry point, not an installed package: `phi3ops run` and a Prefect
deployment (entrypoint flows/retrain.py:retrain) both load this file from the project root.

phi3ops.pipeline's sequence (`Retrain`), with the Prefect tasks of flows/steps.py as its steps.
One MLflow run per flow run; a failure marks the run FAILED and never reaches promotion, so
`@champion` stays where it was. Registration and promotion run in one Prefect transaction: a
failure after the alias move rolls the aliases back. One retrain per registered model at a time
(a file lock under .cache/locks).
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import Flow, flow, get_run_logger
from prefect.runtime import flow_run

from flows.steps import PrefectSteps
from phi3ops import locking
from phi3ops.config import ProjectPaths, load_config, load_mlflow_config
from phi3ops.pipeline import Retrain, start


@flow(name="retrain", persist_result=True, result_serializer="json")
def retrain(
    pipeline: str = "pipelines/tiny-cpu.yaml", overrides: list[str] | None = None,
    root: str = ".", mlflow_config: str = "mlflow.yaml", data_rev: str | None = None,
    force: bool = False, lock_timeout_s: float | None = None,
) -> dict:
    """One retrain per registered model at a time: a second run waits for the lock (up to
    `lock_timeout_s` seconds, None: as long as it takes), then sees what the first one did."""
    paths = ProjectPaths(root)
    cfg = load_config(paths.pipeline(pipeline), overrides, paths.root)
    mcfg = load_mlflow_config(paths.pipeline(mlflow_config)).resolved(paths.root)
    logger = get_run_logger()
    lock = locking.lock_path(paths.root, f"retrain-{mcfg.registered_model}")
    with locking.exclusive(lock, f"flow run {flow_run.name} {flow_run.id}", lock_timeout_s,
                           on_wait=logger.warning):
        run, closed = start(paths, cfg, mcfg)  # preflight, then the MLflow run
        for dead in closed:
            logger.warning("MLflow run %s was RUNNING, but its process is gone: marked FAILED",
                           dead)
        return Retrain(run, PrefectSteps())(data_rev, force)


def in_project(root: str | Path) -> Flow:
    """The retrain flow keeping Prefect's results in that project's .cache/prefect-results, where
    the next run from the same project finds its preprocess cache; each project its own."""
    return retrain.with_options(result_storage=ProjectPaths(root).prefect_results)


if __name__ == "__main__":  # the same front door as `phi3ops run`
    from phi3ops.cli.main import main

    main(["run", *sys.argv[1:]])
