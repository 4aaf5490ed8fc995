"""Full-size Phi-3-mini on CPU, through phi3ops' own path: two LoRA steps, the adapter, a merge.

    make smoke-full-size        # opt-in, not in `make test`: minutes, ~16 GB of disk in a tmp dir

The 3.8B weights cannot be downloaded here, so the full-size architecture (phi3_mini.py) is built
with random weights in bf16 and saved as a local model directory beside Phi-3's real tokenizer.
Then what `phi3ops train` does on that directory: preprocess the demo data at 128 tokens, train
two LoRA steps with gradient checkpointing in a training child (pipelines/phi3-mini-lora.yaml's
settings), save the adapter; then merge it into the base and save the merged model. Prints the
seconds of each phase and the peak RSS of this process and of the training child.

Training computes in bf16 where this CPU multiplies bf16 matrices at a useful speed (AVX-512
BF16, AMX) and in fp32 otherwise (`--dtype` decides by hand): without those units PyTorch's bf16
matmul runs at a fraction of a GFLOP/s, and one step would take hours. fp32 doubles the memory
of the weights (15.3 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from phi3ops.config import ProjectPaths, load_config  # noqa: E402
from phi3ops.data.demo import write_demo_dataset  # noqa: E402
from phi3ops.data.preprocess import preprocess  # noqa: E402
from phi3ops.model.base_model import load_tokenizer  # noqa: E402
from phi3ops.model.inference import merge_adapter  # noqa: E402
from phi3ops.model.phi3_mini import build_phi3_mini  # noqa: E402
from phi3ops.model.phi3_tokenizer import ensure_phi3_tokenizer  # noqa: E402
from phi3ops.train.launch import run_training  # noqa: E402
from phi3ops.train.throughput import matmul_flops_per_s  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LENGTH = 128


def peak_rss_gb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 2**20  # kB on Linux


def compute_dtype() -> str:
    """bf16 unless this CPU's bf16 matmul is far slower than its fp32 one (measured)."""
    cpu = torch.device("cpu")
    ratio = matmul_flops_per_s(torch.bfloat16, cpu, 512) / matmul_flops_per_s(torch.float32, cpu,
                                                                               512)
    return "bfloat16" if ratio > 0.5 else "float32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where the 16 GB go (default: a tmp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the model directories")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"],
                        help="training and merge dtype (default: bf16 if this CPU is fast at it)")
    args = parser.parse_args()
    dtype = args.dtype or compute_dtype()
    print(f"computing in {dtype}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="phi3-full-", dir=args.workdir))
    paths, seconds = ProjectPaths(ROOT), {}
    try:
        started = time.perf_counter()
        base = work / "phi3-mini-random"
        torch.manual_seed(0)
        build_phi3_mini("cpu", torch.bfloat16).save_pretrained(base, safe_serialization=True)
        AutoTokenizer.from_pretrained(ensure_phi3_tokenizer(paths.models)).save_pretrained(base)
        seconds["build and save the random base"] = time.perf_counter() - started

        cfg = load_config(ROOT / "pipelines" / "phi3-mini-lora.yaml", [
            f"model.name_or_path={base}", f"model.dtype={dtype}", f"preprocess.max_length={LENGTH}",
            f"training_config.max_length={LENGTH}", "training_config.max_steps=2",
            "training_config.per_device_train_batch_size=1",
            "training_config.gradient_accumulation_steps=1", "training_config.logging_steps=1",
            "training_config.gradient_checkpointing=true"], ROOT)
        started = time.perf_counter()
        prep = preprocess(write_demo_dataset(work / "data").parent, "demo", cfg.preprocess,
                          load_tokenizer(cfg.model, paths.models), work / "processed")
        seconds["preprocess"] = time.perf_counter() - started

        started = time.perf_counter()
        trained = run_training(cfg, Path(prep.out_dir), work / "run", paths.models)
        seconds["train 2 LoRA steps (child: load, train, save adapter)"] = (
            time.perf_counter() - started)

        started = time.perf_counter()
        merged = merge_adapter(cfg.model, Path(trained.adapter_dir), work / "merged",
                               paths.models)
        seconds["merge and save"] = time.perf_counter() - started
        report = {
            "dtype": dtype, "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "peak_rss_gb": {"training child": round(peak_rss_gb(resource.RUSAGE_CHILDREN), 2),
                            "this process (build, merge)": round(
                                peak_rss_gb(resource.RUSAGE_SELF), 2)},
            "train_loss": trained.train_loss, "global_step": trained.global_step,
            "trainable_params": trained.trainable_params, "total_params": trained.total_params,
            "adapter_mb": round(sum(f.stat().st_size for f in Path(trained.adapter_dir).iterdir())
                                / 2**20, 1),
            "merged_gb": round(sum(f.stat().st_size for f in merged.iterdir()) / 2**30, 2),
        }
        print(json.dumps(report, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
