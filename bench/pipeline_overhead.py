"""Orchestration and tracking overhead of the retrain flow (a benchmark, not a test).

    .venv/bin/python bench/pipeline_overhead.py

In a fresh copy of the project (its own git repo, DVC remote and MLflow SQLite file), times:
1. the stages as plain functions, no Prefect and no MLflow (the compute; training in its child
   process, as in the flow);
2. the whole flow on Prefect's ephemeral server with MLflow tracking and registration;
3. the flow again with nothing changed (it ends before training).
Overhead = (2) - (1). The tiny base model is built before timing: it is a one-off cost. (2)
includes starting Prefect's ephemeral API server, as every `make run` does; it is also shown on
its own, timed as a no-op flow run first (against a running server, PREFECT_API_URL, there is none).
Goals: overhead under 10% of (2); (3) under 5% of (2).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # the copy's own mlruns.db

from prefect import flow as prefect_flow  # noqa: E402

from phi3ops.config import ProjectPaths, load_config  # noqa: E402
from phi3ops.data import checkout_version  # noqa: E402
from phi3ops.evaluation import evaluate_adapter  # noqa: E402
from phi3ops.launch import run_training  # noqa: E402
from phi3ops.modeling import ensure_tiny_model, load_tokenizer  # noqa: E402
from phi3ops.preprocess import preprocess  # noqa: E402

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


def stages_only(root: Path) -> float:
    """Every stage's work, called directly: what the flow would cost with no orchestration."""
    paths = ProjectPaths(root)
    cfg = load_config(paths.pipeline("pipelines/tiny-cpu.yaml"))
    start = time.perf_counter()
    dataset = checkout_version(root, cfg.data)
    tokenizer = load_tokenizer(cfg.model, paths.models)
    prep = preprocess(Path(dataset.path), dataset.md5, cfg.preprocess, tokenizer,
                      root / ".cache" / "bench-processed")
    trained = run_training(cfg, Path(prep.out_dir), root / "bench-run", paths.models)
    evaluate_adapter(cfg.model, cfg.evaluation, Path(prep.out_dir), Path(trained.adapter_dir),
                     paths.models)
    return time.perf_counter() - start


@prefect_flow
def noop() -> None:
    """The first flow run of a process starts Prefect's ephemeral API server."""


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = copy_project(Path(tmp) / "project")
        cfg = load_config(root / "pipelines" / "tiny-cpu.yaml")
        ensure_tiny_model(cfg.model.tiny, ProjectPaths(root).models)
        compute = stages_only(root)

        spec = importlib.util.spec_from_file_location("bench_flow", root / "flows" / "retrain.py")
        flow = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(flow)
        start = time.perf_counter()
        noop()
        server = time.perf_counter() - start
        timings = []
        for _ in range(2):
            start = time.perf_counter()
            summary = flow.retrain(root=str(root))
            timings.append(time.perf_counter() - start)
        full, rerun = timings
        assert summary.get("skipped"), "the second run must find nothing changed"
    full += server  # what a `make run` pays
    overhead = full - compute
    print(f"stages as plain functions: {compute:.1f} s")
    print(f"full flow (Prefect + MLflow): {full:.1f} s; overhead {overhead:.1f} s = "
          f"{100 * overhead / full:.0f}% of the run (goal < 10%)")
    print(f"  of which starting Prefect's API server (a no-op flow run): {server:.1f} s; the rest "
          f"{overhead - server:.1f} s = {100 * (overhead - server) / (full - server):.0f}% of "
          "a run against a running server")
    print(f"rerun with nothing changed: {rerun:.1f} s = {100 * rerun / full:.0f}% of a full run "
          f"(goal < 5%)")


if __name__ == "__main__":
    main()
