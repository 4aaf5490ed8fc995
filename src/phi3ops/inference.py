"""Load, merge and generate: what evaluation, serving and `phi3ops chat` share with no trl.

Greedy generation is batched with left padding and the KV cache and stops at <|end|>, so a
served answer is the one evaluation scored.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from phi3ops import adapters
from phi3ops.config import ModelConfig
from phi3ops.modeling import load_model, load_tokenizer


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


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = [tokenizer.eos_token_id]
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        ids.insert(0, end)
    return ids


@torch.inference_mode()
def generate_replies(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[dict]],
    max_new_tokens: int, batch_size: int, on_progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy replies for chat prompts, batched; left padding keeps every prompt's end aligned.
    `on_progress` hears how many replies are done after each batch."""
    tokenizer.padding_side = "left"
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts[start:start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        batch = batch.to(model.device)
        output = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
            eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        replies += [r.strip() for r in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        if on_progress:
            on_progress(len(replies))
    return replies
