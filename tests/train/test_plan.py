"""`phi3ops plan`: sizes from the meta model, checked by hand, against a measured training step of
the tiny model, against what preprocess keeps, and through the command line."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from phi3ops.config import ProjectPaths, load_config
from phi3ops.errors import ConfigError
from phi3ops.model.phi3_mini import TOTAL_PARAMETERS
from phi3ops.train.plan import build_plan
from tests.conftest import REPO

PHI3_LORA = REPO / "pipelines" / "phi3-mini-lora.yaml"
TRAINABLE = 25_165_824  # r=16 on qkv_proj, o_proj, gate_up_proj, down_proj of 32 layers


def phi3_plan(tmp_path, *overrides: str, pipeline=PHI3_LORA, gpu="H200", mfu=0.4):
    cfg = load_config(pipeline, list(overrides))
    return build_plan(cfg, ProjectPaths(tmp_path), gpu, mfu, tokens=1_000_000)


def test_phi3_mini_lora_parameters_and_memory_by_hand(tmp_path):
    plan = phi3_plan(tmp_path)
    assert (plan.adapted_modules, plan.trainable_params) == (128, TRAINABLE)
    assert plan.total_params == TOTAL_PARAMETERS == 3_821_079_552
    memory, tokens = plan.memory, 4 * 2048
    assert memory.base_weights == 2 * TOTAL_PARAMETERS  # bf16
    assert memory.lora_state == 16 * TRAINABLE
    # Per token and layer: norms 2 x 3073 x 4; rotated q and k, fused qkv output and attention
    # output 6 x 3072 x 2; logsumexp 32 x 4; gate_up output and SiLU 3 x 8192 x 2; LoRA inputs
    # (3 x 3072 + 8192) x (2 + 1 mask byte) and lora_A outputs 4 x 16 x 2. Plus the final norm's
    # fp32 input, 3073 x 4.
    layer = 24_584 + 36_864 + 128 + 49_152 + 52_224 + 128
    assert memory.activations == tokens * (32 * layer + 12_292)
    assert memory.activations_checkpointed == tokens * (32 * 3072 * 2 + layer + 12_292)
    assert 0 < memory.activations_checkpointed < memory.activations
    assert memory.logits_saved == tokens * (32_064 * 4 + 8)
    assert memory.total == (memory.base_weights + memory.lora_state + memory.logits_saved
                            + memory.logits_gradients + memory.activations_checkpointed)
    assert plan.fits and memory.total / 2**30 == pytest.approx(13.27, abs=0.01)


def test_hours_scale_inversely_with_mfu_and_gpus(tmp_path):
    plan = phi3_plan(tmp_path)
    assert plan.hours_per_epoch == pytest.approx(
        1_000_000 * plan.flops_per_token / (989e12 * 0.4) / 3600)
    assert phi3_plan(tmp_path, mfu=0.2).hours_per_epoch == pytest.approx(2 * plan.hours_per_epoch)
    eight = phi3_plan(tmp_path, "launch.nproc=8")
    assert eight.hours_per_epoch == pytest.approx(plan.hours_per_epoch / 8)


def test_fsdp_shards_weights_and_lora_state_and_qlora_shrinks_the_base(tmp_path):
    dense = phi3_plan(tmp_path).memory
    fsdp = phi3_plan(tmp_path, "launch.nproc=8", "launch.strategy=fsdp").memory
    assert fsdp.lora_state == dense.lora_state // 8
    assert dense.base_weights / 8 < fsdp.base_weights < dense.base_weights / 4  # + gathered
    assert fsdp.activations == dense.activations  # each rank holds its own micro-batch
    qlora = phi3_plan(tmp_path, pipeline=REPO / "pipelines" / "phi3-mini-qlora.yaml").memory
    linear, rest = 3_623_878_656, TOTAL_PARAMETERS - 3_623_878_656  # rest: embeddings, head
    assert qlora.base_weights == int(linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + rest * 2)


def test_a_target_module_phi3_lacks_is_named(tmp_path):
    with pytest.raises(ConfigError) as err:
        phi3_plan(tmp_path, "peft_config.target_modules=[qkv,o_proj]")
    message = str(err.value)
    assert "peft_config.target_modules" in message and "['qkv']" in message
    assert all(name in message for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))


def test_a_local_config_is_sized_and_an_uncached_hub_id_says_how_to_get_one(tmp_path):
    from phi3ops.errors import ModelNotAvailableError
    from phi3ops.model.phi3_mini import phi3_mini_config

    phi3_mini_config().save_pretrained(tmp_path / "phi3")  # config.json alone, no weights
    local = phi3_plan(tmp_path, f"model.name_or_path={tmp_path / 'phi3'}")
    assert (local.total_params, local.trainable_params) == (TOTAL_PARAMETERS, TRAINABLE)
    with pytest.raises(ModelNotAvailableError, match="hf download someone/elses-model"):
        phi3_plan(tmp_path, "model.name_or_path=someone/elses-model")


def test_an_unknown_gpu_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="--gpu B200: unknown; known: A100, H100, H200, L4"):
        phi3_plan(tmp_path, gpu="B200")


def test_without_data_the_plan_says_how_to_get_tokens(tmp_path):
    plan = build_plan(load_config(PHI3_LORA), ProjectPaths(tmp_path), "H100")
    assert plan.epoch_tokens is None and plan.hours_per_epoch is None
    data = ProjectPaths(tmp_path).root / "data"
    assert f"no data at {data}; run `dvc pull` or give --tokens" in plan.render()


def test_epoch_tokens_are_what_preprocess_keeps_for_training(tiny_config, tiny_models, processed,
                                                            tmp_path):
    from phi3ops.data.demo import write_demo_dataset
    from phi3ops.data.preprocess import load_processed

    write_demo_dataset(tmp_path / "data")  # the data `processed` was made from
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "models").symlink_to(tiny_models)
    plan = build_plan(tiny_config, ProjectPaths(tmp_path), "H100")
    train = load_processed(processed)["train"]
    assert plan.epoch_tokens == sum(train["n_tokens"])
    assert f"{len(train):,} train conversations in data/" in plan.tokens_source


def test_tiny_estimate_within_25_percent_of_a_measured_training_step(tiny_config, tiny_models,
                                                                    tmp_path):
    """What one forward + backward + AdamW step of the real tiny model holds beyond its frozen
    weights: tensors saved for backward (unique storages, parameters left out) and LoRA weights,
    gradients and optimizer state, against the plan for this CPU (fp32)."""
    from phi3ops.model.adapters import attach
    from phi3ops.model.base_model import load_model

    model = attach(load_model(tiny_config.model, tiny_models, use_cache=False),
                   tiny_config.peft_config, "peft")
    model.train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    train = tiny_config.training_config
    ids = torch.randint(model.config.vocab_size, (train.per_device_train_batch_size,
                                                  train.max_length),
                        generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable)
    optimizer.step()
    lora_state = sum(p.nbytes + p.grad.nbytes for p in trainable) + sum(
        t.nbytes for state in optimizer.state.values() for t in state.values())

    memory = build_plan(tiny_config, ProjectPaths(tmp_path), "cpu", tokens=1).memory
    assert memory.lora_state == pytest.approx(lora_state, rel=0.01)
    estimated = memory.activations + memory.logits_saved + memory.lora_state
    assert estimated == pytest.approx(sum(saved.values()) + lora_state, rel=0.25)


def test_cli_prints_the_table_and_json(tmp_path):
    from phi3ops.cli.main import app

    args = ["plan", "--pipeline", str(PHI3_LORA), "--root", str(tmp_path), "--gpu", "H200",
            "--tokens", "1000000"]
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0, table.output
    for shown in ("128 modules", "25,165,824 trainable", "3,821,079,552 base parameters",
                  "<- this profile", "fits H200 (140.4 GiB)", "40% MFU on 1 x H200"):
        assert shown in table.stdout
    result = json.loads(CliRunner().invoke(app, [*args, "--json", "--mfu", "0.5"]).stdout)
    assert result["trainable_params"] == TRAINABLE and result["mfu"] == 0.5
    assert result["memory"]["total"] > result["memory"]["base_weights"] > 0
