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

from phi3ops.errors import RegistryError

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
    """Loads base + adapter once; answers each conversation greedily."""

    def load_context(self, context):
        """MLflow's entry (`mlflow.pyfunc.load_model`, `mlflow models serve`)."""
        self.load_files(context.artifacts.get("adapter"), context.artifacts.get("base_model"),
                        context.model_config or {})

    def load_files(self, adapter_dir: str | None, base_dir: str | None, config: dict) -> None:
        """The one way a registered model is loaded, by MLflow and by phi3ops' trusted loader:
        weights from safetensors only, tokenizer and model without remote code, the adapter with
        phi3ops' own code. A merged model has no adapter; a hub base has no base_dir."""
        from peft.utils import SAFETENSORS_WEIGHTS_NAME
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from phi3ops import adapters

        weights = (SAFETENSORS_WEIGHTS_NAME, adapters.LORALIB_WEIGHTS)  # peft's, loralib's
        if adapter_dir is not None and not any((Path(adapter_dir) / w).is_file() for w in weights):
            # Without them peft would fall back to a pickled adapter_model.bin.
            raise RegistryError(f"{adapter_dir}: no adapter weights in safetensors "
                                f"({' or '.join(weights)}); refusing to load it")
        base = base_dir or config["base_model"]
        # Training saves its tokenizer (and chat template) beside the adapter; else the base's.
        own = adapter_dir is not None and (Path(adapter_dir) / "tokenizer_config.json").is_file()
        self.tokenizer = AutoTokenizer.from_pretrained(adapter_dir if own else base,
                                                       trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            base, revision=config.get("base_revision"), trust_remote_code=False,
            use_safetensors=True, dtype="auto",
        )
        self.model = adapters.load(model, adapter_dir) if adapter_dir else model
        self.model.eval()
        self.max_new_tokens = int(config.get("max_new_tokens", 64))

    def predict(
        self, context, model_input: pd.DataFrame, params: dict | None = None,
    ) -> list[str]:
        from phi3ops.inference import generate_replies

        params = params or {}
        return generate_replies(
            self.model, self.tokenizer, to_conversations(model_input),
            max_new_tokens=int(params.get("max_new_tokens", self.max_new_tokens)),
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
