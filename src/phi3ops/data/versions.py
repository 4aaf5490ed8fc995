"""Dataset versions with DVC: a version is the DVC md5 of data/ plus the git revision of data.dvc.

    phi3ops data version            # record data/ as a new version: dvc add + dvc push
    phi3ops data status [--verify]  # does data/ match data.dvc, and does the remote hold it?
    phi3ops run --data-rev v1.0     # train on the dataset of any git rev or tag

The retrain flow never records a new version itself: it trains on the version data.dvc names.
Before preprocessing, every file is hashed and checked against data.dvc's manifest (DVC trusts
its cache and file mtimes; we do not), so a changed or corrupted file stops the run, named.
A fresh clone whose remote lacks the data regenerates the seeded demo dataset, which reproduces
the md5 recorded in data.dvc byte for byte; a remote that holds the version corrupt is named
instead, object by object (DVC checks that objects exist, not what they hold).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from phi3ops.config import DataConfig
from phi3ops.data.demo import write_demo_dataset
from phi3ops.data.dvc_repo import DvcError, DvcRepo, get_files
from phi3ops.data.remote_check import RemoteCheck, RemoteObject
from phi3ops.errors import DataError

log = logging.getLogger(__name__)
# Files whose content a push and `phi3ops data status` read back from the remote and hash, besides
# the directory manifest (always): reading every object back costs as much as downloading the
# whole dataset, so a random sample finds a failing remote; `phi3ops data status --verify`, and
# any pull that fails, read them all.
REMOTE_SAMPLE = 16


@dataclass
class DatasetVersion:
    md5: str
    git_rev: str  # the commit whose data.dvc names this version ("-dirty": uncommitted)
    path: str  # where the verified files are
    n_rows: int
    n_files: int
    source: str  # "workspace", "pulled", "generated", "recorded" or "rev:<rev>"


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def git_rev(root: Path) -> str:
    """HEAD's commit, with '-dirty' when tracked files differ from it; 'unversioned' outside git."""
    try:
        rev = _git(root, "rev-parse", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unversioned"
    return f"{rev}-dirty" if dirty else rev


def parse_md5(text: str, where: str) -> str:
    outs = (yaml.safe_load(text) or {}).get("outs") or []
    if len(outs) != 1 or "md5" not in outs[0]:
        raise DataError(f"{where}: expected exactly one output with an md5")
    return outs[0]["md5"]


def recorded_md5(dvc_file: Path) -> str | None:
    """The md5 that a .dvc file records for its single output (None when there is none)."""
    return parse_md5(dvc_file.read_text(), str(dvc_file)) if dvc_file.is_file() else None


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def count_rows(data_dir: Path) -> tuple[int, int]:
    files = sorted(data_dir.rglob("*.jsonl"))
    rows = sum(sum(1 for line in f.open("rb") if line.strip()) for f in files)
    return rows, len(files)


def _cached_manifest(repo: DvcRepo, md5: str) -> list[dict] | None:
    path = repo.cached(md5)
    if path.is_file() and file_md5(path) == md5.removesuffix(".dir"):
        return json.loads(path.read_text())
    return None


def load_manifest(repo: DvcRepo, md5: str, targets: list[str], revs: list[str] | None = None,
                  ) -> list[dict]:
    """The file list of a directory version, from the cache or else fetched from the remote.
    Its own md5 must equal the recorded one: a tampered cache entry is refused."""
    path = repo.cached(md5)
    if not path.is_file():
        try:
            repo.fetch(targets, revs)
        except DvcError as e:
            check_remote(repo, md5, Path(targets[0]).stem, sample=None).raise_if_corrupt()
            raise DataError(f"dataset {md5} is not in the DVC cache nor fetchable: {e}") from e
    if not path.is_file() or file_md5(path) != md5.removesuffix(".dir"):
        raise DataError(f"DVC cache entry {path} is missing or does not hash to {md5}; "
                        "remove it and run `dvc fetch` to get it again from the remote")
    return json.loads(path.read_text())


def verify_files(data_dir: Path, manifest: list[dict], dvc_file: Path) -> None:
    """Hash every file and compare with the manifest; name every file that differs."""
    expected = {entry["relpath"]: entry["md5"] for entry in manifest}
    present = {p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*") if p.is_file()}
    problems = [f"{data_dir / rel}: missing" for rel in sorted(expected.keys() - present)]
    problems += [f"{data_dir / rel}: not in {dvc_file.name}"
                 for rel in sorted(present - expected.keys())]
    problems += [f"{data_dir / rel}: md5 {actual} differs from {dvc_file.name} ({expected[rel]})"
                 for rel in sorted(expected.keys() & present)
                 if (actual := file_md5(data_dir / rel)) != expected[rel]]
    if problems:
        raise DataError(
            f"{data_dir} does not match {dvc_file}:\n  " + "\n  ".join(problems[:20]) +
            f"\nRecord it as a new version with `phi3ops data version`, or restore the recorded "
            f"one with `dvc checkout {dvc_file.name}`."
        )


@contextmanager
def quiet_dvc():
    """DVC's own warnings and bars off (its "missing cache files" twice, "Pushing" lines left on
    a terminal) while phi3ops reports; its failures still raise."""
    loggers = [logging.getLogger(name) for name in ("dvc", "dvc_data")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)  # DVC shows a bar only at ERROR or below
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _restore_missing(repo: DvcRepo, data_dir: Path, dvc_file: Path, cfg: DataConfig) -> str:
    """`dvc pull`; when it fails, regenerate the demo dataset only if the remote truly lacks the
    version: a pull also fails on an object that hashes wrong, and that is refused, named."""
    md5 = recorded_md5(dvc_file)
    try:
        with quiet_dvc():  # a miss is expected here, and phi3ops says what it does about it
            repo.pull([str(dvc_file)])
    except DvcError as e:
        check_remote(repo, md5, dvc_file.stem, sample=None).raise_if_corrupt()
        if not cfg.demo_if_missing:
            raise DataError(
                f"{data_dir} is missing and `dvc pull {dvc_file.name}` failed: {e}. Check the DVC "
                "remote (`dvc remote list`) or put the data in place and rerun."
            ) from e
    else:
        return "pulled"
    log.info("%s is not on the DVC remote; regenerating the seeded demo dataset", data_dir)
    recorded = dvc_file.read_text()
    write_demo_dataset(data_dir)
    repo.add(data_dir)  # fills the cache
    if recorded_md5(dvc_file) != parse_md5(recorded, str(dvc_file)):
        dvc_file.write_text(recorded)  # never replace the user's version with the demo
        shutil.rmtree(data_dir)
        raise DataError(f"{data_dir} is missing and not on the DVC remote, and {dvc_file} does "
                        "not record the demo dataset: `dvc push` it from where it was added")
    return "generated"


def _discard_bad_pull(repo: DvcRepo, data_dir: Path, dvc_file: Path) -> None:
    """A pull wrote files that fail their md5: a remote with `verify` off hands corrupt objects
    over unchecked. Remove them from data/ and the cache, so that the next pull fetches them
    again, and name the corrupt objects on the remote."""
    md5 = recorded_md5(dvc_file)
    shutil.rmtree(data_dir)
    for entry in load_manifest(repo, md5, [str(dvc_file)]):
        cached = repo.cached(entry["md5"])
        if cached.is_file() and file_md5(cached) != entry["md5"]:
            cached.unlink()
    check_remote(repo, md5, dvc_file.stem, sample=None).raise_if_corrupt()


def checkout_version(root: Path, cfg: DataConfig, rev: str | None = None) -> DatasetVersion:
    """The verified files of the version data.dvc names (at `rev`, or in the work tree). It
    reads: data/ missing is pulled (or, where the remote truly lacks it, the seeded demo is
    regenerated into the cache); it never records a version or pushes (`push_version`)."""
    if rev is not None:
        return _checkout_rev(root, cfg, rev)
    data_dir, dvc_file = root / cfg.path, root / cfg.dvc_file
    source, md5 = "workspace", recorded_md5(dvc_file)
    if md5 is not None and not data_dir.is_dir():
        with DvcRepo.open(root) as repo:
            source = _restore_missing(repo, data_dir, dvc_file, cfg)
    try:
        md5 = verify_workspace(root, cfg)
    except DataError:
        if source == "pulled":
            with DvcRepo.open(root) as repo:
                _discard_bad_pull(repo, data_dir, dvc_file)
        raise
    n_rows, n_files = count_rows(data_dir)
    return DatasetVersion(md5, git_rev(root), str(data_dir), n_rows, n_files, source)


def push_version(root: Path, cfg: DataConfig) -> None:
    """The remote holds the version data.dvc records, every object read back (nothing to do
    with `data.push: false`). A retrain pushes before it trains, so that any version it
    registers can be pulled, and reproduced, elsewhere."""
    if cfg.push:
        with DvcRepo.open(root) as repo, quiet_dvc():
            push_verified(repo, root / cfg.dvc_file)


def _checkout_rev(root: Path, cfg: DataConfig, rev: str) -> DatasetVersion:
    """Materialise the dataset of a git rev under .cache/data/<md5> through the DVC API."""
    try:
        sha = _git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        raise DataError(f"{root}: no git commit, branch or tag named {rev!r}; `git tag --list` "
                        f"shows the tags, and `git tag {rev} COMMIT` names a commit whose "
                        f"{cfg.dvc_file} recorded that data") from None
    try:
        dvc_text = _git(root, "show", f"{sha}:{cfg.dvc_file}")
    except subprocess.CalledProcessError as e:
        raise DataError(f"git rev {rev!r} has no {cfg.dvc_file}: {e.stderr.strip()}") from e
    md5 = parse_md5(dvc_text, f"{rev}:{cfg.dvc_file}")
    dest = root / ".cache" / "data" / md5.removesuffix(".dir")
    with DvcRepo.open(root) as repo:
        manifest = load_manifest(repo, md5, [cfg.path], revs=[sha])
        if not dest.is_dir():
            staging = dest.with_name(dest.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            try:
                get_files(str(root), cfg.path, sha, staging)
            except (DvcError, FileNotFoundError) as e:
                raise DataError(f"cannot get {cfg.path} at {rev}: {e}") from e
            staging.rename(dest)
    verify_files(dest, manifest, root / cfg.dvc_file)  # every time: the copy may have changed
    n_rows, n_files = count_rows(dest)
    return DatasetVersion(md5, sha, str(dest), n_rows, n_files, f"rev:{rev}")


def verify_workspace(root: Path, cfg: DataConfig) -> str:
    """Check data/ against data.dvc file by file; returns the recorded md5."""
    data_dir, dvc_file = root / cfg.path, root / cfg.dvc_file
    md5 = recorded_md5(dvc_file)
    if md5 is None:
        raise DataError(f"{dvc_file} not found: record a dataset first (`phi3ops data add PATH`)")
    if not data_dir.is_dir():
        raise DataError(f"{data_dir} is missing: `phi3ops data pull` (or `dvc pull "
                        f"{cfg.dvc_file}`) restores it")
    with DvcRepo.open(root) as repo:
        verify_files(data_dir, load_manifest(repo, md5, [str(dvc_file)]), dvc_file)
    return md5


def check_remote(repo: DvcRepo, md5: str, data_path: str, sample: int | None = REMOTE_SAMPLE,
                 ) -> RemoteCheck:
    """Ask the default remote for every object of a version, and read back and hash its
    manifest and `sample` files picked at random (all when None). DVC itself only asks whether
    an object exists, so a flipped byte on the remote goes unseen until someone pulls it."""
    remote = repo.remote()

    def found(oid: str, file: str, actual: str | None) -> RemoteObject:
        return RemoteObject(oid, remote.url(oid), file, actual)

    actual, raw = remote.read(md5)
    missing, corrupt = [], []
    if actual == md5.removesuffix(".dir"):
        manifest = json.loads(raw)
    else:  # still check the files, when this machine's cache knows them
        bad = found(md5, f"{data_path}/ (directory manifest)", actual)
        (missing if actual is None else corrupt).append(bad)
        manifest = _cached_manifest(repo, md5) or []
    files = [(e["md5"], f"{data_path}/{e['relpath']}") for e in manifest]
    hashed = set(files if sample is None else random.sample(files, min(sample, len(files))))
    for oid, file in files:
        if (oid, file) in hashed:
            actual = remote.read(oid)[0]
        else:  # only asked for: taken as intact when present
            actual = oid if remote.exists(oid) else None
        if actual != oid:
            (missing if actual is None else corrupt).append(found(oid, file, actual))
    return RemoteCheck(md5, 1 + len(files), 1 + len(hashed), missing, corrupt)


def remote_status(root: Path, cfg: DataConfig, sample: int | None = REMOTE_SAMPLE) -> RemoteCheck:
    """The recorded version as the default remote holds it (see check_remote)."""
    dvc_file = root / cfg.dvc_file
    md5 = recorded_md5(dvc_file)
    if md5 is None:
        raise DataError(f"{dvc_file} not found")
    with DvcRepo.open(root) as repo:
        return check_remote(repo, md5, cfg.path, sample)


def remote_missing(root: Path, cfg: DataConfig) -> list[str]:
    """Files of the recorded version that the default remote does not hold. Every object is
    asked for: `dvc status -c` trusts a directory's manifest on the remote and misses them."""
    return [obj.file for obj in remote_status(root, cfg, sample=0).missing]


def push_verified(repo: DvcRepo, dvc_file: Path) -> None:
    """`dvc push`, then read the version back and upload again, from the cache, every object
    the remote lacks or holds corrupt: dvc push skips a directory whose manifest is on the
    remote even when its files are not, and never looks inside an object that exists."""
    md5 = recorded_md5(dvc_file)
    try:
        repo.push([str(dvc_file)])
        check = check_remote(repo, md5, dvc_file.stem)
        bad = check.missing + check.corrupt
        if bad:
            log.warning("the remote lacked or held corrupt %d object(s); uploading again: %s",
                        len(bad), [obj.file for obj in bad])
            remote = repo.remote()
            for obj in bad:
                source, expected = repo.cached(obj.oid), obj.oid.removesuffix(".dir")
                if not source.is_file() or file_md5(source) != expected:
                    raise DataError(f"cannot repair {obj}: this machine's DVC cache has no good "
                                    f"copy ({source}); push from one that has")
                remote.upload(source, obj.oid)
                if remote.read(obj.oid)[0] != expected:
                    raise DataError(f"{obj.url} still does not hash to its name after uploading "
                                    "it again: check the remote's storage")
    except DvcError as e:
        raise DataError(f"`dvc push {dvc_file.name}` failed: {e}") from e


def record_version(root: Path, cfg: DataConfig) -> tuple[DatasetVersion, str | None]:
    """`dvc add data` + `dvc push`: record what is in data/ now. Returns it and the previous md5."""
    data_dir, dvc_file = root / cfg.path, root / cfg.dvc_file
    if not data_dir.is_dir():
        raise DataError(f"{data_dir} does not exist: `phi3ops data add PATH` imports a dataset")
    before = recorded_md5(dvc_file)
    with DvcRepo.open(root) as repo:
        repo.add(data_dir)
        if cfg.push:
            push_verified(repo, dvc_file)
    n_rows, n_files = count_rows(data_dir)
    md5 = recorded_md5(dvc_file)
    assert md5 is not None  # dvc add just wrote it
    return DatasetVersion(md5, git_rev(root), str(data_dir), n_rows, n_files, "recorded"), before
