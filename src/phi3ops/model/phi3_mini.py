"""microsoft/Phi-3-mini-4k-instruct's architecture, shipped with the project.

    phi3ops plan --pipeline pipelines/phi3-mini-lora.yaml     # sizes it without the weights

The values are those of the model's config.json on the hub, so the full-size model can be built
on the meta device (sizing) or with random weights (smoke tests, GPU benchmarks) where the 7.6 GB
of real weights cannot be downloaded.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Phi3Config, Phi3ForCausalLM

HUB_ID = "microsoft/Phi-3-mini-4k-instruct"
CONFIG = {
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32064,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "sliding_window": 2047,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
}
TOTAL_PARAMETERS = 3_821_079_552  # what the config above builds; a test keeps them in step


def phi3_mini_config(**overrides) -> Phi3Config:
    return Phi3Config(**{**CONFIG, **overrides})


def build_phi3_mini(device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16,
                    **overrides) -> Phi3ForCausalLM:
    """The full-size architecture: on 'meta' it holds no memory; elsewhere random weights."""
    config = phi3_mini_config(**overrides)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
