"""The fused next-token head gives transformers' own loss and gradients, inside SFTTrainer too."""

import pytest
import torch
from torch.nn import functional
from transformers import Phi3Config, Phi3ForCausalLM

from phi3ops.config import PeftLoraConfig, load_config
from phi3ops.model import adapters
from phi3ops.train import lm_head
from phi3ops.train.throughput import train_flops_per_token
from phi3ops.train.trainer import build_trainer, scored_fraction
from tests.conftest import REPO


def small_lora_model(vocab: int = 700) -> torch.nn.Module:
    torch.manual_seed(0)
    base = Phi3ForCausalLM(Phi3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=vocab, pad_token_id=0, eos_token_id=1,
        bos_token_id=1))
    model = adapters.attach(base, PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0), "peft")
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero, so the adapter's gradients depend on the head's
            torch.nn.init.normal_(param, std=0.05)
    return model


def lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return grads


def test_fused_head_gives_the_models_own_loss_gradients_and_metrics():
    model = small_lora_model()
    # Longer than one tile, labels masked at the start of both rows and the end of one.
    ids = torch.randint(2, 700, (2, lm_head.ROWS_PER_TILE + 90))
    labels = ids.clone()
    labels[:, :40], labels[1, 200:] = -100, -100
    reference = model(input_ids=ids, labels=labels)
    reference.loss.backward()
    expected = lora_grads(model)

    lm_head.install(model.get_base_model())
    fused = model(input_ids=ids, labels=labels, fused_lm_head=True)
    fused.loss.backward()
    assert fused.loss.item() == pytest.approx(reference.loss.item(), abs=1e-6)
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, expected[name], atol=1e-7, rtol=1e-4, msg=name)

    logits, targets = reference.logits[:, :-1], labels[:, 1:]
    mask = targets != -100
    log_probs = functional.log_softmax(logits.detach(), dim=-1)
    torch.testing.assert_close(fused.log_probs[mask], log_probs[mask].gather(
        1, targets[mask][:, None]).squeeze(1), atol=1e-5, rtol=1e-5)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    torch.testing.assert_close(fused.entropy[mask], entropy[mask], atol=1e-5, rtol=1e-5)
    assert torch.equal(fused.is_top1[mask], logits.argmax(-1)[mask] == targets[mask])
    assert not fused.log_probs[~mask].any() and torch.equal(fused.label_mask, mask)
    # Without fused_lm_head the model is its old self: logits, for generation.
    assert model(input_ids=ids[:, :5]).logits.shape == (2, 5, 700)


def test_a_batch_without_labels_is_a_zero_loss_that_still_backpropagates():
    model = small_lora_model()
    lm_head.install(model.get_base_model())
    ids = torch.randint(2, 700, (1, 16))
    out = model(input_ids=ids, labels=torch.full_like(ids, -100), fused_lm_head=True)
    out.loss.backward()
    assert out.loss.item() == 0.0


def test_a_trainable_head_keeps_trls():
    model = small_lora_model().get_base_model()
    model.lm_head.weight.requires_grad_(True)
    assert not lm_head.can_install(model)
    with pytest.raises(ValueError, match="frozen"):
        lm_head.install(model)


@pytest.mark.parametrize("backend", ["peft", "loralib"])
def test_the_trainer_scores_with_it_and_counts_only_labelled_head_flops(
        tiny_models, processed, tmp_path, monkeypatch, backend):
    calls = []
    real = lm_head.next_token_log_probs
    monkeypatch.setattr(lm_head, "next_token_log_probs",
                        lambda *args: calls.append(len(args[0])) or real(*args))
    cfg = load_config(REPO / "pipelines" / "tiny-cpu.yaml",
                      ["peft_config.lora_dropout=0", f"adapter.backend={backend}"])
    trainer = build_trainer(cfg, processed, tmp_path, tiny_models)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    assert calls == [int((batch["labels"][:, 1:] != -100).sum())], "labelled positions only"
    own = trainer.model(**batch).loss  # transformers' head and cross-entropy, full logits
    assert loss.item() == pytest.approx(own.item(), abs=1e-5)

    fraction = scored_fraction(trainer)
    assert 0.2 < fraction < 0.9, "assistant-only loss labels part of each conversation"
    head = trainer.model.get_output_embeddings().weight.numel()
    full = train_flops_per_token(trainer.model, 100.0)
    assert full - train_flops_per_token(trainer.model, 100.0, fraction) == pytest.approx(
        4 * head * (1 - fraction))
