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
from phi3ops.errors import RegistryError
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


class ChatModel:
    """A registered model's files loaded for answering: base, adapter (if any), tokenizer.
    The one way they load, for `phi3ops chat`, the MLflow pyfunc and the trusted loader alike:
    weights from safetensors only, tokenizer and model without remote code, the adapter with
    phi3ops' own code. A merged model has no adapter; a hub base has no base_dir."""

    def __init__(self, adapter_dir: str | None, base_dir: str | None, config: dict):
        from peft.utils import SAFETENSORS_WEIGHTS_NAME
        from transformers import AutoModelForCausalLM, AutoTokenizer

        weights = (SAFETENSORS_WEIGHTS_NAME, adapters.LORALIB_WEIGHTS)  # peft's, loralib's
        if adapter_dir is not None and not any((Path(adapter_dir) / w).is_file() for w in weights):
            # Without them peft would fall back to a pickled adapter_model.bin.
            raise RegistryError(f"{adapter_dir}: no adapter weights in safetensors "
                                f"({' or '.join(weights)}); refusing to load it")
        base = base_dir or config["base_model"]
        # Training saves its tokenizer (and chat template) beside the adapter; else the base's.
        own = adapter_dir is not None and (Path(adapter_dir) / "tokenizer_config.json").is_file()
        self.tokenizer = AutoTokenizer.from_pretrained(adapter_dir if own else base,
                                                       trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            base, revision=config.get("base_revision"), trust_remote_code=False,
            use_safetensors=True, dtype="auto",
        )
        self.model = (adapters.load(model, Path(adapter_dir)) if adapter_dir else model).eval()
        self.max_new_tokens = int(config.get("max_new_tokens", 64))

    def answer(self, conversations: list[list[dict]], max_new_tokens: int | None = None,
               batch_size: int = 8) -> list[str]:
        return generate_replies(self.model, self.tokenizer, conversations,
                                max_new_tokens or self.max_new_tokens, batch_size)


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
