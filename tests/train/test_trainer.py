"""Real training steps of the tiny Phi-3 with both LoRA backends, and generation from the result."""

import json
from pathlib import Path

import loralib
import pytest
import torch
from safetensors.torch import load_file

from phi3ops.config import load_config
from phi3ops.model import adapters
from phi3ops.model.base_model import load_tokenizer
from phi3ops.model.inference import generate_replies, load_adapter_model, merge_adapter
from phi3ops.train.throughput import loss_curve
from phi3ops.train.trainer import build_trainer, train
from tests.conftest import REPO

STEPS = ["training_config.max_steps=40", "training_config.logging_steps=5",
         "training_config.save_steps=20"]


def run_training(tmp_path_factory, tiny_models, processed, overrides):
    cfg = load_config(REPO / "pipelines" / "tiny-cpu.yaml", [*STEPS, *overrides])
    logged = []
    result = train(cfg, processed, tmp_path_factory.mktemp("run"), tiny_models,
                   log_metrics=lambda m, step: logged.append((step, m)))
    return cfg, result, logged


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models, processed):
    return run_training(tmp_path_factory, tiny_models, processed, [])


@pytest.fixture(scope="module")
def trained_loralib(tmp_path_factory, tiny_models, processed):
    return run_training(tmp_path_factory, tiny_models, processed, ["adapter.backend=loralib"])


@pytest.fixture(params=["peft", "loralib"])
def either(request, trained, trained_loralib):
    return trained if request.param == "peft" else trained_loralib


def test_training_lowers_the_loss_and_logs_speed_and_memory(either):
    _, result, logged = either
    points = [m for _, m in logged if "loss" in m]
    assert len(points) >= 6, "a loss every logging_steps"
    assert points[-1]["loss"] < points[0]["loss"]
    assert result.global_step == 40
    for key in ("learning_rate", "grad_norm", "num_tokens", "tokens_per_s", "mfu", "peak_rss_mb"):
        assert all(key in m for m in points), key
    assert all(0 < m["mfu"] < 1 and m["tokens_per_s"] > 0 for m in points)
    assert [h["step"] for h in result.history] == [step for step, m in logged if "loss" in m]
    assert loss_curve(result.history).axes[0].lines[0].get_ydata()[0] == points[0]["loss"]


def test_peft_adapter_holds_only_lora_weights_on_fused_targets(trained):
    _, result, _ = trained
    weights = load_file(f"{result.adapter_dir}/adapter_model.safetensors")
    assert weights and all("lora_" in name for name in weights)
    targets = {name.split(".lora_")[0].split(".")[-1] for name in weights}
    assert targets == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    config = json.loads(open(f"{result.adapter_dir}/adapter_config.json").read())
    assert config["r"] == 16 and config["lora_alpha"] == 32
    assert result.trainable_params < result.total_params / 5


def test_loralib_checkpoint_is_its_lora_state_dict_with_a_merged_qkv(trained_loralib, tiny_models):
    cfg, result, _ = trained_loralib
    weights = load_file(f"{result.adapter_dir}/{adapters.LORALIB_WEIGHTS}")
    assert weights and all(".lora_A" in k or ".lora_B" in k for k in weights)
    qkv_a = weights["model.layers.0.self_attn.qkv_proj.lora_A"]
    assert qkv_a.shape == (3 * cfg.peft_config.r, cfg.model.tiny.hidden_size), "q, k, v pairs"
    model = load_adapter_model(cfg.model, Path(result.adapter_dir), tiny_models)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, loralib.MergedLinear) and qkv.enable_lora == [True, True, True]
    assert isinstance(model.model.layers[0].mlp.down_proj, loralib.Linear)
    assert torch.equal(qkv.lora_A.detach(), qkv_a), "base first, then LoRA with strict=False"


def test_loralib_merge_in_eval_mode_gives_the_unmerged_outputs(trained_loralib, tiny_models):
    cfg, result, _ = trained_loralib
    model = load_adapter_model(cfg.model, Path(result.adapter_dir), tiny_models)
    ids = torch.tensor([[1, 5, 9, 200, 17, 33, 2]])
    model.train()  # unmerged: W x + B A x
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad():
        unmerged = model(ids).logits
        model.eval()  # loralib folds B A into W
        merged = model(ids).logits
    layer = model.model.layers[0].self_attn.qkv_proj
    assert layer.merged
    assert torch.allclose(merged, unmerged, atol=1e-4)


def test_merged_export_gives_the_adapter_models_logits(either, tiny_models, tmp_path):
    cfg, result, _ = either
    adapter_model = load_adapter_model(cfg.model, Path(result.adapter_dir), tiny_models)
    merged_dir = merge_adapter(cfg.model, Path(result.adapter_dir), tmp_path / "m", tiny_models)
    assert list(merged_dir.glob("*.safetensors")) and not list(merged_dir.glob("*.bin"))
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, use_safetensors=True).eval()
    ids = torch.tensor([[1, 5, 9, 200, 17, 33, 2, 40, 41]])
    with torch.no_grad():
        expected, got = adapter_model(ids).logits, merged(ids).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    with torch.no_grad(), adapters.disabled(adapter_model):
        base = adapter_model(ids).logits
    assert (base - expected).abs().max() > 1e-2, "the adapter changes the outputs"


def test_checkpoints_are_written_every_save_steps_and_marked_complete(either):
    _, result, _ = either
    run_dir = Path(result.adapter_dir).parent
    checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*"))
    assert [p.name for p in checkpoints] == ["checkpoint-20", "checkpoint-40"]
    assert all((p / "phi3ops-complete.json").is_file() for p in checkpoints)


def lora_pairs(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) of every adapted layer, by the layer's path in the base model."""
    pairs = {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict):
            pairs[name.removeprefix("base_model.model.")] = (
                module.lora_A["default"].weight, module.lora_B["default"].weight)
        elif isinstance(module, loralib.LoRALayer) and module.r > 0:
            pairs[name] = (module.lora_A, module.lora_B)
    return pairs


@pytest.mark.parametrize("targets, same_steps", [
    ("[o_proj,gate_up_proj,down_proj]", 5),  # one LoRA pair per layer in both: same function
    ("[qkv_proj,o_proj,gate_up_proj,down_proj]", 2),  # see below
])
def test_both_backends_give_the_same_loss_from_the_same_initial_weights(
        tiny_models, processed, tmp_path, targets, same_steps):
    """peft puts one LoRA pair on the fused qkv_proj; loralib's MergedLinear one pair for each of
    q, k and v. Tiling peft's A three times gives loralib the same function, so the losses agree
    until the first update that can tell them apart (step 1 has lr 0 in warmup); after that the
    per-projection gradients differ by design. Tolerance: 1e-5 on the loss."""
    losses, start = {}, None
    for backend in ("peft", "loralib"):
        cfg = load_config(REPO / "pipelines" / "tiny-cpu.yaml", [
            "training_config.max_steps=5", "training_config.logging_steps=1",
            "training_config.learning_rate=1e-3", "peft_config.lora_dropout=0",
            f"peft_config.target_modules={targets}", f"adapter.backend={backend}"])
        trainer = build_trainer(cfg, processed, tmp_path / backend, tiny_models)
        pairs = lora_pairs(trainer.model)
        with torch.no_grad():
            if start is None:  # peft's own A; a non-zero B so the adapter matters from step 1
                g = torch.Generator().manual_seed(0)
                start = {k: (a.clone(), torch.randn(b.shape, generator=g) * 0.02)
                         for k, (a, b) in pairs.items()}
            assert pairs.keys() == start.keys()
            for name, (a, b) in pairs.items():
                a.copy_(start[name][0].repeat(a.shape[0] // start[name][0].shape[0], 1))
                b.copy_(start[name][1])
        trainer.train()
        losses[backend] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses["peft"]) == 5
    for step in range(same_steps):
        assert losses["peft"][step] == pytest.approx(losses["loralib"][step], abs=1e-5), step
    assert losses["loralib"][-1] < losses["loralib"][0]


@pytest.mark.parametrize("option", ["packing=true", "padding_free=true", "group_by_length=true"])
def test_batching_options_train(tiny_models, processed, tmp_path, option):
    cfg = load_config(REPO / "pipelines" / "tiny-cpu.yaml", [
        "training_config.max_steps=6", "training_config.logging_steps=3",
        f"training_config.{option}"])
    result = train(cfg, processed, tmp_path, tiny_models)
    assert result.global_step == 6 and len(result.history) == 2
    assert result.history[-1]["loss"] < result.history[0]["loss"] + 1.0


@pytest.mark.parametrize("fixture", ["trained", "trained_loralib"])
def test_batched_generation_equals_one_at_a_time(request, fixture, tiny_models):
    cfg, result, _ = request.getfixturevalue(fixture)
    tokenizer = load_tokenizer(cfg.model, tiny_models)
    model = load_adapter_model(cfg.model, Path(result.adapter_dir), tiny_models)
    prompts = [[{"role": "user", "content": "What is the capital of Japan?"}],
               [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Give the antonym of wet."}],
               [{"role": "user", "content": "Add 3 and 4."}]]
    batched = generate_replies(model, tokenizer, prompts, max_new_tokens=24, batch_size=3)
    single = [generate_replies(model, tokenizer, [p], max_new_tokens=24, batch_size=1)[0]
              for p in prompts]
    assert batched == single
    assert all("<|end|>" not in r and "<|assistant|>" not in r for r in batched)


def test_a_reply_that_fits_max_new_tokens_is_never_cut(trained, tiny_models):
    cfg, result, _ = trained
    tokenizer = load_tokenizer(cfg.model, tiny_models)
    model = load_adapter_model(cfg.model, Path(result.adapter_dir), tiny_models)
    prompts = [[{"role": "user", "content": q}] for q in
               ("What is the capital of Peru?", "Add 12 and 7.", "What colour is a lime?")]
    free = generate_replies(model, tokenizer, prompts, max_new_tokens=64, batch_size=3)
    # Room for the longest reply plus its <|end|>: every reply must come out whole.
    needed = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in free) + 1
    assert needed < 64, "the replies stop on <|end|> by themselves"
    assert generate_replies(model, tokenizer, prompts, max_new_tokens=needed, batch_size=3) == free


@pytest.mark.parametrize("backend", ["peft", "loralib"])
def test_a_misspelt_target_module_fails_instead_of_adapting_fewer_layers(
        backend, tiny_config, tiny_models):
    """peft alone would adapt o_proj and skip `qkv` without a word."""
    from phi3ops.errors import ConfigError
    from phi3ops.model.base_model import load_model

    cfg = load_config(REPO / "pipelines" / "tiny-cpu.yaml",
                      ["peft_config.target_modules=[qkv, o_proj]"])
    with pytest.raises(ConfigError, match=r"\['qkv'\] match no Linear layer.*qkv_proj"):
        adapters.attach(load_model(cfg.model, tiny_models), cfg.peft_config, backend)
