"""Real DVC repos and a local-directory remote in temp dirs."""

import shutil

import pytest

from phi3ops.config import DataConfig
from phi3ops.data import DataError, git_rev, recorded_md5, version_data
from tests.conftest import git


def remote_files(root):
    return sorted(p for p in (root / ".dvc-remote").rglob("*") if p.is_file())


def test_fresh_clone_regenerates_demo_data_with_the_recorded_md5(project):
    committed = recorded_md5(project / "data.dvc")
    version = version_data(project, DataConfig())
    assert version.source == "generated"
    assert version.md5 == committed and not version.changed
    assert version.n_rows == 1203 and version.n_files == 1
    assert version.git_rev == git(project, "rev-parse", "HEAD")
    assert len(remote_files(project)) == 2, "the .dir manifest and the one file were pushed"


def test_missing_data_is_pulled_from_the_remote(project):
    version_data(project, DataConfig())
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    version = version_data(project, DataConfig())
    assert version.source == "pulled" and not version.changed


def test_new_data_is_a_new_version(project):
    version_data(project, DataConfig())
    with (project / "data" / "extra.jsonl").open("w") as f:
        f.write('{"messages": [{"role": "user", "content": "Hi"}, '
                '{"role": "assistant", "content": "Hello."}]}\n')
    version = version_data(project, DataConfig())
    assert version.changed and version.n_files == 2
    assert recorded_md5(project / "data.dvc") == version.md5
    assert git_rev(project).endswith("-dirty"), "data.dvc now differs from the commit"


def test_missing_data_without_demo_fallback_is_a_clear_error(project):
    with pytest.raises(DataError, match="dvc pull"):
        version_data(project, DataConfig(demo_if_missing=False))


def test_outside_a_dvc_repo_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="dvc init"):
        version_data(tmp_path, DataConfig())
