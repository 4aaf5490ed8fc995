"""Base model and tokenizer: a hub id or local directory, or the tiny Phi-3 built here for CPU.

    phi3ops run        # builds the tiny base on first use; later runs load it from the cache

The tiny model is a real `Phi3ForCausalLM` with small dimensions and either a byte-level BPE
tokenizer trained locally, carrying Phi-3's special tokens and chat template, or Phi-3's own
tokenizer (`model.tiny.tokenizer: phi3`, see phi3_tokenizer.py). It is saved with
save_pretrained under a content-hash directory, so it loads like any hub model and is built once.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from phi3ops.config import (
    TINY_MODEL,
    ModelConfig,
    QuantizationConfig,
    TinyModelConfig,
    sha256_json,
)
from phi3ops.data.demo import DEMO_SEED, DEMO_SIZE, generate_conversations, tokenizer_corpus
from phi3ops.errors import ModelNotAvailableError
from phi3ops.locking import exclusive
from phi3ops.model.phi3_tokenizer import ensure_phi3_tokenizer
from phi3ops.model.templates import PHI3_TEMPLATE
from phi3ops.progress import Progress

log = logging.getLogger(__name__)
# Bump when the builder changes what it produces: the hash (and so the cache entry) changes too.
TINY_BUILDER_VERSION = 5
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|endoftext|>",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def tiny_model_dir(tiny: TinyModelConfig, cache_dir: Path) -> Path:
    key = sha256_json({"builder": TINY_BUILDER_VERSION, "tiny": tiny.model_dump(),
                       "template": PHI3_TEMPLATE, "special": SPECIAL_TOKENS})
    return cache_dir / f"{TINY_MODEL}-{key[:12]}"


def build_tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the demo corpus (so no byte is unknown), with Phi-3's special
    tokens and chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    # Like Phi-3's tokenizer: a <s> in front of every encoded text.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>",
        pad_token="<|endoftext|>", chat_template=PHI3_TEMPLATE, model_max_length=4096,
        padding_side="right",
    )


def build_tiny_model(tiny: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> Phi3ForCausalLM:
    torch.manual_seed(tiny.seed)
    config = Phi3Config(
        vocab_size=len(tokenizer), hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size, num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        original_max_position_embeddings=tiny.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = Phi3ForCausalLM(config)
    # Phi-3 stops on <|end|> as well as <|endoftext|>.
    model.generation_config.eos_token_id = [
        tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id
    ]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def pretraining_stream(tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """The demo's facts as prose (no chat markup), one token stream: each text as the tokenizer
    encodes it (Phi-3's puts <s> in front), then <|endoftext|>."""
    # One line per turn: a SentencePiece tokenizer (Phi-3's) spells a word at the start of a
    # line without the space marker it has mid-sentence, and replies start on a new line.
    texts = ["\n".join(m["content"] for m in row["messages"]) + tokenizer.eos_token
             for row in generate_conversations(4 * DEMO_SIZE, DEMO_SEED + 1)]
    return torch.tensor([token for ids in tokenizer(texts)["input_ids"] for token in ids])


def pretrain_tiny_model(
    model: Phi3ForCausalLM, tokenizer: PreTrainedTokenizerFast, tiny: TinyModelConfig,
    rows: int = 8, block: int = 128,
) -> None:
    """Full-parameter causal-LM training on plain text, nanoGPT style: each step a batch of
    random blocks cut from one token stream, so no step spends compute on padding (a third of
    a padded batch of these short texts).

    This makes the tiny base behave like a real pretrained model: it knows the facts as prose
    but not Phi-3's chat format, which is what LoRA fine-tuning then teaches it.
    """
    stream = pretraining_stream(tokenizer)
    generator = torch.Generator().manual_seed(tiny.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tiny.pretrain_learning_rate,
                                  weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=tiny.pretrain_learning_rate, total_steps=tiny.pretrain_steps,
        pct_start=0.05,
    )
    model.train()
    bar = Progress("build tiny base", tiny.pretrain_steps)
    for step in range(1, tiny.pretrain_steps + 1):
        starts = torch.randint(len(stream) - block, (rows,), generator=generator).tolist()
        batch = torch.stack([stream[start:start + block] for start in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(step, loss=loss.item())
    bar.close()
    model.eval()
    log.info("pretrained tiny base for %d steps, final loss %.3f", tiny.pretrain_steps, loss.item())


def ensure_tiny_model(tiny: TinyModelConfig, cache_dir: Path) -> Path:
    """Build the tiny model once per config hash; later calls return the cached directory."""
    target = tiny_model_dir(tiny, cache_dir)
    if (target / "config.json").is_file():
        return target
    # One builder: the others wait for it (the lock names who builds), then find it built.
    with exclusive(cache_dir / f".{target.name}.lock", f"building {target.name}",
                   on_wait=log.info):
        if not (target / "config.json").is_file():
            _build_tiny_model(tiny, cache_dir, target)
    return target


def _build_tiny_model(tiny: TinyModelConfig, cache_dir: Path, target: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_dir))
    if tiny.tokenizer == "phi3":
        tokenizer = forget_how_loaded(
            AutoTokenizer.from_pretrained(str(ensure_phi3_tokenizer(cache_dir))))
    else:
        tokenizer = build_tiny_tokenizer(tiny.vocab_size)
    model = build_tiny_model(tiny, tokenizer)
    if tiny.pretrain_steps:
        pretrain_tiny_model(model, tokenizer, tiny)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    staging.rename(target)  # atomic: a half-built model is never visible under `target`


def resolve_model_path(model: ModelConfig, cache_dir: Path) -> str:
    """Local directory for the weights, or a clear error before anything heavy starts."""
    if model.name_or_path == TINY_MODEL:
        assert model.tiny is not None  # guaranteed by PipelineConfig validation
        return str(ensure_tiny_model(model.tiny, cache_dir))
    local = Path(model.name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotAvailableError(f"{local}: not a model directory (no config.json)")
        return str(local)
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    cached = try_to_load_from_cache(model.name_or_path, "config.json", revision=model.revision)
    if offline and not isinstance(cached, str):
        raise ModelNotAvailableError(
            f"base model '{model.name_or_path}' is not available: HF_HUB_OFFLINE=1 and its weights "
            "are not in the Hugging Face cache. Fix: on a machine with hub access run "
            f"`hf download {model.name_or_path}` (same HF_HOME), or set model.name_or_path to a "
            "local directory holding config.json, the tokenizer and *.safetensors."
        )
    return model.name_or_path


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' means bf16 on a GPU that supports it and fp32 on CPU."""
    if name == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return getattr(torch, name)


def _wrap_load_error(model: ModelConfig, err: Exception) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"could not load base model '{model.name_or_path}': {type(err).__name__}: {err}. "
        "Check the hub id or local path, hub access (HF_TOKEN in the environment for gated "
        "models), and that the weights are safetensors."
    )


CALLER_KWARGS = ("local_files_only", "cache_dir", "token", "force_download", "proxies")


def forget_how_loaded(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Drop how this process reached the files (HF_HUB_OFFLINE sets local_files_only): not part
    of the tokenizer, yet save_pretrained writes it, and then the bytes of a registered adapter
    or base would depend on the shell that made them."""
    for key in CALLER_KWARGS:
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


def load_tokenizer(model: ModelConfig, cache_dir: Path) -> PreTrainedTokenizerFast:
    path = resolve_model_path(model, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=model.revision, trust_remote_code=False
        )
    except OSError as e:
        raise _wrap_load_error(model, e) from e
    forget_how_loaded(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if model.chat_template is not None:  # the config's template replaces the tokenizer's
        tokenizer.chat_template = model.chat_template
    return tokenizer


def bnb_config(quant: QuantizationConfig):
    """QLoRA's 4-bit settings for transformers (bitsandbytes is imported only on a GPU box)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_compute_dtype=getattr(torch, quant.compute_dtype),
        bnb_4bit_use_double_quant=quant.double_quant,
    )


def load_model(model: ModelConfig, cache_dir: Path, use_cache: bool = True,
               quantization: QuantizationConfig | None = None) -> PreTrainedModel:
    """The base in full precision, or in 4 bits when training with QLoRA."""
    path = resolve_model_path(model, cache_dir)
    extra = {"quantization_config": bnb_config(quantization)} if quantization else {}
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, revision=model.revision, dtype=resolve_dtype(model.dtype),
            attn_implementation=model.attn_implementation, use_cache=use_cache,
            trust_remote_code=False, use_safetensors=True, **extra,
        )
    except (OSError, ValueError) as e:
        raise _wrap_load_error(model, e) from e
