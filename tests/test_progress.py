"""Progress of long steps: lines now and then off a terminal, nothing for a quick step, and
the training process's progress shown from the launching one."""

import logging
import threading

from phi3ops import progress
from phi3ops.progress import Progress, following, write_state


def test_a_long_step_logs_its_count_fields_and_eta(monkeypatch, caplog):
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="phi3ops.progress")
    with Progress("train", 4) as bar:
        for step in range(1, 5):
            bar.update(step, loss=2.5 / step)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("train: step 1/4, loss 2.5, 0:00, ETA 0:00")
    assert lines[-1].startswith("train: step 4/4, loss 0.625, 0:00") and "ETA" not in lines[-1]


def test_a_quick_step_prints_nothing(caplog):
    caplog.set_level(logging.INFO, logger="phi3ops.progress")
    with Progress("preprocess", 1000, unit="conversation") as bar:
        for done in range(1, 1001):
            bar.update(done)
    assert not caplog.records


def test_following_shows_what_another_process_writes(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    monkeypatch.setattr(progress, "FOLLOW_EVERY_S", 0.02)
    caplog.set_level(logging.INFO, logger="phi3ops.progress")
    state = tmp_path / "train-progress.json"
    write_state(state, 9, 10)  # an earlier attempt's: not shown
    with following(state, "train"):
        assert not state.exists()
        for step in (3, 6, 10):
            write_state(state, step, 10, loss=1.0 / step)
            threading.Event().wait(0.1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all(line.startswith("train: step ") for line in lines)
    assert lines[-1].startswith("train: step 10/10, loss 0.1")
    assert not any(line.startswith("train: step 9/10") for line in lines)
