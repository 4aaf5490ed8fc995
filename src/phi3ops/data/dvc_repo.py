"""The DVC internals phi3ops relies on, in one module: opening a repo, where its cache keeps an
object, add, fetch, pull and push, the default remote's objects, and a git rev's files.

Below `dvc.api`, DVC's Python API is not a stable interface. tests/data/test_dvc_repo.py pins
each behaviour used here, so a DVC upgrade that changes one fails there, by name, rather than
somewhere inside a retrain. Every call raises `DvcError` (DVC's own exception) when it fails.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from dvc.api import DVCFileSystem
from dvc.exceptions import DvcException as DvcError
from dvc.repo import Repo

from phi3ops.errors import DataError

__all__ = ["DvcError", "DvcRepo", "Remote", "get_files"]


class DvcRepo:
    """A DVC repository, opened for one piece of work (`with DvcRepo.open(root) as repo`)."""

    def __init__(self, repo: Repo):
        self._repo = repo

    @classmethod
    def open(cls, root: Path) -> DvcRepo:
        try:
            repo = Repo(str(root))
        except DvcError as e:
            raise DataError(f"{root}: not a DVC repository ({e}); run `dvc init` there") from e
        repo.scm_context.quiet = True  # no "To track the changes with git": phi3ops says it once
        return cls(repo)

    def __enter__(self) -> DvcRepo:
        return self

    def __exit__(self, *exc) -> None:
        self._repo.close()

    def cached(self, oid: str) -> Path:
        """Where the local cache keeps an object (files/md5/xx/yyyy), present or not."""
        return Path(self._repo.cache.local.oid_to_path(oid))

    def add(self, path: Path) -> None:
        """`dvc add PATH`: hash it into the cache and write PATH.dvc."""
        self._repo.add(str(path))

    def fetch(self, targets: list[str], revs: list[str] | None = None) -> None:
        """`dvc fetch`: the targets' objects (at `revs`) from the remote into the cache."""
        self._repo.fetch(targets=targets, revs=revs)

    def pull(self, targets: list[str]) -> None:
        """`dvc pull`: fetch, then check the files out into the work tree."""
        self._repo.pull(targets=targets)

    def push(self, targets: list[str]) -> None:
        """`dvc push`: the targets' objects to the default remote. It skips a directory whose
        manifest the remote holds, even when files of it are missing there."""
        self._repo.push(targets=targets)

    def remote(self) -> Remote:
        """The default remote's object store."""
        try:
            return Remote(self._repo.cloud.get_remote_odb(), self._repo.cache.local)
        except DvcError as e:
            raise DataError(f"no usable DVC remote: {e}") from e


class Remote:
    """The default remote's objects, addressed as in the cache, on any of DVC's filesystems
    (a local directory and S3 are read the same way)."""

    def __init__(self, odb, cache):
        self._odb, self._cache = odb, cache

    def url(self, oid: str) -> str:
        return self._odb.fs.unstrip_protocol(self._odb.oid_to_path(oid))

    def exists(self, oid: str) -> bool:
        return self._odb.exists(oid)

    def read(self, oid: str) -> tuple[str | None, bytes]:
        """md5 and bytes of one object as the remote holds it (None when absent). Only a
        directory manifest's bytes are kept: data files are hashed as they stream."""
        digest, kept = hashlib.md5(usedforsecurity=False), []
        try:
            with self._odb.fs.open(self._odb.oid_to_path(oid), mode="rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
                    if oid.endswith(".dir"):
                        kept.append(chunk)
        except FileNotFoundError:
            return None, b""
        return digest.hexdigest(), b"".join(kept)

    def upload(self, source: Path, oid: str) -> None:
        """Write a cached object to the remote, over whatever it holds under that name."""
        self._odb.add(str(source), self._cache.fs, oid, check_exists=False)


def get_files(repo_url: str, path: str, rev: str, out: Path) -> None:
    """The files of `path` as the git rev `rev` recorded them, into `out` (`dvc get`): from the
    local cache or the remote, through DVC's filesystem for that rev."""
    DVCFileSystem(repo=repo_url, rev=rev).get(path, str(out), recursive=True)
