"""Real DVC repos and a local-directory remote in temp dirs."""

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from datasets import Dataset

from phi3ops.config import DataConfig
from phi3ops.data.drift import diff_dirs
from phi3ops.data.ingest import Columns, Reading, import_dataset
from phi3ops.data.versions import (
    DataError,
    checkout_version,
    git_rev,
    push_version,
    record_version,
    recorded_md5,
    remote_missing,
    verify_workspace,
)
from tests.conftest import PROJECT_FILES, REPO, git, new_project

CFG = DataConfig()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """Overrides conftest's for `project`: the data code never loads a model, so these tests
    do not wait for the tiny one to be built."""
    return tmp_path_factory.mktemp("no-models")


def test_test_projects_ignore_the_data_and_remote_the_user_committed(tmp_path, demo_dvc_file):
    """A user's checkout records their own data (and may push it to their own bucket); the
    projects the tests build still hold the demo dataset and a remote of their own."""
    user = tmp_path / "user-checkout"
    for name in PROJECT_FILES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(REPO / name, user / name)
    (user / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n"
                                   "  size: 5\n  nfiles: 1\n  hash: md5\n  path: data\n")
    (user / ".dvc").mkdir()
    (user / ".dvc" / "config").write_text(
        "[core]\n    remote = team\n['remote \"team\"']\n    url = s3://team-bucket/dvc\n")
    git(user, "init", "-q", "-b", "main")
    git(user, "add", "-A")
    git(user, "-c", "user.name=u", "-c", "user.email=u@u", "commit", "-qm", "our own data")

    project = new_project(tmp_path / "project", demo_dvc_file, checkout=user)
    version = checkout_version(project, CFG)  # the empty remote lacks it: the demo is regenerated
    assert version.md5 == recorded_md5(project / "data.dvc") != recorded_md5(user / "data.dvc")
    assert version.n_rows > 0 and git_rev(project) == git(project, "rev-parse", "HEAD")
    assert "s3://" not in (project / ".dvc" / "config").read_text()


def row(q: str, a: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": q},
                                    {"role": "assistant", "content": a}]})


def remote_files(root):
    return sorted(p for p in (root / ".dvc-remote").rglob("*") if p.is_file())


def lose_local_copy(project):
    """data/ and the DVC cache gone: the version is only on the remote, as in a fresh clone."""
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")


def commit(root, message):
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)


def test_fresh_clone_regenerates_demo_data_with_the_recorded_md5(project):
    committed = recorded_md5(project / "data.dvc")
    version = checkout_version(project, CFG)
    assert version.source == "generated" and version.md5 == committed
    assert version.n_rows == 1203 and version.n_files == 1
    assert version.git_rev == git(project, "rev-parse", "HEAD")
    assert remote_files(project) == [], "a checkout reads: it pushes nothing"
    assert recorded_md5(project / "data.dvc") == committed, "nor records a version"
    push_version(project, CFG)  # what a retrain does next, before it trains
    assert len(remote_files(project)) == 2, "the .dir manifest and the one file were pushed"
    assert remote_missing(project, CFG) == []


def test_missing_data_is_pulled_from_the_remote(project):
    checkout_version(project, CFG)
    push_version(project, CFG)
    lose_local_copy(project)
    assert checkout_version(project, CFG).source == "pulled"


def test_a_changed_file_stops_the_run_even_with_its_mtime_kept(project):
    checkout_version(project, CFG)
    path = project / "data" / "conversations.jsonl"
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[100] = ord("X") if data[100] != ord("X") else ord("Y")
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # DVC's state cache would not notice
    with pytest.raises(DataError, match=r"conversations\.jsonl: md5 \w+ differs from data\.dvc"):
        checkout_version(project, CFG)


def test_extra_and_missing_files_are_named(project):
    checkout_version(project, CFG)
    (project / "data" / "new.jsonl").write_text(row("hi", "hello") + "\n")
    with pytest.raises(DataError, match=r"new\.jsonl: not in data\.dvc"):
        verify_workspace(project, CFG)
    (project / "data" / "new.jsonl").unlink()
    (project / "data" / "conversations.jsonl").unlink()
    with pytest.raises(DataError, match=r"conversations\.jsonl: missing"):
        verify_workspace(project, CFG)


def test_a_tampered_cache_manifest_is_refused(project):
    version = checkout_version(project, CFG)
    md5 = version.md5
    manifest = project / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    manifest.chmod(0o644)
    manifest.write_text(json.dumps([{"md5": "0" * 32, "relpath": "conversations.jsonl"}]))
    with pytest.raises(DataError, match="does not hash to"):
        verify_workspace(project, CFG)


def test_record_version_makes_a_new_version(project):
    checkout_version(project, CFG)
    (project / "data" / "extra.jsonl").write_text(row("Hi", "Hello.") + "\n")
    version, before = record_version(project, CFG)
    assert before != version.md5 == recorded_md5(project / "data.dvc")
    assert version.n_files == 2
    assert git_rev(project).endswith("-dirty"), "data.dvc now differs from the commit"
    assert verify_workspace(project, CFG) == version.md5


def test_missing_data_without_demo_fallback_is_a_clear_error(project):
    with pytest.raises(DataError, match="dvc pull"):
        checkout_version(project, DataConfig(demo_if_missing=False))


def test_a_missing_tag_is_named_as_the_cause(project):
    with pytest.raises(DataError, match=r"no git commit, branch or tag named 'data-v1'.*git tag"):
        checkout_version(project, CFG, "data-v1")
    git(project, "tag", "data-v1")
    checkout_version(project, CFG)  # the demo data, regenerated
    push_version(project, CFG)  # and pushed to the remote
    assert checkout_version(project, CFG, "data-v1").md5 == recorded_md5(project / "data.dvc")


def test_outside_a_dvc_repo_is_a_clear_error(tmp_path):
    (tmp_path / "data.dvc").write_text("outs:\n- md5: abc.dir\n  path: data\n")
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="dvc init"):
        verify_workspace(tmp_path, CFG)


def test_remote_missing_objects_are_reported(project):
    checkout_version(project, CFG)
    push_version(project, CFG)
    for path in remote_files(project):
        if not path.name.endswith(".dir"):
            path.unlink()
    assert len(remote_missing(project, CFG)) == 1


def test_training_on_an_earlier_rev_and_diffing_versions(project):
    v1 = checkout_version(project, CFG)
    git(project, "tag", "v1")
    rows = [row(f"What is {i} times 2?", f"{i} times 2 is {2 * i}.") for i in range(5)]
    (project / "data" / "extra.jsonl").write_text("\n".join(rows) + "\n")
    record_version(project, CFG)
    commit(project, "data: more rows")
    old = checkout_version(project, CFG, rev="v1")
    assert old.md5 == v1.md5 and old.n_rows == v1.n_rows and old.source == "rev:v1"
    assert old.git_rev == git(project, "rev-parse", "v1")
    assert old.path != str(project / "data")
    again = checkout_version(project, CFG, rev="v1")  # reuses the copy, verified again
    assert again.path == old.path
    new = checkout_version(project, CFG, rev="HEAD")
    diff = diff_dirs(Path(old.path), Path(new.path), "v1", "HEAD")
    assert (diff.added, diff.removed) == (5, 0)
    assert "+5 added, -0 removed" in diff.markdown()
    with pytest.raises(DataError, match="no-such-rev"):
        checkout_version(project, CFG, rev="no-such-rev")


def imported(source: Path, data: Path, reading: Reading | None = None) -> list[Path]:
    return [done.written for done in import_dataset(source, data, reading or Reading())]


def test_import_formats(tmp_path):
    data = tmp_path / "data"
    (tmp_path / "one.jsonl").write_text(row("a", "b") + "\n")
    assert [p.name for p in imported(tmp_path / "one.jsonl", data)] == ["one.jsonl"]

    (tmp_path / "folder" / "sub").mkdir(parents=True)
    (tmp_path / "folder" / "sub" / "x.jsonl").write_text(row("c", "d") + "\n")
    assert imported(tmp_path / "folder", data) == [data / "folder" / "sub" / "x.jsonl"]

    pd.DataFrame({"question": ["q1", "q2"], "answer": ["a1", "a2"], "sys": ["s", ""]}).to_csv(
        tmp_path / "table.csv", index=False)
    [csv_out] = imported(tmp_path / "table.csv", data,
                         Reading(columns=Columns("question", "answer", "sys")))
    first, second = [json.loads(x)["messages"] for x in csv_out.read_text().splitlines()]
    assert first == [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                     {"role": "assistant", "content": "a1"}]
    assert [m["role"] for m in second] == ["user", "assistant"]

    pd.DataFrame({"prompt": ["p"], "response": ["r"]}).to_parquet(tmp_path / "t.parquet")
    [pq_out] = imported(tmp_path / "t.parquet", data)
    assert json.loads(pq_out.read_text())["messages"][1] == {"role": "assistant", "content": "r"}

    Dataset.from_list([json.loads(row("e", "f"))]).save_to_disk(str(tmp_path / "saved"))
    [saved_out] = imported(tmp_path / "saved", data)
    assert json.loads(saved_out.read_text()) == json.loads(row("e", "f"))

    with pytest.raises(DataError, match="would overwrite"):
        import_dataset(tmp_path / "one.jsonl", data)
    with pytest.raises(DataError, match=r"no column\(s\) \['prompt', 'response'\]"):
        import_dataset(tmp_path / "table.csv", tmp_path / "elsewhere")


def test_a_user_version_missing_everywhere_is_not_replaced_by_the_demo(project):
    checkout_version(project, CFG)
    (project / "data" / "extra.jsonl").write_text(row("Hi", "Hello.") + "\n")
    version, _ = record_version(project, DataConfig(push=False))  # recorded, never pushed
    lose_local_copy(project)
    with pytest.raises(DataError, match="does not record the demo dataset"):
        checkout_version(project, CFG)
    assert recorded_md5(project / "data.dvc") == version.md5
    assert not (project / "data").exists()
