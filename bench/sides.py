"""The three training setups the throughput benches compare, defined once for both of them.

bench/train_throughput.py runs them on a mid-size model on CPU, bench/gpu_phi3_mini.py on the
full-size Phi-3-mini on an H200: one definition keeps the two comparisons the same comparison.

- cookbook: the Phi-3 Cookbook's recipe on today's TRL: SFTTrainer with peft_config, batches of
  COOKBOOK_BATCH conversations padded to the longest one, no packing, gradient checkpointing,
  loss on every token; bf16 as in the Cookbook where the run computes in bf16 (the GPU), fp32 on
  a CPU, like the other sides: a CPU without bf16 units multiplies bf16 matrices 150x slower than
  fp32 ones, and no one would train so.
- trl-best: plain SFTTrainer at its best settings: best-fit-decreasing packing, padding-free
  batches, no gradient checkpointing, loss on the assistant's tokens only.
- phi3ops: phi3ops' own path: `build_sft_config` and `Phi3opsSFTTrainer`, the adapter attached by
  `phi3ops.model.adapters`, packed and padding-free without gradient checkpointing.

The packed sides take as many rows of `max_length` tokens per step as the cookbook's batch holds
real tokens on average, so every side learns from about the same tokens per optimizer step.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from trl import SFTConfig, SFTTrainer

from phi3ops.config import PeftLoraConfig, TrainingConfig
from phi3ops.model import adapters
from phi3ops.model.templates import plan_training_template
from phi3ops.train.throughput import matmul_flops_per_s
from phi3ops.train.trainer import Phi3opsSFTTrainer, build_sft_config, scored_fraction

SIDES = ("cookbook", "trl-best", "phi3ops")
COOKBOOK_BATCH = 8
LORA = PeftLoraConfig(r=16, lora_alpha=32, lora_dropout=0.05)  # on qkv/o/gate_up/down_proj
WORDS = ("the river city mountain colour number answer question north south water light "
         "paris lima tokyo green blue red seven twelve add sum capital opposite warm cold").split()


def conversations(n: int, seed: int = 0, max_length: int = 512) -> list[list[dict]]:
    """Most answers short, one in eight long. At max_length 512: 5-30 and 150-350 words; the
    ranges grow with max_length, so a long conversation still fits in one row."""
    rng = random.Random(seed)
    scale = max_length / 512
    short, long = (5, round(30 * scale)), (round(150 * scale), round(350 * scale))
    out = []
    for _ in range(n):
        question = " ".join(rng.choices(WORDS, k=rng.randint(6, 20))) + "?"
        words = rng.randint(*long) if rng.random() < 0.125 else rng.randint(*short)
        out.append([{"role": "user", "content": question},
                    {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=words))}])
    return out


def mark_replies(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The training twin of the tokenizer's chat template (phi3ops.model.templates): the same text
    with `{% generation %}` around each reply, which assistant-only loss needs. Every side uses
    it."""
    tokenizer.chat_template = plan_training_template(tokenizer.chat_template,
                                                     assistant_only_loss=True).training
    return tokenizer


def token_lengths(tokenizer: PreTrainedTokenizerBase, data: list[list[dict]]) -> list[int]:
    """Tokens per conversation as trained. (apply_chat_template returns a BatchEncoding, whose
    len() counts its keys.)"""
    return [len(tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"])
            for c in data]


def chat_dataset(data: list[list[dict]]) -> Dataset:
    return Dataset.from_list([{"messages": c} for c in data])


@dataclass(frozen=True)
class Run:
    """What every side shares: where it writes, how long it trains, how big a step is."""

    out_dir: str
    max_length: int
    mean_tokens: float  # real tokens of a conversation on average, each capped at max_length
    dtype: torch.dtype
    learning_rate: float
    max_steps: int = -1  # -1: one epoch
    cookbook_batch: int = COOKBOOK_BATCH

    @property
    def packed_rows(self) -> int:
        """Rows per packed step holding about the real tokens of one cookbook batch."""
        return max(1, round(self.cookbook_batch * self.mean_tokens / self.max_length))


def _common(run: Run) -> dict:
    return {"output_dir": run.out_dir, "num_train_epochs": 1, "max_steps": run.max_steps,
            "learning_rate": run.learning_rate, "max_length": run.max_length,
            "logging_steps": 1, "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
            "use_cpu": not torch.cuda.is_available(), "seed": 0}


def cookbook_config(run: Run) -> SFTConfig:
    return SFTConfig(per_device_train_batch_size=run.cookbook_batch, packing=False,
                     bf16=run.dtype == torch.bfloat16, gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": False}, **_common(run))


def trl_best_config(run: Run) -> SFTConfig:
    return SFTConfig(per_device_train_batch_size=run.packed_rows, packing=True,
                     packing_strategy="bfd", padding_free=True, gradient_checkpointing=False,
                     assistant_only_loss=True, bf16=run.dtype == torch.bfloat16, **_common(run))


def phi3ops_settings(run: Run) -> dict:
    """The training_config fields phi3ops sets where memory is ample (a GPU of 80 GB and more,
    or a small model): packed padding-free rows, no gradient checkpointing, the shared step."""
    return {"packing": True, "padding_free": True, "gradient_checkpointing": False,
            "assistant_only_loss": True, "per_device_train_batch_size": run.packed_rows,
            "gradient_accumulation_steps": 1, "max_length": run.max_length,
            "max_steps": run.max_steps, "logging_steps": 1, "save_steps": 10**6}


def build_trainer(side: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                  dataset: Dataset, run: Run, training: TrainingConfig) -> SFTTrainer:
    """`training` is phi3ops' training_config (phi3ops_settings applied); the others ignore it."""
    if side == "phi3ops":
        args = build_sft_config(training, run.dtype, Path(run.out_dir))
        args.save_strategy = "no"
        return Phi3opsSFTTrainer(model=adapters.attach(model, LORA, "peft"), args=args,
                                 train_dataset=dataset, processing_class=tokenizer)
    args = cookbook_config(run) if side == "cookbook" else trl_best_config(run)
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=adapters.build_lora_config(LORA))


def head_share(trainer: SFTTrainer, side: str) -> float:
    """Share of positions the LM head projects: TRL's Triton head (GPU) and phi3ops' CPU head
    only those with a label; TRL's head off Triton every one."""
    if side == "phi3ops" or trainer.args.device.type == "cuda":
        return scored_fraction(trainer)
    return 1.0


def best_matmul_flops(dtype: torch.dtype, device: torch.device, sizes: tuple[int, ...]) -> float:
    return max(matmul_flops_per_s(dtype, device, size, repeats=10) for size in sizes)


def clock(device: torch.device) -> float:
    """Wall time once the device has finished what it was given."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class SteadyState(TrainerCallback):
    """Real tokens (TRL's `num_tokens`: non-pad) and seconds from the end of step
    `warmup_steps` to the last step, so one-off costs of the first steps (kernel compilation,
    allocator growth, clock ramp-up) stay out. Needs logging_steps=1."""

    def __init__(self, warmup_steps: int = 0):
        self.warmup_steps = warmup_steps
        self.start: tuple[float, float] | None = None
        self.end: tuple[float, float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.warmup_steps == 0:
            self.start = (clock(args.device), 0.0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "num_tokens" not in logs or "loss" not in logs:
            return
        now, tokens = clock(args.device), float(logs["num_tokens"])
        if state.global_step == self.warmup_steps:
            self.start = (now, tokens)
        self.end = (now, tokens, state.global_step)

    def result(self) -> dict:
        if self.start is None or self.end is None or self.end[0] <= self.start[0]:
            raise RuntimeError(f"no steps measured after {self.warmup_steps} warm-up steps")
        tokens, seconds = self.end[1] - self.start[1], self.end[0] - self.start[0]
        return {"real_tokens": tokens, "seconds": round(seconds, 3),
                "tokens_per_s": round(tokens / seconds, 1),
                "measured_steps": self.end[2] - self.warmup_steps}
