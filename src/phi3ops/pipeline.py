"""The retrain sequence, written once: checkout -> preprocess -> train -> evaluate -> publish.

    run, _ = pipeline.start(paths, cfg, mcfg)           # preflight, then the MLflow run
    result = pipeline.Retrain(run, LocalSteps())(data_rev=None, force=False)

flows/retrain.py runs `Retrain` with Prefect's steps; `phi3ops train`, `phi3ops evaluate` and
bench/pipeline_overhead.py call the stages below (`prepare`, `fit`, `score`) with the local ones.
A stage is a step plus what it logs to the MLflow run, when there is one (`run.run_id`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from phi3ops import report
from phi3ops.config import MlflowConfig, PipelineConfig, ProjectPaths, sha256_json
from phi3ops.data.preprocess import PreprocessResult
from phi3ops.data.versions import DatasetVersion
from phi3ops.errors import DataError
from phi3ops.registry import code_version, promotion, runs, store
from phi3ops.registry.client import Registry
from phi3ops.steps import LocalSteps, Publishing, Run, Steps
from phi3ops.train.launch import LOG_FILE

LOCAL = LocalSteps()


@dataclass(frozen=True)
class Prepared:
    """A verified dataset version, preprocessed for this pipeline's tokenizer."""

    dataset: DatasetVersion
    prep: PreprocessResult
    template_note: str | None  # why the chat template will not see some rows as written

    @property
    def data_dir(self) -> Path:
        return Path(self.prep.out_dir)

    def splits(self, run: Run) -> dict:
        """Train and held-out split as MLflow datasets (mlflow_datasets.py), by context."""
        from phi3ops.data import mlflow_datasets

        return mlflow_datasets.splits(run.paths.root, run.cfg.data.path, self.dataset.md5,
                                      self.dataset.git_rev, self.prep.n_train, self.prep.n_test)


def start(paths: ProjectPaths, cfg: PipelineConfig, mcfg: MlflowConfig) -> tuple[Run, list[str]]:
    """Preflight first (machine, weights, chat template: seconds, before any data moves), then
    the MLflow run. Also returns the runs an earlier process left RUNNING when it died, which
    are closed as FAILED now."""
    from phi3ops.model.preflight import preflight

    checked = preflight(cfg, paths.models)
    registry = Registry(mcfg)
    run_id = runs.start_run(registry, cfg, run_name=f"retrain-{cfg.name}")
    code = code_version.current(paths.root)
    runs.log_tags(registry, run_id, {"phi3ops.code_git_rev": code.git_rev,
                           "phi3ops.code_hash": code.hash, "phi3ops.env_lock": code.env_lock})
    return (Run(paths, cfg, registry, run_id, code, checked),
            runs.close_dead_runs(registry, run_id))


def checkout(run: Run, data_rev: str | None = None, steps: Steps = LOCAL) -> DatasetVersion:
    """The dataset version data.dvc names (at `data_rev`, or in the work tree), verified."""
    dataset = steps.checkout(run, data_rev)
    if run.run_id:
        runs.log_tags(run.registry, run.run_id, {"phi3ops.dataset_md5": dataset.md5,
                                   "phi3ops.data_git_rev": dataset.git_rev,
                                   "phi3ops.data_rev": data_rev or "work tree"})
    return dataset


def report_data(run: Run, dataset: DatasetVersion, steps: Steps = LOCAL):
    """The data report (data/inspection.py), shown and logged; a secret in the data fails the
    run before anything is trained on it, unless `preprocess.on_secrets: warn`."""
    from phi3ops.data.inspection import inspect_files
    from phi3ops.data.validation import jsonl_files

    found = inspect_files(jsonl_files(Path(dataset.path)), Path(dataset.path), run.cfg.preprocess)
    steps.show("data-report", found.markdown())
    if run.run_id:
        runs.log_text(run.registry, run.run_id, found.markdown(), "data/report.md")
        runs.log_samples(run.registry, run.run_id, [
            {"where": f.where, "kind": f.kind, "shown": f.shown} for f in found.findings],
            "data/findings.json")
    if found.secrets and run.cfg.preprocess.on_secrets == "fail":
        raise DataError(
            f"{len(found.secrets)} secret(s) in dataset {dataset.md5}, which the model would "
            "learn and repeat: " + "; ".join(map(str, found.secrets[:5])) + ". Remove them and "
            "record the data again (`phi3ops data version`), or set preprocess.on_secrets: warn.")
    return found


def prepare(run: Run, dataset: DatasetVersion, steps: Steps = LOCAL) -> Prepared:
    """Validate, deduplicate, fit to length, split and measure the dataset (cached by key)."""
    from phi3ops.model.base_model import load_tokenizer

    prep = steps.preprocess(run, dataset, load_tokenizer(run.cfg.model, run.paths.models))
    note = None
    if run.checked is not None:
        note = run.checked.template.system_note(prep.messages_by_role.get("system", 0),
                                                prep.n_train + prep.n_test)
    prepared = Prepared(dataset, prep, note)
    if run.run_id:
        from phi3ops.data import mlflow_datasets

        runs.log_preprocess(run.registry, run.run_id, prep)
        mlflow_datasets.log_splits(run.registry.client, run.run_id, prepared.splits(run))
    return prepared


def run_dir(run: Run, dataset_md5: str) -> Path:
    """Where a run trains: one directory per (model, data, config, code), so the rerun of a
    killed run resumes from its newest complete checkpoint."""
    return run.paths.runs / sha256_json([run.registry.model, dataset_md5,
                                         run.cfg.config_hash(), run.code.hash])[:16]


def fit(run: Run, prepared: Prepared, out_dir: Path, steps: Steps = LOCAL):
    """Train the adapter in child process(es); resumes from out_dir's newest checkpoint."""
    if run.run_id:
        runs.log_tags(run.registry, run.run_id, {"phi3ops.run_dir": str(out_dir)})
    trained = steps.train(run, prepared.data_dir, out_dir)
    if run.run_id:
        from phi3ops.train.throughput import loss_curve

        if trained.resumed_from:
            runs.log_tags(run.registry, run.run_id,
                          {"phi3ops.resumed_from": trained.resumed_from})
        runs.log_figure(run.registry, run.run_id, loss_curve(trained.history),
                        "train/loss_curve.png")
    return trained


def score(run: Run, prepared: Prepared, adapter_dir: Path, champion=None,
          steps: Steps = LOCAL):
    """Base, tuned and (given) champion on the same held-out conversations; logged to the run."""
    scores = steps.evaluate(run, prepared.data_dir, adapter_dir, champion)
    if run.run_id:
        runs.log_metrics(run.registry, run.run_id, scores.flat(),
                         dataset=prepared.splits(run)["evaluation"])
        runs.log_samples(run.registry, run.run_id, scores.samples, "eval/samples.json")
    return scores


def data_drift(run: Run, dataset: DatasetVersion) -> str | None:
    """How the data differs from the champion's, as markdown (None: same data, or no champion)."""
    from phi3ops.data import drift

    champion = run.registry.alias(run.registry.config.champion_alias)
    if champion is None or champion.tags.get("phi3ops.dataset_md5") in (None, dataset.md5):
        return None
    diff = drift.diff_against_rev(run.paths.root, run.cfg.data,
                                  champion.tags["phi3ops.data_git_rev"],
                                  champion.tags["phi3ops.dataset_md5"], Path(dataset.path))
    if diff is None:
        return None
    runs.log_text(run.registry, run.run_id, diff.markdown(), "data/drift.md")
    return diff.markdown()


def lineage(run: Run, dataset: DatasetVersion) -> store.Lineage:
    """What made a version: the data, the config and the code."""
    cfg, code = run.cfg, run.code
    return store.Lineage(dataset_md5=dataset.md5, data_git_rev=dataset.git_rev,
                         config_hash=cfg.config_hash(), code_git_rev=code.git_rev,
                         code_hash=code.hash, env_lock=code.env_lock, pipeline=cfg.name,
                         base_model=cfg.model.name_or_path)


class Retrain:
    """One retrain, stage by stage, through `steps`. One MLflow run; a failure marks it FAILED
    and never reaches promotion, so `@champion` stays where it was; registration and promotion
    are one publishing transaction, whose failure puts the aliases back. `stage` names the stage
    running, which the failure report names."""

    def __init__(self, run: Run, steps: Steps = LOCAL):
        self.run, self.steps = run, steps
        self.stage = "version_data"
        self.published: Publishing | None = None

    def __call__(self, data_rev: str | None = None, force: bool = False) -> dict:
        """The flow's result: version, decision, metrics (or why nothing was trained)."""
        try:
            return self.stages(data_rev, force)
        except BaseException as e:
            runs.end_run(self.run.registry, self.run.run_id, failed=True)
            before = self.published.aliases_before if self.published else None
            self.steps.show("retrain-failure", report.failure(
                self.run, self.stage, e, before, self.aliases_now() if before else None))
            raise

    def aliases_now(self) -> dict[str, str | None] | Exception:
        """Where the aliases point after a failure; the error, when reading them fails too."""
        try:
            return promotion.alias_snapshot(self.run.registry)
        except Exception as e:  # noqa: BLE001 - reported, never raised over the run's failure
            return e

    def at(self, stage: str) -> None:
        self.stage = stage
        self.steps.log.info("stage: %s", stage)

    def stages(self, data_rev: str | None, force: bool) -> dict:
        run, steps, log = self.run, self.steps, self.steps.log
        dataset = checkout(run, data_rev, steps)
        if data_rev is None:  # the work tree's version: on the remote before it is trained on
            steps.push(run)
        same = None if force else store.already_decided(
            run.registry, dataset.md5, run.cfg.config_hash(), run.code.hash)
        if same is not None:  # training again would repeat that version
            result, markdown = report.nothing_changed(run, same, dataset.md5)
            runs.end_skipped(run.registry, run.run_id, result["reason"])
            steps.show("retrain-summary", markdown)
            log.info(result["reason"])
            return result
        if drift := data_drift(run, dataset):
            steps.show("data-drift", drift)
        self.at("preprocess")
        report_data(run, dataset, steps)
        prepared = prepare(run, dataset, steps)
        log.info("preprocess: %s", prepared.prep.summary())
        if prepared.template_note:
            log.warning(prepared.template_note)
        self.at("train")
        requirements_checked = store.check_requirements_in_background()  # while it trains
        out_dir = run_dir(run, dataset.md5)
        if force:  # trained from scratch, not resumed from what an earlier run left
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
        log.info("training log: %s", out_dir / LOG_FILE)
        trained = fit(run, prepared, out_dir, steps)
        if trained.resumed_from:
            log.info("training resumed from %s", trained.resumed_from)
        self.at("evaluate")
        champion = store.load_champion(run.registry)
        scores = score(run, prepared, Path(trained.adapter_dir),
                       champion[1] if champion else None, steps)
        steps.show("sample-answers", "first held-out answers of each model",
                   table=scores.samples[:20])
        metrics = scores.flat()
        requirements_checked.join()
        self.published = Publishing(run.registry, run.run_id,
                                    promotion.alias_snapshot(run.registry),
                                    champion[0] if champion else None)
        with steps.publishing(self.published) as state:
            version, decision = self.publish(prepared, trained, metrics, state)
        runs.end_run(run.registry, run.run_id)
        result, markdown = report.summary(run, version, decision, prepared, trained, metrics)
        steps.show("retrain-summary", markdown)
        log.info("registered %s v%s; %s", run.registry.model, version.version,
                 decision.reason)
        return result

    def publish(self, prepared: Prepared, trained, metrics: dict[str, float],
                state: Publishing):
        """Register the adapter (and the merged model when asked), then promote it under the
        policy and record the decision. A version that was decided before keeps its decision."""
        run, steps = self.run, self.steps
        self.at("register")
        made_by = lineage(run, prepared.dataset)
        base_dir = Path(run.checked.model_path)  # a local directory, or a hub id
        candidate = store.Candidate(
            made_by, metrics, Path(trained.adapter_dir), base_dir if base_dir.is_dir() else None,
            run.cfg.evaluation.max_new_tokens, card=store.model_card(run.cfg, made_by, metrics),
            about=promotion.model_description(run.registry.config, run.cfg.model.name_or_path),
            held_out=prepared.splits(run)["evaluation"], evaluated_against=state.champion)
        version = steps.register(run, candidate)
        state.version = version.version
        if run.cfg.registration.merged:
            self.at("merge")
            merged_dir = steps.merge(run, Path(trained.adapter_dir),
                                     run_dir(run, prepared.dataset.md5) / "merged")
            steps.register(run, store.Candidate(
                made_by, metrics, None, merged_dir, candidate.max_new_tokens, card=candidate.card,
                held_out=candidate.held_out, artifact_type="merged"))
        if "promotion.decision" in version.tags:  # a rerun: that decision stands
            decision = report.standing_decision(version, state.champion)
        else:
            self.at("promote")
            decision = steps.promote(run, version.version)
            state.promoted = True
        self.at("record")
        steps.record(run, decision)
        return version, decision
