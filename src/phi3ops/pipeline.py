"""The stage sequence of a retrain, written once: prepare -> fit -> score, then what is published.

    from phi3ops import pipeline
    prepared = pipeline.prepare(paths, cfg, pipeline.checkout(paths, cfg), checked)
    trained = pipeline.fit(paths, cfg, prepared, out_dir)
    scores = pipeline.score(paths, cfg, prepared, Path(trained.adapter_dir))

flows/retrain.py, `phi3ops train`, `phi3ops evaluate` and bench/pipeline_overhead.py all call
these. Plain functions, no Prefect: the flow passes its Prefect tasks in as the steps
(`checkout_version=`, `run_preprocess=`, `run_training=`, `evaluate=`, `register=`...), so retries
and caching stay in flows/ while the order of the work lives here. With a `run_id` a stage also
logs what it did to that MLflow run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from phi3ops import report
from phi3ops.config import MlflowConfig, PipelineConfig, ProjectPaths, sha256_json
from phi3ops.data import drift, preprocess, versions
from phi3ops.data.preprocess import PreprocessResult
from phi3ops.data.versions import DatasetVersion
from phi3ops.model.preflight import Preflight, preflight
from phi3ops.registry import code_version, promotion, runs, store
from phi3ops.registry.code_version import CodeVersion
from phi3ops.train import launch


@dataclass(frozen=True)
class Prepared:
    """A verified dataset version, preprocessed for this pipeline's tokenizer."""

    dataset: DatasetVersion
    prep: PreprocessResult
    template_note: str | None  # why the chat template will not see some rows as written

    @property
    def data_dir(self) -> Path:
        return Path(self.prep.out_dir)

    def splits(self, paths: ProjectPaths, cfg: PipelineConfig) -> dict:
        """Train and held-out split as MLflow datasets (mlflow_datasets.py), by context."""
        from phi3ops.data import mlflow_datasets

        return mlflow_datasets.splits(paths.root, cfg.data.path, self.dataset.md5,
                                 self.dataset.git_rev, self.prep.n_train, self.prep.n_test)


@dataclass(frozen=True)
class Started:
    """A retrain that passed preflight and has its MLflow run."""

    checked: Preflight
    run_id: str
    code: CodeVersion  # the commit, and the hash of what runs: part of what made a version
    closed_runs: list[str]  # runs left RUNNING by a process that died, marked FAILED now


def start(paths: ProjectPaths, cfg: PipelineConfig, mcfg: MlflowConfig) -> Started:
    """Preflight first (machine, weights, chat template: seconds, before any data moves), then
    the run; a run an earlier process left RUNNING when it died is closed as FAILED."""
    checked = preflight(cfg, paths.models)
    run_id = runs.start_run(mcfg, cfg, run_name=f"retrain-{cfg.name}")
    code = code_version.current(paths.root)
    runs.log_tags(run_id, {"phi3ops.code_git_rev": code.git_rev,
                               "phi3ops.code_hash": code.hash, "phi3ops.env_lock": code.env_lock})
    return Started(checked, run_id, code, runs.close_dead_runs(mcfg, run_id))


def made_before(mcfg: MlflowConfig, cfg: PipelineConfig, dataset: DatasetVersion,
                code: CodeVersion):
    """The registered, decided version this data, config and code made already (or None):
    training again would repeat it."""
    return store.already_decided(mcfg, dataset.md5, cfg.config_hash(), code.hash)


def checkout(paths: ProjectPaths, cfg: PipelineConfig, data_rev: str | None = None,
             run_id: str | None = None, checkout_version: Callable = versions.checkout_version,
             ) -> DatasetVersion:
    """The dataset version data.dvc names (at `data_rev`, or in the work tree), verified."""
    dataset = checkout_version(paths.root, cfg.data, data_rev)
    if run_id:
        runs.log_tags(run_id, {"phi3ops.dataset_md5": dataset.md5,
                                   "phi3ops.data_git_rev": dataset.git_rev,
                                   "phi3ops.data_rev": data_rev or "work tree"})
    return dataset


def prepare(paths: ProjectPaths, cfg: PipelineConfig, dataset: DatasetVersion,
            checked: Preflight | None = None, run_id: str | None = None,
            run_preprocess: Callable = preprocess.preprocess) -> Prepared:
    """Validate, deduplicate, fit to length, split and measure the dataset (cached by key)."""
    from phi3ops.model.base_model import load_tokenizer

    tokenizer = load_tokenizer(cfg.model, paths.models)
    prep = run_preprocess(Path(dataset.path), dataset.md5, cfg.preprocess, tokenizer,
                          paths.processed)
    note = None
    if checked is not None:
        note = checked.template.system_note(prep.messages_by_role.get("system", 0),
                                            prep.n_train + prep.n_test)
    prepared = Prepared(dataset, prep, note)
    if run_id:
        from phi3ops.data import mlflow_datasets

        runs.log_preprocess(run_id, prep)
        mlflow_datasets.log_splits(run_id, prepared.splits(paths, cfg))
    return prepared


def run_dir(paths: ProjectPaths, mcfg: MlflowConfig, cfg: PipelineConfig, dataset_md5: str,
            code: CodeVersion) -> Path:
    """Where a run trains: one directory per (model, data, config, code), so the rerun of a
    killed run resumes from its newest complete checkpoint."""
    return paths.runs / sha256_json([mcfg.registered_model, dataset_md5, cfg.config_hash(),
                                     code.hash])[:16]


def fit(paths: ProjectPaths, cfg: PipelineConfig, prepared: Prepared, out_dir: Path,
        run_id: str | None = None, tracking_uri: str | None = None,
        run_training: Callable = launch.run_training):
    """Train the adapter in child process(es); resumes from out_dir's newest checkpoint."""
    if run_id:
        runs.log_tags(run_id, {"phi3ops.run_dir": str(out_dir)})
    trained = run_training(cfg, prepared.data_dir, out_dir, paths.models, run_id=run_id,
                           tracking_uri=tracking_uri)
    if run_id:
        from phi3ops.train.throughput import loss_curve

        if trained.resumed_from:
            runs.log_tags(run_id, {"phi3ops.resumed_from": trained.resumed_from})
        runs.log_figure(run_id, loss_curve(trained.history), "train/loss_curve.png")
    return trained


def score(paths: ProjectPaths, cfg: PipelineConfig, prepared: Prepared, adapter_dir: Path,
          champion=None, run_id: str | None = None, evaluate: Callable | None = None):
    """Base, tuned and (given) champion on the same held-out conversations; logged to the run."""
    if evaluate is None:
        from phi3ops.evaluation.scoring import evaluate_adapter as evaluate
    scores = evaluate(cfg.model, cfg.evaluation, prepared.data_dir, adapter_dir, paths.models,
                      champion=champion)
    if run_id:
        runs.log_metrics(run_id, scores.flat(),
                             dataset=prepared.splits(paths, cfg)["evaluation"])
        runs.log_samples(run_id, scores.samples, "eval/samples.json")
    return scores


def data_drift(paths: ProjectPaths, cfg: PipelineConfig, mcfg: MlflowConfig,
               dataset: DatasetVersion, run_id: str | None = None) -> str | None:
    """How the data differs from the champion's, as markdown (None: same data, or no champion)."""
    champion = store.alias_version(mcfg, mcfg.champion_alias)
    if champion is None or champion.tags.get("phi3ops.dataset_md5") in (None, dataset.md5):
        return None
    diff = drift.diff_against_rev(paths.root, cfg.data, champion.tags["phi3ops.data_git_rev"],
                                  champion.tags["phi3ops.dataset_md5"], Path(dataset.path))
    if diff is None:
        return None
    if run_id:
        runs.log_text(run_id, diff.markdown(), "data/drift.md")
    return diff.markdown()


def lineage(cfg: PipelineConfig, dataset: DatasetVersion, code: CodeVersion,
            ) -> store.Lineage:
    """What made a version: the data, the config and the code."""
    return store.Lineage(dataset_md5=dataset.md5, data_git_rev=dataset.git_rev,
                            config_hash=cfg.config_hash(), code_git_rev=code.git_rev,
                            code_hash=code.hash, env_lock=code.env_lock, pipeline=cfg.name,
                            base_model=cfg.model.name_or_path)


def publish(paths: ProjectPaths, cfg: PipelineConfig, mcfg: MlflowConfig, checked: Preflight,
            prepared: Prepared, trained, out_dir: Path, code: CodeVersion,
            metrics: dict[str, float],
            run_id: str, champion_version: str | None,
            on_registered: Callable = lambda version: None,
            on_stage: Callable[[str], None] = lambda stage: None,
            register: Callable = store.register_adapter, merge: Callable | None = None,
            promote: Callable | None = None, record: Callable | None = None):
    """Register the adapter (and the merged model when asked), then promote it under the policy
    and record the decision. A version that was decided before keeps its decision."""
    from phi3ops.model.inference import merge_adapter  # torch and peft, only when a merge is asked

    merge, promote, record = (merge or merge_adapter, promote or promotion.promote,
                              record or promotion.record)
    made_by = lineage(cfg, prepared.dataset, code)
    base_dir = Path(checked.model_path) if Path(checked.model_path).is_dir() else None
    card = store.model_card(cfg, made_by, metrics)
    on_stage("register")
    held_out = prepared.splits(paths, cfg)["evaluation"]
    about = promotion.model_description(mcfg, cfg.model.name_or_path)
    version = register(mcfg, run_id, Path(trained.adapter_dir), base_dir, made_by, metrics,
                       cfg.evaluation.max_new_tokens, evaluated_against=champion_version,
                       card=card, held_out=held_out, about=about)
    on_registered(version)
    if cfg.registration.merged:
        on_stage("merge")
        merged_dir = merge(cfg.model, Path(trained.adapter_dir), out_dir / "merged", paths.models)
        register(mcfg, run_id, None, merged_dir, made_by, metrics,
                 cfg.evaluation.max_new_tokens, card=card, artifact_type="merged",
                 held_out=held_out)
    if "promotion.decision" in version.tags:  # a rerun: that decision stands
        decision = report.standing_decision(version, champion_version)
    else:
        on_stage("promote")
        decision = promote(mcfg, version.version, by=f"run {run_id}")
    on_stage("record")
    record(mcfg, run_id, decision)
    return version, decision
