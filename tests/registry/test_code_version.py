"""'Same code' is the code that runs, not the commit: a data or docs commit changes nothing."""

import subprocess

from phi3ops.config import file_sha256
from phi3ops.registry import code_version
from phi3ops.registry.code_version import code_hash


def test_the_hash_follows_the_code_and_dependencies_only(tmp_path):
    package = tmp_path / "pkg"
    (package / "__pycache__").mkdir(parents=True)
    (package / "stage.py").write_text("def run():\n    return 1\n")
    before = code_hash([package], ["torch==2.13.0"])

    (package / "__pycache__" / "stage.cpython-311.pyc").write_bytes(b"\0\1")
    assert code_hash([package], ["torch==2.13.0"]) == before, "bytecode is not code"
    assert code_hash([package], ["torch==2.12.0"]) != before, "dependencies are part of it"
    (package / "stage.py").write_text("def run():\n    return 2\n")
    assert code_hash([package], ["torch==2.13.0"]) != before, "an uncommitted edit counts"


def test_a_commit_of_data_or_docs_keeps_the_hash_and_moves_the_rev(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t",
                        *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "retrain.py").write_text("# the flow\n")
    (tmp_path / "requirements.lock").write_text("torch==2.13.0\n")
    (tmp_path / "data.dvc").write_text("outs:\n- md5: a.dir\n")
    git("add", "-A")
    git("commit", "-qm", "data v1")
    first = code_version.current(tmp_path)
    (tmp_path / "data.dvc").write_text("outs:\n- md5: b.dir\n")
    git("commit", "-qam", "data v2")
    second = code_version.current(tmp_path)
    assert second.git_rev != first.git_rev and second.hash == first.hash
    assert code_version.package_dirs(tmp_path)[1] == tmp_path.resolve() / "flows"
    assert first.env_lock == file_sha256(tmp_path / "requirements.lock")

    (tmp_path / "flows" / "retrain.py").write_text("# the flow, edited\n")
    assert code_version.current(tmp_path).hash != first.hash, "the project's flows are code"
    (tmp_path / "flows" / "retrain.py").write_text("# the flow\n")
    (tmp_path / "requirements.lock").write_text("torch==2.12.0\n")
    assert code_version.current(tmp_path).hash != first.hash, "so is its lock"
