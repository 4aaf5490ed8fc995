"""Progress of the long steps, so that a first run never sits silent for minutes.

On a terminal: a bar with rate and ETA (tqdm). Elsewhere (CI, a pipe, a log file): a log line
about every ten seconds and a last one at the end; a step done within ten seconds prints none.
The training process writes its progress to a small JSON file, which `following` shows from the
launching process.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from phi3ops.config import write_json_atomic

log = logging.getLogger(__name__)
LINE_EVERY_S = 10.0
FOLLOW_EVERY_S = 1.0


class Progress:
    """`with Progress("train", total=120) as bar: bar.update(done, loss=2.31)`; `done` is
    absolute, so a resumed step count or a file read twice cannot overcount."""

    def __init__(self, what: str, total: int, unit: str = "step", first: int = 0):
        self.what, self.total, self.unit = what, max(total, 1), unit
        self.done, self.fields = first, {}
        self.first, self.started = first, time.monotonic()
        self.last_line = 0.0  # monotonic time of the last line; 0: none yet
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=first, desc=what, unit=unit,
                            file=sys.stderr, dynamic_ncols=True, leave=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, done: int, **fields: float | str) -> None:
        self.done, self.fields = min(done, self.total), fields
        if self.bar is not None:
            self.bar.n = self.done
            self.bar.set_postfix({k: _short(v) for k, v in fields.items()}, refresh=False)
            self.bar.refresh()
        elif (time.monotonic() - max(self.last_line, self.started) >= LINE_EVERY_S
              and self.done < self.total):
            self._line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.last_line:  # a step short enough to need no line needs no last one either
            self._line()

    def _line(self) -> None:
        self.last_line = now = time.monotonic()
        elapsed, done_here = now - self.started, self.done - self.first
        eta = (f", ETA {_clock(elapsed * (self.total - self.done) / done_here)}"
               if 0 < done_here and self.done < self.total else "")
        fields = "".join(f", {k} {_short(v)}" for k, v in self.fields.items())
        log.info("%s: %s %d/%d%s, %s%s", self.what, self.unit, self.done, self.total, fields,
                 _clock(elapsed), eta)


def write_state(path: Path, done: int, total: int, **fields: float | str) -> None:
    """What `following` reads: written whole, so a reader never sees half of it."""
    write_json_atomic(path, {"done": done, "total": total, "fields": fields})


@contextmanager
def following(path: Path, what: str, unit: str = "step") -> Iterator[None]:
    """While open, show the progress another process writes to `path` with write_state."""
    stop = threading.Event()

    def read() -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # not written yet

    def follow() -> None:
        bar = None
        while True:
            stopping = stop.wait(FOLLOW_EVERY_S)
            if (state := read()) is not None:
                if bar is None:
                    bar = Progress(what, state["total"], unit, first=state["done"])
                bar.update(state["done"], **state["fields"])
            if stopping:
                break
        if bar is not None:
            bar.close()

    path.unlink(missing_ok=True)  # an earlier attempt's state is not this one's
    thread = threading.Thread(target=follow, name=f"{what}-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _short(value: float | str) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"
