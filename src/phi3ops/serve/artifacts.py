"""What a registered model is made of: its code (chat_model_code.py, the MLflow pyfunc; and
chat_runtime.py, which it imports) and its artifacts, chat messages in, the reply out.

Artifacts: the LoRA adapter with its tokenizer, and, when the base model was built locally (the
tiny profile), the base weights too; a hub base is referenced by id in the model config and loaded
from the Hugging Face cache.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

MODEL_CODE = str(Path(__file__).with_name("chat_model_code.py"))  # logged as models-from-code
# Shipped in the model's code/; found, not imported (it imports torch).
RUNTIME_CODE = importlib.util.find_spec("phi3ops.model.chat_runtime").origin
INPUT_EXAMPLE = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}


def model_artifacts(adapter_dir: Path | None, base_dir: Path | None) -> dict[str, str]:
    """Adapter and/or local base weights; a merged model is only a base, a hub base is neither."""
    artifacts = {}
    if adapter_dir is not None:
        artifacts["adapter"] = str(adapter_dir)
    if base_dir is not None:
        artifacts["base_model"] = str(base_dir)
    return artifacts
