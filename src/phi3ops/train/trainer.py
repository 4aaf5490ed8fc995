"""LoRA fine-tuning with trl's SFTTrainer, from the Cookbook's two dictionaries.

    phi3ops train --pipeline pipelines/tiny-cpu.yaml [--nproc 2]   # runs this in child processes

Reads like a recipe: load the base, attach the adapter (peft or loralib, `adapter.backend`), build
the SFT config, train with checkpoints every `save_steps` (resuming from the newest complete one
in `out_dir`), save the adapter as safetensors beside the tokenizer. Both backends share the data
pipeline, optimizer and schedule, so they differ only in how the LoRA weights are held.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jinja2
import torch
from torch import nn
from transformers import TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer

from phi3ops.config import LaunchConfig, PipelineConfig, TrainingConfig
from phi3ops.data.preprocess import load_processed
from phi3ops.errors import (
    ConfigError,
    DataError,
    ModelNotAvailableError,
    Phi3opsError,
    TemplateError,
    TrainingSetupError,
)
from phi3ops.model import adapters
from phi3ops.model.base_model import load_model, load_tokenizer, resolve_dtype
from phi3ops.model.preflight import check_runtime
from phi3ops.model.templates import plan_training_template
from phi3ops.progress import write_state
from phi3ops.train import lm_head
from phi3ops.train.checkpoints import CheckpointError, MarkCompleteCallback, latest_complete
from phi3ops.train.throughput import ThroughputCallback, matmul_flops_per_s, train_flops_per_token

log = logging.getLogger(__name__)
MetricsLogger = Callable[[dict[str, float], int], None]


@dataclass
class TrainResult:
    adapter_dir: str
    train_loss: float
    global_step: int
    runtime_s: float
    resumed_from: str | None
    trainable_params: int
    total_params: int
    world_size: int = 1
    history: list[dict] = field(default_factory=list)
    already_finished: bool = False  # a rerun found this run directory trained to max_steps

    def to_json(self) -> dict:
        return asdict(self)


def build_sft_config(cfg: TrainingConfig, dtype: torch.dtype, checkpoint_dir: Path,
                     launch: LaunchConfig | None = None) -> SFTConfig:
    launch = launch or LaunchConfig()
    fsdp = launch.strategy == "fsdp"
    return SFTConfig(
        output_dir=str(checkpoint_dir),
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        # Padding-free without packing cannot truncate; preprocess already fitted every
        # conversation to preprocess.max_length (<= this one, a config check makes sure).
        max_length=None if cfg.padding_free and not cfg.packing else cfg.max_length,
        assistant_only_loss=cfg.assistant_only_loss,
        packing=cfg.packing,
        packing_strategy="bfd",  # best-fit decreasing: whole conversations, no cross-row splits
        padding_free=cfg.padding_free,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        # FSDP checkpoints activations itself; the trainer's own switch would do it twice.
        gradient_checkpointing=cfg.gradient_checkpointing and not fsdp,
        **({"fsdp": True, "fsdp_config": fsdp_settings(cfg)} if fsdp else {}),
        ddp_find_unused_parameters=False,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",  # metrics go to MLflow through MetricsCallback, into the flow's run
        disable_tqdm=True,
        dataloader_num_workers=0,
        # Across machines each node checkpoints (and saves the adapter) to its own disk, so a
        # node resumes from local files and any node can register the result.
        save_on_each_node=launch.nnodes > 1,
    )


def fsdp_settings(cfg: TrainingConfig) -> dict:
    """FSDP2 sharding each decoder layer; frozen base and LoRA weights shard side by side."""
    return {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": ["Phi3DecoderLayer"],
        "reshard_after_forward": True,
        "activation_checkpointing": cfg.gradient_checkpointing,
        "state_dict_type": "FULL_STATE_DICT",  # checkpoints stay loadable on one process
    }


class MetricsCallback(TrainerCallback):
    """Forward the trainer's numeric logs (loss, learning rate, grad norm, ...) to a logger."""

    def __init__(self, log_metrics: MetricsLogger):
        self.log_metrics = log_metrics

    def on_log(self, args, state, control, logs=None, **kwargs):
        numeric = {k: float(v) for k, v in (logs or {}).items()
                   if isinstance(v, int | float) and math.isfinite(v)}
        if numeric and state.is_local_process_zero:  # each node's launcher reads its own
            self.log_metrics(numeric, state.global_step)


class ProgressFileCallback(TrainerCallback):
    """Each step's count with the newest loss and tokens/s, for the launcher's progress bar."""

    def __init__(self, path: Path):
        self.path, self.fields = path, {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, shown in (("loss", "loss"), ("tokens_per_s", "tokens/s")):
            if key in (logs or {}):
                self.fields[shown] = float(logs[key])

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_local_process_zero:
            write_state(self.path, state.global_step, state.max_steps, **self.fields)


class Phi3opsSFTTrainer(SFTTrainer):
    """SFTTrainer with phi3ops' next-token head on CPU (lm_head.py: about half the step time of
    TRL's head there). On GPUs TRL's Triton head stays."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if self.args.device.type == "cpu" and lm_head.can_install(base):
            lm_head.install(base)


class LoralibSFTTrainer(Phi3opsSFTTrainer):
    """SFTTrainer whose checkpoints hold loralib's lora_state_dict, loaded with strict=False."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.args.should_save:
            save_adapter(self, Path(output_dir or self.args.output_dir))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None):
        adapters.load_loralib_weights(model or self.model,
                                      Path(resume_from_checkpoint) / adapters.LORALIB_WEIGHTS)


def save_adapter(trainer: SFTTrainer, out_dir: Path) -> None:
    """The adapter (either backend's files) beside the tokenizer that goes with it."""
    adapters.save(trainer.accelerator.unwrap_model(trainer.model), out_dir)
    trainer.processing_class.save_pretrained(str(out_dir))


def build_trainer(cfg: PipelineConfig, dataset_dir: Path, out_dir: Path,
                  cache_dir: Path) -> SFTTrainer:
    """Base model + adapter + data + SFT config, ready to train (tests set weights before)."""
    check_runtime(cfg)
    dtype = resolve_dtype(cfg.model.dtype)
    tokenizer = load_tokenizer(cfg.model, cache_dir)
    template = plan_training_template(tokenizer.chat_template,
                                      cfg.training_config.assistant_only_loss)
    if template.training is not None:  # renders the same text, with the replies marked
        tokenizer.chat_template = template.training
    base = load_model(cfg.model, cache_dir, use_cache=cfg.training_config.use_cache,
                      quantization=cfg.model.quantization)
    set_seed(cfg.training_config.seed)  # the LoRA init too: a rerun starts from the same weights
    model = adapters.attach(base, cfg.peft_config, cfg.adapter.backend)
    dataset = load_processed(dataset_dir)["train"].select_columns(["messages"])
    trainer_class = LoralibSFTTrainer if cfg.adapter.backend == "loralib" else Phi3opsSFTTrainer
    trainer = trainer_class(
        model=model,
        args=build_sft_config(cfg.training_config, dtype, out_dir / "checkpoints", cfg.launch),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[MarkCompleteCallback()],
    )
    return trainer


def mean_sequence_length(trainer: SFTTrainer) -> float:
    """Mean conversation length in tokens (packed rows list theirs in `seq_lengths`)."""
    data = trainer.train_dataset
    if "seq_lengths" in data.column_names:
        lengths = [n for row in data["seq_lengths"] for n in row]
    else:
        lengths = [len(ids) for ids in data["input_ids"]]
    return sum(lengths) / max(len(lengths), 1)


def scored_fraction(trainer: SFTTrainer) -> float:
    """Share of tokens that carry a label, the only ones the LM head projects: the assistant
    tokens with assistant-only loss (TRL turns its masks into -100 labels)."""
    data = trainer.train_dataset
    if "labels" not in data.column_names:
        return 1.0
    labels = data["labels"]
    total = sum(map(len, labels))
    return (total - sum(row.count(-100) for row in labels)) / max(total, 1)


SETUP_FAILURES = ((TemplateError, "template"), (jinja2.TemplateError, "template"),
                  (CheckpointError, "checkpoint"), (ModelNotAvailableError, "model"),
                  (ConfigError, "config"), (DataError, "data"))


def setup_failure_kind(error: Exception) -> str:
    """What a failure before the first step was about, for the one-paragraph message."""
    return next((kind for cls, kind in SETUP_FAILURES if isinstance(error, cls)), "setup")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def train(cfg: PipelineConfig, dataset_dir: Path, out_dir: Path, cache_dir: Path,
          log_metrics: MetricsLogger | None = None,
          progress_file: Path | None = None) -> TrainResult:
    """Train a LoRA adapter on the processed train split; returns where the adapter was saved.

    A failure before the first step (config, template, model, data) is a TrainingSetupError:
    the same inputs fail the same way, so callers never retry it. A failure while training
    (a crash, out of memory, a kill) is not, and a retry resumes from the last checkpoint."""
    try:
        trainer = build_trainer(cfg, dataset_dir, out_dir, cache_dir)
        resume = latest_complete(out_dir / "checkpoints")  # verified before anything is unpickled
    except Exception as e:
        detail = str(e) if isinstance(e, Phi3opsError) else f"{type(e).__name__}: {e}"
        raise TrainingSetupError(setup_failure_kind(e),
                                 f"training could not start: {detail}") from e
    model = trainer.model
    peak = matmul_flops_per_s(resolve_dtype(cfg.model.dtype), trainer.args.device)
    trainer.add_callback(ThroughputCallback(
        train_flops_per_token(model, mean_sequence_length(trainer), scored_fraction(trainer)), peak,
        trainer.args.world_size))
    if log_metrics:
        trainer.add_callback(MetricsCallback(log_metrics))  # after throughput: sees its numbers
    if progress_file:
        trainer.add_callback(ProgressFileCallback(progress_file))

    trainable, total = count_parameters(model)
    log.info("training %d of %d parameters (%.2f%%) with %s%s", trainable, total,
             100 * trainable / total, cfg.adapter.backend,
             f", resuming from {resume}" if resume else "")
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    runtime = time.perf_counter() - started

    adapter_dir = out_dir / "adapter"
    if trainer.args.should_save:
        save_adapter(trainer, adapter_dir)
    return TrainResult(
        adapter_dir=str(adapter_dir), train_loss=float(output.training_loss),
        global_step=output.global_step, runtime_s=round(runtime, 2),
        resumed_from=str(resume) if resume else None, trainable_params=trainable,
        total_params=total, world_size=trainer.args.world_size,
        history=[h for h in trainer.state.log_history if "loss" in h],
    )
