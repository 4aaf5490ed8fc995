"""The DVC remote on S3 is a config change: tested against a moto S3 server on 127.0.0.1."""

import subprocess
import sys

import boto3
import pytest

from phi3ops.config import DataConfig
from phi3ops.data.dvc_repo import DvcRepo
from phi3ops.data.versions import (
    checkout_version,
    push_verified,
    push_version,
    recorded_md5,
    remote_missing,
)
from tests.scale_servers import moto_s3

BUCKET, PREFIX = "phi3ops-dvc", "store"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    with moto_s3(tmp_path_factory.mktemp("moto")) as url:
        yield url


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    return client


def dvc(project, *args):
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, check=True,
                   capture_output=True, text=True)


def test_s3_remote_push_verify_and_repair(project, s3, s3_endpoint):
    dvc(project, "remote", "add", "-d", "s3", f"s3://{BUCKET}/{PREFIX}")
    dvc(project, "remote", "modify", "s3", "endpointurl", s3_endpoint)

    checkout_version(project, DataConfig())  # regenerates the demo data
    push_version(project, DataConfig())  # and pushes it to S3, every object read back
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]}
    md5 = recorded_md5(project / "data.dvc")
    assert f"{PREFIX}/files/md5/{md5[:2]}/{md5[2:]}" in keys
    assert remote_missing(project, DataConfig()) == []

    data_key = next(k for k in keys if not k.endswith(".dir"))
    s3.delete_object(Bucket=BUCKET, Key=data_key)  # behind DVC's back
    assert remote_missing(project, DataConfig()) == ["data/conversations.jsonl"]

    with DvcRepo.open(project) as repo:
        push_verified(repo, project / "data.dvc")
    assert remote_missing(project, DataConfig()) == []
    assert data_key in {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]}
