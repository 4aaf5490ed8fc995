"""Dataset versioning with DVC: the version of a dataset is its DVC md5 plus the git revision.

    phi3ops data version        # dvc pull if needed, dvc add data, dvc push

A fresh clone has data.dvc but no data/: it is pulled from the DVC remote, and where the remote
does not have it (the default local remote of a new machine), the seeded demo dataset is written
again; being byte-identical, it reproduces the md5 recorded in data.dvc.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml
from dvc.exceptions import DvcException
from dvc.repo import Repo

from phi3ops.config import DataConfig
from phi3ops.demo_data import write_demo_dataset
from phi3ops.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class DatasetVersion:
    md5: str
    git_rev: str
    path: str
    n_rows: int
    n_files: int
    source: str  # "workspace", "pulled" or "generated"
    changed: bool  # data.dvc now records a different md5 than before this call


def git_rev(root: Path) -> str:
    """HEAD's commit, with '-dirty' when tracked files differ from it; 'unversioned' outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        rev = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unversioned"
    return f"{rev}-dirty" if dirty else rev


def recorded_md5(dvc_file: Path) -> str | None:
    """The md5 that a .dvc file records for its single output (None when absent or empty)."""
    if not dvc_file.is_file():
        return None
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
    if len(outs) != 1 or "md5" not in outs[0]:
        raise DataError(f"{dvc_file}: expected exactly one output with an md5")
    return outs[0]["md5"]


def count_rows(data_dir: Path) -> tuple[int, int]:
    files = sorted(data_dir.rglob("*.jsonl"))
    rows = sum(sum(1 for line in f.open("rb") if line.strip()) for f in files)
    return rows, len(files)


def _fetch_missing(repo: Repo, data_dir: Path, dvc_file: Path, cfg: DataConfig) -> str:
    try:
        repo.pull(targets=[str(dvc_file)])
        return "pulled"
    except DvcException as e:
        if not cfg.demo_if_missing:
            raise DataError(
                f"{data_dir} is missing and `dvc pull {cfg.dvc_file}` failed: {e}. Check the DVC "
                "remote (`dvc remote list`) or put the data in place and rerun."
            ) from e
        log.info("%s not on the DVC remote (%s); regenerating the seeded demo dataset", data_dir, e)
        write_demo_dataset(data_dir)
        return "generated"


def version_data(root: Path, cfg: DataConfig) -> DatasetVersion:
    """Make sure data/ exists, record it in data.dvc (`dvc add`) and push it to the remote."""
    data_dir, dvc_file = root / cfg.path, root / cfg.dvc_file
    try:
        repo = Repo(str(root))
    except DvcException as e:
        raise DataError(f"{root}: not a DVC repository ({e}); run `dvc init` there") from e
    with repo:
        source = "workspace" if data_dir.is_dir() else _fetch_missing(repo, data_dir, dvc_file, cfg)
        before = recorded_md5(dvc_file)
        repo.add(str(data_dir))
        md5 = recorded_md5(dvc_file)
        assert md5 is not None  # dvc add just wrote it
        if cfg.push:
            try:
                repo.push(targets=[str(dvc_file)])
            except DvcException as e:
                raise DataError(f"`dvc push {cfg.dvc_file}` failed: {e}") from e
    n_rows, n_files = count_rows(data_dir)
    if before != md5:
        log.info("new dataset version %s (was %s): commit it with `git add %s && git commit`",
                 md5, before, cfg.dvc_file)
    return DatasetVersion(md5=md5, git_rev=git_rev(root), path=str(data_dir), n_rows=n_rows,
                          n_files=n_files, source=source, changed=before != md5)
