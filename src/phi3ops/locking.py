"""An exclusive lock on a file under the project root: one retrain per registered model at a time.

    phi3ops run        # a second run on the same model waits here, then finds the first's result

`flock` locks belong to the open file, so the OS drops the lock when its holder exits, a crash or
`kill -9` included: a dead run never blocks the next. The file holds the holder's pid, host,
start time and what it is, so whoever waits can say for whom.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import psutil

from phi3ops.errors import BusyError


def process_started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None when there is none; a
    zombie (dead, not yet reaped by its parent) is none."""
    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except psutil.Error:
        return None


def process_alive(pid: int, started: float | None) -> bool:
    """Is the process that had `pid` and started at `started` still running? A pid reused by a
    later process does not count; with `started` unknown, any process with that pid does."""
    now = process_started(pid)
    return now is not None and (started is None or abs(now - started) < 0.01)


def lock_path(root: Path, name: str) -> Path:
    """Where the lock named `name` lives; any character unsafe in a file name becomes `_`."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return root / ".cache" / "locks" / f"{safe}.lock"


def holder(path: Path) -> dict | None:
    """Who holds the lock (as written by its holder), or None when it is free or unreadable."""
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def describe(info: dict | None) -> str:
    if not info:
        return "a holder that has not said who it is yet"
    return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"
            + (f" ({info['what']})" if info.get("what") else ""))


@contextmanager
def exclusive(
    path: Path, what: str, timeout_s: float | None = None,
    on_wait: Callable[[str], None] | None = None, poll_s: float = 1.0,
) -> Iterator[None]:
    """Hold `path` exclusively. Waits while another process (or thread) holds it: forever when
    `timeout_s` is None, else up to `timeout_s` seconds (0: not at all), then raises BusyError
    naming the holder. `on_wait` hears once that this call is waiting, and for whom."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                busy = describe(holder(path))
                if deadline is not None and time.monotonic() >= deadline:
                    raise BusyError(
                        f"{path.stem}: another run holds the lock ({busy}); "
                        + ("did not wait" if not timeout_s else f"waited {timeout_s:.0f} s")
                        + ". Run again when it has finished, or wait longer.") from None
                if on_wait is not None and not told:
                    on_wait(f"waiting for {path.stem}, held by {busy}")
                    told = True
                time.sleep(poll_s if deadline is None
                           else max(0.0, min(poll_s, deadline - time.monotonic())))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
              "since": datetime.now(UTC).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # free again: nobody to name
    finally:
        os.close(fd)  # closing the last descriptor releases the lock
