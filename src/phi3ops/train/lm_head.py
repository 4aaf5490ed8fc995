"""The LM head and next-token loss in one pass over the vocabulary, for training on CPU.

Phi-3's head projects to 32,064 tokens, so on a small model it is most of the FLOPs and, through
the (tokens x vocab) fp32 logits, most of the memory traffic. TRL's fused head avoids the full
logits tensor, but off Triton devices it scores every position, recomputes each tile's logits
in the backward pass, and walks each tile many times. `next_token_log_probs` scores only the
positions that carry a label (the assistant tokens), and computes the gradient for the hidden
states while the tile's logits are still in cache, so the backward is a scaled copy: two matmuls
and a handful of passes per tile instead of three matmuls and a dozen passes.

It serves TRL's own protocol (`model(..., labels=..., fused_lm_head=True)` returning
`FusedCausalLMOutput`), so SFTTrainer's loss, entropy and token-accuracy logging are unchanged.
The head's weight must be frozen (LoRA never trains it); otherwise TRL's head stays.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn
from trl.trainer.utils import FusedCausalLMOutput  # TRL exports its protocol's type only here

ROWS_PER_TILE = 256  # a tile's fp32 logits: 256 x 32,064 x 4 bytes = 33 MB


class _NextTokenLogProb(torch.autograd.Function):
    """log p(target) per row, with the entropy and top-1 hit as metrics (no gradient)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        rows = hidden.shape[0]
        log_probs = hidden.new_empty(rows, dtype=torch.float32)
        entropy, is_top1 = torch.empty_like(log_probs), torch.empty_like(targets, dtype=torch.bool)
        # d log p(t) / d hidden = W[t] - E_p[W]; stored as E_p[W] - W[t], scaled in backward.
        grad_hidden = torch.empty_like(hidden)
        for start in range(0, rows, ROWS_PER_TILE):
            tile = slice(start, start + ROWS_PER_TILE)
            target = targets[tile]
            logits = (hidden[tile] @ weight.T).float()
            top, top_index = logits.max(dim=-1)
            target_logit = logits.gather(1, target[:, None]).squeeze(1)
            probs = torch.sub(logits, top[:, None]).exp_()
            total = probs.sum(dim=-1)
            log_z = top + total.log()
            log_probs[tile] = target_logit - log_z
            entropy[tile] = log_z - torch.linalg.vecdot(probs, logits) / total
            is_top1[tile] = top_index == target
            probs.div_(total[:, None])
            probs[torch.arange(len(target)), target] -= 1.0
            grad_hidden[tile] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        ctx.mark_non_differentiable(entropy, is_top1)
        return log_probs, entropy, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, _grad_entropy, _grad_top1):
        (grad_hidden,) = ctx.saved_tensors
        return -grad_log_probs[:, None].to(grad_hidden.dtype) * grad_hidden, None, None


def next_token_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of `hidden` (rows x hidden size): log p(target), entropy, target is the argmax.
    `weight` is the head's (vocab x hidden) matrix; gradients flow to `hidden` only."""
    return _NextTokenLogProb.apply(hidden, weight, targets)


def can_install(model: nn.Module) -> bool:
    """Phi-3 heads without bias, softcapping or logit scaling, and with a frozen weight."""
    head = model.get_output_embeddings()
    return (model.config.model_type == "phi3" and head.bias is None
            and not head.weight.requires_grad)


def install(model: nn.Module) -> None:
    """Serve `fused_lm_head=True` calls of `model` (a Phi3ForCausalLM, PEFT's base model or
    loralib's) with `next_token_log_probs`; other calls go to the forward it had (TRL's)."""
    if not can_install(model):
        raise ValueError("the fused next-token head needs a Phi-3 model with a frozen, "
                         "bias-free LM head")
    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                num_items_in_batch=None, **kwargs):
        if not fused_lm_head or shift_labels is not None or kwargs.get("output_router_logits"):
            passed = {"fused_lm_head": fused_lm_head or None, "labels": labels,
                      "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return previous(*args, **kwargs, **{k: v for k, v in passed.items() if v is not None})
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        mask = labels != -100
        scored = next_token_log_probs(hidden[mask], self.get_output_embeddings().weight,
                                      labels[mask])
        # masked_scatter keeps an all-masked batch connected to the graph: a zero, not an error
        log_probs, entropy, is_top1 = (x.new_zeros(mask.shape).masked_scatter(mask, x)
                                       for x in scored)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs,
                                   entropy=entropy, is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)
