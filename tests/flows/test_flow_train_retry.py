"""The flow's train task: a hung training is killed at launch.timeout_s and retried once, and the
retry resumes from the newest complete checkpoint instead of starting over; a failure before the
first step (config, template, data) is never retried."""

import re

import pytest
from prefect import flow

from flows.steps import PrefectSteps
from phi3ops.config import ProjectPaths, load_config
from phi3ops.errors import TrainingSetupError
from phi3ops.steps import Run
from phi3ops.train.launch import LOG_FILE, TrainingTimeout
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def train_task(cfg, processed, out_dir, tiny_models):
    """The flow's train step alone, in a flow of its own: its final state."""
    paths = ProjectPaths(out_dir)
    paths.models = tiny_models

    @flow
    def only_train():
        return PrefectSteps().train(Run(paths, cfg), processed, out_dir, return_state=True)

    return only_train(return_state=True)


def test_a_timed_out_training_is_retried_from_its_last_checkpoint(
        tmp_path, tiny_models, processed, prefect_harness):
    cfg = load_config(REPO / "pipelines" / "tiny-cpu.yaml", [
        "training_config.max_steps=1000000", "training_config.save_steps=2",
        "launch.timeout_s=15"])  # never finishes: each attempt is killed after a checkpoint
    state = train_task(cfg, processed, tmp_path, tiny_models)
    assert state.is_failed()
    with pytest.raises(TrainingTimeout):
        state.result()
    log = (tmp_path / LOG_FILE).read_text()
    assert len(re.findall(r"training \d+ of \d+ parameters", log)) == 2, "first try + 1 retry"
    assert "resuming from" in log and "checkpoint-" in log.split("resuming from", 1)[1]


def test_a_failure_before_training_is_reported_once_and_not_retried(
        tmp_path, tiny_models, processed, prefect_harness):
    """A template the trainer cannot use fails the same way every time: the child says so
    (kind 'template'), and the flow does not start a second attempt."""
    cfg = load_config(REPO / "pipelines" / "tiny-cpu.yaml")
    chatml = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"chat_template": chatml})})
    state = train_task(cfg, processed, tmp_path, tiny_models)
    assert state.is_failed()
    with pytest.raises(TrainingSetupError) as err:
        state.result()
    assert err.value.kind == "template" and "model.chat_template" in str(err.value)
    assert (tmp_path / LOG_FILE).read_text().count("failed before the first step") == 1
