import json
import os
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3ForCausalLM

from phi3ops.config import ModelConfig, file_sha256
from phi3ops.model.base_model import (
    SPECIAL_TOKENS,
    ModelNotAvailableError,
    ensure_tiny_model,
    resolve_model_path,
    tiny_model_dir,
)
from tests.conftest import REPO


def test_tiny_model_loads_like_a_hub_model(tiny_config, tiny_models):
    path = tiny_model_dir(tiny_config.model.tiny, tiny_models)
    assert (path / "model.safetensors").is_file()
    assert not list(path.glob("*.bin")), "safetensors only"
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False)
    assert isinstance(model, Phi3ForCausalLM)
    assert model.config.hidden_size == tiny_config.model.tiny.hidden_size
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    assert {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} <= names


def test_tiny_tokenizer_has_phi3_tokens_and_template(tiny_config, tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir(tiny_config.model.tiny, tiny_models))
    for token in SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(token) != tok.unk_token_id or token == "<unk>"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n"
        "<|endoftext|>")
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|user|>\nHi<|end|>\n<|assistant|>\n")
    ids = tok("Paris is the capital.", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "Paris is the capital."


def test_tiny_model_is_built_once(tiny_config, tiny_models):
    path = tiny_model_dir(tiny_config.model.tiny, tiny_models)
    before = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(tiny_config.model.tiny, tiny_models) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == before


def test_generation_stops_at_end_token(tiny_config, tiny_models):
    path = tiny_model_dir(tiny_config.model.tiny, tiny_models)
    config = json.loads((path / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.convert_tokens_to_ids("<|end|>") in config["eos_token_id"]


def test_hub_model_offline_without_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(ModelNotAvailableError) as err:
        resolve_model_path(ModelConfig(name_or_path="microsoft/Phi-3-mini-4k-instruct"), tmp_path)
    message = str(err.value)
    assert "microsoft/Phi-3-mini-4k-instruct" in message
    assert "HF_HUB_OFFLINE=1" in message and "hf download" in message


def test_local_directory_without_config_is_refused(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelNotAvailableError, match="no config.json"):
        resolve_model_path(ModelConfig(name_or_path=str(tmp_path / "weights")), tmp_path)


SAVE_TOKENIZER = """
import sys
from pathlib import Path
from phi3ops.config import load_config
from phi3ops.model.base_model import load_tokenizer
cfg = load_config(Path(sys.argv[1]))
load_tokenizer(cfg.model, Path(sys.argv[2])).save_pretrained(sys.argv[3])
"""


def test_a_saved_tokenizer_has_the_same_bytes_whatever_the_shell(tiny_models, tmp_path):
    """What is registered beside an adapter must not record how the process reached the hub:
    HF_HUB_OFFLINE on or off, another HF_HOME, another working directory."""
    pipeline = str(REPO / "pipelines" / "tiny-cpu.yaml")
    saved = {}
    for offline in ("1", "0"):
        out, cwd = tmp_path / f"offline-{offline}", tmp_path / f"cwd-{offline}"
        cwd.mkdir()
        env = {**os.environ, "HF_HUB_OFFLINE": offline, "HF_HOME": str(tmp_path / offline)}
        subprocess.run([sys.executable, "-c", SAVE_TOKENIZER, pipeline, str(tiny_models), str(out)],
                       env=env, cwd=cwd, check=True, timeout=300)
        saved[offline] = {p.name: file_sha256(p) for p in sorted(out.iterdir())}
    assert "tokenizer_config.json" in saved["1"]
    assert saved["1"] == saved["0"]
    assert "local_files_only" not in (tmp_path / "offline-1" / "tokenizer_config.json").read_text()


def test_the_phi3_tokenizer_and_a_base_built_on_it_record_no_hub_settings(phi3_tokenizer_dir,
                                                                          tiny_config, tmp_path):
    """The same for what is built once and then registered beside every adapter: the Phi-3
    tokenizer's cache and a local base's tokenizer (HF_HUB_OFFLINE=1 in every test)."""
    assert "local_files_only" not in (phi3_tokenizer_dir / "tokenizer_config.json").read_text()
    (tmp_path / phi3_tokenizer_dir.name).symlink_to(phi3_tokenizer_dir)
    tiny = tiny_config.model.tiny.model_copy(update={
        "tokenizer": "phi3", "vocab_size": 32064, "pretrain_steps": 0})
    base = ensure_tiny_model(tiny, tmp_path)
    assert "local_files_only" not in (base / "tokenizer_config.json").read_text()
