"""What a registered model needs to answer, and nothing of phi3ops: torch, transformers, peft,
loralib and safetensors only. Registration ships this file beside the model code (MLflow
`code_paths`), so `models:/phi3ops-chat@champion` loads in any environment built from the
model's requirements.txt; phi3ops' evaluation, `phi3ops chat` and its trusted loader use the
same functions, so a served answer is the one evaluation scored.

Loading: base weights from safetensors, tokenizer and model without remote code, then the
adapter (peft's files, or loralib's LoRA weights with their config). Generation: greedy,
batched with left padding and the KV cache, the chat template applied, stopping at <|end|>.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import loralib as lora
import torch
from safetensors.torch import load_file
from torch import nn

LORALIB_WEIGHTS = "lora.safetensors"
LORALIB_CONFIG = "loralib_config.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
FUSED_QKV = "qkv_proj"


class UnsafeModelFiles(ValueError):
    """The files would load only through a pickle, or are not an adapter at all."""


def attach_loralib(model: nn.Module, lora_cfg: dict, lora_dtype: torch.dtype | None = None):
    """Swap each target nn.Linear for its loralib twin around the same weight (no copy).
    `lora_cfg`: target_modules, r, lora_alpha, lora_dropout, bias, as saved with the adapter."""
    replaced = 0
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in lora_cfg["target_modules"] or not isinstance(module, nn.Linear):
            continue
        kwargs = {"r": lora_cfg["r"], "lora_alpha": lora_cfg["lora_alpha"],
                  "lora_dropout": lora_cfg["lora_dropout"], "bias": module.bias is not None}
        with torch.device(module.weight.device):
            if leaf == FUSED_QKV:
                layer = lora.MergedLinear(module.in_features, module.out_features,
                                          enable_lora=[True, True, True], **kwargs)
            else:
                layer = lora.Linear(module.in_features, module.out_features, **kwargs)
        layer.to(dtype=lora_dtype or module.weight.dtype)
        layer.weight = module.weight
        if module.bias is not None:
            layer.bias = module.bias
        model.set_submodule(name, layer)
        replaced += 1
    if not replaced:
        raise UnsafeModelFiles(f"loralib: none of {list(lora_cfg['target_modules'])} is an "
                               f"nn.Linear in {type(model).__name__}")
    lora.mark_only_lora_as_trainable(model, bias=lora_cfg["bias"])
    model.config.phi3ops_loralib = dict(lora_cfg)
    return model


def load_loralib_weights(model: nn.Module, path: Path) -> None:
    """strict=False because the file holds only LoRA weights; every one of them must land."""
    weights = load_file(str(path))
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    result = model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False)
    if result.unexpected_keys:
        raise UnsafeModelFiles(f"{path}: weights for layers this model does not have: "
                               f"{result.unexpected_keys[:3]}")
    missing_lora = [k for k in result.missing_keys if "lora_" in k]
    if missing_lora:
        raise UnsafeModelFiles(f"{path}: LoRA weights missing for {missing_lora[:3]}")


def load_adapter(base: nn.Module, adapter_dir: Path, trainable: bool = False) -> nn.Module:
    """Base first, then the adapter on top; the format is recognised from the files, and only
    safetensors weights load (peft would otherwise fall back to a pickled adapter_model.bin)."""
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / PEFT_CONFIG).is_file():
        if not (adapter_dir / PEFT_WEIGHTS).is_file():
            raise UnsafeModelFiles(f"{adapter_dir}: no {PEFT_WEIGHTS}; refusing to load it")
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
    if not (adapter_dir / LORALIB_CONFIG).is_file():
        raise UnsafeModelFiles(f"{adapter_dir}: neither a peft adapter ({PEFT_CONFIG}) nor a "
                               f"loralib one ({LORALIB_CONFIG})")
    if not (adapter_dir / LORALIB_WEIGHTS).is_file():
        raise UnsafeModelFiles(f"{adapter_dir}: no {LORALIB_WEIGHTS}; refusing to load it")
    model = attach_loralib(base, json.loads((adapter_dir / LORALIB_CONFIG).read_text()))
    load_loralib_weights(model, adapter_dir / LORALIB_WEIGHTS)
    return model


def stop_token_ids(tokenizer) -> list[int]:
    ids = [tokenizer.eos_token_id]
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        ids.insert(0, end)
    return ids


@torch.inference_mode()
def generate_replies(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int,
                     batch_size: int, on_progress: Callable[[int], None] | None = None,
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


class ChatModel:
    """A registered model's files loaded for answering: base, adapter (if any), tokenizer.
    A merged model has no adapter; a hub base has no base_dir (config names it)."""

    def __init__(self, adapter_dir: str | None, base_dir: str | None, config: dict):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = base_dir or config["base_model"]
        # Training saves its tokenizer (and chat template) beside the adapter; else the base's.
        own = adapter_dir is not None and (Path(adapter_dir) / "tokenizer_config.json").is_file()
        self.tokenizer = AutoTokenizer.from_pretrained(adapter_dir if own else base,
                                                       trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            base, revision=config.get("base_revision"), trust_remote_code=False,
            use_safetensors=True, dtype="auto",
        )
        self.model = (load_adapter(model, Path(adapter_dir)) if adapter_dir else model).eval()
        self.max_new_tokens = int(config.get("max_new_tokens", 64))

    def answer(self, conversations: list[list[dict]], max_new_tokens: int | None = None,
               batch_size: int = 8) -> list[str]:
        return generate_replies(self.model, self.tokenizer, conversations,
                                max_new_tokens or self.max_new_tokens, batch_size)
