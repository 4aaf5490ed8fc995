"""Full-size Phi-3-mini LoRA training on one H200: the Cookbook, TRL at its best, phi3ops.

On the lent H200, in the repo's root, with `.whl` and the tokenizer's directory in `carry`:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src
    PYTHONUNBUFFERED=1 python3 bench/gpu_phi3_mini.py --tokenizer .cache/models/phi3-tokenizer-*

There is no package index there, so both are made here first: `make gpu-wheels` fills .whl/
(what the image lacks, about 5 MB) and
`PYTHONPATH=src .venv/bin/python -m phi3ops.model.phi3_tokenizer` builds the tokenizer and
prints its directory. About 4 minutes there (--side-timeout bounds each side); the JSON lands
in $OUT/gpu_phi3_mini.json. Here, the same code path on a tiny architecture on CPU (about two
minutes; its numbers check the path, they measure nothing):

    PYTHONPATH=src .venv/bin/python bench/gpu_phi3_mini.py --smoke [--tokenizer DIR]

It trains the random-init full-size Phi-3-mini (3.8B, built on the GPU) in bf16 at max length
2048 with LoRA r=16 on qkv_proj, o_proj, gate_up_proj and down_proj, on one seeded set of
mixed-length chats (most short, one in eight long), for --warmup-steps then --steps optimizer
steps per side; bench/sides.py defines the sides, each run in its own process:

- cookbook: the Cookbook's recipe on today's TRL (padded batches of 8, gradient checkpointing).
- trl-best: plain SFTTrainer packed (bfd), padding-free, no gradient checkpointing, assistant
  loss only, about the same real tokens per step.
- phi3ops: build_sft_config from pipelines/phi3-mini-lora.yaml's training_config, overridden as
  phi3ops configures an H200 (packed, padding-free, no checkpointing, the same step), and
  Phi3opsSFTTrainer.

Per side: real tokens/s (TRL's num_tokens: no pad) over the steps after warm-up, model FLOPs per
token (phi3ops.train.throughput.train_flops_per_token), MFU against the best bf16 matmul measured in
these runs (before and after each side), and peak allocated GPU memory. Once: one merge of the
phi3ops adapter (merge_and_unload) and a 16-prompt greedy batched generation (left padding, KV
cache). Results go to --out as JSON, and a markdown table for the README ends the output.
Goal: phi3ops MFU >= 45%, >= 2x the cookbook's tokens/s and >= 1.5x trl-best's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)  # renames due in transformers 6

import sides  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerBase  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from phi3ops.config import load_config  # noqa: E402
from phi3ops.model import adapters  # noqa: E402
from phi3ops.model.base_model import build_tiny_tokenizer  # noqa: E402
from phi3ops.model.phi3_mini import build_phi3_mini  # noqa: E402
from phi3ops.train.throughput import train_flops_per_token  # noqa: E402

PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "phi3-mini-lora.yaml"
SMOKE_ARCH = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 4, "intermediate_size": 256}
GPU_MATMUL_SIZES, SMOKE_MATMUL_SIZES = (4096, 8192, 16384), (256, 512)
PROMPTS = 16


def load_tokenizer(args) -> PreTrainedTokenizerBase:
    """The real Phi-3 tokenizer (a local directory), or a tiny BPE (--smoke without one)."""
    tokenizer = (build_tiny_tokenizer(1024) if args.tokenizer is None
                 else AutoTokenizer.from_pretrained(args.tokenizer))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return sides.mark_replies(tokenizer)


def build_model(tokenizer: PreTrainedTokenizerBase, args):
    """Random init, directly on the device: no 7.6 GB of weights to fetch."""
    torch.manual_seed(0)
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
           "bos_token_id": tokenizer.bos_token_id, "attn_implementation": args.attn,
           "use_cache": False}
    arch = {**SMOKE_ARCH, "vocab_size": len(tokenizer)} if args.smoke else {}
    return build_phi3_mini(args.device, args.dtype, **ids, **arch)


def run_side(side: str, args) -> dict:
    device = torch.device(args.device)
    tokenizer = load_tokenizer(args)
    data = sides.conversations(args.conversations, max_length=args.max_length)
    lengths = [min(n, args.max_length) for n in sides.token_lengths(tokenizer, data)]
    pipeline = load_config(PIPELINE)
    run = sides.Run(out_dir=f"{tempfile.gettempdir()}/gpu-bench-{side}",
                    max_length=args.max_length, mean_tokens=sum(lengths) / len(lengths),
                    dtype=args.dtype, learning_rate=pipeline.training_config.learning_rate,
                    max_steps=args.warmup_steps + args.steps, cookbook_batch=args.cookbook_batch)
    training = load_config(PIPELINE, [f"training_config.{key}={json.dumps(value)}" for key, value
                                      in sides.phi3ops_settings(run).items()]).training_config
    peaks = [sides.best_matmul_flops(args.dtype, device, args.matmul_sizes)]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer = sides.build_trainer(side, build_model(tokenizer, args), tokenizer,
                                  sides.chat_dataset(data), run, training)
    trainer.remove_callback(PrinterCallback)  # a dict per step would bury the results
    steady = sides.SteadyState(args.warmup_steps)
    trainer.add_callback(steady)
    print(f"[{side}] training {run.max_steps} steps, {run.packed_rows} packed rows or "
          f"{run.cookbook_batch} padded conversations a step", file=sys.stderr, flush=True)
    trainer.train()
    peak_gb = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    flops = train_flops_per_token(trainer.model, run.mean_tokens, sides.head_share(trainer, side))
    result = {"side": side, **steady.result(), "steps": trainer.state.global_step,
              "warmup_steps": args.warmup_steps, "packed_rows": run.packed_rows,
              "mean_tokens": round(run.mean_tokens, 1), "model_gflop_per_token": flops / 1e9,
              "peak_gpu_gb": None if peak_gb is None else round(peak_gb, 2)}
    if side == "phi3ops":
        try:  # the training numbers are what this run is for: keep them if this part fails
            result |= merge_and_generate(trainer, tokenizer, data, device, args.max_new_tokens)
        except Exception as e:
            traceback.print_exc()
            result["merge_error"] = f"{type(e).__name__}: {e}"
    peaks.append(sides.best_matmul_flops(args.dtype, device, args.matmul_sizes))
    return result | {"matmul_tflops": max(peaks) / 1e12}


def merge_and_generate(trainer, tokenizer: PreTrainedTokenizerBase, data: list[list[dict]],
                       device: torch.device, max_new_tokens: int) -> dict:
    """Fold the trained adapter into the base, then greedy-decode a batch of prompts with the
    KV cache: what serving the merged model costs, with random weights."""
    started = sides.clock(device)
    model = adapters.merged(trainer.accelerator.unwrap_model(trainer.model)).eval()
    merge_s = sides.clock(device) - started
    tokenizer.padding_side = "left"
    batch = tokenizer.apply_chat_template([c[:1] for c in data[:PROMPTS]], tokenize=True,
                                          add_generation_prompt=True, padding=True,
                                          return_tensors="pt", return_dict=True).to(device)

    def generate(tokens: int) -> torch.Tensor:  # exactly `tokens` new tokens, no early stop
        return model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens,
                              do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id)

    with torch.inference_mode():
        generate(4)  # warm-up
        started = sides.clock(device)
        out = generate(max_new_tokens)
        seconds = sides.clock(device) - started
    new_tokens = out[:, batch["input_ids"].shape[1]:].numel()
    return {"merge_s": round(merge_s, 3), "generate_prompts": len(out),
            "generate_new_tokens": new_tokens, "generate_s": round(seconds, 3),
            "generate_tokens_per_s": round(new_tokens / seconds, 1)}


def run_child(side: str, args, result_dir: Path) -> dict:
    """One side in a fresh process: its own peak memory, no state left by another side."""
    path = result_dir / f"{side}.json"
    command = [sys.executable, __file__, *sys.argv[1:], "--side", side, "--result", str(path)]
    started = time.perf_counter()
    try:
        code = subprocess.run(command, timeout=args.side_timeout).returncode
    except subprocess.TimeoutExpired:
        return {"side": side, "error": f"timed out after {args.side_timeout} s"}
    if code != 0 or not path.is_file():
        return {"side": side, "error": f"exit code {code}"}
    return json.loads(path.read_text()) | {"wall_s": round(time.perf_counter() - started, 1)}


def summarize(results: dict[str, dict]) -> dict:
    """MFU against the best matmul of all the runs, the ratios, and the README table."""
    done = {side: r for side, r in results.items() if "error" not in r}
    peak = max((r["matmul_tflops"] for r in done.values()), default=0.0) * 1e12
    for r in done.values():
        r["mfu"] = r["tokens_per_s"] * r["model_gflop_per_token"] * 1e9 / peak
    rows = ["| side | tokens/s | MFU | peak GB | steps |", "| --- | --- | --- | --- | --- |"]
    for side, r in results.items():
        if "error" in r:
            rows.append(f"| {side} | failed ({r['error']}) | | | |")
            continue
        gb = "-" if r["peak_gpu_gb"] is None else f"{r['peak_gpu_gb']:.1f}"
        rows.append(f"| {side} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {gb} | "
                    f"{r['measured_steps']} (+{r['warmup_steps']} warm-up) |")
    ratios = {}
    ours = done.get("phi3ops")
    for other, goal in (("cookbook", 2.0), ("trl-best", 1.5)):
        if ours and other in done:
            ratios[f"phi3ops_vs_{other}"] = {
                "ratio": ours["tokens_per_s"] / done[other]["tokens_per_s"], "goal": goal}
    return {"matmul_tflops": peak / 1e12, "ratios": ratios, "table": "\n".join(rows)}


def report(results: dict[str, dict], summary: dict, smoke: bool) -> None:
    print(f"\nbest bf16 matmul: {summary['matmul_tflops']:.4g} TFLOP/s")
    for side, r in results.items():
        if "error" in r:
            print(f"{side}: FAILED ({r['error']})")
            continue
        print(f"{side}: {r['tokens_per_s']:,.0f} real tokens/s over {r['measured_steps']} steps "
              f"({r['real_tokens']:.0f} tokens in {r['seconds']} s), "
              f"{r['model_gflop_per_token']:.4g} GFLOP/token, MFU {r['mfu']:.1%}"
              + (" (goal >= 45%)" if side == "phi3ops" else "")
              + ("" if r["peak_gpu_gb"] is None else f", peak GPU {r['peak_gpu_gb']} GB"))
    for name, ratio in summary["ratios"].items():
        print(f"{name.replace('_', ' ')}: {ratio['ratio']:.2f}x (goal >= {ratio['goal']}x)")
    ours = results.get("phi3ops", {})
    if "merge_s" in ours:
        print(f"merge (merge_and_unload): {ours['merge_s']} s; greedy generation of "
              f"{ours['generate_prompts']} prompts: {ours['generate_new_tokens']} new tokens in "
              f"{ours['generate_s']} s = {ours['generate_tokens_per_s']:,.0f} tokens/s")
    elif "merge_error" in ours:
        print(f"merge and generation FAILED: {ours['merge_error']}")
    print("\n" + summary["table"])
    if smoke:
        print("\n(on CPU: a check of the code path; the numbers measure nothing)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="the Phi-3 tokenizer's directory (needed on GPU)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny architecture on CPU, length 256, 2 steps a side; the tiny BPE "
                        "unless --tokenizer")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60, help="measured steps after warm-up")
    parser.add_argument("--cookbook-batch", type=int, default=sides.COOKBOOK_BATCH,
                        help="conversations per cookbook step; the packed sides match its tokens")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--attn", default="sdpa", help="attn_implementation for every side")
    parser.add_argument("--side-timeout", type=int, default=150, help="seconds per side")
    parser.add_argument("--out", help="JSON results (default: $OUT/gpu_phi3_mini.json if OUT)")
    parser.add_argument("--side", choices=sides.SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.max_length, args.warmup_steps, args.steps = 256, 1, 2
        args.max_new_tokens = 8
    elif args.tokenizer is None:
        parser.error("--tokenizer DIR is required (or --smoke)")
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: this is the H200 check (try --smoke)")
    args.device = "cpu" if args.smoke else "cuda"
    args.dtype = torch.bfloat16
    args.matmul_sizes = SMOKE_MATMUL_SIZES if args.smoke else GPU_MATMUL_SIZES
    # every cookbook step a fresh batch: the cookbook sees each conversation once
    args.conversations = (args.warmup_steps + args.steps) * args.cookbook_batch
    if args.out is None and os.environ.get("OUT"):
        args.out = str(Path(os.environ["OUT"]) / "gpu_phi3_mini.json")
    return args


def main() -> None:
    args = parse_args()
    if args.side:  # one side, in its own process
        Path(args.result).write_text(json.dumps(run_side(args.side, args)))
        return
    versions = {m.__name__: m.__version__ for m in map(__import__, (
        "torch", "transformers", "trl", "peft", "datasets", "accelerate", "pyarrow", "fsspec"))}
    print(json.dumps({"device": torch.cuda.get_device_name() if not args.smoke else "cpu",
                      **versions}), flush=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as result_dir:
        for side in sides.SIDES:
            results[side] = run_child(side, args, Path(result_dir))
            print(json.dumps(results[side]), flush=True)
            if args.out:  # so far, in case a later side outlasts the call
                Path(args.out).write_text(json.dumps({"versions": versions,
                                                      "sides": results}, indent=1))
    summary = summarize(results)
    report(results, summary, args.smoke)
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"versions": versions, "sides": results, **summary,
             "settings": {k: str(v) for k, v in vars(args).items()}}, indent=1))
        print(f"\nresults: {args.out}")
    if any("error" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
