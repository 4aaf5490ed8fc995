"""The registered model's MLflow pyfunc flavour: chat messages in, the assistant's reply out.

    mlflow.pyfunc.load_model("models:/phi3ops-chat@champion").predict(
        {"messages": [{"role": "user", "content": "What is the capital of France?"}]})

Artifacts: the LoRA adapter with its tokenizer, and, when the base model was built locally (the
tiny profile), the base weights too; a hub base is referenced by id in the model config and loaded
from the Hugging Face cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

MODEL_CODE = str(Path(__file__).with_name("chat_model_code.py"))  # logged as models-from-code
INPUT_EXAMPLE = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}


def to_conversations(model_input: Any) -> list[list[dict]]:
    """Accept what MLflow hands predict(): a DataFrame with a 'messages' column, or one dict."""
    if isinstance(model_input, dict):
        model_input = pd.DataFrame([model_input])
    if not isinstance(model_input, pd.DataFrame) or "messages" not in model_input.columns:
        raise ValueError("input must have a 'messages' column of chat turns")
    return [[{"role": t["role"], "content": t["content"]} for t in turns]
            for turns in model_input["messages"]]


class Phi3ChatModel(mlflow.pyfunc.PythonModel):
    """MLflow's entry (`mlflow.pyfunc.load_model`, `mlflow models serve`) to inference.ChatModel:
    the files load once, each conversation is answered greedily."""

    def load_context(self, context):
        from phi3ops.inference import ChatModel

        self.chat = ChatModel(context.artifacts.get("adapter"),
                              context.artifacts.get("base_model"), context.model_config or {})

    def predict(
        self, context, model_input: pd.DataFrame, params: dict | None = None,
    ) -> list[str]:
        params = params or {}
        return self.chat.answer(
            to_conversations(model_input),
            max_new_tokens=int(params.get("max_new_tokens", self.chat.max_new_tokens)),
            batch_size=int(params.get("batch_size", 8)),
        )


def model_artifacts(adapter_dir: Path | None, base_dir: Path | None) -> dict[str, str]:
    """Adapter and/or local base weights; a merged model is only a base, a hub base is neither."""
    artifacts = {}
    if adapter_dir is not None:
        artifacts["adapter"] = str(adapter_dir)
    if base_dir is not None:
        artifacts["base_model"] = str(base_dir)
    return artifacts
