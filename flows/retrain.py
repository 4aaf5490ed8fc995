"""Retrain flow: version_data -> preprocess -> train -> evaluate -> register -> promote.

    phi3ops run --pipeline pipelines/tiny-cpu.yaml [key.path=value ...]
    python flows/retrain.py --pipeline pipelines/tiny-cpu.yaml      # the same command

A recipe over phi3ops.pipeline's stages, with the Prefect tasks of flows/tasks.py as their steps.
One MLflow run per flow run; a failure marks the run FAILED and never reaches promotion, so
`@champion` stays where it was. Registration and promotion run in one Prefect transaction: a
failure after the alias move rolls the aliases back. One retrain per registered model at a time
(a file lock under .cache/locks).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from prefect import Flow, flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.transactions import transaction

from flows.tasks import (
    evaluate_adapter,
    merge,
    preprocess_cached,
    promote,
    record_decision,
    register_adapter,
    train_adapter,
    version_data,
)
from phi3ops import locking, pipeline, report
from phi3ops.config import (
    MlflowConfig,
    PipelineConfig,
    ProjectPaths,
    load_config,
    load_mlflow_config,
)
from phi3ops.registry import promotion, runs, store
from phi3ops.train.launch import LOG_FILE


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
    lock = locking.lock_path(paths.root, f"retrain-{mcfg.registered_model}")
    with locking.exclusive(lock, f"flow run {flow_run.name} {flow_run.id}", lock_timeout_s,
                           on_wait=get_run_logger().warning):
        return run_stages(paths, cfg, mcfg, data_rev, force)


def in_project(root: str | Path) -> Flow:
    """The retrain flow keeping Prefect's results in that project's .cache/prefect-results, where
    the next run from the same project finds its preprocess cache; each project its own."""
    return retrain.with_options(result_storage=ProjectPaths(root).prefect_results)


def run_stages(paths: ProjectPaths, cfg: PipelineConfig, mcfg: MlflowConfig,
               data_rev: str | None, force: bool) -> dict:
    logger = get_run_logger()
    started = pipeline.start(paths, cfg, mcfg)  # preflight, then the MLflow run
    run_id, code = started.run_id, started.code
    for dead in started.closed_runs:
        logger.warning("MLflow run %s was RUNNING, but its process is gone: marked FAILED", dead)
    stage, before = "version_data", None

    def at(name: str) -> None:  # what the failure report names, and the screen shows
        nonlocal stage
        stage = name
        logger.info("stage: %s", name)

    try:
        dataset = pipeline.checkout(paths, cfg, data_rev, run_id, checkout_version=version_data)
        same = None if force else pipeline.made_before(mcfg, cfg, dataset, code)
        if same is not None:
            result, markdown = report.nothing_changed(run_id, cfg.name, same, dataset.md5)
            runs.end_skipped(run_id, result["reason"])
            create_markdown_artifact(key="retrain-summary", markdown=markdown)
            logger.info(result["reason"])
            return result
        if drift := pipeline.data_drift(paths, cfg, mcfg, dataset, run_id):
            create_markdown_artifact(key="data-drift", markdown=drift)
        at("preprocess")
        prepared = pipeline.prepare(paths, cfg, dataset, started.checked, run_id,
                                    run_preprocess=preprocess_cached)
        logger.info("preprocess: %s", prepared.prep.summary())
        if prepared.template_note:
            logger.warning(prepared.template_note)
        at("train")
        requirements_checked = store.check_requirements_in_background()  # while it trains
        out_dir = pipeline.run_dir(paths, mcfg, cfg, dataset.md5, code)
        if force:  # trained from scratch, not resumed from what an earlier run left
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
        logger.info("training log: %s", out_dir / LOG_FILE)
        trained = pipeline.fit(paths, cfg, prepared, out_dir, run_id, mcfg.tracking_uri,
                               run_training=train_adapter)
        if trained.resumed_from:
            logger.info("training resumed from %s", trained.resumed_from)
        at("evaluate")
        champion = store.load_champion(mcfg)
        champion_version = champion[0] if champion else None
        scores = pipeline.score(paths, cfg, prepared, Path(trained.adapter_dir),
                                champion[1] if champion else None, run_id, evaluate_adapter)
        create_table_artifact(key="sample-answers", table=scores.samples[:20],
                              description="first held-out answers of each model")
        metrics = scores.flat()
        requirements_checked.join()
        before = promotion.alias_snapshot(mcfg)
        with transaction() as txn:  # all of it commits, or the rollback hooks undo the aliases
            txn.set("mlflow", mcfg)
            txn.set("aliases_before", before)
            txn.set("run_id", run_id)
            version, decision = pipeline.publish(
                paths, cfg, mcfg, started.checked, prepared, trained, out_dir, code, metrics,
                run_id, champion_version, lambda v: txn.set("version", v.version), at,
                register=register_adapter, merge=merge, promote=promote, record=record_decision)
    except BaseException as e:
        runs.end_run(run_id, failed=True)
        create_markdown_artifact(key="retrain-failure", markdown=report.failure(
            cfg.name, stage, e, run_id, mcfg, before))
        raise
    runs.end_run(run_id)
    result, markdown = report.summary(cfg.name, mcfg, run_id, version, decision, prepared,
                                      trained, metrics)
    create_markdown_artifact(key="retrain-summary", markdown=markdown)
    logger.info("registered %s v%s; %s", mcfg.registered_model, version.version, decision.reason)
    return result


if __name__ == "__main__":  # the same front door as `phi3ops run`
    from phi3ops.cli.main import main

    main(["run", *sys.argv[1:]])
