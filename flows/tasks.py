"""The stages as Prefect tasks: retries only on network-bound work (DVC remote, MLflow), never on
validation or training; preprocessing cached on what decides its output; the rollback hooks of
the register/promote transaction. What Prefect persists is JSON, in the flow's result storage
(the project's .cache/prefect-results: see flows.retrain.in_project).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import Transaction

from phi3ops.config import sha256_json
from phi3ops.data import preprocess, versions
from phi3ops.errors import Phi3opsError
from phi3ops.evaluation import scoring
from phi3ops.model import inference
from phi3ops.registry import promotion, store
from phi3ops.train import launch


def retry_unless_user_error(task, task_run, state) -> bool:
    """Retry I/O hiccups, never bad data or config: those fail the same way every time."""
    return not isinstance(state.result(raise_on_failure=False), Phi3opsError)


def preprocess_key(context, parameters: dict) -> str:
    """Prefect's cache key of `preprocess`: data md5, preprocess config, tokenizer and code (the
    key of its output directory), and where that directory lives."""
    key = preprocess.cache_key(parameters["data_md5"], parameters["cfg"], parameters["tokenizer"])
    return f"preprocess-{key}-{sha256_json(str(parameters['out_root']))[:8]}"


# Results are persisted only where they are reused (preprocess) or read back (the flow's
# summary), always as JSON; the other tasks return live objects (model versions) not worth keeping.
NETWORK = {"retries": 2, "retry_delay_seconds": 5, "cache_policy": NO_CACHE,
           "persist_result": False, "retry_condition_fn": retry_unless_user_error}
LOCAL = {"cache_policy": NO_CACHE, "persist_result": False}
# Inside the transaction a task's failed attempt rolls the whole transaction back at once, even
# when a retry then succeeds; so no task retries there: register retries each MLflow call itself.
IN_TRANSACTION = LOCAL

version_data = task(versions.checkout_version, name="version_data", **NETWORK)
preprocess_data = task(preprocess.preprocess, name="preprocess", cache_key_fn=preprocess_key,
                       persist_result=True, result_serializer="json")
# A timeout or crash of the training process is retried once; the retry resumes from the newest
# complete checkpoint in the same run directory. A user error (bad config, tampered checkpoint)
# is not retried.
train_adapter = task(launch.run_training, name="train", retries=1, retry_delay_seconds=1,
                     retry_condition_fn=retry_unless_user_error, **LOCAL)
evaluate_adapter = task(scoring.evaluate_adapter, name="evaluate", **LOCAL)
merge = task(inference.merge_adapter, name="merge", **LOCAL)
register_adapter = task(store.register_adapter, name="register", **IN_TRANSACTION)
promote = task(promotion.promote, name="promote", **IN_TRANSACTION)
record_decision = task(promotion.record, name="record", **IN_TRANSACTION)


@register_adapter.on_rollback
def undo_register(txn: Transaction) -> None:
    """Rollback: `@challenger` back where it was. The version stays: a rerun finds it by key."""
    store.with_retries("put @challenger back", lambda: promotion.undo_challenger(
        txn.get("mlflow"), txn.get("aliases_before"), txn.get("version")),
        txn.get("mlflow").retry)


@promote.on_rollback
def undo_promote(txn: Transaction) -> None:
    """Rollback: `@champion` and `@previous-champion` back where they were."""
    reason = f"run {txn.get('run_id')} failed after promoting it; rolled back"
    store.with_retries("put @champion back", lambda: promotion.undo_promotion(
        txn.get("mlflow"), txn.get("aliases_before"), txn.get("version"), reason,
        by=f"run {txn.get('run_id')}"), txn.get("mlflow").retry)


def preprocess_cached(data_dir: Path, data_md5: str, cfg, tokenizer, out_root: Path):
    """The cached preprocess task; output deleted since it was cached runs again."""
    done = preprocess.is_complete(out_root / preprocess.cache_key(data_md5, cfg, tokenizer))
    state = preprocess_data.with_options(refresh_cache=not done)(
        data_dir, data_md5, cfg, tokenizer, out_root, return_state=True)
    return replace(state.result(), cached=True) if state.name == "Cached" else state.result()
