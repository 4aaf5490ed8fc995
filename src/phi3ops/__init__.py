"""phi3ops: keep a Phi-3 chat model LoRA fine-tuned on a team's own data.

Stages as subpackages (data, model, train, evaluation, registry, serve); pipeline.Retrain runs
them in order through a Steps object; the project's flows/retrain.py runs it as a Prefect flow.
"""

__version__ = "0.1.0"
