"""The `phi3ops` command as a user runs it: clear errors, no stack traces."""

import os
import subprocess
import sys

from tests.conftest import REPO


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
