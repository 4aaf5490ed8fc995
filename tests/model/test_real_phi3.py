"""Phi-3's real tokenizer end to end, through the retrain flow against a real MLflow server: a
local Phi-3 directory with either Phi-3 template trains and registers on the first attempt, and
the phi3-vocab-cpu profile runs whole."""

import os
import re
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

import flows.retrain as retrain_flow
from phi3ops.model.templates import PHI3_2024_04_TEMPLATE, PHI3_TEMPLATE
from tests.conftest import own_model

pytestmark = pytest.mark.slow
SHORT = ["training_config.max_steps=6", "training_config.save_steps=3",
         "evaluation.max_samples=8"]


def local_phi3_directory(path, tokenizer_dir, template: str):
    """What a user brings: Phi-3's tokenizer with a template, and a (small, random) Phi-3."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    Phi3ForCausalLM(Phi3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=32000, pad_token_id=32000)).save_pretrained(path)
    return path


def attempts(run_id: str) -> int:
    """How often the run's training started, from its log (MLflow as MLFLOW_TRACKING_URI says)."""
    run = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(run_id)
    run_dir = Path(run.data.tags["phi3ops.run_dir"])
    log = (run_dir / "train.log").read_text()
    return len(re.findall(r"training \d+ of \d+ parameters", log))


@pytest.mark.parametrize("template", [PHI3_TEMPLATE, PHI3_2024_04_TEMPLATE],
                         ids=["hub-template", "april-2024-template"])
def test_local_phi3_directory_trains_and_registers_without_a_retry(
        template, project, tmp_path, phi3_tokenizer_dir, mlflow_server, prefect_harness,
        monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    name = f"local-phi3-{'hub' if template is PHI3_TEMPLATE else 'april'}"
    own_model(project, name)
    model_dir = local_phi3_directory(tmp_path / "phi3", phi3_tokenizer_dir, template)

    summary = retrain_flow.in_project(project)(
        root=str(project), overrides=[f"model.name_or_path={model_dir}", *SHORT])

    assert attempts(summary["run_id"]) == 1
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    version = client.get_model_version(name, str(summary["version"]))
    assert f"LoRA adapter for `{model_dir}`" in version.description
    assert client.get_model_version_by_alias(name, "challenger").version == version.version


def test_phi3_vocab_profile_runs_end_to_end(project, mlflow_server, prefect_harness,
                                            monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    own_model(project, "phi3-vocab")
    summary = retrain_flow.in_project(project)(root=str(project),
                                                pipeline="pipelines/phi3-vocab-cpu.yaml")
    metrics = summary["metrics"]
    assert summary["promoted"], summary["reason"]
    # Fine-tuning helps: the bootstrap 95% interval of the gain over the base lies above zero.
    assert metrics["delta_base_rougeL_lo"] > 0 and metrics["delta_base_rougeL"] > 0.1, metrics
    assert attempts(summary["run_id"]) == 1
