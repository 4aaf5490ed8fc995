"""History that never rewrites: a rerun finds its version and leaves its decision and the
aliases alone; "nothing changed" finds any decided version; the alias history only grows."""

import re
import uuid

import pytest
from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

from phi3ops.config import load_mlflow_config
from phi3ops.registry.client import Registry
from phi3ops.registry.promotion import history, promote, rollback
from phi3ops.registry.store import (
    Candidate,
    Lineage,
    already_decided,
    register_adapter,
)
from tests.conftest import REPO

LINEAGE = Lineage(dataset_md5="d1.dir", data_git_rev="r1", config_hash="c1",
                  code_git_rev="r1", code_hash="h1", env_lock="l1",
                  pipeline="tiny-cpu", base_model="tiny-phi3")
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00 "


@pytest.fixture
def cfg(mlflow_server, monkeypatch, tmp_path) -> Registry:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    name = f"history-{uuid.uuid4().hex[:8]}"
    return Registry(load_mlflow_config(REPO / "mlflow.yaml", [f"registered_model={name}"])
                    .resolved(tmp_path))


@pytest.fixture
def register(cfg, adapter):
    """register(config_hash, rougeL): the tiny adapter, registered by one run as phi3ops does."""
    run_id = cfg.client.create_run(cfg.experiment_id).info.run_id

    def register(config_hash: str, rougeL: float) -> ModelVersion:
        lineage = Lineage(**{**LINEAGE.__dict__, "config_hash": config_hash})
        return register_adapter(cfg, run_id, Candidate(
            lineage, {"tuned_rougeL": rougeL, "base_rougeL": 0.1}, *adapter, max_new_tokens=16))

    register.run_id = run_id
    return register


def test_a_rerun_leaves_decisions_and_aliases_and_nothing_changed_finds_any_version(
        cfg, register):
    client = cfg.client
    v1 = register("c1", 0.6)
    assert already_decided(cfg, "d1.dir", "c1", "h1") is None, "registered, not yet decided"
    assert promote(cfg, v1.version, by="run one").promoted
    v2 = register("c2", 0.5)
    assert not promote(cfg, v2.version, by="run two").promoted
    # Not the champion, but decided: the same data, config and code would only repeat it.
    assert already_decided(cfg, "d1.dir", "c2", "h1").version == v2.version
    assert already_decided(cfg, "d1.dir", "c2", "h2") is None, "other code never matches"
    before = client.get_model_version(cfg.model, v1.version).tags

    again = register("c1", 0.9)  # a forced rerun of v1's inputs
    assert again.version == v1.version
    assert client.get_model_version(cfg.model, v1.version).tags == before
    assert cfg.alias("challenger").version == v2.version, "not moved back to v1"
    assert cfg.alias("champion").version == v1.version


def test_the_history_of_a_version_is_only_ever_added_to(cfg, register):
    client = cfg.client
    v1 = register("c1", 0.5).version
    promote(cfg, v1, by="run one")
    v2 = register("c2", 0.7).version
    promote(cfg, v2, by="run two")
    rollback(cfg, by="ann@laptop")
    v3 = register("c3", 0.2).version
    promote(cfg, v3, by="run three")

    def events(version: str) -> list[str]:
        entries = history(client.get_model_version(cfg.model, version))
        assert all(re.match(STAMP, e) for e in entries), entries
        return [re.sub(STAMP, "", e) for e in entries]

    assert events(v1) == [
        f"registered, @challenger (by run {register.run_id})",
        "@champion: first champion (rougeL 0.5000); rougeL +0.4000 over the base (by run one)",
        f"@previous-champion: v{v2} took @champion (by run two)",
        f"@champion again: v{v2} rolled back (by ann@laptop)",
    ]
    assert events(v2)[1:] == [
        f"@champion: rougeL +0.2000 over the champion (champion v{v1}); rougeL +0.6000 over "
        "the base (by run two)",
        f"rolled back: v{v2} rolled back by hand; @champion is v{v1} again; @challenger "
        "cleared (by ann@laptop)",
    ]
    assert events(v3)[1:] == [f"rejected: rougeL gain over the champion -0.3000 is not above "
                              f"0.0 (champion v{v1}); rougeL +0.1000 over the base (by run three)"]


def test_a_version_registered_before_keeps_its_numbered_history_first():
    older = ModelVersion("m", "1", 0, tags=[ModelVersionTag("history.002", "b"),
                                            ModelVersionTag("history.001", "a")])
    assert history(older) == ["a", "b"]
    newer = ModelVersion("m", "2", 0, tags=[ModelVersionTag("phi3ops.history", "a\nb\nc")])
    assert history(newer) == ["a", "b", "c"]
