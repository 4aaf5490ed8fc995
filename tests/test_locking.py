"""The retrain lock: one holder at a time, across processes and threads; a dead holder frees it."""

import subprocess
import sys
import threading
import time

import pytest

from phi3ops.errors import BusyError
from phi3ops.locking import exclusive, holder, lock_path

HOLD_IN_A_PROCESS = """
import sys, time
from pathlib import Path
from phi3ops.locking import exclusive
with exclusive(Path(sys.argv[1]), "a retrain in another process"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_process_is_told_who_holds_it_and_a_killed_holder_frees_it(tmp_path):
    path = lock_path(tmp_path, "retrain-phi3ops/chat")
    assert path.parent == tmp_path / ".cache" / "locks" and path.name == "retrain-phi3ops_chat.lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_IN_A_PROCESS, str(path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert holder(path)["pid"] == proc.pid
        with pytest.raises(BusyError, match=rf"another run holds the lock \(pid {proc.pid} on "
                                            r".*\(a retrain in another process\)\); did not wait"):
            with exclusive(path, "second", timeout_s=0):
                pass
        start = time.monotonic()
        with pytest.raises(BusyError, match="waited 1 s"):
            with exclusive(path, "third", timeout_s=1, poll_s=0.1):
                pass
        assert time.monotonic() - start >= 1
    finally:
        proc.kill()  # SIGKILL: no cleanup runs, the OS drops the lock with the process
        proc.wait(timeout=30)
    with exclusive(path, "after the crash", timeout_s=0):
        assert holder(path)["what"] == "after the crash"
    assert holder(path) is None, "released: nobody to name"


def test_a_waiter_starts_only_after_the_holder_ends(tmp_path):
    path = lock_path(tmp_path, "retrain-m")
    spans, heard = {}, []
    first_holds = threading.Event()

    def run(name: str, hold_s: float) -> None:
        with exclusive(path, name, on_wait=heard.append, poll_s=0.05):
            start = time.monotonic()
            first_holds.set()
            time.sleep(hold_s)
            spans[name] = (start, time.monotonic())

    first = threading.Thread(target=run, args=("first", 0.5))
    first.start()
    assert first_holds.wait(10)
    second = threading.Thread(target=run, args=("second", 0))
    second.start()
    first.join(10)
    second.join(10)
    assert spans["second"][0] >= spans["first"][1], "never both at once"
    assert len(heard) == 1 and "held by pid" in heard[0] and "(first)" in heard[0]
