"""Size a training run before renting the GPU: memory per GPU, FLOPs per token, hours per epoch.

    phi3ops plan --pipeline pipelines/phi3-mini-lora.yaml --gpu H200

The model is built on the meta device (shapes only, nothing downloaded) with the profile's LoRA
attached by peft, so the parameter counts are peft's own. Memory per GPU with N ranks, in bytes:

    base weights  numel x dtype bytes (4-bit: NF4's bytes per Linear weight but the LM head's);
                  FSDP: / N, + the unsharded root (embeddings, head) + two gathered layers
    LoRA state    trainable x 16: fp32 weight, gradient and AdamW's two moments; FSDP: / N
    activations   tokens x bytes saved for backward per token (below): a micro-batch per GPU
    logits        transformers' loss keeps an fp32 log-softmax, tokens x (vocab x 4 + 8 for the
                  int64 label); its backward adds two fp32 gradients, tokens x vocab x 8
    total         all of these, with the activations as the profile checkpoints them

Saved for backward per token and decoder layer (h hidden, i intermediate, q and kv the query and
key widths, d bytes per element of the compute dtype), as a training step of the tiny model saves
them (tests/test_plan.py measures it with saved-tensor hooks):

    2 x (h + 1) x 4          each RMSNorm keeps its input in fp32, and 1/rms
    3(q + kv) x d + 4 heads  attention (sdpa, flash: no s x s scores) keeps rotated q and k, the
                             fused qkv output (v is a view of it), its output, fp32 logsumexp
    3 x i x d                gate_up's output (SiLU and the product read it) and SiLU(gate)
    in x (d + m) + r x d     per adapted Linear: LoRA dropout's copy of the input and its mask
                             (m: 1 byte on CUDA, d on CPU, 0 without dropout), lora_A's output

Frozen base Linears keep nothing: their input gradient needs only the weight. The first layer
keeps less when nothing before it trains; it is counted as the others. With gradient
checkpointing each layer keeps only its input, h x d, and one layer is recomputed at a time.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
from huggingface_hub import try_to_load_from_cache
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from phi3ops.config import TINY_MODEL, ModelConfig, PipelineConfig, ProjectPaths
from phi3ops.data.preprocess import split_of
from phi3ops.data.validation import jsonl_files, read_rows
from phi3ops.errors import ConfigError, DataError, ModelNotAvailableError
from phi3ops.model.adapters import attach
from phi3ops.model.base_model import load_tokenizer, resolve_dtype
from phi3ops.model.phi3_mini import HUB_ID, build_phi3_mini
from phi3ops.model.phi3_tokenizer import ensure_phi3_tokenizer
from phi3ops.train.throughput import matmul_flops_per_s, train_flops_per_token

GIB = 2**30
LORA_STATE_BYTES = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq
# NF4: an fp32 absmax per 64 weights; double quantisation: 8-bit absmax + fp32 per 256 blocks
NF4_BYTES = {False: 0.5 + 4 / 64, True: 0.5 + 1 / 64 + 4 / (64 * 256)}
TINY_DIMS = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "max_position_embeddings"}
MEMORY_LABELS = {
    "base_weights": "base weights", "lora_state": "LoRA weights + gradients + AdamW (fp32)",
    "activations": "activations, no gradient checkpointing",
    "activations_checkpointed": "activations, gradient checkpointing",
    "logits_saved": "logits: fp32 log-softmax kept for backward",
    "logits_gradients": "logits: its gradients in the loss backward", "total": "total"}
ASSUMPTIONS = (
    "logits as transformers' own loss holds them: phi3ops train's fused LM head holds less",
    "not counted: CUDA context and allocator slack (1-2 GiB), gradients inside a layer's backward",
    "MFU of model FLOPs, as phi3ops train logs it; checkpointing's recompute lowers what runs get")


@dataclass(frozen=True)
class Accelerator:  # what the plan is for: one device's peak FLOP/s and memory
    name: str
    peak_flops: float  # dense matmul FLOP/s, no sparsity
    memory_gib: float  # usable, as nvidia-smi reports it
    cuda: bool = True


GPUS = {gpu.name: gpu for gpu in (  # A100 and H100 (SXM) 80GB, H200 141GB, L4 24GB with ECC
    Accelerator("A100", 312e12, 80.0), Accelerator("H100", 989e12, 79.6),
    Accelerator("H200", 989e12, 140.4), Accelerator("L4", 121e12, 22.5))}


@dataclass(frozen=True)
class Memory:  # bytes per GPU
    base_weights: int
    lora_state: int
    activations: int
    activations_checkpointed: int
    logits_saved: int
    logits_gradients: int
    total: int  # with the activations that the profile's checkpointing setting keeps


@dataclass(frozen=True)
class Plan:  # what `phi3ops plan` prints; asdict() of it is the --json output
    pipeline: str
    model: str
    dtype: str
    quantized: bool
    accelerator: Accelerator
    n_gpus: int
    strategy: str
    lora_r: int
    adapted_modules: int
    trainable_params: int
    total_params: int
    micro_batch: tuple[int, int]  # sequences x tokens, per GPU
    gradient_checkpointing: bool
    memory: Memory
    fits: bool
    flops_per_token: float
    mfu: float
    epoch_tokens: int | None
    tokens_source: str  # where epoch_tokens come from, or why there are none
    hours_per_epoch: float | None

    def render(self) -> str:
        acc, (batch, length) = self.accelerator, self.micro_batch
        unit, scale = ("GiB", GIB) if self.memory.total >= GIB else ("MiB", 2**20)
        kept = "activations_checkpointed" if self.gradient_checkpointing else "activations"
        memory = [f"  {MEMORY_LABELS[name]:44s}{value / scale:8.2f}"
                  + ("  <- this profile" if name == kept else "")
                  for name, value in asdict(self.memory).items()]
        memory[-1] += (f"  {'fits' if self.fits else 'does NOT fit'} {acc.name} "
                       f"({acc.memory_gib:,.1f} GiB)")
        tokens, hours = self.tokens_source, "unknown without a token count"
        if self.hours_per_epoch is not None:
            tokens = f"{self.epoch_tokens:,} ({self.tokens_source})"
            seconds = self.hours_per_epoch * 3600
            hours = (f"{self.hours_per_epoch:.3g}" + (f" ({seconds:.0f} s)" if seconds < 60 else "")
                     + f" at {self.mfu:.0%} MFU on {self.n_gpus} x {acc.name} "
                     f"({acc.peak_flops / 1e12:.3g} TFLOP/s "
                     f"{'dense bf16' if acc.cuda else 'measured matmul'} each)")
        return "\n".join([
            f"{self.pipeline}: {self.model} ({self.dtype}"
            f"{', 4-bit NF4 base' if self.quantized else ''}) on {self.n_gpus} x {acc.name}, "
            f"{self.strategy}",
            f"  LoRA r={self.lora_r} on {self.adapted_modules} modules: {self.trainable_params:,}"
            f" trainable of {self.total_params:,} base parameters "
            f"({self.trainable_params / self.total_params:.2%})",
            f"  micro-batch {batch} x {length:,} = {batch * length:,} tokens per GPU (longest)",
            "", f"memory per GPU ({unit})", *memory, "",
            f"FLOPs per trained token  {self.flops_per_token:.3g}",
            f"tokens per epoch         {tokens}",
            f"hours per epoch          {hours}",
            "", "assumptions:", *(f"  - {line}" for line in ASSUMPTIONS),
        ])


def find_accelerator(name: str, dtype: torch.dtype) -> Accelerator:
    """A GPU from the table, or `cpu`: this machine, its RAM and the matmul FLOP/s it reaches."""
    if name.lower() == "cpu":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
        return Accelerator("cpu", matmul_flops_per_s(dtype, torch.device("cpu")), ram, cuda=False)
    if name.upper() not in GPUS:
        raise ConfigError(f"--gpu {name}: unknown; known: {', '.join(GPUS)}, or cpu (this machine)")
    return GPUS[name.upper()]


def build_meta_model(model: ModelConfig, dtype: torch.dtype) -> nn.Module:
    """The architecture without weights: Phi-3-mini's shipped config, the tiny dims, or a
    config.json already here (a local directory, the Hugging Face cache); never a download."""
    if model.name_or_path == HUB_ID:
        return build_phi3_mini("meta", dtype)
    if model.name_or_path == TINY_MODEL:
        return build_phi3_mini("meta", dtype, **model.tiny.model_dump(include=TINY_DIMS),
                               bos_token_id=None, eos_token_id=None, pad_token_id=None)
    try:
        config = AutoConfig.from_pretrained(model.name_or_path, revision=model.revision,
                                            local_files_only=True)
    except OSError:
        raise ModelNotAvailableError(
            f"model.name_or_path '{model.name_or_path}': no config.json here to size it from (no "
            f"such directory, not in the Hugging Face cache); `hf download {model.name_or_path} "
            "config.json` where the hub is reachable (same HF_HOME)") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def activation_bytes_per_token(model: PeftModel, d: int, m: int) -> tuple[int, int]:
    """Bytes saved for backward per token, without and with gradient checkpointing: the module
    docstring's count per layer (d bytes per element, m per dropout mask element), plus the final
    norm's fp32 input."""
    config, r = model.get_base_model().config, model.peft_config["default"].r
    h, i, n_layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    layer = 2 * (h + 1) * 4 + 3 * (heads + kv_heads) * head_dim * d + heads * 4 + 3 * i * d
    lora = sum(adapted.in_features * (d + m) + r * d
               for adapted in model.modules() if isinstance(adapted, LoraLayer))
    final_norm = (h + 1) * 4
    return (n_layers * layer + lora + final_norm,
            n_layers * h * d + layer + lora // n_layers + final_norm)


def build_memory(cfg: PipelineConfig, model: PeftModel, dtype: torch.dtype, cuda: bool) -> Memory:
    """Per GPU, as the module docstring counts it."""
    base, quant = model.get_base_model(), cfg.model.quantization
    quantized = {id(m.weight) for m in base.modules() if quant and isinstance(m, nn.Linear)
                 and m is not base.get_output_embeddings()}
    nf4 = NF4_BYTES[bool(quant and quant.double_quant)]
    weights = {name: p.numel() * (nf4 if id(p) in quantized else p.element_size())
               for name, p in base.named_parameters() if not p.requires_grad}  # LoRA's are not
    base_bytes = int(sum(weights.values()))
    n, fsdp = cfg.launch.world_size, cfg.launch.strategy == "fsdp"
    if fsdp:  # on top of the shard: the unsharded root (embeddings, head), two gathered layers
        root = sum(size for name, size in weights.items() if ".layers." not in name)
        layer = sum(size for name, size in weights.items() if ".layers.0." in name)
        base_bytes = int(base_bytes / n + root + 2 * layer)
    mask_bytes = (1 if cuda else dtype.itemsize) if cfg.peft_config.lora_dropout > 0 else 0
    full, checkpointed = activation_bytes_per_token(model, dtype.itemsize, mask_bytes)
    train = cfg.training_config
    tokens, vocab = train.per_device_train_batch_size * train.max_length, base.config.vocab_size
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora_state = trainable * LORA_STATE_BYTES // (n if fsdp else 1)
    logits_saved, logits_gradients = tokens * (vocab * 4 + 8), tokens * vocab * 8
    kept = tokens * (checkpointed if train.gradient_checkpointing else full)
    return Memory(
        base_weights=base_bytes, lora_state=lora_state, activations=tokens * full,
        activations_checkpointed=tokens * checkpointed, logits_saved=logits_saved,
        logits_gradients=logits_gradients,
        total=base_bytes + lora_state + kept + logits_saved + logits_gradients)


def count_epoch_tokens(cfg: PipelineConfig, paths: ProjectPaths) -> tuple[int, int, str]:
    """(tokens, conversations, source) of an epoch: distinct valid train-split conversations with
    the chat template, capped at the length training keeps, counted by the run's tokenizer."""
    data_dir = paths.root / cfg.data.path
    if not data_dir.exists():
        raise DataError(f"no data at {data_dir}; run `dvc pull` or give --tokens")
    prep, train_rows = cfg.preprocess, {}
    for path in jsonl_files(data_dir):
        for row, _rejected in read_rows(path, path.name):
            if row and split_of(row["messages"], prep.test_fraction, prep.seed) == "train":
                train_rows.setdefault(json.dumps(row["messages"], sort_keys=True), row["messages"])
    model, source = cfg.model, f"{cfg.model.name_or_path}'s tokenizer"
    if model.name_or_path == HUB_ID and not isinstance(
            try_to_load_from_cache(HUB_ID, "tokenizer.json", revision=model.revision), str):
        tokenizer = AutoTokenizer.from_pretrained(str(ensure_phi3_tokenizer(paths.models)))
        tokenizer.chat_template = model.chat_template or tokenizer.chat_template
        source = "Phi-3's tokenizer rebuilt from llama.cpp's vocabulary; the hub's is not cached"
    else:
        tokenizer = load_tokenizer(model, paths.models)
    texts = tokenizer.apply_chat_template(list(train_rows.values()), tokenize=False)
    cap = min(prep.max_length, cfg.training_config.max_length)
    lengths = [min(len(row), cap) for row in tokenizer(texts, add_special_tokens=False).input_ids]
    where = f"{len(lengths):,} train conversations in {cfg.data.path}/, {source}"
    return sum(lengths), len(lengths), where


def build_plan(cfg: PipelineConfig, paths: ProjectPaths, gpu: str, mfu: float = 0.4,
               tokens: int | None = None) -> Plan:
    """Size `cfg` on `launch.nproc` x `gpu`; `tokens` per epoch skips reading the data."""
    # The plan is for the machine named, not this one: 'auto' is bf16 on every GPU in the table.
    dtype = (torch.bfloat16 if gpu.lower() != "cpu" and cfg.model.dtype == "auto"
             else resolve_dtype(cfg.model.dtype))
    accelerator = find_accelerator(gpu, dtype)
    base = build_meta_model(cfg.model, dtype)
    total_params = sum(p.numel() for p in base.parameters())
    model = attach(base, cfg.peft_config, "peft")  # a misspelt target fails here
    memory = build_memory(cfg, model, dtype, accelerator.cuda)
    train = cfg.training_config
    source, mean_length = "given", train.max_length
    if tokens is None:
        try:
            tokens, conversations, source = count_epoch_tokens(cfg, paths)
            mean_length = tokens / max(conversations, 1)
        except (DataError, FileNotFoundError, ModelNotAvailableError) as e:
            source = str(e)
    # Packed rows are max_length long, and attention spans the whole row.
    flops = train_flops_per_token(model, train.max_length if train.packing else mean_length)
    hours = (tokens * flops / (accelerator.peak_flops * mfu * cfg.launch.world_size) / 3600
             if tokens is not None else None)
    return Plan(
        pipeline=cfg.name, model=cfg.model.name_or_path, dtype=str(dtype).removeprefix("torch."),
        quantized=cfg.model.quantization is not None, accelerator=accelerator,
        n_gpus=cfg.launch.world_size, strategy=cfg.launch.strategy, lora_r=cfg.peft_config.r,
        adapted_modules=sum(isinstance(m, LoraLayer) for m in model.modules()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=total_params, fits=memory.total <= accelerator.memory_gib * GIB,
        micro_batch=(train.per_device_train_batch_size, train.max_length),
        gradient_checkpointing=train.gradient_checkpointing, memory=memory,
        flops_per_token=flops, mfu=mfu, epoch_tokens=tokens, tokens_source=source,
        hours_per_epoch=hours)
