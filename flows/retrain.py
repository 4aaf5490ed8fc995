"""Retrain flow: version_data -> preprocess -> train -> evaluate -> register -> promote.

    python flows/retrain.py --pipeline pipelines/tiny-cpu.yaml [key.path=value ...]

Thin Prefect wiring around plain phi3ops functions. Retries only on network-bound stages (DVC
remote, MLflow); never on validation or training. One MLflow run per flow run; a failure marks
the run FAILED and never reaches promotion, so `@champion` stays where it was. Registration and
promotion run in one Prefect transaction: a failure after the alias move rolls the aliases back.
One retrain per registered model at a time (a file lock under .cache/locks). Preprocessing is a
cached task; what Prefect persists is JSON, under .cache/prefect-results.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.transactions import Transaction, transaction

from phi3ops import (
    data,
    evaluation,
    inference,
    launch,
    locking,
    pipeline,
    preprocess,
    promotion,
    registry,
    report,
)
from phi3ops.config import (
    MlflowConfig,
    PipelineConfig,
    ProjectPaths,
    load_config,
    load_mlflow_config,
    sha256_json,
)
from phi3ops.errors import Phi3opsError
from phi3ops.preflight import preflight


def retry_unless_user_error(task, task_run, state) -> bool:
    """Retry I/O hiccups, never bad data or config: those fail the same way every time."""
    return not isinstance(state.result(raise_on_failure=False), Phi3opsError)


def preprocess_key(context, parameters: dict) -> str:
    """Prefect's cache key of `preprocess`: data md5, preprocess config, tokenizer and code (the
    key of its output directory), and where that directory lives."""
    key = preprocess.cache_key(parameters["data_md5"], parameters["cfg"], parameters["tokenizer"])
    return f"preprocess-{key}-{sha256_json(str(parameters['out_root']))[:8]}"


RESULTS = Path(__file__).resolve().parents[1] / ".cache" / "prefect-results"
# Results are persisted only where they are reused (preprocess) or read back (the flow's
# summary), always as JSON; the other tasks return live objects (model versions) not worth keeping.
NETWORK = {"retries": 2, "retry_delay_seconds": 5, "cache_policy": NO_CACHE,
           "persist_result": False, "retry_condition_fn": retry_unless_user_error}
LOCAL = {"cache_policy": NO_CACHE, "persist_result": False}
# Inside the transaction a task's failed attempt rolls the whole transaction back at once, even
# when a retry then succeeds; so no task retries there: register retries each MLflow call itself.
IN_TRANSACTION = LOCAL

version_data = task(data.checkout_version, name="version_data", **NETWORK)
preprocess_data = task(preprocess.preprocess, name="preprocess", cache_key_fn=preprocess_key,
                       persist_result=True, result_serializer="json", result_storage=RESULTS)
# A timeout or crash of the training process is retried once; the retry resumes from the newest
# complete checkpoint in the same run directory. A user error (bad config, tampered checkpoint)
# is not retried.
train_adapter = task(launch.run_training, name="train", retries=1, retry_delay_seconds=1,
                     retry_condition_fn=retry_unless_user_error, **LOCAL)
evaluate_adapter = task(evaluation.evaluate_adapter, name="evaluate", **LOCAL)
merge = task(inference.merge_adapter, name="merge", **LOCAL)
register_adapter = task(registry.register_adapter, name="register", **IN_TRANSACTION)
promote = task(promotion.promote, name="promote", **IN_TRANSACTION)
record_decision = task(promotion.record, name="record", **IN_TRANSACTION)


@register_adapter.on_rollback
def undo_register(txn: Transaction) -> None:
    """Rollback: `@challenger` back where it was. The version stays: a rerun finds it by key."""
    registry.with_retries("put @challenger back", lambda: promotion.undo_challenger(
        txn.get("mlflow"), txn.get("aliases_before"), txn.get("version")))


@promote.on_rollback
def undo_promote(txn: Transaction) -> None:
    """Rollback: `@champion` and `@previous-champion` back where they were."""
    reason = f"run {txn.get('run_id')} failed after promoting it; rolled back"
    registry.with_retries("put @champion back", lambda: promotion.undo_promotion(
        txn.get("mlflow"), txn.get("aliases_before"), txn.get("version"), reason,
        by=f"run {txn.get('run_id')}"))


def preprocess_cached(data_dir: Path, data_md5: str, cfg, tokenizer, out_root: Path):
    """The cached preprocess task; output deleted since it was cached runs again."""
    done = preprocess.is_complete(out_root / preprocess.cache_key(data_md5, cfg, tokenizer))
    state = preprocess_data.with_options(refresh_cache=not done)(
        data_dir, data_md5, cfg, tokenizer, out_root, return_state=True)
    return replace(state.result(), cached=True) if state.name == "Cached" else state.result()


@flow(name="retrain", persist_result=True, result_serializer="json", result_storage=RESULTS)
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


def run_stages(paths: ProjectPaths, cfg: PipelineConfig, mcfg: MlflowConfig,
               data_rev: str | None, force: bool) -> dict:
    logger = get_run_logger()
    checked = preflight(cfg, paths.models)  # machine, weights, chat template: fail fast
    run_id = registry.start_run(mcfg, cfg, run_name=f"retrain-{cfg.name}")
    for dead in registry.close_dead_runs(mcfg, run_id):
        logger.warning("MLflow run %s was RUNNING, but its process is gone: marked FAILED", dead)
    stage, before = "version_data", None
    try:
        dataset = pipeline.checkout(paths, cfg, data_rev, run_id, checkout_version=version_data)
        code_rev = data.git_rev(paths.root)
        same = None if force else registry.already_decided(
            mcfg, dataset.md5, cfg.config_hash(), code_rev)
        if same is not None:
            result, markdown = report.nothing_changed(run_id, cfg.name, same, dataset.md5)
            create_markdown_artifact(key="retrain-summary", markdown=markdown)
            logger.info(result["reason"])
            return result
        if drift := pipeline.data_drift(paths, cfg, mcfg, dataset, run_id):
            create_markdown_artifact(key="data-drift", markdown=drift)
        stage = "preprocess"
        prepared = pipeline.prepare(paths, cfg, dataset, checked, run_id,
                                    run_preprocess=preprocess_cached)
        logger.info("preprocess: %s", prepared.prep.summary())
        if prepared.template_note:
            logger.warning(prepared.template_note)
        stage = "train"
        requirements_checked = registry.check_requirements_in_background()  # while it trains
        out_dir = pipeline.run_dir(paths, mcfg, cfg, dataset.md5, code_rev)
        if force:  # trained from scratch, not resumed from what an earlier run left
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
        trained = pipeline.fit(paths, cfg, prepared, out_dir, run_id, mcfg.tracking_uri,
                               run_training=train_adapter)
        if trained.resumed_from:
            logger.info("training resumed from %s", trained.resumed_from)
        stage = "evaluate"
        champion = registry.load_champion(mcfg)
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
            stage = "register, promote, record"
            version, decision = pipeline.publish(
                paths, cfg, mcfg, checked, prepared, trained, out_dir, code_rev, metrics, run_id,
                champion_version, lambda v: txn.set("version", v.version),
                register=register_adapter, merge=merge, promote=promote, record=record_decision)
    except BaseException as e:
        registry.end_run(run_id, failed=True)
        create_markdown_artifact(key="retrain-failure", markdown=report.failure(
            cfg.name, stage, e, run_id, mcfg, before))
        raise
    registry.end_run(run_id)
    result, markdown = report.summary(cfg.name, mcfg, run_id, version, decision, prepared,
                                      trained, metrics)
    create_markdown_artifact(key="retrain-summary", markdown=markdown)
    logger.info("registered %s v%s; %s", mcfg.registered_model, version.version, decision.reason)
    return result


if __name__ == "__main__":  # the same front door as `phi3ops run`
    from phi3ops.cli import main

    main(["run", *sys.argv[1:]])
