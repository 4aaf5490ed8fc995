"""Wait a bounded time for the MLflow server, before a command does any heavy work.

    phi3ops run --mlflow-timeout 60     # the default; MLFLOW_TRACKING_URI names the server

MLflow's client retries every request seven times with growing backoff, and a run makes many
requests: with the server down, `phi3ops run` took five minutes and printed hundreds of lines
before a raw MlflowException. This probe turns the client's own retries off, asks once per
attempt, logs one line per retry, and ends with one paragraph that names the URI and the fix.
"""

from __future__ import annotations

import logging
import re
import time

import tenacity
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException

from phi3ops.errors import RegistryError, safe_uri
from phi3ops.retry import mlflow_client_retries_off

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 60.0  # covers an `mlflow server` restart (10-30 s on a 2-core machine)
REQUEST_TIMEOUT_S = 5  # one probe; a server that is up answers in well under a second
MAX_DELAY_S = 10.0


def reason(error: Exception) -> str:
    """The cause in a few words ('Connection refused'), not urllib3's nested reprs."""
    text = str(error)
    for pattern in (r"\[Errno -?\d+\] ([^\"'()]+)", r"(error code \d+)", r"(timed out)"):
        if m := re.search(pattern, text):
            return m.group(1).strip()
    return text[:200]


def unanswered(error: BaseException) -> bool:
    """No answer (refused, timed out): worth waiting for. An answer with an error (a
    RestException: bad credentials, not a tracking server) is not."""
    return isinstance(error, MlflowException) and not isinstance(error, RestException)


def wait_for_mlflow(tracking_uri: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Return once an HTTP tracking server answers; a RegistryError after `timeout_s` seconds.
    A local store (sqlite:///..., a directory) has no server to wait for."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    uri = safe_uri(tracking_uri)
    deadline = time.monotonic() + timeout_s

    def left() -> float:
        return deadline - time.monotonic()

    def probe() -> None:
        with mlflow_client_retries_off(max(1, min(REQUEST_TIMEOUT_S, int(left())))):
            MlflowClient(tracking_uri).search_experiments(max_results=1)

    def say_retrying(state: tenacity.RetryCallState) -> None:
        log.warning("MLflow at %s not reachable (%s); retry %d in %.0f s (%.0f s left)", uri,
                    reason(state.outcome.exception()), state.attempt_number,
                    state.next_action.sleep, left())

    backoff = tenacity.wait_exponential(multiplier=1, max=MAX_DELAY_S)
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(unanswered),
        stop=tenacity.stop_after_delay(timeout_s),
        wait=lambda state: max(0.0, min(backoff(state), left())),  # never past the deadline
        before_sleep=say_retrying, reraise=True)
    try:
        retrying(probe)
    except RestException as e:  # it answered, with an error of its own: waiting won't help
        raise RegistryError(f"MLflow at {uri} answered with an error: {e.message}. Check "
                            "MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN, "
                            "and that the URI is the tracking server's.") from None
    except MlflowException as e:
        raise RegistryError(
            f"MLflow at {uri} is not reachable ({reason(e)}); waited {timeout_s:g} s, "
            f"{retrying.statistics['attempt_number']} attempts. Start that server, or point "
            "MLFLOW_TRACKING_URI (or tracking_uri in mlflow.yaml) at one that runs; unset "
            "MLFLOW_TRACKING_URI to track to the project's own mlruns.db. A server that is "
            "starting may need longer: --mlflow-timeout SECONDS.") from None
