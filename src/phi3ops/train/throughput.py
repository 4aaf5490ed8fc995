"""Training speed in the units that compare across machines: real tokens/s, MFU, peak memory.

Real tokens are the non-pad tokens the model learns from (TRL's `num_tokens`), so padding and
packing choices cannot inflate the number. MFU divides the model FLOPs those tokens cost by the
matmul FLOP/s this machine reaches, measured in the same process, not a datasheet figure.
"""

from __future__ import annotations

import resource
import sys
import time

import torch
from torch import nn
from transformers import TrainerCallback


def matmul_flops_per_s(dtype: torch.dtype, device: torch.device, size: int | None = None,
                       repeats: int = 5) -> float:
    """Best of a few large square matmuls: what dense compute reaches here at best."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def train_flops_per_token(model: nn.Module, mean_seq_len: float,
                          scored_fraction: float = 1.0) -> float:
    """FLOPs of one trained token with a frozen base and LoRA weights.

    Every matmul weight costs 2 FLOPs per token forward and 2 more backward for the activation
    gradient; only trainable weights need the weight gradient (2 more). The LM head projects only
    the `scored_fraction` of tokens that carry a label. Attention adds QK^T and AV:
    2 * 2 * hidden * context forward per layer (causal: half the sequence on average), three
    times that with backward. Embedding lookups are not matmuls and are left out.
    """
    head = model.get_output_embeddings().weight
    frozen = trainable = 0.0
    for name, param in model.named_parameters():  # a head tied to the embedding counts once
        if param is not head and (param.ndim < 2 or "embed_tokens" in name):
            continue
        share = scored_fraction if param is head else 1.0
        if param.requires_grad:
            trainable += share * param.numel()
        else:
            frozen += share * param.numel()
    config = model.config
    if hasattr(model, "get_base_model"):
        config = model.get_base_model().config
    attention = 3 * 4 * config.num_hidden_layers * config.hidden_size * mean_seq_len / 2
    return 4 * frozen + 6 * trainable + attention


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process; on a GPU also peak allocated device memory."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"peak_rss_mb": rss_kb / (1024 * 1024 if sys.platform == "darwin" else 1024)}
    if torch.cuda.is_available():
        peak["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


class ThroughputCallback(TrainerCallback):
    """Adds tokens_per_s, mfu and peak memory to each training log (before it is forwarded)."""

    def __init__(self, flops_per_token: float, peak_flops: float, world_size: int = 1):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops * world_size
        self.last: tuple[float, float | None] = (time.perf_counter(), 0.0)

    def on_train_begin(self, args, state, control, **kwargs):
        # A fresh run starts from zero tokens; a resumed one gets its rate from its second log.
        self.last = (time.perf_counter(), 0.0 if state.global_step == 0 else None)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "num_tokens" not in logs or "loss" not in logs:
            return
        now, tokens = time.perf_counter(), float(logs["num_tokens"])
        since, before = self.last
        self.last = (now, tokens)
        if before is not None and tokens > before and now > since:
            rate = (tokens - before) / (now - since)
            logs["tokens_per_s"] = rate
            logs["mfu"] = rate * self.flops_per_token / self.peak_flops
        logs.update(peak_memory_mb())


def loss_curve(history: list[dict]):
    """The training loss against step, as a matplotlib figure for mlflow.log_figure."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    points = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if points:
        ax.plot(*zip(*points, strict=True), marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
