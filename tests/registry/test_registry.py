"""Promotion policy and registry checks against a real MLflow server (SQLite, subprocess)."""

import logging
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest
from mlflow.entities import Metric
from mlflow.entities.model_registry import ModelVersion, ModelVersionTag
from mlflow.exceptions import MlflowException

from phi3ops.config import load_mlflow_config
from phi3ops.errors import RegistryError
from phi3ops.registry.client import Registry
from phi3ops.registry.promotion import (
    PromotionDecision,
    alias_snapshot,
    decide,
    promote,
    promotion_lock,
    record,
    rollback,
    undo_challenger,
    undo_promotion,
)
from phi3ops.registry.store import (
    check_requirements_in_background,
    pip_requirements,
    version_metrics,
)
from tests.conftest import REPO


def version(n: int, evaluated_against: str | None = None, **metrics: float) -> ModelVersion:
    """A version as the registry returns it, with the metrics of its logged model."""
    tags = [ModelVersionTag("phi3ops.evaluated_against", evaluated_against)] * bool(
        evaluated_against)
    return ModelVersion("m", str(n), 0, tags=tags,
                        metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])


@pytest.fixture
def registry(mlflow_server, monkeypatch, tmp_path) -> Registry:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    name = f"chat-{uuid.uuid4().hex[:8]}"
    return Registry(load_mlflow_config(REPO / "mlflow.yaml", [f"registered_model={name}"])
                    .resolved(tmp_path))


def register(registry: Registry, **metrics: float) -> str:
    experiment, client = registry.experiment_id, registry.client
    try:
        client.create_registered_model(registry.model)
    except Exception:
        pass  # already there
    run_id = client.create_run(experiment).info.run_id
    model = client.create_logged_model(experiment, source_run_id=run_id)
    client.log_batch(run_id, metrics=[Metric(k, v, 0, 0, model_id=model.model_id)
                                      for k, v in metrics.items()])
    with registry.as_process_default():  # a SQL registry store finds the model through it
        return client.create_model_version(registry.model, f"models:/{model.model_id}",
                                           run_id=run_id, model_id=model.model_id).version


def test_metrics_are_read_from_the_logged_model_and_from_older_versions_tags(registry):
    client = registry.client
    current = client.get_model_version(registry.model,
                                       register(registry, tuned_rougeL=0.5, base_rougeL=0.2))
    assert version_metrics(registry, current) == {"tuned_rougeL": 0.5, "base_rougeL": 0.2}
    assert not any(k.startswith("metric.") for k in current.tags)
    run_id = client.create_run(registry.experiment_id).info.run_id  # as versions were registered
    older = client.create_model_version(registry.model, f"runs:/{run_id}/adapter",
                                        run_id=run_id, tags={"metric.tuned_rougeL": "0.25"})
    assert version_metrics(registry, older) == {"tuned_rougeL": 0.25}


def test_decide_first_champion_must_beat_base(registry):
    ok, reason = decide(registry, version(1, tuned_rougeL=0.5, base_rougeL=0.2), None)
    assert ok and "first champion" in reason
    ok, reason = decide(registry, version(1, tuned_rougeL=0.2, base_rougeL=0.3), None)
    assert not ok and "gain over the base -0.1000 is not above 0.0" in reason


def test_decide_never_promotes_on_nan_or_missing(registry):
    assert not decide(registry, version(1, tuned_rougeL=float("nan"), base_rougeL=0.1), None)[0]
    assert not decide(registry, version(1, base_rougeL=0.1), None)[0]
    assert not decide(registry, version(1, tuned_rougeL=0.9), None)[0], "base metric missing"


def test_decide_uses_the_paired_delta_against_the_same_champion(registry):
    champion = version(1, tuned_rougeL=0.9, base_rougeL=0.1)
    # Scored against v1 on the same split: a small paired gain counts...
    scores = dict(tuned_rougeL=0.5, base_rougeL=0.1, delta_base_rougeL=0.4,
                  delta_champion_rougeL=0.02, delta_champion_rougeL_lo=-0.01)
    ok, reason = decide(registry, version(2, "1", **scores), champion)
    assert ok and "+0.0200 over the champion" in reason
    # ...unless the policy wants the interval above zero.
    policy = registry.config.promotion.model_copy(update={"require_interval_above_zero": True})
    strict = Registry(registry.config.model_copy(update={"promotion": policy}))
    ok, reason = decide(strict, version(2, "1", **scores, delta_base_rougeL_lo=0.3), champion)
    assert not ok and "lower bound -0.0100" in reason
    # A delta measured against another champion is ignored: stored scores decide (0.5 < 0.9).
    assert not decide(registry, version(2, "7", **scores), champion)[0]


def test_decide_requires_more_than_min_gain(registry):
    policy = registry.config.promotion.model_copy(update={"min_gain": 0.05})
    demanding = Registry(registry.config.model_copy(update={"promotion": policy}))
    champion = version(1, tuned_rougeL=0.6, base_rougeL=0.1)
    assert not decide(demanding, version(2, tuned_rougeL=0.64, base_rougeL=0.1), champion)[0]
    assert decide(demanding, version(2, tuned_rougeL=0.7, base_rougeL=0.1), champion)[0]


def test_champion_moves_only_to_a_better_version(registry):
    client = registry.client
    v1 = register(registry, tuned_rougeL=0.5, base_rougeL=0.2)
    assert promote(registry, v1).promoted
    v2 = register(registry, tuned_rougeL=0.4, base_rougeL=0.2)
    decision = promote(registry, v2)
    assert not decision.promoted and decision.previous_champion == v1
    assert registry.alias("champion").version == v1
    tags = client.get_model_version(registry.model, v2).tags
    assert tags["promotion.decision"] == "rejected"
    assert "gain over the champion -0.1000 is not above 0.0" in tags["promotion.reason"]
    v3 = register(registry, tuned_rougeL=float("nan"), base_rougeL=0.2)
    assert not promote(registry, v3).promoted
    v4 = register(registry, tuned_rougeL=0.7, base_rougeL=0.2)
    assert promote(registry, v4).promoted
    assert registry.alias("champion").version == v4
    assert client.get_model_version(registry.model, v4).tags[
        "promotion.decision"] == "promoted"


def test_previous_champion_and_rollback(registry):
    client = registry.client
    v1 = register(registry, tuned_rougeL=0.5, base_rougeL=0.2)
    promote(registry, v1)
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        rollback(registry)
    v2 = register(registry, tuned_rougeL=0.6, base_rougeL=0.2)
    assert promote(registry, v2).promoted
    assert registry.alias("previous-champion").version == v1
    client.set_registered_model_alias(registry.model, "challenger", v2)  # as a run
    decision = rollback(registry)
    assert decision.version == v1 and decision.previous_champion == v2
    assert decision.reason == (f"v{v2} rolled back by hand; @champion is v{v1} again; "
                               "@challenger cleared")
    assert registry.alias("challenger") is None, "the demoted one is no candidate"
    assert registry.alias("champion").version == v1
    assert registry.alias("previous-champion") is None
    assert client.get_model_version(registry.model, v2).tags[
        "promotion.decision"] == "rolled-back"
    # The rolled-back version does not come back through a later promotion's settling.
    v3 = register(registry, tuned_rougeL=0.55, base_rougeL=0.2)
    assert promote(registry, v3).promoted
    assert registry.alias("champion").version == v3


PROMOTE_IN_A_PROCESS = """
import sys
import threading
from pathlib import Path
from phi3ops.config import load_mlflow_config
from phi3ops.errors import RegistryError
from phi3ops.registry.client import Registry
from phi3ops.registry.promotion import promote
cfg = load_mlflow_config(sys.argv[1], [f"registered_model={sys.argv[2]}"])
print(promote(Registry(cfg.resolved(Path(sys.argv[3]))), sys.argv[4]).promoted)
"""


def start_promotion(registry: Registry, server: str, tmp_path, version: str) -> subprocess.Popen:
    """A promotion in its own process; its stderr goes to promote-v<version>.log."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": server}
    with (tmp_path / f"promote-v{version}.log").open("w") as log:
        return subprocess.Popen([sys.executable, "-c", PROMOTE_IN_A_PROCESS,
                                 str(REPO / "mlflow.yaml"), registry.model, str(tmp_path),
                                 version], env=env, stdout=subprocess.PIPE, stderr=log, text=True)


def promotion_log(tmp_path, version: str) -> str:
    return (tmp_path / f"promote-v{version}.log").read_text()


@pytest.mark.parametrize("attempt", range(3))
def test_concurrent_promotions_leave_the_better_version(registry, mlflow_server, tmp_path,
                                                        attempt):
    v1 = register(registry, tuned_rougeL=0.5, base_rougeL=0.2)
    promote(registry, v1)
    better = register(registry, tuned_rougeL=0.9, base_rougeL=0.2)
    worse = register(registry, tuned_rougeL=0.8, base_rougeL=0.2)
    # Start the better one first on odd attempts, so neither order is always the winner's.
    order = [better, worse] if attempt % 2 else [worse, better]
    procs = [start_promotion(registry, mlflow_server, tmp_path, v) for v in order]
    outputs = {v: p.communicate(timeout=120)[0].strip() for v, p in zip(order, procs, strict=True)}
    assert all(p.returncode == 0 for p in procs), [promotion_log(tmp_path, v) for v in order]
    assert registry.alias("champion").version == better
    assert outputs[better] == "True"
    tags = registry.client.get_model_version(registry.model, worse).tags
    # One after the other: the worse one went first and was replaced, or saw the better one.
    if outputs[worse] == "True":
        assert tags["promotion.decision"] == "promoted"
        assert registry.alias("previous-champion").version == worse
    else:
        assert tags["promotion.decision"] == "rejected"
        assert f"(champion v{better})" in tags["promotion.reason"]
        assert registry.alias("previous-champion").version == v1


def test_a_promotion_waits_for_the_lock(registry, mlflow_server, tmp_path):
    v1 = register(registry, tuned_rougeL=0.5, base_rougeL=0.2)
    with promotion_lock(registry):
        proc = start_promotion(registry, mlflow_server, tmp_path, v1)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=10)  # long enough for the process to start and reach the lock
        assert registry.alias("champion") is None
    assert proc.communicate(timeout=120)[0].strip() == "True", promotion_log(tmp_path, v1)
    assert registry.alias("champion").version == v1
    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST|not found"):
        registry.client.get_registered_model(registry.model + ".promotion-lock")


def test_a_held_lock_names_its_holder_and_a_stale_one_is_broken(registry):
    client, lock = registry.client, registry.model + ".promotion-lock"
    client.create_registered_model(lock, tags={"phi3ops.holder": "gone-host:4242:abcd"})
    with pytest.raises(RegistryError, match=r"held by gone-host:4242:abcd .* delete the regis"):
        with promotion_lock(registry, wait_s=0.5):
            pass
    time.sleep(0.2)
    with promotion_lock(registry, stale_s=0.1):
        assert client.get_registered_model(lock).tags["phi3ops.holder"] != "gone-host:4242:abcd"
    with pytest.raises(MlflowException):
        client.get_registered_model(lock)


def test_duplicates_of_a_registration_key_are_removed(registry):
    from phi3ops.registry.store import find_version

    client = registry.client
    first, second = register(registry), register(registry)
    for v in (first, second):
        client.set_model_version_tag(registry.model, v, "phi3ops.registration_key",
                                     "k1")
    assert find_version(registry, registry.model, "k1").version == first
    remaining = client.search_model_versions(f"name='{registry.model}'")
    assert [v.version for v in remaining] == [first]
    assert find_version(registry, registry.model, "k2") is None


def test_undo_puts_the_aliases_back_unless_someone_moved_them_since(registry):
    client, name = registry.client, registry.model
    v1 = register(registry, tuned_rougeL=0.5, base_rougeL=0.2)
    client.set_registered_model_alias(name, "challenger", v1)
    assert promote(registry, v1).promoted
    before = alias_snapshot(registry)
    assert before == {"champion": v1, "previous-champion": None, "challenger": v1}
    v2 = register(registry, tuned_rougeL=0.9, base_rougeL=0.2)
    client.set_registered_model_alias(name, "challenger", v2)
    assert promote(registry, v2).promoted
    assert registry.alias("previous-champion").version == v1

    assert undo_promotion(registry, before, v2, "run r failed after promoting it")
    assert undo_challenger(registry, before, v2)
    assert alias_snapshot(registry) == before
    tags = client.get_model_version(name, v2).tags
    assert tags["promotion.decision"] == "rolled-back"
    assert tags["promotion.reason"] == "run r failed after promoting it"
    assert not undo_promotion(registry, before, v2, "again"), "nothing left to undo"

    # A champion moved by someone else since is theirs: an undo leaves it.
    v3 = register(registry, tuned_rougeL=0.95, base_rougeL=0.2)
    assert promote(registry, v3).promoted
    assert not undo_promotion(registry, before, v2, "late")
    assert registry.alias("champion").version == v3


def test_record_checks_the_registry_agrees_then_tags_the_run(registry):
    v1 = register(registry, tuned_rougeL=0.5, base_rougeL=0.2)
    decision = promote(registry, v1)
    run_id = registry.client.create_run(registry.experiment_id).info.run_id
    record(registry, run_id, decision)
    tags = registry.client.get_run(run_id).data.tags
    assert tags["phi3ops.version"] == v1 and tags["phi3ops.promotion"] == "promoted"
    assert tags["phi3ops.promotion_reason"] == decision.reason
    v2 = register(registry, tuned_rougeL=0.9, base_rougeL=0.2)
    with pytest.raises(RegistryError, match=f"v{v2} was promoted but @champion names v{v1}"):
        record(registry, run_id, PromotionDecision(v2, True, "said so", v1))


def test_record_and_undo_on_a_sql_store_whose_versions_are_ints(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"
    sql = Registry(load_mlflow_config(REPO / "mlflow.yaml", [uri]).resolved(tmp_path))
    v1 = register(sql, tuned_rougeL=0.5, base_rougeL=0.2)
    before = alias_snapshot(sql)
    decision = promote(sql, v1)
    run_id = sql.client.create_run(sql.experiment_id).info.run_id
    record(sql, run_id, decision)
    assert sql.client.get_run(run_id).data.tags["phi3ops.version"] == str(v1)
    assert alias_snapshot(sql)["champion"] == str(v1)
    assert undo_promotion(sql, before, v1, "undone") and alias_snapshot(sql) == before


def test_the_early_requirements_check_passes_for_the_pinned_runtime():
    """The check log_model makes, run ahead in a thread: it ends, and this environment
    satisfies every requirement a registered model records (pinned as installed)."""
    warnings: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = warnings.append
    logger = logging.getLogger("mlflow.utils.requirements_utils")
    logger.addHandler(handler)
    try:
        thread = check_requirements_in_background()
        thread.join(timeout=120)
    finally:
        logger.removeHandler(handler)
    assert not thread.is_alive()
    assert [w.getMessage() for w in warnings] == []
    assert {r.split("==")[0] for r in pip_requirements()} >= {"torch", "peft", "mlflow"}
    assert not [r for r in pip_requirements() if "+" in r], "resolvable from the public index"


def test_the_lock_survives_being_released_while_another_creates_it(registry):
    """A create that meets the lock, which is then released before the server reads the holder
    back, fails with RESOURCE_DOES_NOT_EXIST: that is a free lock, tried again, not an error."""
    inside, overlaps, errors = [0], [], []

    def hammer():
        try:
            for _ in range(15):
                with promotion_lock(registry):
                    inside[0] += 1
                    overlaps.append(inside[0])
                    inside[0] -= 1
        except Exception as e:  # noqa: BLE001 - the test reports it below
            errors.append(repr(e))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == []
    assert len(overlaps) == 60 and max(overlaps) == 1
