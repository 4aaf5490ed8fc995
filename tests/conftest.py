"""Shared fixtures: real components only. The tiny base model is built once per session; MLflow
runs as a real server subprocess on SQLite; Prefect uses one test harness per session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# The default path must work offline; set before any Hugging Face import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
# `make test` runs two pytest workers (pytest-xdist): each, and every process it starts, gets its
# share of the cores. Two torch processes each spinning as many threads as there are cores run
# several times slower than one after the other.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["flows", "pipelines", "mlflow.yaml", ".gitignore", "prefect.yaml",
                 "requirements.lock"]
# The test projects' own DVC settings: a local remote beside the project, whatever the user's
# checkout points its remote at.
DVC_CONFIG = """[core]
    analytics = false
    remote = local
['remote "local"']
    url = ../.dvc-remote
    verify = true
"""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first, so the longest do not run alone at the end. Under pytest-xdist the
    scheduler orders the files itself (by default, the files with most tests first)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def own_model(project: Path, name: str) -> None:
    """Register under a model and experiment of the test's own on the shared MLflow server,
    committed, so the project's tree stays clean."""
    settings = project / "mlflow.yaml"
    settings.write_text(settings.read_text().replace("registered_model: phi3ops-chat",
                                                     f"registered_model: {name}")
                        .replace("experiment: phi3ops", f"experiment: {name}"))
    git(project, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "own model")


@pytest.fixture(scope="session")
def tiny_config():
    from phi3ops.config import load_config

    return load_config(REPO / "pipelines" / "tiny-cpu.yaml")


@pytest.fixture(scope="session")
def tiny_models(tiny_config, tmp_path_factory) -> Path:
    """A model cache holding the default tiny Phi-3, built once for the whole session: under
    pytest-xdist in the session's directory, which every worker shares (the first builds)."""
    from phi3ops.model.base_model import ensure_tiny_model

    if os.environ.get("PYTEST_XDIST_WORKER"):
        cache = tmp_path_factory.getbasetemp().parent / "models"
    else:
        cache = tmp_path_factory.mktemp("models")
    ensure_tiny_model(tiny_config.model.tiny, cache)
    return cache


@pytest.fixture(scope="session")
def processed(tmp_path_factory, tiny_config, tiny_models) -> Path:
    """The demo dataset, preprocessed for the tiny model: what the train stage reads."""
    from phi3ops.data.demo import write_demo_dataset
    from phi3ops.data.preprocess import preprocess
    from phi3ops.model.base_model import load_tokenizer

    tmp = tmp_path_factory.mktemp("data")
    write_demo_dataset(tmp / "data")
    tokenizer = load_tokenizer(tiny_config.model, tiny_models)
    prep = preprocess(tmp / "data", "md5", tiny_config.preprocess, tokenizer, tmp / "processed")
    return Path(prep.out_dir)


def new_project(root: Path, demo_dvc_file: str, checkout: Path = REPO) -> Path:
    """A clone of `checkout`'s code and settings with a data.dvc of the seeded demo dataset
    (not the checkout's, which records the user's own data), no data/ and an empty remote."""
    for name in PROJECT_FILES:
        src, dst = checkout / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    (root / ".dvc").mkdir()
    (root / ".dvc" / "config").write_text(DVC_CONFIG)
    (root / "data.dvc").write_text(demo_dvc_file)
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return root


@pytest.fixture(scope="session")
def demo_dvc_file(tmp_path_factory) -> str:
    """data.dvc of the seeded demo dataset, made by `dvc add` in a scratch repo once a session."""
    from phi3ops.config import DataConfig
    from phi3ops.data.demo import write_demo_dataset
    from phi3ops.data.versions import record_version

    scratch = tmp_path_factory.mktemp("demo-dvc")
    (scratch / ".dvc").mkdir()
    (scratch / ".dvc" / "config").write_text(DVC_CONFIG)
    git(scratch, "init", "-q", "-b", "main")
    write_demo_dataset(scratch / "data")
    record_version(scratch, DataConfig(push=False))
    return (scratch / "data.dvc").read_text()


@pytest.fixture
def project(tmp_path, tiny_models, demo_dvc_file) -> Path:
    """A fresh clone of the project: git repo with data.dvc committed, no data/, empty remote."""
    root = new_project(tmp_path / "project", demo_dvc_file)
    (root / ".cache").mkdir()
    (root / ".cache" / "models").symlink_to(tiny_models)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow(home: Path, port: int, backend: str | None = None, artifacts: str | None = None,
                 env: dict[str, str] | None = None, workers: int = 1) -> subprocess.Popen:
    """A real `mlflow server` with served artifacts on 127.0.0.1:port, once healthy: on SQLite
    and a folder in `home` unless given a backend store and artifacts destination URI. The store
    URI (a password in it) and `env` (store credentials) go to the server alone, through its
    environment, never its command line: its clients need only its URL."""
    log = (home / "server.log").open("a")
    store = {"MLFLOW_BACKEND_STORE_URI": backend or f"sqlite:///{home / 'mlflow.db'}",
             # No job runners (five more processes importing MLflow): phi3ops submits no jobs.
             "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--serve-artifacts",
         "--artifacts-destination", artifacts or str(home / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **store, **(env or {})},
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log_text = (home / "server.log").read_text()
                raise RuntimeError(f"mlflow server did not start:\n{log_text}") from None
            time.sleep(0.5)


def stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM, then SIGKILL after `grace_s`: a server or worker that lingers on its way out
    (a Prefect worker can) is the test's to end, not its failure."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    home = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = start_mlflow(home, port)
    yield f"http://127.0.0.1:{port}"
    stop(proc)


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the session (it takes ~15 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def phi3_tokenizer_dir(tmp_path_factory) -> Path:
    """Phi-3's real tokenizer, built from llama.cpp's vocabulary and checked against its
    reference vectors (the archive is downloaded once into ~/.cache/phi3ops)."""
    from phi3ops.model.phi3_tokenizer import ensure_phi3_tokenizer

    return ensure_phi3_tokenizer(tmp_path_factory.mktemp("phi3-tokenizer"))


@pytest.fixture
def adapter(tmp_path, tiny_config, tiny_models) -> tuple[Path, Path]:
    """(adapter dir, base dir): an untrained LoRA adapter on the tiny base, ready to register."""
    from peft import get_peft_model

    from phi3ops.model.adapters import build_lora_config
    from phi3ops.model.base_model import load_model, tiny_model_dir

    model = get_peft_model(load_model(tiny_config.model, tiny_models),
                           build_lora_config(tiny_config.peft_config))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", tiny_model_dir(tiny_config.model.tiny, tiny_models)
