"""`phi3ops chat`: a registered model's answer in a few seconds, most of them imports.

    phi3ops chat "What is the capital of France?"          # @champion; or --alias, --version

Importing torch and transformers and importing MLflow (to resolve, download and check the
version: trusted_load.py) each take seconds, one after the other. So a helper process does the
registry work while this one imports the model libraries; the verified files then load here.
The process leaves without the interpreter's teardown, which takes about two seconds more with
these libraries loaded and has nothing left to do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from phi3ops.errors import RegistryError


def load(tracking_uri: str, uri: str, mlflow_timeout_s: float):
    """chat_runtime.ChatModel behind a model URI, from files the helper verified once the MLflow
    server answered (within `mlflow_timeout_s`)."""
    with tempfile.TemporaryDirectory(prefix="phi3ops-model-", ignore_cleanup_errors=True) as tmp:
        helper = subprocess.Popen(  # the URI may hold credentials: environment, not argv
            [sys.executable, "-m", "phi3ops.registry.trusted_load", uri, tmp,
             str(mlflow_timeout_s)],
            env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
            stdout=subprocess.PIPE, text=True)  # its stderr: "waiting for MLflow" lines
        from phi3ops.model.inference import ChatModel  # meanwhile: torch, transformers, peft

        out, _ = helper.communicate()
        lines = out.strip().splitlines()
        fetched = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
        if "error" in fetched:
            raise RegistryError(fetched["error"])
        if helper.returncode != 0 or not fetched:
            raise RuntimeError(f"fetching {uri} failed (exit {helper.returncode}); see above")
        return ChatModel(fetched["adapter_dir"], fetched["base_dir"], fetched["config"])


def leave(code: int = 0) -> None:
    """Exit now: output flushed, temporary files gone, nothing else to finish."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
