"""Training throughput: our SFT settings against the Cookbook recipe (a benchmark, not a test).

    .venv/bin/python bench/train_throughput.py [--conversations 160] [--layers 4] [--hidden 512]

Both sides train the same mid-size Phi3ForCausalLM (random init, Phi-3's vocabulary size), the
same LoRA (r=16 on qkv_proj, o_proj, gate_up_proj, down_proj), for one epoch over the same
mixed-length chat data (most answers short, a few long), so both see the same real (non-pad)
tokens. Each side runs in its own process, so peak RSS is its own.

- baseline: the Cookbook notebook on today's TRL: SFTTrainer with peft_config, padding to the
  longest conversation in each batch of 8, no packing, max length 512, gradient checkpointing on,
  loss on every token.
- ours: phi3ops' trainer and build_sft_config: best-fit-decreasing packing into rows of 512
  tokens, padding-free batches, no gradient checkpointing (not needed at this size), loss on
  assistant tokens, the LM head projecting only those (lm_head.py); batch size chosen for about
  the same real tokens per optimizer step.

Reported: real tokens/s, the ratio, held-out assistant loss after the epoch (equal real tokens),
MFU and peak RSS. MFU is the FLOPs each side performs per real token (its LM head only where it
scores) x tokens/s, over the best fp32 matmul FLOP/s measured on this machine: before and after
each side's training, the best of all four, so a slow moment of a shared machine cannot flatter
either side. Goal: ours >= 2x baseline tokens/s at equal or lower loss, MFU >= 40%.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import Phi3Config, Phi3ForCausalLM  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from phi3ops import adapters  # noqa: E402
from phi3ops.config import PeftLoraConfig, TrainingConfig  # noqa: E402
from phi3ops.evaluation import assistant_loss  # noqa: E402
from phi3ops.modeling import PHI3_CHAT_TEMPLATE, build_tiny_tokenizer  # noqa: E402
from phi3ops.throughput import (  # noqa: E402
    matmul_flops_per_s,
    peak_memory_mb,
    train_flops_per_token,
)
from phi3ops.train import Phi3opsSFTTrainer, build_sft_config, scored_fraction  # noqa: E402

WORDS = ("the river city mountain colour number answer question north south water light "
         "paris lima tokyo green blue red seven twelve add sum capital opposite warm cold").split()
BASELINE_BATCH, MAX_LENGTH, LR = 8, 512, 1e-3


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """Most answers short (5-30 words), one in eight long (150-350 words)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        question = " ".join(rng.choices(WORDS, k=rng.randint(6, 20))) + "?"
        words = rng.randint(150, 350) if rng.random() < 0.125 else rng.randint(5, 30)
        out.append([{"role": "user", "content": question},
                    {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=words))}])
    return out


def mid_size_model(args) -> Phi3ForCausalLM:
    torch.manual_seed(0)
    return Phi3ForCausalLM(Phi3Config(
        hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64, vocab_size=32064, max_position_embeddings=1024,
        pad_token_id=0, use_cache=False, attn_implementation="sdpa"))


def side_config(side: str, out_dir: str, mean_tokens: float) -> SFTConfig:
    common = {"output_dir": out_dir, "num_train_epochs": 1, "learning_rate": LR,
              "logging_steps": 1, "save_strategy": "no", "report_to": "none",
              "disable_tqdm": True, "use_cpu": True, "seed": 0, "max_length": MAX_LENGTH}
    if side == "baseline":
        return SFTConfig(per_device_train_batch_size=BASELINE_BATCH, packing=False,
                         gradient_checkpointing=True,
                         gradient_checkpointing_kwargs={"use_reentrant": False}, **common)
    rows = max(1, round(BASELINE_BATCH * mean_tokens / MAX_LENGTH))  # same tokens per step
    cfg = TrainingConfig(learning_rate=LR, per_device_train_batch_size=rows, num_train_epochs=1,
                         max_length=MAX_LENGTH, packing=True, padding_free=True,
                         logging_steps=1, save_steps=10**6, warmup_ratio=0.0,
                         lr_scheduler_type="linear")
    sft = build_sft_config(cfg, torch.float32, out_dir)
    sft.save_strategy = "no"
    return sft


def run_side(side: str, args) -> dict:
    tokenizer = build_tiny_tokenizer(1024)
    tokenizer.chat_template = PHI3_CHAT_TEMPLATE
    data = conversations(args.conversations)
    held_out = conversations(64, seed=1)
    lengths = [len(tokenizer.apply_chat_template(c, tokenize=True)) for c in data]
    mean_tokens = sum(min(n, MAX_LENGTH) for n in lengths) / len(lengths)
    model = mid_size_model(args)
    lora = PeftLoraConfig(r=16, lora_alpha=32, lora_dropout=0.05)
    if side == "ours":
        model = adapters.attach(model, lora, "peft")
        peft_config, trainer_class = None, Phi3opsSFTTrainer
    else:
        peft_config, trainer_class = adapters.build_lora_config(lora), SFTTrainer
    trainer = trainer_class(model=model, args=side_config(side, f"/tmp/bench-{side}", mean_tokens),
                            train_dataset=Dataset.from_list([{"messages": c} for c in data]),
                            processing_class=tokenizer, peft_config=peft_config)
    peaks = [best_matmul_flops()]
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    peaks.append(best_matmul_flops())
    tokens = max(h.get("num_tokens", 0) for h in trainer.state.log_history)
    # TRL's head on CPU projects every position; ours only the labelled ones.
    flops = train_flops_per_token(trainer.model, mean_tokens,
                                  scored_fraction(trainer) if side == "ours" else 1.0)
    trainer.model.eval()
    with torch.no_grad():
        loss = assistant_loss(trainer.model, tokenizer, held_out, 16)
    return {"side": side, "real_tokens": tokens, "seconds": round(seconds, 1),
            "tokens_per_s": round(tokens / seconds, 1), "held_out_loss": round(loss, 4),
            "steps": trainer.state.global_step, "matmul_gflops": round(max(peaks) / 1e9, 1),
            "model_gflop_per_token": round(flops / 1e9, 4), **peak_memory_mb()}


def best_matmul_flops() -> float:
    return max(matmul_flops_per_s(torch.float32, torch.device("cpu"), size, repeats=10)
               for size in (1024, 2048))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["baseline", "ours"])
    parser.add_argument("--conversations", type=int, default=160)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args()
    if args.side:  # one side, in its own process
        print("RESULT " + json.dumps(run_side(args.side, args)))
        return
    results = {}
    for side in ("baseline", "ours"):
        out = subprocess.run([sys.executable, __file__, "--side", side, *sys.argv[1:]],
                             capture_output=True, text=True, check=True).stdout
        results[side] = json.loads(out.split("RESULT ", 1)[1])
        print(json.dumps(results[side]))
    base, ours = results["baseline"], results["ours"]
    peak = max(base["matmul_gflops"], ours["matmul_gflops"]) * 1e9
    for side in (base, ours):
        side["mfu"] = side["tokens_per_s"] * side["model_gflop_per_token"] * 1e9 / peak
    print(f"\nreal tokens: baseline {base['real_tokens']:.0f}, ours {ours['real_tokens']:.0f}")
    print(f"tokens/s: baseline {base['tokens_per_s']}, ours {ours['tokens_per_s']} "
          f"({ours['tokens_per_s'] / base['tokens_per_s']:.2f}x; goal >= 2x)")
    print(f"held-out assistant loss: baseline {base['held_out_loss']}, "
          f"ours {ours['held_out_loss']} (goal: ours <= baseline)")
    print(f"MFU: baseline {base['mfu']:.1%}, ours {ours['mfu']:.1%} (goal >= 40%; "
          f"best matmul {peak / 1e9:.0f} GFLOP/s)")
    print(f"peak RSS MB: baseline {base['peak_rss_mb']:.0f}, ours {ours['peak_rss_mb']:.0f}")


if __name__ == "__main__":
    main()
