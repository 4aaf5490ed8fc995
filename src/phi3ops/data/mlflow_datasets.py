"""The data a run trained and was scored on, as MLflow dataset inputs (the run's Datasets panel).

Each split is logged as a dataset whose digest is the DVC md5 of the version it came from and
whose source is that DVC path at its git revision; `source.load()` fetches those files again
(`dvc get`). The evaluation metrics name the held-out split, so MLflow shows which data a score
was measured on.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag

from phi3ops.errors import safe_uri

CONTEXT_TAG = "mlflow.data.context"  # what MLflow's UI shows as the dataset's use


class DvcDatasetSource(DatasetSource):
    """A DVC-tracked path in a git repository at a revision."""

    def __init__(self, repo: str, path: str, rev: str):
        self.repo, self.path, self.rev = repo, path, rev

    @staticmethod
    def _get_source_type() -> str:
        return "dvc"

    def load(self, dst_path: str | None = None) -> str:
        """`dvc get REPO PATH --rev REV`: the files of this version, into `dst_path`."""
        from phi3ops.data.dvc_repo import get_files

        out = Path(dst_path or tempfile.mkdtemp(prefix="phi3ops-data-")) / Path(self.path).name
        get_files(self.repo, self.path, self.rev, out)
        return str(out)

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False  # built from a run's record only, never guessed from a string

    @classmethod
    def _resolve(cls, raw_source: Any) -> DvcDatasetSource:
        raise ValueError(f"not a DVC dataset source: {raw_source!r}")

    def to_dict(self) -> dict[str, str]:
        return {"repo": self.repo, "path": self.path, "rev": self.rev}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> DvcDatasetSource:
        return cls(source_dict["repo"], source_dict["path"], source_dict["rev"])


class SplitDataset(MetaDataset):
    """One split of a DVC dataset version: digest = its md5, profile = its row count."""

    def __init__(self, source: DvcDatasetSource, name: str, md5: str, n_rows: int):
        self.n_rows = n_rows
        super().__init__(source=source, name=name, digest=md5)

    @property
    def profile(self) -> dict[str, int]:
        return {"num_rows": self.n_rows}

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self.profile)}


def repo_url(root: Path) -> str:
    """Where others find the repository: its `origin` remote (any credentials in it left out),
    else this path."""
    found = subprocess.run(["git", "-C", str(root), "remote", "get-url", "origin"],
                           capture_output=True, text=True)
    url = found.stdout.strip() if found.returncode == 0 else ""
    return safe_uri(url) if url else str(root)


def splits(root: Path, data_path: str, md5: str, git_rev: str, n_train: int,
           n_test: int) -> dict[str, SplitDataset]:
    """The train and held-out splits of one dataset version, by MLflow context."""
    source = DvcDatasetSource(repo_url(root), data_path, git_rev.removesuffix("-dirty"))
    name = Path(data_path).name
    return {"training": SplitDataset(source, f"{name}-train", md5, n_train),
            "evaluation": SplitDataset(source, f"{name}-held-out", md5, n_test)}


def log_splits(client: MlflowClient, run_id: str, datasets: dict[str, SplitDataset]) -> None:
    client.log_inputs(run_id, datasets=[
        DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(CONTEXT_TAG, context)])
        for context, ds in datasets.items()])
