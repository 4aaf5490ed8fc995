"""Load, merge and generate: what evaluation, serving and `phi3ops chat` share with no trl.

Generation and the loading of a registered model's files are chat_runtime's, the module every
registered model ships: a served answer is the one evaluation scored. Here: the base from the
pipeline config (the tiny build or the hub), and merging an adapter into it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from phi3ops.config import ModelConfig
from phi3ops.model import adapters
from phi3ops.model.base_model import load_model, load_tokenizer
from phi3ops.model.chat_runtime import ChatModel, generate_replies, stop_token_ids

__all__ = ["ChatModel", "generate_replies", "load_adapter_model", "merge_adapter",
           "split_prompts", "stop_token_ids"]


def load_adapter_model(model_cfg: ModelConfig, adapter_dir: Path, cache_dir: Path) -> nn.Module:
    """Unquantised base weights plus a saved adapter (either backend), ready for generation."""
    base = load_model(model_cfg, cache_dir, use_cache=True)
    return adapters.load(base, Path(adapter_dir)).eval()


def merge_adapter(model_cfg: ModelConfig, adapter_dir: Path, out_dir: Path,
                  cache_dir: Path) -> Path:
    """Fold the adapter into an unquantised copy of the base and save it (safetensors) with the
    tokenizer: a plain transformers model for serving stacks that know no LoRA."""
    adapted = load_adapter_model(model_cfg, adapter_dir, cache_dir)
    merged: PreTrainedModel = adapters.merged(adapted)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    load_tokenizer(model_cfg, cache_dir).save_pretrained(str(out_dir))
    return out_dir


def split_prompts(conversations: list[list[dict]]) -> tuple[list[list[dict]], list[str]]:
    """Prompt = all turns before the last (assistant) turn; reference = that turn's content."""
    return [c[:-1] for c in conversations], [c[-1]["content"] for c in conversations]
