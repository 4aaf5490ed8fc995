"""The retrain's steps as Prefect tasks: retries only on network-bound work (DVC remote, MLflow),
never on validation or training; preprocessing cached on what decides its output; registration
and promotion in one Prefect transaction whose rollback hooks put the aliases back. What Prefect
persists is JSON, in the flow's result storage (the project's .cache/prefect-results: see
flows.retrain.in_project).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.transactions import Transaction, transaction

from phi3ops.config import sha256_json
from phi3ops.data import preprocess
from phi3ops.errors import Phi3opsError
from phi3ops.steps import LocalSteps, Publishing, Run


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

preprocess_data = task(preprocess.preprocess, name="preprocess", cache_key_fn=preprocess_key,
                       persist_result=True, result_serializer="json")


class PrefectSteps(LocalSteps):
    """Each step a task of the flow run (Prefect binds `self` as a task parameter)."""

    checkout = task(LocalSteps.checkout, name="version_data", **NETWORK)
    push = task(LocalSteps.push, name="push_data", **NETWORK)
    # A timeout or crash of the training process is retried once; the retry resumes from the
    # newest complete checkpoint in the same run directory. A user error (bad config, tampered
    # checkpoint) is not retried.
    train = task(LocalSteps.train, name="train", retries=1, retry_delay_seconds=1,
                 retry_condition_fn=retry_unless_user_error, **LOCAL)
    evaluate = task(LocalSteps.evaluate, name="evaluate", **LOCAL)
    merge = task(LocalSteps.merge, name="merge", **LOCAL)
    register = task(LocalSteps.register, name="register", **IN_TRANSACTION)
    promote = task(LocalSteps.promote, name="promote", **IN_TRANSACTION)
    record = task(LocalSteps.record, name="record", **IN_TRANSACTION)

    @property
    def log(self):  # the flow run's logger: the lines show in Prefect's UI
        return get_run_logger()

    def preprocess(self, run: Run, dataset, tokenizer):
        """The cached preprocess task; output deleted since it was cached runs again."""
        out_root, cfg = run.paths.processed, run.cfg.preprocess
        done = preprocess.is_complete(out_root / preprocess.cache_key(dataset.md5, cfg, tokenizer))
        state = preprocess_data.with_options(refresh_cache=not done)(
            Path(dataset.path), dataset.md5, cfg, tokenizer, out_root, return_state=True)
        return replace(state.result(), cached=True) if state.name == "Cached" else state.result()

    @contextmanager
    def publishing(self, state: Publishing) -> Iterator[Publishing]:
        """All of it commits, or the rollback hooks below undo what the tasks did."""
        with transaction() as txn:
            txn.set("publishing", state)
            yield state

    def show(self, key: str, text: str, table: list[dict] | None = None) -> None:
        if table is None:
            create_markdown_artifact(key=key, markdown=text)
        else:
            create_table_artifact(key=key, table=table, description=text)


@PrefectSteps.register.on_rollback
def undo_register(txn: Transaction) -> None:
    txn.get("publishing").undo_register()


@PrefectSteps.promote.on_rollback
def undo_promote(txn: Transaction) -> None:
    txn.get("publishing").undo_promote()
