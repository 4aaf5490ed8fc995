"""What can be known wrong before any stage runs: the machine, the weights, the chat template.

    phi3ops run      # runs this first, in seconds, before Prefect starts or data is versioned

A run that would fail an hour in, inside a training child, fails here instead with the fix.
`phi3ops run` checks before Prefect starts (the error in seconds, not after the server's 15 s)
and the flow checks again as its first step (a deployment has no CLI in front of it); the
second check finds the model built and takes about 3 ms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from phi3ops.config import PipelineConfig
from phi3ops.errors import Phi3opsError
from phi3ops.model.base_model import load_tokenizer, resolve_model_path
from phi3ops.model.templates import TemplatePlan, plan_training_template


def check_runtime(cfg: PipelineConfig) -> None:
    """Fail at once, with the fix, for settings this machine cannot run."""
    if cfg.model.quantization is not None:
        if not torch.cuda.is_available():
            raise Phi3opsError(
                f"pipeline '{cfg.name}': 4-bit QLoRA (model.quantization) needs a CUDA GPU and "
                "bitsandbytes; this machine has no CUDA device. Use pipelines/phi3-mini-lora.yaml "
                "on a GPU without quantisation, or pipelines/tiny-cpu.yaml on CPU.")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise Phi3opsError("model.quantization needs bitsandbytes: pip install "
                               "'bitsandbytes>=0.45'") from None
    if cfg.launch.strategy == "fsdp" and not torch.cuda.is_available():
        raise Phi3opsError(f"pipeline '{cfg.name}': launch.strategy fsdp is for GPUs; on CPU use "
                           "launch.strategy: ddp (gloo)")


@dataclass(frozen=True)
class Preflight:
    model_path: str  # a local directory, or the hub id when its weights are in the HF cache
    template: TemplatePlan


def preflight(cfg: PipelineConfig, models_dir: Path) -> Preflight:
    """Runtime, base model (builds the tiny one on first use) and the training template."""
    check_runtime(cfg)
    model_path = resolve_model_path(cfg.model, models_dir)  # missing weights fail here, with fix
    tokenizer = load_tokenizer(cfg.model, models_dir)
    return Preflight(model_path, plan_training_template(tokenizer.chat_template,
                                                        cfg.training_config.assistant_only_loss))
