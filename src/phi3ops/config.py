"""Typed configuration: one pipeline YAML (pipelines/*.yaml) plus mlflow.yaml.

    phi3ops run --pipeline pipelines/tiny-cpu.yaml training_config.max_steps=20

Every model is frozen and forbids unknown keys, so a typo fails at load with its dotted path
instead of being silently ignored deep inside a library call.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from phi3ops.errors import ConfigError
from phi3ops.model.templates import resolve_setting

TINY_MODEL = "tiny-phi3"
PHI3_VOCAB_SIZE = 32064
PHI3_FUSED_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# Names from Llama-style models that Phi-3 does not have: it fuses q/k/v into qkv_proj and
# gate/up into gate_up_proj. peft would silently adapt only the remaining layers.
UNFUSED_NAMES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                 "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModelConfig(_Frozen):
    """Dimensions of the CPU-sized Phi3ForCausalLM built locally (same architecture, small dims)."""

    hidden_size: int = Field(128, gt=0)
    intermediate_size: int = Field(256, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(4, gt=0)
    max_position_embeddings: int = Field(512, gt=0)
    tokenizer: Literal["trained-bpe", "phi3"] = Field(
        "trained-bpe", description="a BPE trained on the demo corpus, or Phi-3's own (32,064 "
        "tokens, built from llama.cpp's vocabulary: make phi3-tokenizer)")
    vocab_size: int = Field(1024, ge=300, description="tokens: the BPE's target size, or 32064")
    pretrain_steps: int = Field(
        600, ge=0, description="causal-LM steps on plain demo text so the base knows the facts"
    )
    pretrain_learning_rate: float = Field(3e-3, gt=0)
    seed: int = 0


class QuantizationConfig(_Frozen):
    """QLoRA: the frozen base loaded in 4 bits through bitsandbytes (needs a CUDA GPU)."""

    load_in_4bit: Literal[True] = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    double_quant: bool = Field(True, description="quantise the quantisation constants too")


class ModelConfig(_Frozen):
    name_or_path: str = Field(description=f"hub id, local directory, or '{TINY_MODEL}'")
    revision: str | None = None
    tiny: TinyModelConfig | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    quantization: QuantizationConfig | None = Field(
        None, description="load the base in 4 bits for training (QLoRA); merging uses full weights"
    )
    chat_template: str | None = Field(
        None, description="replaces the tokenizer's: phi3, phi3-2024-04, phi3.5, a .jinja file "
        "(relative to the project root) or the template itself; resolved to its text at load"
    )


class DataConfig(_Frozen):
    path: str = "data"
    dvc_file: str = "data.dvc"
    demo_if_missing: bool = Field(
        True, description="regenerate the seeded demo dataset when data/ is absent and not pullable"
    )
    push: bool = True


class PreprocessConfig(_Frozen):
    test_fraction: float = Field(0.1, gt=0, lt=1)
    max_length: int = Field(512, gt=0, description="token budget of one conversation")
    overlength: Literal["truncate", "drop"] = Field(
        "truncate", description="cut a longer conversation after its last fitting assistant turn"
    )
    max_reject_fraction: float = Field(
        0.2, ge=0, le=1, description="fail the run when more of the input than this is rejected"
    )
    on_secrets: Literal["fail", "warn"] = Field(
        "fail", description="a key or token in the data (data/inspection.py) fails the run, or "
        "is only reported"
    )
    seed: int = 0


class TrainingConfig(_Frozen):
    """The Cookbook's `training_config` dictionary, typed."""

    learning_rate: float = Field(gt=0)
    per_device_train_batch_size: int = Field(gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="-1 trains for num_train_epochs")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(512, gt=0)
    assistant_only_loss: bool = Field(True, description="loss on assistant replies only")
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(100, gt=0)
    save_total_limit: int = Field(2, gt=0)
    gradient_checkpointing: bool = False
    use_cache: bool = Field(False, description="KV cache is useless in training and costs memory")
    packing: bool = Field(False, description="pack conversations into max_length rows (BFD)")
    padding_free: bool = Field(
        False, description="concatenate a batch into one row with position ids: no pad tokens"
    )
    group_by_length: bool = Field(False, description="batch conversations of similar length")
    seed: int = 0


class PeftLoraConfig(_Frozen):
    """The Cookbook's `peft_config` dictionary, typed."""

    r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    bias: Literal["none", "all", "lora_only"] = "none"
    task_type: Literal["CAUSAL_LM"] = "CAUSAL_LM"
    target_modules: tuple[str, ...] = PHI3_FUSED_TARGETS


class AdapterConfig(_Frozen):
    backend: Literal["peft", "loralib"] = Field(
        "peft", description="peft + trl (default), or the Cookbook's loralib recipe"
    )


class LaunchConfig(_Frozen):
    """How training runs: in a child process (killed after timeout_s), on one or more ranks,
    on one machine or several (torchrun's c10d rendezvous: every node runs the same config)."""

    nproc: int = Field(1, ge=1, description="processes per node; over one: DDP/FSDP")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: gloo on CPU, nccl on GPU; fsdp: GPUs only, shards the base"
    )
    timeout_s: int = Field(
        3600, gt=0, description="a hung step is killed; the retry resumes from the last checkpoint"
    )
    nnodes: int = Field(1, ge=1, description="machines; each runs `phi3ops train` (or `run`)")
    rdzv_endpoint: str | None = Field(
        None, pattern=r"^\S+:\d+$",
        description="host:port every node reaches (on one of them): where the nodes meet",
    )
    rdzv_id: str | None = Field(
        None, description="the job's name at the rendezvous; default: pipeline name + config hash"
    )

    @model_validator(mode="after")
    def _endpoint_for_nodes(self) -> LaunchConfig:
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError("launch.rdzv_endpoint: required when launch.nnodes > 1 (host:port "
                             "of one node that all nodes reach, e.g. node0:29400)")
        return self

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


class EvaluationConfig(_Frozen):
    max_samples: int | None = Field(64, gt=0, description="held-out conversations; null = all")
    max_new_tokens: int = Field(48, gt=0)
    batch_size: int = Field(16, gt=0)


class RegistrationConfig(_Frozen):
    merged: bool = Field(False, description="also log the adapter merged into the base weights")


class PipelineConfig(_Frozen):
    name: str
    schedule: str | None = Field(
        None, pattern=r"^\S+( \S+){4}$", description="cron for `make schedule`, e.g. '0 3 * * 1'"
    )
    model: ModelConfig
    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    training_config: TrainingConfig
    peft_config: PeftLoraConfig = PeftLoraConfig()
    adapter: AdapterConfig = AdapterConfig()
    launch: LaunchConfig = LaunchConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    registration: RegistrationConfig = RegistrationConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineConfig:
        problems = []
        if self.model.name_or_path == TINY_MODEL and self.model.tiny is None:
            problems.append(f"model.tiny: required when model.name_or_path is '{TINY_MODEL}'")
        if self.model.tiny is not None:
            tiny = self.model.tiny
            if tiny.hidden_size % tiny.num_attention_heads:
                problems.append("model.tiny.hidden_size: must be divisible by num_attention_heads")
            if tiny.num_attention_heads % tiny.num_key_value_heads:
                problems.append(
                    "model.tiny.num_key_value_heads: must divide num_attention_heads"
                )
            if tiny.tokenizer == "phi3" and tiny.vocab_size != PHI3_VOCAB_SIZE:
                problems.append(f"model.tiny.vocab_size: Phi-3's tokenizer has {PHI3_VOCAB_SIZE} "
                                "tokens; set it to that")
            if self.training_config.max_length > tiny.max_position_embeddings:
                problems.append(
                    "training_config.max_length: exceeds model.tiny.max_position_embeddings"
                )
        problems += self._training_checks()
        for name in self.peft_config.target_modules:
            if name in UNFUSED_NAMES:
                problems.append(
                    f"peft_config.target_modules: '{name}' does not exist in Phi-3, which fuses "
                    f"it into '{UNFUSED_NAMES[name]}'; use {list(PHI3_FUSED_TARGETS)}"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _training_checks(self) -> list[str]:
        """Combinations the libraries accept but that would fail late or train the wrong thing."""
        problems = []
        loralib = self.adapter.backend == "loralib"
        tiny = self.model.tiny
        if loralib and tiny is not None and tiny.num_key_value_heads != tiny.num_attention_heads:
            problems.append("adapter.backend: loralib's MergedLinear splits qkv_proj into equal "
                            "q, k, v parts; it needs num_key_value_heads == num_attention_heads")
        if self.model.quantization is not None:
            if loralib:
                problems.append("model.quantization: 4-bit QLoRA needs adapter.backend: peft "
                                "(loralib cannot wrap bitsandbytes layers)")
            if self.model.name_or_path == TINY_MODEL:
                problems.append("model.quantization: the tiny CPU model cannot be quantised")
        if self.launch.strategy == "fsdp":
            if self.launch.world_size < 2:
                problems.append("launch.strategy: fsdp shards over ranks; set launch.nproc >= 2")
            if loralib:
                problems.append("launch.strategy: fsdp is supported with adapter.backend: peft")
        train = self.training_config
        unpacked_padding_free = train.padding_free and not train.packing
        if unpacked_padding_free and train.max_length < self.preprocess.max_length:
            problems.append("training_config.padding_free: without packing nothing truncates in "
                            "training; keep training_config.max_length >= preprocess.max_length")
        if train.save_total_limit < 2:
            problems.append("training_config.save_total_limit: keep at least 2 so a complete "
                            "checkpoint survives while the next one is being written")
        return problems

    def config_hash(self) -> str:
        """Stable short hash of the resolved config: the lineage key of a trained adapter."""
        return sha256_json(self.model_dump(mode="json"))[:12]


class PromotionPolicy(_Frozen):
    metric: str = "rougeL"
    min_gain: float = Field(0.0, ge=0)
    must_beat_base: bool = True
    require_interval_above_zero: bool = Field(
        False, description="the bootstrap 95% interval of each gain must lie above zero"
    )


class RetryPolicy(_Frozen):
    """How long phi3ops keeps trying an MLflow server that does not answer: `attempts` tries,
    the waits between them doubling from `first_wait_s` (7 and 1 s: 63 s of waiting in all,
    longer than an `mlflow server` takes to restart under load)."""

    attempts: int = Field(7, ge=1)
    first_wait_s: float = Field(1.0, ge=0)


class MlflowConfig(_Frozen):
    tracking_uri: str = "sqlite:///mlruns.db"
    artifact_location: str = "mlartifacts"
    experiment: str = "phi3ops"
    registered_model: str = "phi3ops-chat"
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"
    promotion: PromotionPolicy = PromotionPolicy()
    retry: RetryPolicy = RetryPolicy()

    def resolved(self, root: Path) -> MlflowConfig:
        """Make relative paths absolute against the project root; MLFLOW_TRACKING_URI wins."""
        uri = os.environ.get("MLFLOW_TRACKING_URI") or self.tracking_uri
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = f"sqlite:///{(root / uri.removeprefix('sqlite:///')).resolve()}"
        artifacts = self.artifact_location
        if "://" not in artifacts:
            artifacts = (root / artifacts).resolve().as_uri()
        return self.model_copy(update={"tracking_uri": uri, "artifact_location": artifacts})


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write beside `path`, then rename over it: readers see the whole file or none of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply torchtune-style dotted `key.sub=value` overrides; values are parsed as YAML."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected key.path=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[leaf] = yaml.safe_load(value)
    return raw


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def _load(path: Path, model: type[BaseModel], overrides: list[str]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    raw = apply_overrides(raw, overrides)
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(path, e)) from None


def load_config(path: Path | str, overrides: list[str] | None = None,
                root: Path | str | None = None) -> PipelineConfig:
    """The pipeline config; a `model.chat_template` name or file becomes the template's text
    (files relative to `root`, default the working directory), so the config says all."""
    cfg: PipelineConfig = _load(Path(path), PipelineConfig, overrides or [])
    template = resolve_setting(cfg.model.chat_template, Path(root or Path.cwd()))
    if template != cfg.model.chat_template:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(
            update={"chat_template": template})})
    return cfg


def load_mlflow_config(path: Path | str, overrides: list[str] | None = None) -> MlflowConfig:
    return _load(Path(path), MlflowConfig, overrides or [])


class ProjectPaths:
    """Where a project's generated files live, all under its root (and all git-ignored)."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        self.models = self.root / ".cache" / "models"  # built tiny base models
        self.processed = self.root / ".cache" / "processed"  # preprocessed datasets by key
        self.runs = self.root / "runs"  # per MLflow run: checkpoints and adapter
        self.prefect_results = self.root / ".cache" / "prefect-results"  # Prefect's JSON results

    def pipeline(self, path: Path | str) -> Path:
        path = Path(path)
        return path if path.is_absolute() else self.root / path
