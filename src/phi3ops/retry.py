"""One retry layer for work that crosses the network: the MLflow server, a DVC remote.

    retry.with_retries("register phi3ops-chat", register_once, mcfg.retry)

A transient failure (connection refused or reset, a timeout, a server's 5xx or 429) is tried
again with exponential backoff, `policy.attempts` tries in all (mlflow.yaml's `retry`), then
becomes one clear error; a deterministic one (a missing resource, a bad request, a refused
credential, a file that is not there, any phi3ops error) is raised at once, since trying again
would only repeat it. MLflow's client retries each request itself (7 times, backoff up to a
minute); inside this layer those are off, so the waits do not multiply.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import tenacity

from phi3ops.config import RetryPolicy
from phi3ops.errors import Phi3opsError, RegistryError

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_RETRY = RetryPolicy()  # mlflow.yaml's defaults, where no config is at hand
# Errors of the file system, not of the network: the same call fails the same way again.
NOT_TRANSIENT_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                           NotADirectoryError)
MLFLOW_CLIENT_RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"  # read by MLflow at each request
MLFLOW_REQUEST_TIMEOUT = "MLFLOW_HTTP_REQUEST_TIMEOUT"


def is_transient(error: BaseException) -> bool:
    """Might the same call succeed in a moment? Network errors and a server's 5xx or 429: yes.
    A 4xx reply (MLflow's RESOURCE_DOES_NOT_EXIST, INVALID_PARAMETER_VALUE, PERMISSION_DENIED),
    a missing file, a phi3ops error: no."""
    if isinstance(error, (Phi3opsError, *NOT_TRANSIENT_OS_ERRORS)):
        return False
    status = getattr(error, "get_http_status_code", None)  # an MlflowException, by its code
    if callable(status):
        return status() >= 500 or status() == 429
    return isinstance(error, OSError)  # ConnectionError, TimeoutError, socket and HTTP errors


@contextmanager
def mlflow_client_retries_off(request_timeout_s: int | None = None) -> Iterator[None]:
    """MLflow's own request retries off (and, given, a shorter request timeout) for the calls
    inside. Environment variables are what MLflow reads, so this is process-wide while it lasts:
    a concurrent request elsewhere also goes untried twice."""
    wanted = {MLFLOW_CLIENT_RETRIES: "0"}
    if request_timeout_s is not None:
        wanted[MLFLOW_REQUEST_TIMEOUT] = str(request_timeout_s)
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def with_retries(what: str, call: Callable[[], T], policy: RetryPolicy = DEFAULT_RETRY,
                 fails_as: type[Phi3opsError] = RegistryError) -> T:
    """`call()`, tried again on a transient error with exponential backoff from
    `policy.first_wait_s`; after `policy.attempts` tries, a `fails_as` error that says what
    could not be done. A deterministic error is raised as it is, after one try. `call` must be
    idempotent: an attempt whose reply was lost may have done its work."""

    def say_retrying(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception()
        log.warning("%s failed (%s); retrying in %.0f s", what, type(error).__name__,
                    state.next_action.sleep)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient),
        stop=tenacity.stop_after_attempt(policy.attempts),
        wait=tenacity.wait_exponential(multiplier=policy.first_wait_s, min=policy.first_wait_s),
        before_sleep=say_retrying, reraise=True)
    try:
        with mlflow_client_retries_off():
            return retrying(call)
    except Exception as e:
        if not is_transient(e):
            raise
        raise fails_as(f"could not {what} after {policy.attempts} attempts: {e}") from e
