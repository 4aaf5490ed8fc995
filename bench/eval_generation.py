"""Batched vs one-at-a-time greedy generation throughput (a benchmark, not a test).

    .venv/bin/python bench/eval_generation.py [--prompts 128] [--batch-size 32]

Uses the tiny Phi-3 base of pipelines/tiny-cpu.yaml and held-out-style prompts from the demo
generator. Both sides produce the same replies (checked); throughput counts generated tokens up
to and including the stop token. Goal: batched at least 4x one-at-a-time.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from phi3ops.config import load_config  # noqa: E402
from phi3ops.data.demo import generate_conversations  # noqa: E402
from phi3ops.model.base_model import load_model, load_tokenizer  # noqa: E402
from phi3ops.model.inference import generate_replies, split_prompts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed(model, tokenizer, prompts, max_new_tokens, batch_size) -> tuple[list[str], float]:
    start = time.perf_counter()
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens, batch_size)
    return replies, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config(ROOT / "pipelines" / "tiny-cpu.yaml")
    cache = ROOT / ".cache" / "models"
    tokenizer, model = load_tokenizer(cfg.model, cache), load_model(cfg.model, cache).eval()
    conversations = [r["messages"] for r in generate_conversations(args.prompts, seed=99)]
    prompts, _ = split_prompts(conversations)

    generate_replies(model, tokenizer, prompts[:4], args.max_new_tokens, 4)  # warm-up
    batched, t_batched = timed(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
    single, t_single = timed(model, tokenizer, prompts, args.max_new_tokens, 1)
    same = sum(a == b for a, b in zip(batched, single, strict=True))
    tokens = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1 for r in single)
    print(f"{args.prompts} prompts, max_new_tokens {args.max_new_tokens}, {tokens} tokens out; "
          f"{same}/{len(single)} replies identical")
    print(f"one at a time: {t_single:.2f} s = {tokens / t_single:,.0f} tokens/s")
    print(f"batched ({args.batch_size}): {t_batched:.2f} s = {tokens / t_batched:,.0f} tokens/s")
    print(f"speed-up: {t_single / t_batched:.1f}x")


if __name__ == "__main__":
    main()
