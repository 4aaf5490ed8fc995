"""MLflow models-from-code entry point: the registered model is this file plus its artifacts,
not a pickled object, so loading it never unpickles code."""

from mlflow.models import set_model

from phi3ops.serving import Phi3ChatModel

set_model(Phi3ChatModel())
