"""Score base and tuned models on the held-out split with `evaluate` metrics kept in the package.

    phi3ops run evaluation.max_samples=128        # stage 4 of the retrain flow

Each held-out conversation becomes a prompt (every turn before the last assistant reply) and a
reference (that reply). Generation is greedy, batched with left padding, and stops at <|end|>.
The base model is the same PeftModel with its adapter disabled, so the weights load once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import evaluate
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from phi3ops.config import EvaluationConfig, ModelConfig
from phi3ops.metrics import metric_path
from phi3ops.modeling import load_tokenizer
from phi3ops.preprocess import load_processed
from phi3ops.train import load_adapter_model

METRICS = ("rouge", "exact_match")


@dataclass
class EvalResult:
    metrics: dict[str, dict[str, float]]  # {"base": {...}, "tuned": {...}}
    samples: list[dict] = field(default_factory=list)  # prompt, reference, one answer per model

    @property
    def n_samples(self) -> int:
        return len(self.samples)


def split_prompts(conversations: list[list[dict]]) -> tuple[list[list[dict]], list[str]]:
    """Prompt = all turns before the last (assistant) turn; reference = that turn's content."""
    return [c[:-1] for c in conversations], [c[-1]["content"] for c in conversations]


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = [tokenizer.eos_token_id]
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        ids.insert(0, end)
    return ids


@torch.inference_mode()
def generate_replies(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[dict]],
    max_new_tokens: int, batch_size: int,
) -> list[str]:
    """Greedy replies for chat prompts, batched; left padding keeps every prompt's end aligned."""
    tokenizer.padding_side = "left"
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts[start:start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        batch = batch.to(model.device)
        output = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        replies += [r.strip() for r in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return replies


def score(predictions: list[str], references: list[str]) -> dict[str, float]:
    metrics = evaluate.combine([evaluate.load(metric_path(name)) for name in METRICS])
    return {k: float(v) for k, v in metrics.compute(predictions=predictions,
                                                    references=references).items()}


def evaluate_adapter(
    model_cfg: ModelConfig, eval_cfg: EvaluationConfig, dataset_dir: Path, adapter_dir: Path,
    cache_dir: Path,
) -> EvalResult:
    test = load_processed(dataset_dir)["test"]
    if eval_cfg.max_samples is not None:
        test = test.select(range(min(eval_cfg.max_samples, len(test))))
    prompts, references = split_prompts(test["messages"])
    tokenizer = load_tokenizer(model_cfg, cache_dir)
    model = load_adapter_model(model_cfg, adapter_dir, cache_dir)

    def replies() -> list[str]:
        return generate_replies(model, tokenizer, prompts, eval_cfg.max_new_tokens,
                                eval_cfg.batch_size)

    answers = {"tuned": replies()}
    with model.disable_adapter():
        answers["base"] = replies()
    metrics = {name: score(preds, references) for name, preds in answers.items()}
    samples = [
        {"prompt": p[-1]["content"], "reference": ref,
         **{f"{name}_answer": answers[name][i] for name in answers}}
        for i, (p, ref) in enumerate(zip(prompts, references, strict=True))
    ]
    return EvalResult(metrics=metrics, samples=samples)
