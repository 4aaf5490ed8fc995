"""How the retrain flow is wired into Prefect: what it persists is JSON, and preprocessing is a
cached task keyed on what decides its output."""

import pytest
from prefect import Task

import flows.retrain as retrain_flow
import flows.steps as flow_steps
from phi3ops.config import PreprocessConfig
from phi3ops.data.preprocess import cache_key
from phi3ops.model.base_model import load_tokenizer


@pytest.fixture(scope="module")
def flow_module():
    return flow_steps


def flow_tasks(module) -> dict[str, Task]:
    """The flow's tasks by name: the steps, and the cached preprocess task they call."""
    candidates = [*vars(module).values(), *vars(module.PrefectSteps).values()]
    return {t.name: t for t in candidates if isinstance(t, Task)}


def test_whatever_prefect_persists_is_json_under_the_project(flow_module, tmp_path):
    tasks = flow_tasks(flow_module)
    assert {"version_data", "preprocess", "train", "evaluate", "register", "promote",
            "record"} <= set(tasks)
    for name, t in tasks.items():
        assert t.persist_result is False or t.result_serializer == "json", name
    retrain = retrain_flow.retrain
    assert retrain.persist_result and retrain.result_serializer == "json"
    assert tasks["preprocess"].persist_result and tasks["preprocess"].cache_key_fn is not None
    # The tasks keep the flow's storage; the flow, run for a project, keeps it in that project.
    assert all(t.result_storage is None for t in tasks.values())
    assert retrain_flow.in_project(tmp_path).result_storage == (
        tmp_path.resolve() / ".cache" / "prefect-results")


def test_no_task_retries_inside_the_transaction(flow_module):
    """A failed attempt rolls back the enclosing transaction even if its retry then succeeds."""
    tasks = flow_tasks(flow_module)
    assert [tasks[name].retries for name in ("register", "promote", "record")] == [0, 0, 0]


def test_the_preprocess_cache_key_follows_data_config_tokenizer_and_place(
        flow_module, tiny_config, tiny_models, tmp_path):
    tokenizer = load_tokenizer(tiny_config.model, tiny_models)
    params = {"data_dir": tmp_path / "a", "data_md5": "m1", "cfg": PreprocessConfig(),
              "tokenizer": tokenizer, "out_root": tmp_path / "processed"}
    key = flow_module.preprocess_key(None, params)
    assert cache_key("m1", PreprocessConfig(), tokenizer) in key
    assert flow_module.preprocess_key(None, {**params, "data_dir": tmp_path / "b"}) == key, (
        "where the data was checked out does not matter, its md5 does")
    for change in ({"data_md5": "m2"}, {"cfg": PreprocessConfig(max_length=128)},
                   {"out_root": tmp_path / "elsewhere"}):
        assert flow_module.preprocess_key(None, {**params, **change}) != key, change
