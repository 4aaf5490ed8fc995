"""The steps of a retrain, as one object the sequence (pipeline.py) calls.

`LocalSteps` calls the library directly: `phi3ops train`, `phi3ops evaluate` and the benches use
it. flows/steps.py makes each step a Prefect task (retries, caching, the publishing transaction)
by subclassing it, so both run the same code and the order of the work is written once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from phi3ops.config import PipelineConfig, ProjectPaths
from phi3ops.registry import promotion, store
from phi3ops.registry.client import Registry
from phi3ops.registry.code_version import CodeVersion

if TYPE_CHECKING:  # types only: the CLI's light commands import no torch
    from phi3ops.data.preprocess import PreprocessResult
    from phi3ops.data.versions import DatasetVersion
    from phi3ops.evaluation.scoring import EvalResult
    from phi3ops.model.preflight import Preflight
    from phi3ops.train.trainer import TrainResult


@dataclass(frozen=True)
class Run:
    """What every step of one retrain is given: where, what, and the MLflow run it logs to.
    Outside the flow (`phi3ops train`) there is no MLflow run: `registry` and `run_id` are None."""

    paths: ProjectPaths
    cfg: PipelineConfig
    registry: Registry | None = None
    run_id: str | None = None
    code: CodeVersion | None = None  # the commit and hash of what runs: part of a version's key
    checked: Preflight | None = None  # machine, weights and template, checked before any data

    @property
    def tracking_uri(self) -> str | None:
        return self.registry.uri if self.registry else None


@dataclass
class Publishing:
    """What registration and promotion did so far: all a rollback reads."""

    registry: Registry
    run_id: str
    aliases_before: dict[str, str | None]
    champion: str | None  # the version the candidate was scored against
    version: str | None = None  # registered: `@challenger` may have moved
    promoted: bool = False  # `@champion` may have moved

    def undo_register(self) -> None:
        """`@challenger` back where it was. The version stays: a rerun finds it by its key."""
        self.registry.retried("put @challenger back", lambda: promotion.undo_challenger(
            self.registry, self.aliases_before, self.version))

    def undo_promote(self) -> None:
        """`@champion` and `@previous-champion` back where they were."""
        reason = f"run {self.run_id} failed after promoting it; rolled back"
        self.registry.retried("put @champion back", lambda: promotion.undo_promotion(
            self.registry, self.aliases_before, self.version, reason, by=f"run {self.run_id}"))


class Steps(Protocol):
    """One retrain's work, step by step; what each step returns is what the next one needs."""

    log: logging.Logger | logging.LoggerAdapter

    def checkout(self, run: Run, data_rev: str | None) -> DatasetVersion: ...
    def push(self, run: Run) -> None: ...
    def preprocess(self, run: Run, dataset: DatasetVersion, tokenizer) -> PreprocessResult: ...
    def train(self, run: Run, data_dir: Path, out_dir: Path) -> TrainResult: ...
    def evaluate(self, run: Run, data_dir: Path, adapter_dir: Path, champion) -> EvalResult: ...
    def register(self, run: Run, candidate: store.Candidate): ...
    def merge(self, run: Run, adapter_dir: Path, out_dir: Path) -> Path: ...
    def promote(self, run: Run, version: str) -> promotion.PromotionDecision: ...
    def record(self, run: Run, decision: promotion.PromotionDecision) -> None: ...
    def publishing(self, state: Publishing) -> AbstractContextManager[Publishing]:
        """Registration and promotion as one: if anything inside fails, the aliases go back."""
    def show(self, key: str, text: str, table: list[dict] | None = None) -> None:
        """A report for whoever watches the run: markdown (summary, failure, drift), or a table
        with `text` as its description."""


class LocalSteps:
    """The steps in this process, calling the library: no retries, no cache, no Prefect."""

    log: logging.Logger | logging.LoggerAdapter = logging.getLogger("phi3ops.retrain")

    def checkout(self, run: Run, data_rev: str | None) -> DatasetVersion:
        from phi3ops.data.versions import checkout_version

        return checkout_version(run.paths.root, run.cfg.data, data_rev)

    def push(self, run: Run) -> None:
        from phi3ops.data.versions import push_version

        push_version(run.paths.root, run.cfg.data)

    def preprocess(self, run: Run, dataset: DatasetVersion, tokenizer) -> PreprocessResult:
        from phi3ops.data.preprocess import preprocess

        return preprocess(Path(dataset.path), dataset.md5, run.cfg.preprocess, tokenizer,
                          run.paths.processed)

    def train(self, run: Run, data_dir: Path, out_dir: Path) -> TrainResult:
        from phi3ops.train.launch import run_training

        return run_training(run.cfg, data_dir, out_dir, run.paths.models, run_id=run.run_id,
                            tracking_uri=run.tracking_uri)

    def evaluate(self, run: Run, data_dir: Path, adapter_dir: Path, champion) -> EvalResult:
        from phi3ops.evaluation.scoring import evaluate_adapter

        return evaluate_adapter(run.cfg.model, run.cfg.evaluation, data_dir, adapter_dir,
                                run.paths.models, champion=champion)

    def register(self, run: Run, candidate: store.Candidate):
        return store.register_adapter(run.registry, run.run_id, candidate)

    def merge(self, run: Run, adapter_dir: Path, out_dir: Path) -> Path:
        from phi3ops.model.inference import merge_adapter  # torch and peft: only when asked

        return merge_adapter(run.cfg.model, adapter_dir, out_dir, run.paths.models)

    def promote(self, run: Run, version: str) -> promotion.PromotionDecision:
        return promotion.promote(run.registry, version, by=f"run {run.run_id}")

    def record(self, run: Run, decision: promotion.PromotionDecision) -> None:
        promotion.record(run.registry, run.run_id, decision)

    @contextmanager
    def publishing(self, state: Publishing) -> Iterator[Publishing]:
        try:
            yield state
        except BaseException:
            if state.promoted:
                state.undo_promote()
            if state.version is not None:
                state.undo_register()
            raise

    def show(self, key: str, text: str, table: list[dict] | None = None) -> None:
        if table is None:
            self.log.info("%s:\n%s", key, text)
