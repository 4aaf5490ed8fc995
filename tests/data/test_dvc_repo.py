"""The DVC behaviour phi3ops relies on (phi3ops.data.dvc_repo), pinned on a real DVC repo with a
local-directory remote: a DVC upgrade that changes any of it fails here, by name."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from phi3ops.data.dvc_repo import DvcError, DvcRepo, get_files
from phi3ops.data.versions import file_md5
from tests.conftest import git


@pytest.fixture
def repo_root(tmp_path) -> Path:
    """git + DVC, a remote in a directory beside it, data/ with two files, added and pushed."""
    root = tmp_path / "repo"
    (root / "data" / "sub").mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    from dvc.repo import Repo

    Repo.init(str(root)).close()
    (root / ".dvc" / "config").write_text(
        f"[core]\n    remote = local\n['remote \"local\"']\n    url = {tmp_path / 'remote'}\n")
    (root / "data" / "a.jsonl").write_text('{"n": 1}\n')
    (root / "data" / "sub" / "b.jsonl").write_text('{"n": 2}\n')
    with DvcRepo.open(root) as repo:
        repo.add(root / "data")
        repo.push([str(root / "data.dvc")])
    commit(root, "v1")
    return root


def commit(root: Path, message: str) -> str:
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)
    return git(root, "rev-parse", "HEAD")


def recorded(root: Path) -> str:
    return yaml.safe_load((root / "data.dvc").read_text())["outs"][0]["md5"]


def test_a_directory_is_one_manifest_object_naming_its_files(repo_root):
    md5 = recorded(repo_root)
    assert md5.endswith(".dir")
    with DvcRepo.open(repo_root) as repo:
        manifest_path = repo.cached(md5)
        manifest = json.loads(manifest_path.read_text())
        assert file_md5(manifest_path) == md5.removesuffix(".dir")
        assert {e["relpath"]: e["md5"] for e in manifest} == {
            "a.jsonl": file_md5(repo_root / "data" / "a.jsonl"),
            "sub/b.jsonl": file_md5(repo_root / "data" / "sub" / "b.jsonl")}
        for entry in manifest:  # each file in the cache under its md5: files/md5/xx/yyyy
            cached = repo.cached(entry["md5"])
            assert cached.parts[-2:] == (entry["md5"][:2], entry["md5"][2:])
            assert file_md5(cached) == entry["md5"]


def test_the_remote_holds_each_object_under_its_cache_name(repo_root, tmp_path):
    md5 = recorded(repo_root)
    with DvcRepo.open(repo_root) as repo:
        remote = repo.remote()
        actual, raw = remote.read(md5)
        assert actual == md5.removesuffix(".dir")
        assert json.loads(raw) == json.loads(repo.cached(md5).read_text())
        for entry in json.loads(raw):
            assert remote.exists(entry["md5"])
            assert remote.read(entry["md5"]) == (entry["md5"], b""), "data files: md5, no bytes"
            url = remote.url(entry["md5"])
            assert url.startswith(str(tmp_path / "remote"))
            assert url.endswith(f"/files/md5/{entry['md5'][:2]}/{entry['md5'][2:]}")
        assert remote.read("0" * 32) == (None, b"")
        assert not remote.exists("0" * 32)


def test_push_skips_a_directory_whose_manifest_the_remote_holds(repo_root):
    """Why phi3ops reads a push back: a file object gone from the remote stays gone after
    `dvc push`, since the manifest is there. Uploading it from the cache repairs it."""
    md5 = recorded(repo_root)
    with DvcRepo.open(repo_root) as repo:
        remote = repo.remote()
        lost = json.loads(repo.cached(md5).read_text())[0]["md5"]
        Path(remote.url(lost)).unlink()
        repo.push([str(repo_root / "data.dvc")])
        assert not remote.exists(lost)
        remote.upload(repo.cached(lost), lost)
        assert remote.read(lost)[0] == lost


def test_pull_and_fetch_fail_with_dvc_error_on_a_missing_object(repo_root):
    md5 = recorded(repo_root)
    with DvcRepo.open(repo_root) as repo:
        lost = json.loads(repo.cached(md5).read_text())[0]["md5"]
        Path(repo.remote().url(lost)).unlink()
    shutil.rmtree(repo_root / "data")
    shutil.rmtree(repo_root / ".dvc" / "cache")
    with DvcRepo.open(repo_root) as repo:
        with pytest.raises(DvcError):
            repo.fetch([str(repo_root / "data.dvc")])
        with pytest.raises(DvcError):
            repo.pull([str(repo_root / "data.dvc")])
        # The manifest goes into the cache last: a cache that holds it holds every file.
        assert not repo.cached(md5).is_file()


def test_an_older_revs_files_come_from_the_cache_or_the_remote(repo_root, tmp_path):
    v1 = git(repo_root, "rev-parse", "HEAD")
    v1_md5 = recorded(repo_root)
    (repo_root / "data" / "a.jsonl").write_text('{"n": 3}\n')
    with DvcRepo.open(repo_root) as repo:
        repo.add(repo_root / "data")
    commit(repo_root, "v2")
    assert recorded(repo_root) != v1_md5

    get_files(str(repo_root), "data", v1, tmp_path / "v1")
    assert (tmp_path / "v1" / "a.jsonl").read_text() == '{"n": 1}\n'
    assert (tmp_path / "v1" / "sub" / "b.jsonl").is_file()

    shutil.rmtree(repo_root / ".dvc" / "cache")  # v1 only on the remote now
    with DvcRepo.open(repo_root) as repo:
        repo.fetch(["data"], revs=[v1])
        assert repo.cached(v1_md5).is_file()
    get_files(str(repo_root), "data", v1, tmp_path / "again")
    assert (tmp_path / "again" / "a.jsonl").read_text() == '{"n": 1}\n'
