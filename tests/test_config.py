from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from phi3ops.config import (
    ConfigError,
    PipelineConfig,
    ProjectPaths,
    load_config,
    load_mlflow_config,
)
from phi3ops.model.adapters import build_lora_config
from phi3ops.train.trainer import build_sft_config

REPO = Path(__file__).resolve().parents[1]
PIPELINES = sorted((REPO / "pipelines").rglob("*.yaml"))


def test_there_are_pipelines():
    names = {p.name for p in PIPELINES}
    assert {"tiny-cpu.yaml", "phi3-mini-lora.yaml"} <= names


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_every_pipeline_validates_and_builds_library_configs(path, tmp_path):
    cfg = load_config(path)
    assert path.read_text().startswith("#"), "a pipeline opens with the command that runs it"
    lora = build_lora_config(cfg.peft_config)
    assert set(lora.target_modules) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert lora.r == cfg.peft_config.r and lora.task_type == "CAUSAL_LM"
    sft = build_sft_config(cfg.training_config, torch.float32, tmp_path)
    assert sft.learning_rate == cfg.training_config.learning_rate
    assert sft.max_length == cfg.training_config.max_length
    assert sft.report_to == []  # metrics go to the flow's MLflow run, not a second one


def test_real_model_profile_settings():
    cfg = load_config(REPO / "pipelines" / "phi3-mini-lora.yaml")
    assert cfg.model.name_or_path == "microsoft/Phi-3-mini-4k-instruct"
    assert cfg.model.dtype == "bfloat16"
    assert cfg.training_config.gradient_checkpointing and not cfg.training_config.use_cache


def test_unknown_key_fails_with_its_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    text = (REPO / "pipelines" / "tiny-cpu.yaml").read_text()
    bad.write_text(text.replace("  warmup_ratio:", "  warmup_ratoi:"))
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(bad) in str(err.value)
    assert "training_config.warmup_ratoi" in str(err.value)


def test_wrong_type_fails_with_its_path():
    with pytest.raises(ConfigError, match=r"training_config\.learning_rate"):
        load_config(REPO / "pipelines" / "tiny-cpu.yaml", ["training_config.learning_rate=fast"])


def test_unfused_target_names_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="fuses it into 'qkv_proj'"):
        load_config(REPO / "pipelines" / "tiny-cpu.yaml",
                    ["peft_config.target_modules=[q_proj, k_proj, v_proj, o_proj]"])


def test_cross_field_problems_are_collected_together():
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "pipelines" / "tiny-cpu.yaml",
                    ["model.tiny.hidden_size=130", "training_config.max_length=4096"])
    assert "divisible by num_attention_heads" in str(err.value)
    assert "max_position_embeddings" in str(err.value)


def test_overrides_are_typed_and_change_the_hash():
    base = load_config(REPO / "pipelines" / "tiny-cpu.yaml")
    changed = load_config(REPO / "pipelines" / "tiny-cpu.yaml", ["training_config.max_steps=5"])
    assert changed.training_config.max_steps == 5
    assert base.config_hash() != changed.config_hash()
    assert base.config_hash() == load_config(REPO / "pipelines" / "tiny-cpu.yaml").config_hash()


def test_config_is_frozen():
    cfg = load_config(REPO / "pipelines" / "tiny-cpu.yaml")
    with pytest.raises(ValidationError):
        cfg.training_config.learning_rate = 1.0  # type: ignore[misc]
    assert isinstance(cfg, PipelineConfig)


def test_mlflow_config_resolves_paths_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_mlflow_config(REPO / "mlflow.yaml").resolved(tmp_path)
    assert cfg.tracking_uri == f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert cfg.artifact_location == (tmp_path / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert load_mlflow_config(REPO / "mlflow.yaml").resolved(tmp_path).tracking_uri == (
        "http://127.0.0.1:5999")


def test_project_paths_are_under_the_root(tmp_path):
    paths = ProjectPaths(tmp_path)
    assert paths.pipeline("pipelines/x.yaml") == tmp_path / "pipelines" / "x.yaml"
    assert paths.models.is_relative_to(tmp_path) and paths.runs.is_relative_to(tmp_path)


def test_qlora_profile_is_valid_and_stops_at_once_without_cuda(tmp_path):
    from phi3ops.errors import Phi3opsError
    from phi3ops.model.base_model import bnb_config
    from phi3ops.model.preflight import check_runtime

    cfg = load_config(REPO / "pipelines" / "phi3-mini-qlora.yaml")
    quant = cfg.model.quantization
    assert quant.quant_type == "nf4" and quant.double_quant and cfg.adapter.backend == "peft"
    bnb = bnb_config(quant)
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4"
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(Phi3opsError, match="needs a CUDA GPU"):
        check_runtime(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["adapter.backend=loralib", "model.tiny.num_key_value_heads=2"], "equal q, k, v"),
    (["launch.strategy=fsdp"], "launch.nproc >= 2"),
    (["launch.strategy=fsdp", "launch.nproc=2", "adapter.backend=loralib"], "backend: peft"),
    (["training_config.save_total_limit=1"], "at least 2"),
    (["adapter.backend=lora"], "adapter.backend"),
    (["model.quantization.quant_type=nf4"], "tiny CPU model cannot be quantised"),
])
def test_training_settings_that_cannot_work_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "pipelines" / "tiny-cpu.yaml", overrides)


def test_fsdp_settings_shard_decoder_layers_and_need_gpus(tmp_path):
    from phi3ops.errors import Phi3opsError
    from phi3ops.model.preflight import check_runtime

    cfg = load_config(REPO / "pipelines" / "phi3-mini-lora.yaml",
                      ["launch.strategy=fsdp", "launch.nproc=8"])
    sft = build_sft_config(cfg.training_config, torch.bfloat16, tmp_path, cfg.launch)
    assert sft.fsdp and sft.fsdp_config["version"] == 2
    assert sft.fsdp_config["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert sft.fsdp_config["transformer_layer_cls_to_wrap"] == ["Phi3DecoderLayer"]
    assert sft.fsdp_config["activation_checkpointing"] is True
    assert sft.gradient_checkpointing is False, "FSDP checkpoints activations itself"
    if not torch.cuda.is_available():
        with pytest.raises(Phi3opsError, match="fsdp is for GPUs"):
            check_runtime(cfg)


def test_several_nodes_meet_at_one_endpoint_under_one_job_name(tmp_path):
    from phi3ops.train.launch import command

    tiny = REPO / "pipelines" / "tiny-cpu.yaml"
    with pytest.raises(ConfigError, match=r"launch\.rdzv_endpoint: required"):
        load_config(tiny, ["launch.nnodes=2"])
    cfg = load_config(tiny, ["launch.nnodes=2", "launch.nproc=4",
                             "launch.rdzv_endpoint=node0:29400"])
    torchrun = command(tmp_path / "job.json", cfg)
    assert {"--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d",
            "--rdzv_endpoint=node0:29400"} <= set(torchrun) and "--standalone" not in torchrun
    # Every node derives the same job name from the same config.
    assert f"--rdzv_id={cfg.name}-{cfg.config_hash()}" in torchrun
    assert cfg.launch.world_size == 8
    one_node = command(tmp_path / "job.json", load_config(tiny, ["launch.nproc=2"]))
    assert "--standalone" in one_node and not any(a.startswith("--rdzv") for a in one_node)
