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

import argparse
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.transactions import Transaction, transaction

from phi3ops import (
    data,
    drift,
    evaluation,
    launch,
    locking,
    preprocess,
    promotion,
    registry,
    train,
)
from phi3ops.config import (
    DataConfig,
    MlflowConfig,
    PipelineConfig,
    ProjectPaths,
    load_config,
    load_mlflow_config,
    sha256_json,
)
from phi3ops.errors import Phi3opsError
from phi3ops.mlflow_wait import DEFAULT_TIMEOUT_S, wait_for_mlflow
from phi3ops.modeling import load_tokenizer
from phi3ops.preflight import preflight
from phi3ops.throughput import loss_curve


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
merge = task(train.merge_adapter, name="merge", **LOCAL)
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


def nothing_changed(mcfg: MlflowConfig, run_id: str, name: str, same: ModelVersion,
                    dataset_md5: str) -> dict:
    """End a run whose data, config and code made a version already: training would repeat it."""
    reason = (f"nothing changed since v{same.version} (data, config and code are the same; it "
              f"was {same.tags['promotion.decision']}: {same.tags.get('promotion.reason', '')})")
    registry.log_tags(run_id, {"phi3ops.skipped": reason})
    registry.end_run(run_id)
    create_markdown_artifact(key="retrain-summary", markdown=(
        f"# retrain {name}: nothing changed\n\n{reason}; no training. Change the data "
        "(`phi3ops data add`), the config or the code, or run with `--force`.\n"))
    get_run_logger().info(reason)
    return {"run_id": run_id, "skipped": True, "version": int(same.version), "promoted": False,
            "reason": reason, "dataset_md5": dataset_md5}


def run_dir(paths: ProjectPaths, mcfg: MlflowConfig, dataset_md5: str, cfg: PipelineConfig,
            code_rev: str) -> Path:
    """Where a run trains: one directory per (model, data, config, code), so the rerun of a
    killed run resumes from its newest complete checkpoint. A dirty tree adds its diff."""
    diff = subprocess.run(["git", "-C", str(paths.root), "diff", "HEAD"], capture_output=True,
                          text=True).stdout if code_rev.endswith("-dirty") else ""
    return paths.runs / sha256_json([mcfg.registered_model, dataset_md5, cfg.config_hash(),
                                     code_rev, diff])[:16]


def publish_drift(mcfg: MlflowConfig, run_id: str, root: Path, data_cfg: DataConfig,
                  dataset: data.DatasetVersion) -> None:
    """When the data differs from the champion's, say how, in Prefect and in the MLflow run."""
    champion = registry.alias_version(mcfg, mcfg.champion_alias)
    if champion is None or champion.tags.get("phi3ops.dataset_md5") in (None, dataset.md5):
        return
    diff = drift.diff_against_rev(root, data_cfg, champion.tags["phi3ops.data_git_rev"],
                                  champion.tags["phi3ops.dataset_md5"], Path(dataset.path))
    if diff is not None:
        create_markdown_artifact(key="data-drift", markdown=diff.markdown())
        registry.log_text(run_id, diff.markdown(), "data/drift.md")


def aliases_note(mcfg: MlflowConfig, before: dict[str, str | None] | None) -> str:
    """For the failure report: are the aliases where they were before the run?"""
    if before is None:
        return " No alias moved."
    try:
        now = promotion.alias_snapshot(mcfg)
    except Exception as e:  # the report must not hide the failure it reports
        return f" Could not read the aliases back ({type(e).__name__}); check them."
    if now == before:
        return " Registration and promotion were rolled back: the aliases are where they were."
    return (f" The aliases moved during the run: now {now}, before {before}; check them "
            "(`phi3ops promote --rollback`).")


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
        dataset = version_data(paths.root, cfg.data, data_rev)
        registry.log_tags(run_id, {"phi3ops.dataset_md5": dataset.md5,
                                   "phi3ops.data_git_rev": dataset.git_rev,
                                   "phi3ops.data_rev": data_rev or "work tree"})
        code_rev = data.git_rev(paths.root)
        unchanged = None if force else registry.already_decided(
            mcfg, dataset.md5, cfg.config_hash(), code_rev)
        if unchanged is not None:
            return nothing_changed(mcfg, run_id, cfg.name, unchanged, dataset.md5)
        publish_drift(mcfg, run_id, paths.root, cfg.data, dataset)
        stage = "preprocess"
        tokenizer = load_tokenizer(cfg.model, paths.models)
        out_dir = paths.processed / preprocess.cache_key(dataset.md5, cfg.preprocess, tokenizer)
        # Output deleted since it was cached: run again and overwrite the cache record.
        state = preprocess_data.with_options(refresh_cache=not preprocess.is_complete(out_dir))(
            Path(dataset.path), dataset.md5, cfg.preprocess, tokenizer, paths.processed,
            return_state=True)
        prep = state.result()
        if state.name == "Cached":
            prep = replace(prep, cached=True)
        logger.info("preprocess: %s", prep.summary())
        n_with_system = prep.messages_by_role.get("system", 0)
        if note := checked.template.system_note(n_with_system, prep.n_train + prep.n_test):
            logger.warning(note)
        registry.log_preprocess(run_id, prep)
        stage = "train"
        requirements_checked = registry.check_requirements_in_background()  # while it trains
        out_dir = run_dir(paths, mcfg, dataset.md5, cfg, code_rev)
        if force:  # trained from scratch, not resumed from what an earlier run left
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
        registry.log_tags(run_id, {"phi3ops.run_dir": str(out_dir)})
        trained = train_adapter(cfg, Path(prep.out_dir), out_dir, paths.models,
                                run_id=run_id, tracking_uri=mcfg.tracking_uri)
        if trained.resumed_from:
            logger.info("training resumed from %s", trained.resumed_from)
            registry.log_tags(run_id, {"phi3ops.resumed_from": trained.resumed_from})
        registry.log_figure(run_id, loss_curve(trained.history), "train/loss_curve.png")
        stage = "evaluate"
        champion = registry.load_champion(mcfg)
        scores = evaluate_adapter(cfg.model, cfg.evaluation, Path(prep.out_dir),
                                  Path(trained.adapter_dir), paths.models,
                                  champion=champion[1] if champion else None)
        metrics = scores.flat()
        registry.log_metrics(run_id, metrics)
        registry.log_samples(run_id, scores.samples, "eval/samples.json")
        create_table_artifact(key="sample-answers", table=scores.samples[:20],
                              description="first held-out answers of each model")
        stage = "register"
        requirements_checked.join()
        lineage = registry.Lineage(
            dataset_md5=dataset.md5, data_git_rev=dataset.git_rev,
            config_hash=cfg.config_hash(), code_git_rev=code_rev,
            pipeline=cfg.name, base_model=cfg.model.name_or_path,
        )
        base_dir = Path(checked.model_path) if Path(checked.model_path).is_dir() else None
        card = registry.model_card(cfg, lineage, metrics)
        before = promotion.alias_snapshot(mcfg)
        with transaction() as txn:  # all of it commits, or the rollback hooks undo the aliases
            txn.set("mlflow", mcfg)
            txn.set("aliases_before", before)
            txn.set("run_id", run_id)
            version = register_adapter(mcfg, run_id, Path(trained.adapter_dir), base_dir,
                                       lineage, metrics, cfg.evaluation.max_new_tokens,
                                       evaluated_against=champion[0] if champion else None,
                                       card=card)
            txn.set("version", version.version)
            if cfg.registration.merged:
                merged_dir = merge(cfg.model, Path(trained.adapter_dir), out_dir / "merged",
                                   paths.models)
                register_adapter(mcfg, run_id, None, merged_dir, lineage, metrics,
                                 cfg.evaluation.max_new_tokens, card=card,
                                 artifact_type="merged")
            stage = "promote"
            if "promotion.decision" in version.tags:  # a rerun: that decision stands
                decision = promotion.PromotionDecision(
                    version.version, False, f"v{version.version} holds this data, config and "
                    f"code already and was {version.tags['promotion.decision']}; left as it is",
                    champion[0] if champion else None)
            else:
                decision = promote(mcfg, version.version, by=f"run {run_id}")
            stage = "record"
            record_decision(mcfg, run_id, decision)
    except BaseException as e:
        registry.end_run(run_id, failed=True)
        create_markdown_artifact(key="retrain-failure", markdown=(
            f"# retrain {cfg.name} failed in `{stage}`\n\n```\n{type(e).__name__}: {e}\n```\n\n"
            f"MLflow run `{run_id}` is marked FAILED." + aliases_note(mcfg, before) + "\n"))
        raise
    registry.end_run(run_id)

    scored = " | ".join(f"{m} {metrics[f'{m}_{mcfg.promotion.metric}']:.4f}"
                        for m in ("base", "tuned", "champion")
                        if f"{m}_{mcfg.promotion.metric}" in metrics)
    gains = "".join(
        f"\n- tuned - {other}: {metrics[key]:+.4f} "
        f"(95% CI {metrics[key + '_lo']:+.4f} .. {metrics[key + '_hi']:+.4f})"
        for other in ("base", "champion")
        if (key := f"delta_{other}_{mcfg.promotion.metric}") in metrics)
    summary = {
        "run_id": run_id, "version": int(version.version), "promoted": decision.promoted,
        "reason": decision.reason, "dataset_md5": dataset.md5, "metrics": metrics,
        "train_loss": trained.train_loss, "resumed_from": trained.resumed_from,
        "rows_accepted": prep.n_accepted,
        "rows_quarantined": prep.n_rejected,
    }
    create_markdown_artifact(
        key="retrain-summary",
        markdown=(
            f"# retrain {cfg.name}\n\n"
            f"- data: `{dataset.md5}` ({prep.n_accepted} rows accepted, "
            f"{prep.n_rejected} quarantined)\n"
            f"- MLflow run `{run_id}`, model `{mcfg.registered_model}` v{version.version}\n"
            f"- {mcfg.promotion.metric}: {scored}{gains}\n"
            f"- promotion: {'promoted' if decision.promoted else 'not promoted'}: "
            f"{decision.reason}\n"
        ),
    )
    logger.info("registered %s v%s; %s", mcfg.registered_model, version.version, decision.reason)
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="pipelines/tiny-cpu.yaml")
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--data-rev", help="train on the dataset of this git rev or tag")
    parser.add_argument("--force", action="store_true",
                        help="train even when data, config and code are the champion's")
    parser.add_argument("--lock-timeout", type=float, metavar="SECONDS",
                        help="while another retrain of the same model runs, wait at most this "
                             "long (0: fail at once); default: wait until it ends")
    parser.add_argument("--mlflow-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        metavar="SECONDS", help="wait at most this long for an MLflow server "
                        "that does not answer, before any stage runs (default %(default)g)")
    parser.add_argument("--debug", action="store_true", help="a user error's traceback too")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = parser.parse_args(argv)
    paths = ProjectPaths(args.root)
    try:  # fail before Prefect starts, with the fix in the message rather than a traceback
        preflight(load_config(paths.pipeline(args.pipeline), args.overrides, paths.root),
                  paths.models)
        wait_for_mlflow(load_mlflow_config(paths.pipeline("mlflow.yaml")).resolved(
            paths.root).tracking_uri, args.mlflow_timeout)
        return retrain(pipeline=args.pipeline, overrides=args.overrides, root=args.root,
                       data_rev=args.data_rev, force=args.force, lock_timeout_s=args.lock_timeout)
    except Phi3opsError as e:  # a user's mistake: one paragraph, no traceback, exit 2
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
