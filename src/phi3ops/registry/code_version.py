"""Which code made a version: the commit, for people, and a hash of what runs, for the decision.

A retrain with the same data, config and code would only repeat a version, so it stops early.
"Same code" is decided by the hash of the files that run (the phi3ops package with its metric
modules, the flows package, the declared dependencies and the environment lock), not by the
commit: committing a new
data.dvc or a README edit makes a new commit but runs the same code, while an uncommitted edit
of a module changes the hash.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from phi3ops.config import file_sha256

LOCK_FILE = Path(__file__).resolve().parents[3] / "requirements.lock"  # beside pyproject.toml


@dataclass(frozen=True)
class CodeVersion:
    git_rev: str  # HEAD, '-dirty' when tracked files differ: recorded, not compared
    hash: str  # sha256 of what runs, the lock included: compared
    env_lock: str  # sha256 of requirements.lock ("none" in an install without one)


def package_dirs() -> list[Path]:
    """The directories of the packages a retrain runs: phi3ops and flows (found, not imported:
    nothing under src/ imports the flows)."""
    dirs = [Path(__file__).resolve().parents[1]]  # phi3ops/, this file in phi3ops/registry/
    flows = importlib.util.find_spec("flows")
    if flows is not None and flows.submodule_search_locations:
        dirs += [Path(p).resolve() for p in flows.submodule_search_locations]
    return dirs


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

    lock = file_sha256(LOCK_FILE) if LOCK_FILE.is_file() else "none"
    requirements = [*(importlib.metadata.distribution("phi3ops").requires or []), f"lock {lock}"]
    return CodeVersion(git_rev(root), code_hash(package_dirs(), requirements), lock)
