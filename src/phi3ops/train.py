"""LoRA fine-tuning with peft + trl's SFTTrainer, from the Cookbook's two dictionaries.

    phi3ops run training_config.max_steps=50      # stage 3 of the retrain flow

Reads like a recipe: build the LoRA config, the SFT config, the model and data; train with
checkpoints every `save_steps` (resuming from the newest one in `out_dir`); save the adapter as
safetensors beside the tokenizer.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from phi3ops.config import ModelConfig, PeftLoraConfig, TrainingConfig
from phi3ops.modeling import load_model, load_tokenizer, resolve_dtype
from phi3ops.preprocess import load_processed

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


def build_lora_config(cfg: PeftLoraConfig) -> LoraConfig:
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias=cfg.bias,
        task_type=cfg.task_type, target_modules=list(cfg.target_modules),
    )


def build_sft_config(cfg: TrainingConfig, dtype: torch.dtype, checkpoint_dir: Path) -> SFTConfig:
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
        max_length=cfg.max_length,
        assistant_only_loss=cfg.assistant_only_loss,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",  # metrics go to MLflow through MetricsCallback, into the flow's run
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


class MetricsCallback(TrainerCallback):
    """Forward the trainer's numeric logs (loss, learning rate, grad norm) to a logger callable."""

    def __init__(self, log_metrics: MetricsLogger):
        self.log_metrics = log_metrics

    def on_log(self, args, state, control, logs=None, **kwargs):
        numeric = {k: float(v) for k, v in (logs or {}).items()
                   if isinstance(v, int | float) and math.isfinite(v)}
        if numeric:
            self.log_metrics(numeric, state.global_step)


def train(
    model_cfg: ModelConfig, lora_cfg: PeftLoraConfig, train_cfg: TrainingConfig,
    dataset_dir: Path, out_dir: Path, cache_dir: Path, log_metrics: MetricsLogger | None = None,
) -> TrainResult:
    """Train a LoRA adapter on the processed train split; returns where the adapter was saved."""
    dtype = resolve_dtype(model_cfg.dtype)
    tokenizer = load_tokenizer(model_cfg, cache_dir)
    model = load_model(model_cfg, cache_dir, use_cache=train_cfg.use_cache)
    dataset = load_processed(dataset_dir)["train"].select_columns(["messages"])

    checkpoint_dir = out_dir / "checkpoints"
    resume = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
    trainer = SFTTrainer(
        model=model,
        args=build_sft_config(train_cfg, dtype, checkpoint_dir),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=build_lora_config(lora_cfg),
        callbacks=[MetricsCallback(log_metrics)] if log_metrics else None,
    )
    trainable, total = trainer.model.get_nb_trainable_parameters()
    log.info("training %d of %d parameters (%.2f%%)%s", trainable, total, 100 * trainable / total,
             f", resuming from {resume}" if resume else "")
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    runtime = time.perf_counter() - started

    adapter_dir = out_dir / "adapter"
    trainer.model.save_pretrained(str(adapter_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(adapter_dir))
    return TrainResult(
        adapter_dir=str(adapter_dir), train_loss=float(output.training_loss),
        global_step=output.global_step, runtime_s=round(runtime, 2),
        resumed_from=resume, trainable_params=trainable, total_params=total,
    )


def merge_adapter(model_cfg: ModelConfig, adapter_dir: Path, out_dir: Path,
                  cache_dir: Path) -> Path:
    """Fold the adapter into an unquantised copy of the base and save it (safetensors) with the
    tokenizer: a plain transformers model for serving stacks that know no peft."""
    merged = load_adapter_model(model_cfg, adapter_dir, cache_dir).merge_and_unload()
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    load_tokenizer(model_cfg, cache_dir).save_pretrained(str(out_dir))
    return out_dir


def load_adapter_model(model_cfg: ModelConfig, adapter_dir: Path, cache_dir: Path) -> PeftModel:
    """Base weights plus a saved adapter, ready for generation."""
    base = load_model(model_cfg, cache_dir, use_cache=True)
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).eval()
