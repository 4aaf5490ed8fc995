"""The MLflow model registry: the registered adapter with its lineage, and loading it back.

    phi3ops chat --alias champion "What is the capital of France?"

Every registered version gets `@challenger`; promotion.py decides whether `@champion` moves.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.utils.requirements_utils import (  # not public: the check log_model runs itself,
    warn_dependency_requirement_mismatches,  # run early here to warm its cache
)

from phi3ops.config import PipelineConfig, sha256_json
from phi3ops.registry.client import Registry
from phi3ops.registry.runs import log_metrics
from phi3ops.registry.trusted_load import (
    MANIFEST_TAG,
    artifact_manifest,
    inspect_version,
    load_verified,
)
from phi3ops.serve.artifacts import INPUT_EXAMPLE, MODEL_CODE, RUNTIME_CODE, model_artifacts

if TYPE_CHECKING:  # types only: chat and serving load no `datasets`
    from mlflow.data.dataset import Dataset


log = logging.getLogger(__name__)
SIGNATURE = infer_signature(INPUT_EXAMPLE, ["The capital of France is Paris."])  # messages in
HISTORY_TAG = "phi3ops.history"  # a version's append-only history, one event per line
LEGACY_HISTORY = "history."  # how versions registered before kept it: history.001, ...
RUNTIME_PACKAGES = ("torch", "transformers", "peft", "loralib", "accelerate", "safetensors",
                    "tokenizers", "mlflow", "pandas")


def pip_requirements() -> list[str]:
    """What a registered model needs to load: the runtime packages, pinned as installed, without
    a local build label (torch's `+cpu`), which the public index does not resolve."""
    return [f"{p}=={installed_version(p).split('+')[0]}" for p in RUNTIME_PACKAGES]


def check_requirements_in_background() -> threading.Thread:
    """log_model checks the model's requirements against this environment by mapping every
    installed package's files: about a second, once per process. Started while the training
    child is importing and training, it is done by registration time and costs the run nothing."""
    thread = threading.Thread(target=warn_dependency_requirement_mismatches,
                              args=(pip_requirements(),), name="mlflow-requirements", daemon=True)
    thread.start()
    return thread


VERSION_LINEAGE = ("dataset_md5", "data_git_rev", "config_hash", "code_git_rev", "code_hash")


@dataclass
class Lineage:
    dataset_md5: str
    data_git_rev: str
    config_hash: str
    code_git_rev: str  # the commit, for people
    code_hash: str  # what ran (code_version.py): what "same code" compares
    env_lock: str  # sha256 of requirements.lock, the environment it ran in
    pipeline: str
    base_model: str

    def tags(self) -> dict[str, str]:
        """What the version carries; the pipeline and base model are in its card and model
        config, the environment lock in its run's tags: a version keeps 12 tags or fewer."""
        return {f"phi3ops.{k}": getattr(self, k) for k in VERSION_LINEAGE}


def history_entry(event: str, by: str) -> str:
    return f"{datetime.now(UTC).isoformat(timespec='seconds')} {event} (by {by})"


def registration_key(dataset_md5: str, config_hash: str, code_hash: str,
                     artifact_type: str = "adapter") -> str:
    """Same data, config and code give the same key, and so the same registered version."""
    return sha256_json([dataset_md5, config_hash, code_hash, artifact_type])[:16]


def find_version(registry: Registry, name: str, key: str) -> ModelVersion | None:
    """The oldest version with this key. Newer ones are duplicates, left by a create whose reply
    was lost before a retry (at-least-once over HTTP); they are deleted so the key stays unique."""
    client = registry.client
    same = sorted((v for v in client.search_model_versions(f"name='{name}'")
                   if v.tags.get("phi3ops.registration_key") == key), key=lambda v: int(v.version))
    for duplicate in same[1:]:
        log.warning("deleting %s v%s: a duplicate of v%s (same registration key)",
                    name, duplicate.version, same[0].version)
        client.delete_model_version(name, duplicate.version)
    return same[0] if same else None


def model_card(cfg: PipelineConfig, lineage: Lineage, metrics: dict[str, float]) -> str:
    """The version's description in the registry: what it is, what made it, how good it is."""
    metric = ["| metric | base | tuned | tuned - base (95% CI) |", "| --- | --- | --- | --- |"]
    for name in ("rougeL", "rouge1", "bleu", "chrf", "exact_match", "perplexity"):
        if f"tuned_{name}" in metrics:
            delta = metrics.get(f"delta_base_{name}")
            ci = (f"{delta:+.4f} ({metrics[f'delta_base_{name}_lo']:+.4f} .. "
                  f"{metrics[f'delta_base_{name}_hi']:+.4f})" if delta is not None else "")
            metric.append(f"| {name} | {metrics[f'base_{name}']:.4f} | "
                          f"{metrics[f'tuned_{name}']:.4f} | {ci} |")
    lora = cfg.peft_config
    train = cfg.training_config
    return "\n".join([
        f"# {cfg.name}: LoRA adapter for `{lineage.base_model}`", "",
        f"- data: DVC md5 `{lineage.dataset_md5}` at git `{lineage.data_git_rev}`",
        f"- code: git `{lineage.code_git_rev}` (hash of what ran `{lineage.code_hash[:12]}`); "
        f"pipeline config hash `{lineage.config_hash}`",
        f"- LoRA ({cfg.adapter.backend}): r={lora.r}, alpha={lora.lora_alpha}, "
        f"dropout={lora.lora_dropout}, "
        f"targets {', '.join(lora.target_modules)}",
        f"- training: lr {train.learning_rate}, batch {train.per_device_train_batch_size} x "
        f"{train.gradient_accumulation_steps}, epochs {train.num_train_epochs}, "
        f"scheduler {train.lr_scheduler_type}, max length {train.max_length}", "",
        *metric, "",
    ])


@dataclass(frozen=True)
class Candidate:
    """What one registration logs: the weights, what made them, how they scored."""

    lineage: Lineage
    metrics: dict[str, float]
    adapter_dir: Path | None  # None: a merged model, its weights in base_dir
    base_dir: Path | None  # None: the base model comes from the hub by name
    max_new_tokens: int
    card: str = ""  # the version's description
    about: str = ""  # the registered model's description
    held_out: Dataset | None = None  # the split the metrics were computed on
    evaluated_against: str | None = None  # the champion version scored on that split
    artifact_type: str = "adapter"


def version_tags(registry: Registry, run_id: str, candidate: Candidate, key: str) -> dict:
    """Lineage, key, file hashes and the first history line: set with the version itself, so
    none is ever missing."""
    adapter = candidate.artifact_type == "adapter"
    tags = {**candidate.lineage.tags(), "phi3ops.artifact_type": candidate.artifact_type,
            "phi3ops.registration_key": key,
            MANIFEST_TAG: artifact_manifest(candidate.adapter_dir, candidate.base_dir),
            HISTORY_TAG: history_entry("registered" + (
                f", @{registry.config.challenger_alias}" if adapter else ""), f"run {run_id}")}
    if candidate.evaluated_against is not None:  # the champion, scored on the same split
        tags["phi3ops.evaluated_against"] = candidate.evaluated_against
    return tags


def create_version(registry: Registry, name: str, info, tags: dict) -> ModelVersion:
    """A version of `name` (created on first use) for the logged model `info`. What
    `mlflow.register_model` does, on this registry's client rather than the process-wide one."""
    try:
        registry.client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise  # else: registered before, by this run or another
    return registry.client.create_model_version(name, info.model_uri, tags=tags,
                                                model_id=info.model_id)


def register_adapter(registry: Registry, run_id: str, candidate: Candidate) -> ModelVersion:
    """Log the model in the run, register it and set `@challenger`. Idempotent: the same
    (data, config, code) gives the existing version, also when a retry follows a failure.
    A merged model (`artifact_type="merged"`, base_dir = merged weights, no adapter) goes to
    `<name>-merged`, without aliases: promotion is decided on the adapter."""
    mcfg, client = registry.config, registry.client
    lineage, metrics, artifact_type = candidate.lineage, candidate.metrics, candidate.artifact_type
    adapter_dir, base_dir = candidate.adapter_dir, candidate.base_dir
    name = mcfg.registered_model
    if artifact_type != "adapter":
        name = f"{name}-merged"
    key = registration_key(lineage.dataset_md5, lineage.config_hash, lineage.code_hash,
                           artifact_type)

    existed = registry.retried("reach MLflow", lambda: find_version(
        registry, name, key)) is not None  # a rerun: its aliases stay as they are

    def register_once() -> ModelVersion:
        existing = find_version(registry, name, key)
        if existing is not None:
            log.info("%s v%s already holds this data, config and code", name, existing.version)
            return existing
        # MLflow's module functions, on this server: log_model has no client form.
        with registry.as_process_default(), mlflow.start_run(run_id=run_id):
            # A signature, no input example: MLflow would check the example by loading the whole
            # model and generating, which for Phi-3-mini means minutes and its full weights in
            # memory once more. Loading and serving the registered model is tested end to end.
            info = mlflow.pyfunc.log_model(
                name=artifact_type,
                python_model=MODEL_CODE,
                code_paths=[RUNTIME_CODE],  # imported by MODEL_CODE: no phi3ops needed to load
                artifacts=model_artifacts(adapter_dir, base_dir),
                model_config={"base_model": lineage.base_model,
                              "max_new_tokens": candidate.max_new_tokens},
                signature=SIGNATURE,
                pip_requirements=pip_requirements(),
            )
            log_metrics(registry, run_id, metrics, dataset=candidate.held_out,
                        model_id=info.model_id)
            tags = version_tags(registry, run_id, candidate, key)
            return create_version(registry, name, info, tags)

    registry.retried(f"register {name}", register_once)
    version = registry.retried("check the key is unique",
                               lambda: find_version(registry, name, key))
    registry.retried("describe the version", lambda: client.update_model_version(
        name, version.version, description=candidate.card))
    if candidate.about:
        registry.retried("describe the model", lambda: client.update_registered_model(
            name, description=candidate.about))
    if artifact_type == "adapter" and not existed:  # never back to an older version
        registry.retried("set @challenger", lambda: client.set_registered_model_alias(
            name, mcfg.challenger_alias, version.version))
    return version


def version_metrics(registry: Registry, version: ModelVersion) -> dict[str, float]:
    """A version's evaluation metrics: those of its logged model, or the `metric.*` tags of a
    version registered before phi3ops logged metrics to the model."""
    if version.metrics is not None:
        return {m.key: m.value for m in version.metrics}
    scores = {}
    if version.source and version.source.startswith("models:/m-"):  # MLflow 3's logged model
        scores = registry.retried("read the model's metrics", lambda: {
            m.key: m.value for m in registry.client.get_logged_model(
                version.source.removeprefix("models:/")).metrics or []})
    return scores or {k.removeprefix("metric."): float(v) for k, v in version.tags.items()
                      if k.startswith("metric.")}


def already_decided(registry: Registry, dataset_md5: str, config_hash: str,
                    code_hash: str) -> ModelVersion | None:
    """The version already trained on this very data, config and code (code_version.py),
    champion or not, once its promotion was decided (a version whose run died before that is
    trained again: the run resumes, and the decision is made)."""
    found = find_version(registry, registry.model,
                         registration_key(dataset_md5, config_hash, code_hash))
    return found if found is not None and "promotion.decision" in found.tags else None


def check_registered(registry: Registry, uri: str) -> ModelVersion:
    """Before any heavy work: the version behind `uri` exists and phi3ops registered it."""
    return inspect_version(registry.uri, uri)


def load_registered(registry: Registry, uri: str):
    """The chat model (chat_runtime.ChatModel) behind `models:/NAME@ALIAS`, `models:/NAME/N` or
    `runs:/ID/adapter`, loaded by phi3ops' own code from files checked against the hashes
    recorded at registration. Never mlflow.pyfunc.load_model: it runs whatever code a version
    names, and anyone who can write to the registry can add a version (trusted_load.py)."""
    return load_verified(registry.uri, uri)


def load_chat_model(registry: Registry, uri: str):
    """(model, tokenizer) inside a registered phi3ops model, for scoring or generation."""
    chat = load_registered(registry, uri)
    return chat.model, chat.tokenizer


def load_champion(registry: Registry):
    """(version, (model, tokenizer)) of the current champion, to score it on this run's split;
    None when there is no champion yet."""
    champion = registry.alias(registry.config.champion_alias)
    if champion is None:
        return None
    return champion.version, load_chat_model(
        registry, f"models:/{registry.model}/{champion.version}")
