"""Score base, tuned and champion models on the same held-out split with `evaluate` metrics.

    phi3ops run evaluation.max_samples=128        # stage 4 of the retrain flow

Each held-out conversation becomes a prompt (every turn before the last assistant reply) and a
reference (that reply). Generation is greedy, batched with left padding and the KV cache, and
stops at <|end|>. Metrics (ROUGE, BLEU, chrF, exact match) are modules kept in the package;
perplexity comes from the loss on assistant tokens. Deltas against the base model and the
champion carry a paired bootstrap 95% interval. The base model is the tuned model with its
adapter disabled, so the weights load once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import evaluate
import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from phi3ops.config import EvaluationConfig, ModelConfig
from phi3ops.data.preprocess import load_processed
from phi3ops.evaluation.metrics import metric_path
from phi3ops.model import adapters
from phi3ops.model.base_model import load_tokenizer
from phi3ops.model.inference import generate_replies, load_adapter_model, split_prompts
from phi3ops.model.templates import plan_training_template
from phi3ops.progress import Progress

METRICS = ("rouge", "bleu", "chrf", "exact_match")
BOOTSTRAP_SAMPLES = 1000
log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    metrics: dict[str, dict[str, float]]  # {"base": {...}, "tuned": {...}, "champion": {...}}
    deltas: dict[str, dict[str, float]] = field(default_factory=dict)  # {"base": {"rougeL": ..}}
    samples: list[dict] = field(default_factory=list)  # prompt, reference, answers, scores

    def flat(self) -> dict[str, float]:
        """`tuned_rougeL`, `delta_base_rougeL_lo`, ...: names for MLflow metrics and tags."""
        flat = {f"{m}_{k}": v for m, scores in self.metrics.items() for k, v in scores.items()}
        flat.update({f"delta_{m}_{k}": v for m, d in self.deltas.items() for k, v in d.items()})
        return flat


@torch.inference_mode()
def assistant_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   conversations: list[list[dict]], batch_size: int) -> float:
    """Mean negative log-likelihood per assistant token (exp of it is the perplexity)."""
    # The training twin of the tokenizer's template: the same text, with the replies marked.
    template = plan_training_template(tokenizer.chat_template, assistant_only_loss=True).training
    total, count = 0.0, 0
    for start in range(0, len(conversations), batch_size):
        encoded = [tokenizer.apply_chat_template(c, chat_template=template, tokenize=True,
                                                 return_dict=True,
                                                 return_assistant_tokens_mask=True)
                   for c in conversations[start:start + batch_size]]
        width = max(len(e["input_ids"]) for e in encoded)
        ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
        labels = torch.full((len(encoded), width), -100)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            n = len(e["input_ids"])
            ids[row, :n] = torch.tensor(e["input_ids"])
            mask[row, :n] = 1
            assistant = torch.tensor(e["assistant_masks"], dtype=torch.bool)
            labels[row, :n] = torch.where(assistant, ids[row, :n], -100)
        n_tokens = int((labels[:, 1:] != -100).sum())
        loss = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                     labels=labels.to(model.device)).loss
        total, count = total + float(loss) * n_tokens, count + n_tokens
    return total / max(count, 1)


def score(predictions: list[str], references: list[str]) -> tuple[dict, dict[str, list[float]]]:
    """Aggregated metrics, and the per-sample scores the bootstrap resamples."""
    metrics = evaluate.combine([evaluate.load(metric_path(name)) for name in METRICS])
    result = metrics.compute(predictions=predictions, references=references, per_sample=True)
    per_sample = {k.removesuffix("_per_sample"): list(map(float, v))
                  for k, v in result.items() if k.endswith("_per_sample")}
    return {k: float(v) for k, v in result.items() if not k.endswith("_per_sample")}, per_sample


def bootstrap_delta(a: list[float], b: list[float], seed: int = 0) -> dict[str, float]:
    """Mean paired difference a - b with a percentile bootstrap 95% interval."""
    diffs = np.asarray(a) - np.asarray(b)
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), (BOOTSTRAP_SAMPLES, len(diffs)))].mean(axis=1)
    return {"": float(diffs.mean()), "_lo": float(np.percentile(means, 2.5)),
            "_hi": float(np.percentile(means, 97.5))}


def held_out(dataset_dir: Path, eval_cfg: EvaluationConfig) -> list[list[dict]]:
    """The first `max_samples` conversations of the test split (its order is stable)."""
    test = load_processed(dataset_dir)["test"]
    if eval_cfg.max_samples is not None:
        test = test.select(range(min(eval_cfg.max_samples, len(test))))
    return test["messages"]


def run_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
              conversations: list[list[dict]], eval_cfg: EvaluationConfig, name: str = "model",
              ) -> tuple[list[str], dict[str, float], dict[str, list[float]]]:
    """Answers, aggregated metrics (with perplexity) and per-sample scores of one model."""
    prompts, references = split_prompts(conversations)
    with Progress(f"evaluate {name}", len(prompts), unit="answer") as bar:
        answers = generate_replies(model, tokenizer, prompts, eval_cfg.max_new_tokens,
                                   eval_cfg.batch_size, on_progress=bar.update)
    metrics, per_sample = score(answers, references)
    loss = assistant_loss(model, tokenizer, conversations, eval_cfg.batch_size)
    metrics["perplexity"] = math.exp(min(loss, 50.0))  # capped: a random model would overflow
    log.info("evaluate %s: rougeL %.4f, perplexity %.2f on %d held-out answers", name,
             metrics["rougeL"], metrics["perplexity"], len(prompts))
    return answers, metrics, per_sample


def evaluate_adapter(
    model_cfg: ModelConfig, eval_cfg: EvaluationConfig, dataset_dir: Path, adapter_dir: Path,
    cache_dir: Path, champion: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
) -> EvalResult:
    conversations = held_out(dataset_dir, eval_cfg)
    prompts, references = split_prompts(conversations)
    tokenizer = load_tokenizer(model_cfg, cache_dir)
    tuned = load_adapter_model(model_cfg, adapter_dir, cache_dir)

    outputs = {"tuned": run_model(tuned, tokenizer, conversations, eval_cfg, "tuned")}
    with adapters.disabled(tuned):
        outputs["base"] = run_model(tuned, tokenizer, conversations, eval_cfg, "base")
    if champion is not None:
        outputs["champion"] = run_model(*champion, conversations, eval_cfg, "champion")

    metrics = {name: out[1] for name, out in outputs.items()}
    per_sample = {name: out[2] for name, out in outputs.items()}
    deltas = {
        other: {f"{metric}{suffix}": value
                for metric, values in per_sample["tuned"].items()
                for suffix, value in bootstrap_delta(values, per_sample[other][metric]).items()}
        for other in outputs if other != "tuned"
    }
    samples = [
        {"prompt": p[-1]["content"], "reference": ref,
         **{f"{name}_answer": outputs[name][0][i] for name in outputs},
         **{f"{name}_rougeL": per_sample[name]["rougeL"][i] for name in outputs}}
        for i, (p, ref) in enumerate(zip(prompts, references, strict=True))
    ]
    return EvalResult(metrics=metrics, deltas=deltas, samples=samples)
