"""The `phi3ops` command as a user runs it: clear errors, no stack traces."""

import json
import os
import re
import subprocess
import sys

import pytest

from phi3ops.config import DataConfig
from phi3ops.data.versions import push_version
from tests.conftest import REPO, own_model


def phi3ops(*args, env=None, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "phi3ops.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300, env={**os.environ, **(env or {})})


def test_real_model_profile_without_weights_fails_at_once(tmp_path):
    result = phi3ops("run", "--pipeline", "pipelines/phi3-mini-lora.yaml",
                     env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2
    assert "microsoft/Phi-3-mini-4k-instruct" in result.stderr
    assert "hf download" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_override_names_the_key():
    result = phi3ops("run", "training_config.learning_rate=fast")
    assert result.returncode == 2
    assert "training_config.learning_rate" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_the_commands():
    result = phi3ops("--help")
    assert result.returncode == 0
    for command in ("run", "chat", "promote", "data"):
        assert command in result.stdout
    assert "fine-tuned on your own data" in result.stdout, "the first line says what it does"


def test_commands_that_run_no_model_never_import_torch(project, mlflow_server):
    """Importing torch and transformers costs seconds in every process: only commands that run a
    model pay it (bench/startup.py times them)."""
    own_model(project, "no-torch")  # the session's server holds other tests' versions
    assert phi3ops("data", "pull", "--root", str(project)).returncode == 0
    push_version(project, DataConfig())  # as a run would: `data status` then finds it all
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    for args in (["--help"], ["data", "status"], ["models"]):
        root = [] if args == ["--help"] else ["--root", str(project)]
        traced = subprocess.run([sys.executable, "-X", "importtime", "-m", "phi3ops.cli", *args,
                                 *root], capture_output=True, text=True, timeout=300,
                                env={**os.environ, **env})
        assert traced.returncode == 0, traced.stderr[-2000:]
        imported = re.findall(r"^import time:.*\|\s+([\w.]+)$", traced.stderr, re.MULTILINE)
        assert "phi3ops.config" in imported, "the trace lists what was imported"
        heavy = {name for name in imported if name.split(".")[0] in ("torch", "transformers")}
        assert not heavy, (args, sorted(heavy)[:5])
    assert "no registered versions yet" in traced.stdout, "before the first retrain"


def test_data_validate_reports_rules_and_exit_code(tmp_path):
    good = ('{"messages": [{"role": "user", "content": "hi"}, '
            '{"role": "assistant", "content": "hello"}]}')
    (tmp_path / "ok.jsonl").write_text("\n".join([good] * 9 + ["{bad"]) + "\n")
    result = phi3ops("data", "validate", str(tmp_path / "ok.jsonl"), "--quarantine",
                     str(tmp_path / "q.jsonl"), "--root", str(REPO), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "10 lines: 9 accepted, 1 rejected" in result.stdout
    assert "invalid_json: 1" in result.stdout
    assert (result.stdout + result.stderr).count("ok.jsonl:10") == 1, "each rejection once"
    assert '"line": 10' in (tmp_path / "q.jsonl").read_text()

    (tmp_path / "bad.jsonl").write_text("\n".join([good] * 5 + ["{bad"] * 5) + "\n")
    result = phi3ops("data", "validate", str(tmp_path / "bad.jsonl"), "--quarantine",
                     str(tmp_path / "q2.jsonl"), "--root", str(REPO), cwd=tmp_path)
    assert result.returncode == 1
    assert "max_reject_fraction" in result.stderr


def test_data_add_then_status(project, tmp_path):
    (tmp_path / "faq.csv").write_text("question,answer\nWhat is DVC?,Data version control.\n")
    assert phi3ops("data", "status", "--root", str(project)).returncode == 2, "no data/ yet"
    assert phi3ops("data", "pull", "--root", str(project)).returncode == 0
    added = phi3ops("data", "add", str(tmp_path / "faq.csv"), "--prompt-column", "question",
                    "--response-column", "answer", "--root", str(project))
    assert added.returncode == 0, added.stderr
    assert "wrote" in added.stdout and "faq.jsonl" in added.stdout
    assert "git add data.dvc && git commit" in added.stdout
    said = added.stdout + added.stderr
    assert said.count("git add data.dvc") == 1 and "To track the changes" not in said, said
    status = phi3ops("data", "status", "--root", str(project))
    assert status.returncode == 0, status.stderr
    assert "data/ matches data.dvc" in status.stdout
    assert "remote holds this version" in status.stdout


def test_train_runs_in_a_child_process_and_prints_its_result(project):
    result = phi3ops("train", "training_config.max_steps=4", "training_config.save_steps=2",
                     "--root", str(project), "--out", str(project / "runs" / "cli"))
    assert result.returncode == 0, result.stderr
    assert "training peft adapter on 1 process(es)" in result.stdout
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["global_step"] == 4 and summary["world_size"] == 1
    adapter = project / "runs" / "cli" / "adapter" / "adapter_model.safetensors"
    assert adapter.is_file() and (project / "runs" / "cli" / "train.log").is_file()
    shown = json.loads((project / "runs" / "cli" / "train-progress.json").read_text())
    assert shown["done"] == shown["total"] == 4, "what the progress bar showed last"

    # The same run directory again: it is finished, so nothing trains past max_steps.
    weights = adapter.read_bytes()
    again = phi3ops("train", "training_config.max_steps=4", "training_config.save_steps=2",
                    "--root", str(project), "--out", str(project / "runs" / "cli"))
    assert again.returncode == 0, again.stderr
    assert "is trained already (step 4 of 4)" in again.stdout and "--force" in again.stdout
    assert json.loads(again.stdout[again.stdout.index("{"):])["global_step"] == 4
    assert adapter.read_bytes() == weights
    forced = phi3ops("train", "training_config.max_steps=4", "training_config.save_steps=2",
                     "--root", str(project), "--out", str(project / "runs" / "cli"), "--force")
    retrained = json.loads(forced.stdout[forced.stdout.index("{"):])
    assert retrained["global_step"] == 4 and retrained["resumed_from"] is None
    assert not retrained["already_finished"]


def test_qlora_without_cuda_stops_at_once():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = phi3ops("train", "--pipeline", "pipelines/phi3-mini-qlora.yaml")
    assert result.returncode == 2
    assert "4-bit QLoRA (model.quantization) needs a CUDA GPU" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_template_without_markers_stops_before_any_stage(project):
    """A chat template phi3ops does not know, with assistant-only loss: exit 2 in seconds, the
    fix named, and nothing versioned, tracked or trained."""
    (project / "chatml.jinja").write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}")
    result = phi3ops("run", "--root", str(project), "model.chat_template=chatml.jinja",
                     cwd=project)
    assert result.returncode == 2, result.stderr
    assert "model.chat_template" in result.stderr and "assistant_only_loss" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project / "data").exists() and not (project / "mlruns.db").exists()
    assert not (project / "runs").exists()
