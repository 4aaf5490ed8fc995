"""Real training steps of the tiny Phi-3 with peft + trl, and generation from the result."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from phi3ops.config import load_config
from phi3ops.demo_data import write_demo_dataset
from phi3ops.evaluation import generate_replies
from phi3ops.modeling import load_tokenizer
from phi3ops.preprocess import preprocess
from phi3ops.train import load_adapter_model, train
from tests.conftest import REPO


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("train")
    cfg = load_config(REPO / "pipelines" / "tiny-cpu.yaml",
                      ["training_config.max_steps=40", "training_config.logging_steps=5",
                       "training_config.save_steps=20"])
    write_demo_dataset(tmp / "data")
    tokenizer = load_tokenizer(cfg.model, tiny_models)
    prep = preprocess(tmp / "data", "md5", cfg.preprocess, tokenizer, tmp / "processed")
    logged = []
    result = train(cfg.model, cfg.peft_config, cfg.training_config, prep.out_dir, tmp / "run",
                   tiny_models, log_metrics=lambda m, step: logged.append((step, m)))
    return cfg, prep, result, logged, tokenizer


def test_training_lowers_the_loss_and_logs_it(trained):
    _, _, result, logged, _ = trained
    losses = [m["loss"] for _, m in logged if "loss" in m]
    assert len(losses) >= 6, "a loss every logging_steps"
    assert losses[-1] < losses[0]
    assert result.global_step == 40
    assert all("learning_rate" in m and "grad_norm" in m for _, m in logged if "loss" in m)


def test_adapter_holds_only_lora_weights_on_fused_targets(trained):
    _, _, result, _, _ = trained
    weights = load_file(f"{result.adapter_dir}/adapter_model.safetensors")
    assert weights and all("lora_" in name for name in weights)
    targets = {name.split(".lora_")[0].split(".")[-1] for name in weights}
    assert targets == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    config = json.loads(open(f"{result.adapter_dir}/adapter_config.json").read())
    assert config["r"] == 16 and config["lora_alpha"] == 32
    assert result.trainable_params < result.total_params / 5


def test_checkpoints_are_written_every_save_steps(trained):
    _, _, result, _, _ = trained
    run_dir = Path(result.adapter_dir).parent
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-20", "checkpoint-40"]


def test_batched_generation_equals_one_at_a_time(trained, tiny_models):
    cfg, _, result, _, tokenizer = trained
    model = load_adapter_model(cfg.model, result.adapter_dir, tiny_models)
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
    cfg, _, result, _, tokenizer = trained
    model = load_adapter_model(cfg.model, result.adapter_dir, tiny_models)
    prompts = [[{"role": "user", "content": q}] for q in
               ("What is the capital of Peru?", "Add 12 and 7.", "What colour is a lime?")]
    free = generate_replies(model, tokenizer, prompts, max_new_tokens=64, batch_size=3)
    # Room for the longest reply plus its <|end|>: every reply must come out whole.
    needed = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in free) + 1
    assert needed < 64, "the replies stop on <|end|> by themselves"
    assert generate_replies(model, tokenizer, prompts, max_new_tokens=needed, batch_size=3) == free
