"""phi3ops on a team's MLflow server, on real engines: runs and the registry in PostgreSQL,
artifacts in S3 (a moto server) served through `mlflow server --serve-artifacts`. A client gets
only MLFLOW_TRACKING_URI: no database URI and no S3 credentials, which stay on the server."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

import flows.retrain as retrain_flow
from phi3ops.config import file_sha256, load_mlflow_config
from phi3ops.registry.client import Registry
from phi3ops.registry.promotion import promote
from phi3ops.registry.store import Candidate, Lineage, register_adapter
from phi3ops.registry.trusted_load import MANIFEST_TAG
from tests.conftest import new_project, own_model
from tests.registry import test_registry
from tests.scale_servers import ARTIFACTS_PREFIX, BUCKET, SharedMlflow, moto_s3, shared_mlflow

# The SQLite suite's own fixture and tests, run again here on PostgreSQL (see mlflow_server).
registry = test_registry.registry
register = test_registry.register
test_concurrent_promotions_on_pg = test_registry.test_concurrent_promotions_leave_the_better_version
test_lock_hammer_on_pg = (
    test_registry.test_the_lock_survives_being_released_while_another_creates_it)

pytestmark = [pytest.mark.slow, pytest.mark.scale]
MODEL = "scale-chat"
TRACKING_PASSWORD = f"mlflow-pw-{uuid.uuid4().hex}"  # sent by every client; must land nowhere
MiB = 1 << 20


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Iterator[SharedMlflow]:
    """The server for this module."""
    home = tmp_path_factory.mktemp("mlflow-pg-s3")
    with moto_s3(home) as s3_endpoint, shared_mlflow(home, s3_endpoint) as server:
        yield server


@pytest.fixture(scope="module")
def mlflow_server(shared) -> str:
    """The suite's MLflow server is the shared one here: test_registry's fixtures and tests
    imported above run against PostgreSQL and S3 unchanged."""
    return shared.url


def as_client(mp: pytest.MonkeyPatch, url: str) -> None:
    """What a user's machine has: the server's URL and its own login, no cloud credentials."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "MLFLOW_S3_ENDPOINT_URL"):
        mp.delenv(key, raising=False)
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    mp.setenv("AWS_CONFIG_FILE", os.devnull)
    mp.setenv("MLFLOW_TRACKING_URI", url)
    mp.setenv("MLFLOW_TRACKING_USERNAME", "phi3ops-ci")
    mp.setenv("MLFLOW_TRACKING_PASSWORD", TRACKING_PASSWORD)


@pytest.fixture(autouse=True)
def client_side(shared, monkeypatch) -> None:
    as_client(monkeypatch, shared.url)


@dataclass
class Retrained:
    project: Path
    first: dict
    second: dict


@pytest.fixture(scope="module")
def retrained(shared, tmp_path_factory, tiny_models, demo_dvc_file, prefect_harness):
    """Two real retrains on the shared server: the first champion, then a cheaper config
    (5 steps) that is a new version, scored against the champion it downloads from S3."""
    root = new_project(tmp_path_factory.mktemp("scale") / "project", demo_dvc_file)
    (root / ".cache").mkdir()
    (root / ".cache" / "models").symlink_to(tiny_models)
    own_model(root, MODEL)
    with pytest.MonkeyPatch.context() as mp:
        as_client(mp, shared.url)
        flow = retrain_flow.in_project(root)
        first = flow(root=str(root))
        second = flow(root=str(root), overrides=["training_config.max_steps=5"])
    return Retrained(root, first, second)


def phi3ops_cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "phi3ops.cli", *args, "--root", str(project)],
                          capture_output=True, text=True, env=dict(os.environ), timeout=300)


WITHOUT_DRIVERS = """
import sys
sys.modules.update(dict.fromkeys(["boto3", "botocore", "psycopg2", "psycopg"]))  # unimportable
import mlflow
mlflow.artifacts.download_artifacts(sys.argv[1], dst_path=sys.argv[2])
"""


def s3_key(client: MlflowClient, model_id: str, path: str) -> str:
    """Where the server put a logged model's file in the bucket."""
    location = client.get_logged_model(model_id).artifact_location
    return f"{ARTIFACTS_PREFIX}/{location.removeprefix('mlflow-artifacts:/').strip('/')}/{path}"


def test_retrain_promotes_rejects_and_rolls_back_on_postgres_and_s3(retrained, shared, tmp_path):
    client, first, second = MlflowClient(shared.url), retrained.first, retrained.second
    v1, v2 = str(first["version"]), str(second["version"])
    assert first["promoted"] and "first champion" in first["reason"]
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == v1 and champion.tags["phi3ops.artifact_type"] == "adapter"

    # The adapter went through the server into the bucket and comes back byte for byte.
    got = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{v1}",
                                                   dst_path=str(tmp_path / "v1")))
    weights = got / "artifacts" / "adapter" / "adapter_model.safetensors"
    assert weights.is_file() and (got / "MLmodel").is_file()
    key = s3_key(client, champion.source.removeprefix("models:/"),
                 "artifacts/adapter/adapter_model.safetensors")
    head = shared.s3().head_object(Bucket=BUCKET, Key=key)
    assert head["ContentLength"] == weights.stat().st_size
    assert head["ETag"].strip('"') == hashlib.md5(weights.read_bytes()).hexdigest()
    manifest = json.loads(champion.tags[MANIFEST_TAG])
    assert manifest["adapter/adapter_model.safetensors"] == file_sha256(weights)
    # A client needs neither boto3 nor a database driver: the server, or a URL it presigned,
    # serves every byte.
    bare = subprocess.run([sys.executable, "-c", WITHOUT_DRIVERS, f"models:/{MODEL}/{v1}",
                           str(tmp_path / "bare")], capture_output=True, text=True, timeout=300)
    assert bare.returncode == 0, bare.stderr
    assert file_sha256(tmp_path / "bare" / weights.relative_to(got)) == file_sha256(weights)

    # The second run loaded that champion from S3 (hash-checked) and scored it on its split.
    assert v2 == str(int(v1) + 1) and not second["promoted"]
    assert "gain over the champion" in second["reason"]
    assert second["metrics"]["champion_rougeL"] == pytest.approx(first["metrics"]["tuned_rougeL"])
    assert client.get_model_version(MODEL, v2).tags["phi3ops.evaluated_against"] == v1
    assert client.get_model_version_by_alias(MODEL, "challenger").version == v2

    # A better version (registered directly: no third training) takes @champion...
    project = Registry(load_mlflow_config(retrained.project / "mlflow.yaml")
                       .resolved(retrained.project))
    v3 = register(project, tuned_rougeL=0.99, base_rougeL=0.01)
    assert promote(project, v3).promoted
    assert project.alias("previous-champion").version == v1
    # ...and `phi3ops promote --rollback` puts v1 back.
    rolled = phi3ops_cli(retrained.project, "promote", "--rollback")
    assert rolled.returncode == 0, rolled.stderr
    assert f"v{v3} rolled back by hand; @champion is v{v1} again" in rolled.stdout
    assert project.alias("champion").version == v1
    assert project.alias("previous-champion") is None
    assert project.alias("challenger").version == v2
    assert client.get_model_version(MODEL, v3).tags["promotion.decision"] == "rolled-back"
    listed = phi3ops_cli(retrained.project, "models", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [str(r["version"]) for r in json.loads(listed.stdout)] == [v3, v2, v1]


def write_random(path: Path, size: int) -> str:
    """`size` bytes that do not compress, written a MiB at a time; their sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(size // MiB):
            block = os.urandom(MiB)
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


@pytest.mark.parametrize("proxy_multipart", ["advertised", "true"])
def test_merged_weights_upload_in_parts_and_download_whole(registry, shared, tmp_path,
                                                           monkeypatch, proxy_multipart):
    """A merged model registered by phi3ops itself, its weights a 300 MB file: uploaded in
    chunks straight to S3 (presigned by the server), the server advertising that it can
    ("advertised": no client setting), or the client asking for it ("true")."""
    size, chunk = 300 * MiB, 64 * MiB
    monkeypatch.setenv("MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE", str(100 * MiB))
    monkeypatch.setenv("MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE", str(chunk))
    monkeypatch.delenv("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", raising=False)
    if proxy_multipart == "true":
        monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "true")
    weights = tmp_path / "merged"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    sha256 = write_random(weights / "model.safetensors", size)

    client = registry.client
    run_id = client.create_run(registry.experiment_id).info.run_id
    lineage = Lineage("0" * 32, "rev", "c" * 12, "rev", "h" * 16, "lock", "big", "tiny-phi3")
    version = register_adapter(registry, run_id, Candidate(
        lineage, {"tuned_rougeL": 0.5}, None, weights, max_new_tokens=8, artifact_type="merged"))
    assert version.name == f"{registry.model}-merged"

    in_model = f"artifacts/{weights.name}/model.safetensors"  # pyfunc keeps the folder's name
    key = s3_key(client, version.source.removeprefix("models:/"), in_model)
    head = shared.s3().head_object(Bucket=BUCKET, Key=key)
    assert head["ContentLength"] == size
    # An S3 ETag ends in -<parts> for a multipart upload: the client's 64 MiB chunks, not the
    # server's boto3 upload (8 MiB parts), so the bytes did not go through the server.
    assert head["ETag"].strip('"').endswith(f"-{math.ceil(size / chunk)}"), head["ETag"]
    assert "/mlflow-artifacts/mpu/complete/" in shared.log.read_text()

    (weights / "model.safetensors").unlink()
    got = Path(mlflow.artifacts.download_artifacts(
        f"models:/{version.name}/{version.version}", dst_path=str(tmp_path / "got")))
    assert file_sha256(got / in_model) == sha256
    manifest = json.loads(version.tags[MANIFEST_TAG])
    assert manifest["base_model/model.safetensors"] == sha256


def secrets_found(text: str, secrets: dict[str, str], where: str) -> list[str]:
    return [f"{name} in {where}" for name, secret in secrets.items() if secret in text]


def test_no_secret_reaches_runs_versions_logs_or_artifacts(retrained, shared):
    """The database password and the S3 secret live on the server; the client's MLflow password
    is sent with each request. None is in a run, a version, a log or an artifact."""
    secrets = {**shared.secrets, "MLFLOW_TRACKING_PASSWORD": TRACKING_PASSWORD}
    client, found = MlflowClient(shared.url), []
    experiments = [e.experiment_id for e in client.search_experiments()]
    for run in client.search_runs(experiments, max_results=1000):
        found += secrets_found(json.dumps([run.data.params, run.data.tags]), secrets,
                               f"run {run.info.run_id}")
    for model in client.search_logged_models(experiments):
        found += secrets_found(json.dumps([model.params, model.tags]), secrets, model.model_id)
    for registered in client.search_registered_models():
        for v in client.search_model_versions(f"name='{registered.name}'"):
            found += secrets_found(json.dumps([v.tags, v.description]), secrets,
                                   f"{v.name} v{v.version}")
    # Everything MLflow stored, and every artifact (the big test weights excepted: random).
    found += secrets_found(shared.db.dump(), secrets, "the MLflow database")
    s3, read = shared.s3(), []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            if obj["Size"] < 50 * MiB:
                body = s3.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
                found += secrets_found(body.decode(errors="replace"), secrets, obj["Key"])
                read.append(obj["Key"])
    # What the retrain left in the project: training logs, run outputs, Prefect results.
    for folder, dirs, files in os.walk(retrained.project):
        dirs[:] = [d for d in dirs if d != ".git"]  # .cache/models is a link: not walked
        for name in files:
            path = Path(folder, name)
            if path.stat().st_size < 50 * MiB:
                found += secrets_found(path.read_text(errors="replace"), secrets, str(path))
                read.append(name)
    assert read.count("train.log") == 2 and sum(k.endswith("/MLmodel") for k in read) >= 2
    # The flows' logs, as Prefect keeps them.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        logs, offset = [], 0
        while page := prefect.read_logs(limit=200, offset=offset):
            logs += [log.message for log in page]
            offset += len(page)
    assert any("stage: train" in m for m in logs), "the retrain's logs were read"
    found += secrets_found("\n".join(logs), secrets, "Prefect's logs")
    # The client's password never reaches the server's log either.
    found += secrets_found(shared.log.read_text(errors="replace"),
                           {"MLFLOW_TRACKING_PASSWORD": TRACKING_PASSWORD}, "the server log")
    assert found == []
