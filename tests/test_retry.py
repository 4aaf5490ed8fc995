"""The one retry layer: transient failures are tried again with backoff and then named; a
deterministic one fails at once; MLflow's client does not retry underneath it."""

import os

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import ErrorCode

from phi3ops.config import RetryPolicy
from phi3ops.errors import ConfigError, DataError, RegistryError
from phi3ops.retry import MLFLOW_CLIENT_RETRIES, is_transient, with_retries
from tests.conftest import free_port

QUICK = RetryPolicy(attempts=3, first_wait_s=0.01)


def mlflow_error(code: str) -> MlflowException:
    return MlflowException("the server said no", error_code=ErrorCode.Value(code))


@pytest.mark.parametrize(("error", "transient"), [
    (ConnectionRefusedError(111, "Connection refused"), True),
    (TimeoutError("timed out"), True),
    (mlflow_error("INTERNAL_ERROR"), True),  # a 500, also how a lost connection comes back
    (mlflow_error("TEMPORARILY_UNAVAILABLE"), True),  # 503
    (mlflow_error("REQUEST_LIMIT_EXCEEDED"), True),  # 429
    (mlflow_error("RESOURCE_DOES_NOT_EXIST"), False),  # 404
    (mlflow_error("INVALID_PARAMETER_VALUE"), False),  # 400
    (mlflow_error("PERMISSION_DENIED"), False),  # 403
    (FileNotFoundError(2, "No such file"), False),
    (PermissionError(13, "Permission denied"), False),
    (ConfigError("bad key"), False),
    (ValueError("a bug"), False),
])
def test_what_is_worth_trying_again(error, transient):
    assert is_transient(error) is transient


def test_a_transient_failure_is_tried_again_until_it_passes():
    calls = []

    def flaky():
        calls.append(os.environ.get(MLFLOW_CLIENT_RETRIES))
        if len(calls) < 3:
            raise ConnectionResetError(104, "Connection reset by peer")
        return "done"

    before = os.environ.get(MLFLOW_CLIENT_RETRIES)
    assert with_retries("reach it", flaky, QUICK) == "done"
    assert calls == ["0", "0", "0"], "MLflow's client does not retry inside the layer"
    assert os.environ.get(MLFLOW_CLIENT_RETRIES) == before, "and does again outside it"


def test_a_server_that_stays_down_is_named_after_the_attempts():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    calls = []

    def search():
        calls.append(1)
        return MlflowClient(url).search_experiments(max_results=1)

    with pytest.raises(RegistryError, match=r"could not list experiments after 3 attempts: "
                                            r".*Connection refused"):
        with_retries("list experiments", search, QUICK)
    assert len(calls) == 3
    with pytest.raises(DataError, match="could not push after 3 attempts"):
        with_retries("push", lambda: search(), QUICK, fails_as=DataError)


def test_a_deterministic_failure_is_raised_at_once_as_it_is(mlflow_server):
    calls = []

    def missing():
        calls.append(1)
        return MlflowClient(mlflow_server, registry_uri=mlflow_server).get_registered_model(
            "no-such-model")

    with pytest.raises(MlflowException) as raised:
        with_retries("read the model", missing, QUICK)
    assert raised.value.error_code == "RESOURCE_DOES_NOT_EXIST" and calls == [1]
    with pytest.raises(FileNotFoundError):
        with_retries("read the file", lambda: open("/nonexistent/phi3ops"), QUICK)
