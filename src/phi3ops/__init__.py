"""phi3ops: keep a Phi-3 chat model LoRA fine-tuned on a team's own data.

Stages are plain functions (data, preprocess, train, evaluation, registry) that take typed config
slices and paths; flows/retrain.py wires them into a Prefect flow.
"""

__version__ = "0.1.0"
