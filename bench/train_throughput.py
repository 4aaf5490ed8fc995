"""Training throughput: phi3ops, the Cookbook recipe, TRL at its best (a benchmark, not a test).

    .venv/bin/python bench/train_throughput.py [--conversations 160] [--layers 4] [--hidden 512]

Every side trains the same mid-size Phi3ForCausalLM (random init, Phi-3's vocabulary size), the
same LoRA (r=16 on qkv_proj, o_proj, gate_up_proj, down_proj), for one epoch over the same
mixed-length chat data (most answers short, a few long) at max length 512, so all see the same
real (non-pad) tokens. Each side runs in its own process, so peak RSS is its own. bench/sides.py
defines the sides, shared with bench/gpu_phi3_mini.py (the full-size model on an H200):

- cookbook: the Cookbook notebook on today's TRL: SFTTrainer with peft_config, padding to the
  longest conversation in each batch of 8, no packing, gradient checkpointing on, loss on every
  token (fp32 like the other sides: see bench/sides.py).
- trl-best: plain SFTTrainer at its best settings: best-fit-decreasing packing, padding-free
  batches, no gradient checkpointing, loss on assistant tokens, about the same real tokens per
  optimizer step; TRL's own LM head, which off Triton projects every position.
- phi3ops: phi3ops' trainer and build_sft_config, packed and padding-free like trl-best, the LM
  head projecting only the labelled positions (lm_head.py).

Reported: real tokens/s, phi3ops' ratio to each other side, held-out assistant loss after the
epoch (equal real tokens), MFU and peak RSS. MFU is the FLOPs each side performs per real token
(its LM head only where it scores) x tokens/s, over the best fp32 matmul FLOP/s measured on this
machine: before and after each side's training, the best of all six, so a slow moment of a
shared machine cannot flatter any side. Goal: phi3ops >= 2x the cookbook's tokens/s and >= 1.5x
trl-best's, at equal or lower loss, MFU >= 40%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import sides  # noqa: E402
import torch  # noqa: E402
from transformers import Phi3Config, Phi3ForCausalLM  # noqa: E402

from phi3ops.config import TrainingConfig  # noqa: E402
from phi3ops.evaluation.scoring import assistant_loss  # noqa: E402
from phi3ops.model.base_model import build_tiny_tokenizer  # noqa: E402
from phi3ops.train.throughput import peak_memory_mb, train_flops_per_token  # noqa: E402

MAX_LENGTH, LR = 512, 1e-3
CPU = torch.device("cpu")
MATMUL_SIZES = (1024, 2048)


def mid_size_model(args) -> Phi3ForCausalLM:
    torch.manual_seed(0)
    return Phi3ForCausalLM(Phi3Config(
        hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64, vocab_size=32064, max_position_embeddings=1024,
        pad_token_id=0, use_cache=False, attn_implementation="sdpa"))


def run_side(side: str, args) -> dict:
    tokenizer = sides.mark_replies(build_tiny_tokenizer(1024))
    data = sides.conversations(args.conversations, max_length=MAX_LENGTH)
    held_out = sides.conversations(64, seed=1, max_length=MAX_LENGTH)
    lengths = [min(n, MAX_LENGTH) for n in sides.token_lengths(tokenizer, data)]
    run = sides.Run(out_dir=f"/tmp/bench-{side}", max_length=MAX_LENGTH,
                    mean_tokens=sum(lengths) / len(lengths), dtype=torch.float32,
                    learning_rate=LR)
    training = TrainingConfig(learning_rate=LR, num_train_epochs=1, warmup_ratio=0.0,
                              lr_scheduler_type="linear", **sides.phi3ops_settings(run))
    trainer = sides.build_trainer(side, mid_size_model(args), tokenizer,
                                  sides.chat_dataset(data), run, training)
    steady = sides.SteadyState()
    trainer.add_callback(steady)
    peaks = [sides.best_matmul_flops(torch.float32, CPU, MATMUL_SIZES)]
    trainer.train()
    peaks.append(sides.best_matmul_flops(torch.float32, CPU, MATMUL_SIZES))
    flops = train_flops_per_token(trainer.model, run.mean_tokens, sides.head_share(trainer, side))
    trainer.model.eval()
    with torch.no_grad():
        loss = assistant_loss(trainer.model, tokenizer, held_out, 16)
    return {"side": side, **steady.result(), "held_out_loss": round(loss, 4),
            "steps": trainer.state.global_step, "rows_per_step": run.packed_rows,
            "matmul_gflops": round(max(peaks) / 1e9, 1),
            "model_gflop_per_token": round(flops / 1e9, 4), **peak_memory_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=sides.SIDES)
    parser.add_argument("--conversations", type=int, default=160)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args()
    if args.side:  # one side, in its own process
        print("RESULT " + json.dumps(run_side(args.side, args)))
        return
    results = {}
    for side in sides.SIDES:
        out = subprocess.run([sys.executable, __file__, "--side", side, *sys.argv[1:]],
                             capture_output=True, text=True, check=True).stdout
        results[side] = json.loads(out.split("RESULT ", 1)[1])
        print(json.dumps(results[side]))
    peak = max(r["matmul_gflops"] for r in results.values()) * 1e9
    for r in results.values():
        r["mfu"] = r["tokens_per_s"] * r["model_gflop_per_token"] * 1e9 / peak
    cook, best, ours = (results[side] for side in sides.SIDES)

    def each(key: str, fmt: str = "") -> str:
        return ", ".join(f"{side} {format(r[key], fmt)}" for side, r in results.items())

    print(f"\nreal tokens: {each('real_tokens', '.0f')}")
    print(f"tokens/s: {each('tokens_per_s')}")
    print(f"phi3ops vs cookbook: {ours['tokens_per_s'] / cook['tokens_per_s']:.2f}x (goal >= 2x); "
          f"phi3ops vs trl-best: {ours['tokens_per_s'] / best['tokens_per_s']:.2f}x "
          "(goal >= 1.5x)")
    print(f"held-out assistant loss: {each('held_out_loss')} (goal: phi3ops <= the others)")
    print(f"MFU: {each('mfu', '.1%')} (goal >= 40%; best matmul {peak / 1e9:.0f} GFLOP/s)")
    print(f"peak RSS MB: {each('peak_rss_mb', '.0f')}")


if __name__ == "__main__":
    main()
