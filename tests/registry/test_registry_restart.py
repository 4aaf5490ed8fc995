"""Registration survives an MLflow server restart and never duplicates a version."""

import threading
import time

import pytest

from phi3ops.config import load_mlflow_config
from phi3ops.errors import RegistryError
from phi3ops.registry.client import Registry
from phi3ops.registry.store import Candidate, Lineage, register_adapter
from tests.conftest import REPO, free_port, start_mlflow, stop

pytestmark = pytest.mark.slow  # restarts a server and waits out the backoff
LINEAGE = Lineage(dataset_md5="abc.dir", data_git_rev="r1", config_hash="c1",
                  code_git_rev="r1", code_hash="h1", env_lock="l1",
                  pipeline="tiny-cpu", base_model="tiny-phi3")


def test_register_is_idempotent_across_a_restart(adapter, tmp_path, monkeypatch):
    home, port = tmp_path / "mlflow", free_port()
    home.mkdir()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    registry = Registry(load_mlflow_config(REPO / "mlflow.yaml").resolved(tmp_path))
    adapter_dir, base_dir = adapter
    server = start_mlflow(home, port)
    client = registry.client
    run_id = client.create_run(client.create_experiment("restart")).info.run_id

    def register(lineage=LINEAGE):
        return register_adapter(registry, run_id, Candidate(
            lineage, {"tuned_rougeL": 0.5}, adapter_dir, base_dir, max_new_tokens=16, card="card"))

    first = register()
    stop(server)
    result = {}
    worker = threading.Thread(target=lambda: result.update(v=register()))
    worker.start()  # MLflow is down: the first attempts fail and back off
    time.sleep(2)
    server = start_mlflow(home, port)
    worker.join(timeout=120)
    try:
        assert result["v"].version == first.version, "the retry found the existing version"
        versions = client.search_model_versions(f"name='{registry.model}'")
        assert [v.version for v in versions] == [first.version], [
            (v.version, v.tags, v.run_id, v.creation_timestamp) for v in versions]
        other = register(Lineage(**{**LINEAGE.__dict__, "config_hash": "c2"}))
        assert other.version != first.version
    finally:
        stop(server)
    # The server stays down: after mlflow.yaml's attempts, a clear error. The waits between them
    # (63 s with the defaults, which the restart above needed) are shortened from mlflow.yaml.
    retry = registry.config.retry
    assert (retry.attempts, retry.first_wait_s) == (7, 1.0)
    registry = Registry(registry.config.model_copy(  # the closure above sees this one
        update={"retry": retry.model_copy(update={"first_wait_s": 0.05})}))
    with pytest.raises(RegistryError, match=r"could not reach MLflow after 7 attempts: .*"
                                            r"Connection refused"):
        register()
