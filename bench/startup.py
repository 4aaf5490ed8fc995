"""Start-up time of the `phi3ops` commands a user types most (a benchmark, not a test).

    make run                                  # once: a project with a registered @champion
    .venv/bin/python bench/startup.py [--root .] [--rounds 3]

Each command runs `--rounds` times in a fresh process with PYTHONDONTWRITEBYTECODE=1 (as in CI
and many Docker images: no `.pyc` is written on import, so whatever the install did not compile
is compiled again by every process); the median and every round are printed, beside the goal.
A first untimed round, under `-X importtime`, warms the file cache and tells whether the command
imported torch (the last column): only commands that run a model should.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLI = "import sys; from phi3ops.cli.main import main; main(sys.argv[1:])"
# (label, arguments, goal in seconds)
COMMANDS = [
    ("phi3ops --help", ["--help"], 1.0),
    ("phi3ops data status", ["data", "status"], 3.0),
    ("phi3ops models", ["models"], 3.0),
    ("phi3ops chat", ["chat", "What is the capital of France?"], 5.0),
    ("import torch, transformers, peft", None, None),
]


def timed(args: list[str] | None, root: Path, trace: bool = False) -> tuple[float, str]:
    """Seconds the command took, and its stderr (with -X importtime when `trace`)."""
    code = CLI if args is not None else "import torch, transformers, peft"
    cmd = [sys.executable, *(["-X", "importtime"] if trace else []), "-c", code, *(args or [])]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}\n"
                 "Is there a registered @champion? Run `make run` in --root first.")
    return elapsed, done.stderr


def imports_torch(stderr: str) -> bool:
    """Whether -X importtime listed torch (any process of the command that writes here)."""
    return re.search(r"\|\s+torch$", stderr, re.MULTILINE) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"{'command':34s} {'median s':>8s} {'goal':>6s}  rounds{'':14s} torch")
    for label, argv, goal in COMMANDS:
        _, trace = timed(argv, args.root, trace=True)  # also warms the file cache
        times = [timed(argv, args.root)[0] for _ in range(args.rounds)]
        goal_text = f"< {goal:g}" if goal else ""
        rounds = " ".join(f"{t:.2f}" for t in times)
        print(f"{label:34s} {statistics.median(times):8.2f} {goal_text:>6s}  {rounds:20s} "
              f"{'yes' if imports_torch(trace) else 'no'}", flush=True)


if __name__ == "__main__":
    main()
