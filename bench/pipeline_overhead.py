"""Orchestration and tracking overhead of the retrain flow (a benchmark, not a test).

In a fresh copy of the project (its own git repo, DVC remote and MLflow SQLite file), times:
1. the stages as plain functions, no Prefect and no MLflow (the compute; training in its child
   process, as in the flow), stage by stage;
2. the whole flow with MLflow tracking and registration, each task's time read back from
   Prefect's API, and the rest (the MLflow run, logging, artifacts, Prefect's bookkeeping);
3. the flow again with nothing changed (it ends before training);
4. a flow that does nothing: Prefect's own cost per flow run, part of (2) and (3).
Overhead = (2) - (1), shown for a run against a running Prefect server, as scheduled runs are,
and with the ephemeral server started first, as a one-off `make run` does (timed as the first
no-op flow run less a second one). One-off costs of a new project are paid before timing and
shown apart: the tiny base model and the MLflow database (created and migrated by the first
call). The stages run once untimed first, so that imports and file caches are as warm for them
as for the flow after them.
Each round runs in a fresh process (a scheduled run is one too: MLflow's and the flow's
once-per-process costs count); the report gives every round and the medians, because a shared
2-core machine moves training alone by a second or more between runs.
Goals: overhead under 10% of (2); (3) under 5% of (2).

    .venv/bin/python bench/pipeline_overhead.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # the copy's own mlruns.db

from prefect import flow as prefect_flow  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: E402

import flows.retrain as retrain_flow  # noqa: E402
from phi3ops import pipeline  # noqa: E402
from phi3ops.config import ProjectPaths, load_config, load_mlflow_config  # noqa: E402
from phi3ops.model.base_model import ensure_tiny_model  # noqa: E402
from phi3ops.registry.client import Registry  # noqa: E402
from phi3ops.steps import Run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FILES = ["flows", "pipelines", "mlflow.yaml", "data.dvc", ".dvc/config", ".dvcignore",
         ".gitignore"]


def copy_project(dest: Path) -> Path:
    for name in FILES:
        src, dst = ROOT / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    for args in (["init", "-q"], ["add", "-A"],
                 ["-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "bench"]):
        subprocess.run(["git", "-C", str(dest), *args], check=True)
    return dest


def stages_only(root: Path, out: str) -> dict[str, float]:
    """Every stage's work, called directly: what the flow would cost with no orchestration.
    Seconds per stage, named as the flow's tasks; outputs under `out`, so nothing is reused."""
    paths = ProjectPaths(root)
    cfg = load_config(paths.pipeline("pipelines/tiny-cpu.yaml"))
    seconds, last = {}, time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal last
        seconds[stage], last = time.perf_counter() - last, time.perf_counter()

    run = Run(paths, cfg)  # no MLflow run: the work alone
    dataset = pipeline.checkout(run)
    lap("version_data")
    paths.processed = root / out / "processed"  # nothing reused from an earlier pass
    prepared = pipeline.prepare(run, dataset)
    lap("preprocess")
    trained = pipeline.fit(run, prepared, root / out / "run")
    lap("train")
    pipeline.score(run, prepared, Path(trained.adapter_dir))
    lap("evaluate")
    return seconds


def task_seconds(flow_run_id) -> dict[str, float]:
    """How long each task of a flow run took, from Prefect's API."""
    async def read() -> list:
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: (run.end_time - run.start_time).total_seconds()
            for run in asyncio.run(read()) if run.start_time and run.end_time}


@prefect_flow
def noop() -> None:
    """The first flow run of a process starts Prefect's ephemeral API server."""


def one_round() -> dict:
    """Times of one fresh project, in seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        root = copy_project(Path(tmp) / "project")
        cfg = load_config(root / "pipelines" / "tiny-cpu.yaml")
        ensure_tiny_model(cfg.model.tiny, ProjectPaths(root).models)
        start = time.perf_counter()  # a project's first MLflow call creates and migrates its DB
        _ = Registry(load_mlflow_config(root / "mlflow.yaml").resolved(root)).experiment_id
        first_db = time.perf_counter() - start
        stages_only(root, "warm-up")  # imports and file caches warm, as for the flow after it
        plain = stages_only(root, "plain")

        flow = retrain_flow
        start = time.perf_counter()
        noop()
        server = time.perf_counter() - start
        start = time.perf_counter()
        noop()
        noop_run = time.perf_counter() - start
        start = time.perf_counter()
        state = flow.in_project(root)(root=str(root), return_state=True)
        full = time.perf_counter() - start
        tasks = task_seconds(state.state_details.flow_run_id)
        start = time.perf_counter()
        summary = flow.in_project(root)(root=str(root))
        rerun = time.perf_counter() - start
        assert summary.get("skipped"), "the second run must find nothing changed"
    return {"first_db": first_db, "plain": plain, "tasks": tasks, "server": server - noop_run,
            "noop": noop_run, "full": full, "rerun": rerun}


def report(rounds: list[dict]) -> None:
    median = statistics.median
    for r in rounds:
        r["compute"] = sum(r["plain"].values())
        r["overhead"] = r["full"] - r["compute"]
        r["overhead %"] = 100 * r["overhead"] / r["full"]
        r["with server %"] = 100 * (r["overhead"] + r["server"]) / (r["full"] + r["server"])
        r["rerun %"] = 100 * r["rerun"] / r["full"]
    print(f"one-off, not in the times below: MLflow database created "
          f"{median(r['first_db'] for r in rounds):.1f} s")
    print(f"{'round':14s}" + "".join(f"{i + 1:>8d}" for i in range(len(rounds))) + "  median")
    rows = [("stages plain", "compute"), ("flow", "full"), ("overhead", "overhead"),
            ("overhead %", "overhead %"), ("rerun", "rerun"), ("rerun %", "rerun %"),
            ("no-op flow", "noop"), ("server start", "server"), ("+ server %", "with server %")]
    for label, key in rows:
        values = [r[key] for r in rounds]
        print(f"{label:14s}" + "".join(f"{v:8.2f}" for v in values) + f"{median(values):8.2f}")
    print(f"\nmedian seconds per stage\n{'stage':14s} {'plain':>7s} {'as task':>8s}")
    stages = [*rounds[0]["plain"], *(t for t in rounds[0]["tasks"] if t not in rounds[0]["plain"])]
    for stage in stages:
        plain = median(r["plain"].get(stage, 0) for r in rounds)
        task = median(r["tasks"].get(stage, 0) for r in rounds)
        print(f"{stage:14s} {plain:7.2f} {task:8.2f}")
    outside = median(r["full"] - sum(r["tasks"].values()) for r in rounds)
    print(f"{'outside tasks':14s} {'':7s} {outside:8.2f}  (MLflow run, logging, artifacts, "
          "Prefect)\n")
    print(f"overhead against a running Prefect server (scheduled runs): "
          f"{median(r['overhead %'] for r in rounds):.0f}% (goal < 10%); with Prefect's "
          f"ephemeral server started first (make run): "
          f"{median(r['with server %'] for r in rounds):.0f}%")
    print(f"rerun with nothing changed: {median(r['rerun %'] for r in rounds):.1f}% of a full "
          "run (goal < 5%)")
    print(f"a no-op flow run costs {median(r['noop'] for r in rounds):.2f} s (Prefect's own "
          "per-run cost: its heartbeat thread sleeps in whole seconds and is joined at the end)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one-round", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_round:
        print("RESULT " + json.dumps(one_round()))
        return
    rounds = []
    for i in range(args.rounds):
        out = subprocess.run([sys.executable, __file__, "--one-round"], capture_output=True,
                             text=True, check=True).stdout
        rounds.append(json.loads(out.split("RESULT ", 1)[1]))
        print(f"round {i + 1}: flow {rounds[-1]['full']:.1f} s", flush=True)
    report(rounds)


if __name__ == "__main__":
    main()
