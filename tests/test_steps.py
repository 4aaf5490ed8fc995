"""The local steps' publishing: outside Prefect too, a failure after registration and promotion
puts the aliases back where they were (the flow's Prefect transaction is tested end to end in
tests/flows/test_flow_faults.py)."""

import pytest

from phi3ops.registry.promotion import alias_snapshot, promote
from phi3ops.steps import LocalSteps, Publishing
from tests.registry.test_registry_history import cfg, register  # noqa: F401 (fixtures)


def test_a_failure_inside_publishing_puts_the_aliases_back(cfg, register):  # noqa: F811
    champion = register("c1", 0.5).version
    assert promote(cfg, champion, by="run one").promoted
    before = alias_snapshot(cfg)
    state = Publishing(cfg, register.run_id, before, champion)

    with pytest.raises(RuntimeError, match="after promotion"), LocalSteps().publishing(state):
        state.version = register("c2", 0.9).version
        assert alias_snapshot(cfg)["challenger"] == state.version
        state.promoted = promote(cfg, state.version, by="run two").promoted
        assert state.promoted and alias_snapshot(cfg)["champion"] == state.version
        raise RuntimeError("a failure after promotion")
    assert alias_snapshot(cfg) == before


def test_a_failure_before_registration_touches_nothing(cfg, register):  # noqa: F811
    champion = register("c1", 0.5).version
    promote(cfg, champion, by="run one")
    before = alias_snapshot(cfg)
    with pytest.raises(RuntimeError), LocalSteps().publishing(
            Publishing(cfg, register.run_id, before, champion)):
        raise RuntimeError("the model card could not be written")
    assert alias_snapshot(cfg) == before
