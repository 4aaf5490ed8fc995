"""Faults operators met in the data commands, replayed on real DVC repos and remotes in temp dirs:
a corrupt object on the remote, junk imported by `data add`, and `data validate` on bad paths."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from phi3ops.config import DataConfig
from phi3ops.data.ingest import Columns, Reading, add_dataset
from phi3ops.data.versions import (
    DataError,
    checkout_version,
    file_md5,
    push_version,
    recorded_md5,
    remote_status,
    verify_workspace,
)
from phi3ops.errors import InvalidDataError
from tests.conftest import REPO
from tests.data.test_s3_remote import BUCKET, PREFIX, dvc, s3, s3_endpoint  # noqa: F401 (moto S3)
from tests.data.test_versions import lose_local_copy, tiny_models  # noqa: F401 (no model: these tests never load one)

CFG = DataConfig()
ROW = json.dumps({"messages": [{"role": "user", "content": "What is DVC?"},
                               {"role": "assistant", "content": "Data version control."}]})


def phi3ops(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "phi3ops.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300, env=os.environ)


def remote_object(root: Path, manifest: bool = False) -> Path:
    """The remote's copy of the one data file (or of the directory manifest)."""
    [path] = [p for p in (root / ".dvc-remote").rglob("*")
              if p.is_file() and p.name.endswith(".dir") == manifest]
    return path


def flip_a_byte(path: Path, at: int = 40) -> None:
    path.chmod(0o644)  # DVC leaves objects read-only
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def snapshot(root: Path):
    """data/ and data.dvc byte for byte, the remote's files, and what an add might leave."""
    data = root / "data"
    files = {p.relative_to(root).as_posix(): p.read_bytes()
             for p in sorted(data.rglob("*")) if p.is_file()} if data.exists() else None
    folders = sorted(p.relative_to(root).as_posix() for p in data.rglob("*") if p.is_dir())
    remote = sorted(p.name for p in (root / ".dvc-remote").rglob("*") if p.is_file()) \
        if (root / ".dvc-remote").exists() else []
    leftovers = sorted(p.name for p in root.glob(".phi3ops-add-*"))
    return files, folders, (root / "data.dvc").read_bytes(), remote, leftovers


def pushed(project):
    """data/ restored and the version on the remote, as a retrain leaves them before training."""
    version = checkout_version(project, CFG)
    push_version(project, CFG)
    return version


# 1. A corrupt object on the DVC remote


def test_a_corrupt_remote_object_is_named_never_regenerated_over(project):
    pushed(project)
    obj = remote_object(project)
    flip_a_byte(obj)
    lose_local_copy(project)
    with pytest.raises(DataError, match="corrupt") as err:
        checkout_version(project, CFG)
    message = str(err.value)
    oid = obj.parent.name + obj.name
    assert str(obj) in message and f"expected {oid}" in message
    assert "data/conversations.jsonl" in message and "Delete them from the remote" in message
    assert not (project / "data").exists(), "the demo dataset is not regenerated over it"

    status = phi3ops("data", "status", "--root", str(project))
    assert status.returncode != 0
    assert str(obj) in status.stderr and f"expected {oid}" in status.stderr
    assert "remote holds this version" not in status.stdout

    obj.unlink()  # the documented fix: the remote now truly lacks it, so the demo comes back
    assert pushed(project).source == "generated"
    assert remote_status(project, CFG, sample=None).problems() == ""


def test_a_corrupt_directory_manifest_on_the_remote_is_named(project):
    pushed(project)
    flip_a_byte(remote_object(project, manifest=True), at=5)
    lose_local_copy(project)
    with pytest.raises(DataError, match=r"data/ \(directory manifest\): .* is corrupt"):
        checkout_version(project, CFG)
    assert not (project / "data").exists()


def test_a_remote_without_verify_hands_over_corrupt_files_and_they_are_named(project):
    config = project / ".dvc" / "config"
    config.write_text(config.read_text().replace("verify = true", "verify = false"))
    pushed(project)
    obj = remote_object(project)
    flip_a_byte(obj)
    lose_local_copy(project)
    with pytest.raises(DataError, match=r"data/conversations\.jsonl: .* is corrupt"):
        checkout_version(project, CFG)  # DVC pulled it unchecked; the md5 check caught it
    assert not (project / "data").exists(), "the corrupt pull is not left in data/"
    cached = project / ".dvc" / "cache" / "files" / "md5" / obj.parent.name / obj.name
    assert not cached.exists(), "nor in the cache, where the next pull would trust it"


def test_status_names_a_corrupt_object_and_verify_reads_every_one(project):
    pushed(project)
    for i in range(3):
        (project / "data" / f"extra{i}.jsonl").write_text(ROW.replace("DVC", f"DVC {i}") + "\n")
    assert phi3ops("data", "version", "--root", str(project)).returncode == 0
    clean = phi3ops("data", "status", "--verify", "--root", str(project))
    assert clean.returncode == 0, clean.stderr
    assert "remote holds this version (5 of 5 objects read back and hashed)" in clean.stdout
    assert remote_status(project, CFG, sample=1).n_hashed == 2, "the manifest and one file"

    md5 = file_md5(project / "data" / "extra1.jsonl")
    obj = project / ".dvc-remote" / "files" / "md5" / md5[:2] / md5[2:]  # DVC's addressing
    flip_a_byte(obj, at=3)
    assert remote_status(project, CFG, sample=0).problems() == "", "existence alone misses it"
    [bad] = remote_status(project, CFG, sample=None).corrupt
    assert bad.file == "data/extra1.jsonl" and bad.url == str(obj)
    status = phi3ops("data", "status", "--verify", "--root", str(project))
    assert status.returncode == 1
    assert "data/ matches data.dvc" in status.stdout, "the workspace is fine; the remote is not"
    assert f"data/extra1.jsonl: {obj} is corrupt: its md5 is {bad.actual}" in status.stderr


def test_a_corrupt_object_on_s3_is_found_through_the_same_code(project, request):
    client, endpoint = request.getfixturevalue("s3"), request.getfixturevalue("s3_endpoint")
    dvc(project, "remote", "add", "-d", "s3", f"s3://{BUCKET}/{PREFIX}")
    dvc(project, "remote", "modify", "s3", "endpointurl", endpoint)
    pushed(project)
    md5 = file_md5(project / "data" / "conversations.jsonl")
    key = f"{PREFIX}/files/md5/{md5[:2]}/{md5[2:]}"
    data = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[40] ^= 0x01
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    [bad] = remote_status(project, CFG, sample=None).corrupt
    assert bad.url == f"s3://{BUCKET}/{key}" and bad.file == "data/conversations.jsonl"
    lose_local_copy(project)
    with pytest.raises(DataError, match=f"s3://{BUCKET}/{key} is corrupt"):
        checkout_version(project, CFG)
    assert not (project / "data").exists()


def test_a_push_from_good_data_replaces_a_corrupt_object(project):
    pushed(project)
    obj = remote_object(project)
    flip_a_byte(obj)
    push_version(project, CFG)  # data/ and the cache are good: the push reads back, repairs
    assert remote_status(project, CFG, sample=None).problems() == ""


# 2. `data add` is all or nothing


@pytest.fixture
def pulled(project):
    """A clone whose data/ holds the recorded version, and its state before any add."""
    pushed(project)
    return project, snapshot(project)


def test_add_refuses_before_data_is_pulled(project, tmp_path):
    (tmp_path / "chat.jsonl").write_text(ROW + "\n")
    before = snapshot(project)
    with pytest.raises(DataError, match=r"(?s)data is missing.*`phi3ops data pull`"):
        add_dataset(project, CFG, tmp_path / "chat.jsonl")
    assert snapshot(project) == before and not (project / "data").exists()

    pulled = phi3ops("data", "pull", "--root", str(project))  # the fix the error names
    assert pulled.returncode == 0, pulled.stderr
    assert "1203 rows in 1 files (generated)" in pulled.stdout, "the remote lacks the demo"
    version, _, _ = add_dataset(project, CFG, tmp_path / "chat.jsonl")
    assert version.n_rows == 1204


def test_add_refuses_over_an_edited_data_folder(pulled, tmp_path):
    project, _ = pulled
    (project / "data" / "conversations.jsonl").write_text(ROW + "\n")
    (tmp_path / "chat.jsonl").write_text(ROW + "\n")
    before = snapshot(project)
    with pytest.raises(DataError, match=r"(?s)differs from data\.dvc.*`dvc checkout data\.dvc`"):
        add_dataset(project, CFG, tmp_path / "chat.jsonl")
    assert snapshot(project) == before


def test_add_an_empty_file_is_refused_and_changes_nothing(pulled, tmp_path):
    project, before = pulled
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(InvalidDataError, match=r"empty\.jsonl.*no conversation in 0 line"):
        add_dataset(project, CFG, tmp_path / "empty.jsonl")
    assert snapshot(project) == before

    added = phi3ops("data", "add", str(tmp_path / "empty.jsonl"), "--root", str(project))
    assert added.returncode == 2 and "Traceback" not in added.stderr
    assert "no conversation" in added.stderr
    assert snapshot(project) == before


def test_add_a_binary_file_is_refused_with_file_line_and_rule(pulled, tmp_path):
    project, before = pulled
    shutil.copyfile("/bin/ls", tmp_path / "x.jsonl")
    quarantine = tmp_path / "rejected.jsonl"
    with pytest.raises(InvalidDataError, match=r"x\.jsonl was not added: .*lines rejected") as err:
        add_dataset(project, CFG, tmp_path / "x.jsonl", quarantine=quarantine)
    assert "x.jsonl:1: invalid_utf8" in str(err.value) and str(quarantine) in str(err.value)
    with quarantine.open(encoding="utf-8") as lines:  # not splitlines(): U+0085 is in raw text
        rejected = [json.loads(line) for line in lines]
    assert rejected and {r["rule"] for r in rejected} <= {"invalid_utf8", "invalid_json",
                                                          "empty_line", "not_an_object"}
    assert snapshot(project) == before


def test_add_a_csv_with_wrong_columns_then_the_corrected_retry(pulled, tmp_path):
    project, before = pulled
    pd.DataFrame({"question": ["What is DVC?", "What is MLflow?"],
                  "answer": ["Data version control.", "Experiment tracking."]}).to_csv(
        tmp_path / "cols.csv", index=False)
    with pytest.raises(InvalidDataError, match=r"cols\.csv: no column\(s\) \['prompt', 'resp"):
        add_dataset(project, CFG, tmp_path / "cols.csv")
    assert snapshot(project) == before, "no empty data/cols.jsonl left behind"

    recorded = recorded_md5(project / "data.dvc")
    version, old_md5, read = add_dataset(project, CFG, tmp_path / "cols.csv",
                                         Reading(columns=Columns("question", "answer")))
    assert [done.written for done in read] == [project / "data" / "cols.jsonl"]
    assert old_md5 == recorded != version.md5 == recorded_md5(project / "data.dvc")
    assert version.n_rows == 1203 + 2 and version.n_files == 2
    assert verify_workspace(project, CFG) == version.md5
    assert remote_status(project, CFG, sample=None).problems() == ""
    assert not list(project.glob(".phi3ops-add-*"))


def test_a_failed_push_takes_the_add_back(pulled, tmp_path):
    project, _ = pulled
    (project / "remote-is-a-file").write_text("not a folder")
    config = project / ".dvc" / "config"
    config.write_text(config.read_text().replace("../.dvc-remote", "../remote-is-a-file"))
    before = snapshot(project)
    (tmp_path / "chat.jsonl").write_text(ROW + "\n")
    with pytest.raises(OSError, match="remote-is-a-file"):  # after dvc add rewrote data.dvc
        add_dataset(project, CFG, tmp_path / "chat.jsonl")
    assert snapshot(project) == before


# 3. `data validate` on a missing or empty file


def test_validate_a_missing_file_is_one_paragraph_exit_2(tmp_path):
    result = phi3ops("data", "validate", "missing.jsonl", "--root", str(REPO), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: missing.jsonl: no such file or folder")
    assert len(result.stderr.strip().splitlines()) == 1


def test_validate_an_empty_file_fails(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    result = phi3ops("data", "validate", "empty.jsonl", "--root", str(REPO), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "empty.jsonl: no conversation in 0 line(s)" in result.stderr


def test_a_sharegpt_file_is_added_as_a_new_version_through_the_cli(pulled, tmp_path):
    project, _ = pulled
    conversation = {"conversations": [{"from": "customer", "value": "Where is my order?"},
                                      {"from": "agent", "value": "It ships today."}]}
    (tmp_path / "support.jsonl").write_text((json.dumps(conversation) + "\n") * 40)
    added = phi3ops("data", "add", str(tmp_path / "support.jsonl"), "--role-map", "customer=user",
                    "--role-map", "agent=assistant", "--root", str(project))
    assert added.returncode == 0, added.stderr
    assert f"wrote {project / 'data' / 'support.jsonl'}" in added.stdout
    assert "(sharegpt): 40 row(s)" in added.stdout
    assert verify_workspace(project, CFG) == recorded_md5(project / "data.dvc")
    first = json.loads((project / "data" / "support.jsonl").read_text().splitlines()[0])
    assert first == {"messages": [{"role": "user", "content": "Where is my order?"},
                                  {"role": "assistant", "content": "It ships today."}]}
