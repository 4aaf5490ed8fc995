"""MLflow models-from-code entry point: the registered model is this file, chat_runtime.py
(shipped beside it, MLflow `code_paths`) and its artifacts, never a pickled object, and it
imports nothing of phi3ops: an environment built from the model's requirements.txt loads it.

    mlflow.pyfunc.load_model("models:/phi3ops-chat@champion").predict(
        {"messages": [{"role": "user", "content": "What is the capital of France?"}]})
"""

from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.models import set_model

try:  # a logged model: MLflow puts its code/ directory, which holds chat_runtime.py, on sys.path
    from chat_runtime import ChatModel
except ImportError:  # registering from a phi3ops checkout: the same file, in the package
    from phi3ops.model.chat_runtime import ChatModel


def to_conversations(model_input: Any) -> list[list[dict]]:
    """Accept what MLflow hands predict(): a DataFrame with a 'messages' column, or one dict."""
    if isinstance(model_input, dict):
        model_input = pd.DataFrame([model_input])
    if not isinstance(model_input, pd.DataFrame) or "messages" not in model_input.columns:
        raise ValueError("input must have a 'messages' column of chat turns")
    return [[{"role": t["role"], "content": t["content"]} for t in turns]
            for turns in model_input["messages"]]


class Phi3ChatModel(mlflow.pyfunc.PythonModel):
    """Loads base + adapter once (chat_runtime.ChatModel); answers each conversation greedily."""

    def load_context(self, context):
        self.chat = ChatModel(context.artifacts.get("adapter"),
                              context.artifacts.get("base_model"), context.model_config or {})

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None,
                ) -> list[str]:
        params = params or {}
        return self.chat.answer(
            to_conversations(model_input),
            max_new_tokens=int(params.get("max_new_tokens", self.chat.max_new_tokens)),
            batch_size=int(params.get("batch_size", 8)),
        )


set_model(Phi3ChatModel())
