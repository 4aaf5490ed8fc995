"""Training in child processes: one rank, or several through torchrun; killed after a timeout.

    phi3ops train --pipeline pipelines/tiny-cpu.yaml --nproc 2     # DDP, gloo on CPU
    phi3ops train ... launch.nnodes=2 launch.rdzv_endpoint=node0:29400   # on each of two nodes

A hung step cannot be interrupted from inside Python, so training never runs in the caller's
process: the child gets a JSON job file, writes a JSON result, and is killed with its whole
process group when `launch.timeout_s` passes. A child that fails before its first step (config,
template, model, data) writes a JSON error with that kind instead: the caller raises it as a
TrainingSetupError, which is never retried. A crash or timeout is retried, and the retry (the same
`out_dir`) resumes from the newest complete checkpoint. Each rank watches the process that
launched it and kills itself within a second of that process's death, `kill -9` included: a
training child never outlives its run.

Training metrics reach MLflow through this process: the child appends them to a JSON-lines file
and a thread of the caller, idle while it waits, forwards new lines to the run about once a
second. So the child never imports or waits on MLflow, and an MLflow hiccup costs metric points,
never the run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from functools import cached_property
from pathlib import Path

from phi3ops import progress
from phi3ops.config import PipelineConfig, write_json_atomic
from phi3ops.errors import TrainingSetupError
from phi3ops.locking import process_alive, process_started

log = logging.getLogger(__name__)
JOB_FILE, RESULT_FILE, ERROR_FILE, LOG_FILE, METRICS_FILE, PROGRESS_FILE = (
    "train-job.json", "train-result.json", "train-error.json", "train.log", "train-metrics.jsonl",
    "train-progress.json")
FORWARD_EVERY_S = 1.0
WATCH_PARENT_EVERY_S = 1.0


class TrainingTimeout(TimeoutError):
    """Training ran past launch.timeout_s and was killed; retrying resumes from a checkpoint."""


class TrainingCrashed(RuntimeError):
    """The training process died (killed, out of memory, a bug); its log tail says how."""


def command(job_path: Path, cfg: PipelineConfig) -> list[str]:
    """One process; torchrun on this machine alone; or torchrun as one of launch.nnodes nodes,
    meeting the others at launch.rdzv_endpoint (c10d: node ranks are given out as they join)."""
    launch, entry = cfg.launch, ["-m", "phi3ops.train.launch", str(job_path)]
    if launch.world_size == 1:
        return [sys.executable, *entry]
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={launch.nproc}"]
    if launch.nnodes == 1:
        return [*torchrun, "--standalone", *entry]
    return [*torchrun, f"--nnodes={launch.nnodes}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={launch.rdzv_endpoint}",
            f"--rdzv_id={launch.rdzv_id or f'{cfg.name}-{cfg.config_hash()}'}", *entry]


def finished(cfg: PipelineConfig, out_dir: Path):
    """The result of a run directory already trained to max_steps, or None: resuming from its
    final checkpoint would train one step past it and overwrite the adapter."""
    from phi3ops.train.checkpoints import latest_complete
    from phi3ops.train.trainer import TrainResult

    result_file = out_dir / RESULT_FILE
    if not result_file.is_file() or not (out_dir / "adapter").is_dir():
        return None
    done = TrainResult(**json.loads(result_file.read_text()))
    newest = latest_complete(out_dir / "checkpoints")  # gone after a forced retrain
    if (done.global_step < cfg.training_config.max_steps or newest is None
            or newest.name != f"checkpoint-{done.global_step}"):
        return None
    return replace(done, already_finished=True)


def run_training(cfg: PipelineConfig, dataset_dir: Path, out_dir: Path, cache_dir: Path,
                 run_id: str | None = None, tracking_uri: str | None = None):
    """Train in child process(es) and return their TrainResult; raise if they fail or hang.
    Callers run preflight first; a child refuses what this machine cannot run all the same."""
    from phi3ops.train.trainer import TrainResult

    if (done := finished(cfg, out_dir)) is not None:
        return done
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (RESULT_FILE, ERROR_FILE, METRICS_FILE):  # a retry's metrics are forwarded anew
        (out_dir / name).unlink(missing_ok=True)
    job_path = write_job(cfg, dataset_dir, out_dir, cache_dir, write_metrics=run_id is not None)
    with MetricsForwarder(out_dir / METRICS_FILE, run_id, tracking_uri), \
            progress.following(out_dir / PROGRESS_FILE, "train"), \
            (out_dir / LOG_FILE).open("ab") as log_file:
        child = subprocess.Popen(command(job_path, cfg),
                                 stdout=log_file, stderr=subprocess.STDOUT,
                                 start_new_session=True)  # its own group: kill ranks together
        try:
            code = child.wait(timeout=cfg.launch.timeout_s)
        except subprocess.TimeoutExpired:
            raise TrainingTimeout(
                f"training ran past launch.timeout_s={cfg.launch.timeout_s}s and was killed; "
                f"a retry resumes from the newest complete checkpoint in {out_dir}") from None
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    if (out_dir / ERROR_FILE).is_file():  # the child's verdict: it failed before training
        error = json.loads((out_dir / ERROR_FILE).read_text())
        raise TrainingSetupError(error["kind"], f"{error['message']} (not retried: the same "
                                 f"inputs fail the same way; log: {out_dir / LOG_FILE})")
    if code != 0 or not (out_dir / RESULT_FILE).is_file():
        tail = (out_dir / LOG_FILE).read_text(errors="replace")[-3000:]
        raise TrainingCrashed(f"training exited with code {code}; log {out_dir / LOG_FILE} "
                              f"ends with:\n{tail}")
    return TrainResult(**json.loads((out_dir / RESULT_FILE).read_text()))


def write_job(cfg: PipelineConfig, dataset_dir: Path, out_dir: Path, cache_dir: Path,
              write_metrics: bool = False) -> Path:
    """The child's instructions, as JSON: config, data, where to write, whether to log, and
    which process to outlive never (this one)."""
    job = {"config": cfg.model_dump(mode="json"), "dataset_dir": str(dataset_dir),
           "out_dir": str(out_dir), "cache_dir": str(cache_dir), "write_metrics": write_metrics,
           "launcher": {"pid": os.getpid(), "started": process_started(os.getpid())}}
    write_json_atomic(out_dir / JOB_FILE, job)
    return out_dir / JOB_FILE


class MetricsForwarder:
    """While open, a thread sends the complete lines the child added to its metrics file to the
    MLflow run, one batch about every second, and once more on close; without a run, nothing.
    A thread, so that an MLflow that is slow to answer never delays the child's timeout."""

    def __init__(self, path: Path, run_id: str | None, tracking_uri: str | None):
        self.path, self.run_id, self.tracking_uri, self.offset = path, run_id, tracking_uri, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="metrics-forwarder", daemon=True)

    def __enter__(self) -> MetricsForwarder:
        if self.run_id is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    @cached_property
    def registry(self):
        """The run's server, built on the first forward (MLflow is imported only with a run)."""
        from phi3ops.registry.client import Registry

        return Registry.at(self.tracking_uri)

    def _run(self) -> None:
        while not self.stop.wait(FORWARD_EVERY_S):
            self.forward()
        self.forward()

    def forward(self) -> None:
        if self.run_id is None or not self.path.is_file():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a line being written waits for next time
        if not complete:
            return
        self.offset += len(complete)
        points = [json.loads(line) for line in complete.splitlines()]
        from phi3ops.registry import runs

        try:
            runs.log_metric_steps(self.registry, self.run_id,
                                  [(p["step"], p["metrics"]) for p in points])
        except Exception as e:  # noqa: BLE001 - metrics are best effort here
            log.warning("could not log training metrics of steps %s: %s",
                        [p["step"] for p in points], e)


def _metrics_writer(out_dir: Path, enabled: bool):
    """Append each logging step's metrics as one JSON line, for MetricsForwarder."""
    if not enabled:
        return None

    def write(metrics: dict[str, float], step: int) -> None:
        with (out_dir / METRICS_FILE).open("a") as f:
            f.write(json.dumps({"step": step, "metrics": metrics}) + "\n")

    return write


def die_with(pid: int, started: float | None) -> threading.Thread:
    """Kill this process as soon as the launcher is gone: its own session shields it from the
    launcher's signals, so nothing else would stop it."""
    def watch() -> None:
        while process_alive(pid, started):
            time.sleep(WATCH_PARENT_EVERY_S)
        log.error("the process that launched this training (pid %d) is gone; stopping", pid)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="launcher-watchdog", daemon=True)
    thread.start()
    return thread


def main(job_path: str) -> int:
    """Entry point of each rank: run the job, write the result or the user error (the first
    rank of each node)."""
    from phi3ops.train.trainer import train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    job = json.loads(Path(job_path).read_text())
    if launcher := job.get("launcher"):
        die_with(launcher["pid"], launcher["started"])
    out_dir = Path(job["out_dir"])
    # Every node keeps its own copy (adapter, result, checkpoints): no shared disk is needed.
    node_first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    try:
        cfg = PipelineConfig.model_validate(job["config"])
        result = train(cfg, Path(job["dataset_dir"]), out_dir, Path(job["cache_dir"]),
                       log_metrics=_metrics_writer(out_dir, job.get("write_metrics", False)),
                       progress_file=out_dir / PROGRESS_FILE)
    except TrainingSetupError as e:
        log.error("failed before the first step (%s)", e.kind, exc_info=e)  # kept in train.log
        if node_first:
            write_json_atomic(out_dir / ERROR_FILE, {"kind": e.kind, "message": str(e)})
        return 2
    if node_first:
        write_json_atomic(out_dir / RESULT_FILE, result.to_json())
    leave_process_group()
    return 0


def leave_process_group() -> None:
    """End this rank's part in the process group before the interpreter exits: with gloo's
    threads still running at shutdown the process can abort ("terminate called without an
    active exception", exit -6) after a complete training, and torchrun reports a crash."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
