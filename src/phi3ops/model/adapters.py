"""The two LoRA backends behind one small interface: attach, save, load, disable, merge.

peft: `get_peft_model` with the Cookbook's `peft_config`; saved as adapter_model.safetensors.
loralib: the Cookbook's own recipe. qkv_proj becomes `lora.MergedLinear` with a LoRA pair for each
of q, k and v; the other targets become `lora.Linear`; `mark_only_lora_as_trainable`; the
checkpoint is `lora.lora_state_dict`, saved as safetensors; loading is the base, then the LoRA
weights with strict=False. In eval mode loralib folds B @ A into the frozen weight.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import loralib as lora
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from phi3ops.config import PeftLoraConfig
from phi3ops.errors import ConfigError, Phi3opsError
from phi3ops.model import chat_runtime

LORALIB_WEIGHTS, LORALIB_CONFIG = chat_runtime.LORALIB_WEIGHTS, chat_runtime.LORALIB_CONFIG
PEFT_CONFIG = chat_runtime.PEFT_CONFIG


def build_lora_config(cfg: PeftLoraConfig) -> LoraConfig:
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias=cfg.bias,
        task_type=cfg.task_type, target_modules=list(cfg.target_modules),
    )


def check_target_modules(model: nn.Module, cfg: PeftLoraConfig) -> None:
    """Every target must name a Linear layer: peft adapts the targets it finds and silently
    skips a misspelt one, so a typo would train a fraction of the layers meant."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    unknown = [t for t in cfg.target_modules if not any(f".{n}".endswith(f".{t}") for n in linears)]
    if unknown:
        raise ConfigError(f"peft_config.target_modules: {unknown} match no Linear layer of "
                          f"{type(model).__name__}; its Linear layers are "
                          f"{sorted({name.rsplit('.', 1)[-1] for name in linears})}")


def attach(model: PreTrainedModel, cfg: PeftLoraConfig, backend: str) -> nn.Module:
    """Wrap the targets of a frozen base with trainable LoRA weights (fp32, as peft keeps them)."""
    check_target_modules(model, cfg)
    if backend == "peft":
        return get_peft_model(model, build_lora_config(cfg))
    return attach_loralib(model, cfg, lora_dtype=torch.float32)


def attach_loralib(model: PreTrainedModel, cfg: PeftLoraConfig,
                   lora_dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Swap each target nn.Linear for its loralib twin around the same (frozen) weight."""
    return chat_runtime.attach_loralib(model, cfg.model_dump(mode="json"), lora_dtype)


def loralib_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in lora.lora_state_dict(model, bias=bias).items()}


def save(model: nn.Module, out_dir: Path) -> None:
    """Only the adapter: peft's files, or loralib's lora_state_dict plus its LoRA config."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        model.save_pretrained(str(out_dir), safe_serialization=True)
        # peft writes target_modules from a set, in an order that changes from process to
        # process: sorted, the same training gives the same bytes (phi3ops reproduce).
        config = json.loads((out_dir / PEFT_CONFIG).read_text())
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
        (out_dir / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return
    cfg = model.config.phi3ops_loralib
    save_file(loralib_state_dict(model, cfg["bias"]), str(out_dir / LORALIB_WEIGHTS),
              metadata={"format": "pt"})
    (out_dir / LORALIB_CONFIG).write_text(json.dumps(cfg, indent=1))


def load(base: PreTrainedModel, adapter_dir: Path, trainable: bool = False) -> nn.Module:
    """Base first, then the adapter on top (chat_runtime: what registered models ship)."""
    try:
        return chat_runtime.load_adapter(base, adapter_dir, trainable)
    except chat_runtime.UnsafeModelFiles as e:
        raise Phi3opsError(str(e)) from e


def load_loralib_weights(model: nn.Module, path: Path) -> None:
    """A loralib checkpoint's LoRA weights (resuming training); each must land."""
    try:
        chat_runtime.load_loralib_weights(model, path)
    except chat_runtime.UnsafeModelFiles as e:
        raise Phi3opsError(str(e)) from e


def _lora_layers(model: nn.Module) -> list[lora.LoRALayer]:
    return [m for m in model.modules() if isinstance(m, lora.LoRALayer) and m.r > 0]


def _delta(layer: lora.LoRALayer) -> torch.Tensor:
    if isinstance(layer, lora.MergedLinear):
        return layer.merge_AB() * layer.scaling
    return (layer.lora_B @ layer.lora_A) * layer.scaling


@contextmanager
def disabled(model: nn.Module):
    """The base model's outputs, with the adapter in place but switched off."""
    if isinstance(model, PeftModel):
        with model.disable_adapter():
            yield
        return
    model.eval()  # loralib folds B @ A into the weights in eval mode: take it out again
    layers = _lora_layers(model)
    with torch.no_grad():
        for layer in layers:
            layer.weight.data -= _delta(layer).to(layer.weight.dtype)
    try:
        yield
    finally:
        with torch.no_grad():
            for layer in layers:
                layer.weight.data += _delta(layer).to(layer.weight.dtype)


def merged(model: nn.Module) -> PreTrainedModel:
    """A plain transformers model with B @ A folded into the base weights."""
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    model.eval()  # merges
    for name, module in list(model.named_modules()):
        if isinstance(module, lora.LoRALayer) and isinstance(module, nn.Linear):
            assert module.merged or module.r == 0
            plain = nn.Linear(module.in_features, module.out_features,
                              bias=module.bias is not None, device="meta")
            plain.weight = nn.Parameter(module.weight.data, requires_grad=False)
            if module.bias is not None:
                plain.bias = nn.Parameter(module.bias.data, requires_grad=False)
            model.set_submodule(name, plain)
    if hasattr(model.config, "phi3ops_loralib"):
        del model.config.phi3ops_loralib
    return model
