"""Which code made a version: the commit, for people, and a hash of what runs, for the decision.

A retrain with the same data, config and code would only repeat a version, so it stops early.
"Same code" is decided by the hash of the files that run (the phi3ops package with its metric
modules, the project's flows/, the declared dependencies and the project's requirements.lock),
not by the commit: committing a new data.dvc or a README edit makes a new commit but runs the
same code, while an uncommitted edit of a module changes the hash. flows/ and the lock are read
from the project root, where `phi3ops run` and a Prefect deployment both load the flow from, so
an editable and a wheel install of phi3ops hash the same files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from phi3ops.config import file_sha256

LOCK_FILE = "requirements.lock"  # in the project root, beside flows/


@dataclass(frozen=True)
class CodeVersion:
    git_rev: str  # HEAD, '-dirty' when tracked files differ: recorded, not compared
    hash: str  # sha256 of what runs, the lock included: compared
    env_lock: str  # sha256 of requirements.lock ("none" in an install without one)


def package_dirs(root: Path) -> list[Path]:
    """The directories a retrain runs code from: the phi3ops package and the project's flows/."""
    return [Path(__file__).resolve().parents[1],  # phi3ops/, this file in phi3ops/registry/
            Path(root).resolve() / "flows"]


def code_hash(dirs: list[Path], requirements: list[str]) -> str:
    """sha256 over every file under `dirs` (by path relative to its directory; bytecode caches
    left out) and the requirement specs."""
    digest = hashlib.sha256()
    for directory in dirs:
        for path in sorted(directory.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                rel = f"{directory.name}/{path.relative_to(directory).as_posix()}"
                digest.update(f"{rel}\0{file_sha256(path)}\n".encode())
    for spec in sorted(requirements):
        digest.update(f"requires\0{spec}\n".encode())
    return digest.hexdigest()


def current(root: Path) -> CodeVersion:
    """The code this process runs, and the commit of the project at `root`."""
    from phi3ops.data.versions import git_rev

    lock_file = Path(root) / LOCK_FILE
    lock = file_sha256(lock_file) if lock_file.is_file() else "none"
    requirements = [*(importlib.metadata.distribution("phi3ops").requires or []), f"lock {lock}"]
    return CodeVersion(git_rev(root), code_hash(package_dirs(root), requirements), lock)
